"""A simulated OpenAI-compatible server with continuous batching, to measure how busy a client keeps it.

The server serves at most `capacity` (C) sequences at once; further requests wait in a FIFO queue. A
request holds its slot for output_tokens * ms_per_token (default 10 ms per token, one decoding step
of a busy vLLM replica), then is answered. output_tokens is drawn from a log-normal law of median 60
and sigma 1.0 (mean ~99 before the cuts), rounded, cut to [1, 2048] and to the request's max_tokens,
and is deterministic per prompt: the random generator is seeded with a hash of the prompt text (of the
messages on the chat API), so two runs of the same requests ask the same work of the server.

Endpoints (vLLM's shapes):
    GET  /v1/models             the served model, with `max_model_len`
    POST /v1/completions        choices[0].text; POST /v1/chat/completions: choices[0].message.content
                                (output_tokens words; finish_reason "length" when cut by max_tokens,
                                else "stop"; usage.prompt_tokens ~ characters // 4, completion_tokens)
    GET  /stats                 what was served since the start or the last POST /reset (below)
    POST /reset                 forget the requests served so far

For every request the server records its arrival (its handler entered), the start of its service (a slot
given) and its end. /stats reports, over the requests recorded:
    utilization         busy slot-seconds / (C x (last finish - first arrival))
    window_utilization  the same, counted only between the first and the LAST ARRIVAL: while the client
                        still had requests to send (after the last arrival the server drains, which no
                        client can speed up)
    ideal_utilization   the utilization the same services would give with a client that sent every
                        request at once (all queued at the first arrival, served FIFO in arrival order):
                        the ceiling of `utilization` for this request set, below 1 because of the drain
    span_ratio          the span of that schedule (`ideal_span_s`, the best possible: every request
                        queued at the first arrival) / the span served (`span_s`, first arrival to last
                        finish); 1.0 when no slot ever waited for the client (= utilization / ideal)
and the raw figures (busy_slot_s, first_arrival, last_arrival, last_finish, max_queue, mean_wait_s).

    .venv/bin/python -m benchmarks.serving_sim --capacity 256 --ms-per-token 10 --model NAME [--port 8000]

prints `PORT <n>` on its first stdout line once it listens (port 0, the default, takes a free one);
runs on aiohttp, on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import heapq
import json
import math
import os
import random
import sys
import time

from aiohttp import web

MEDIAN_TOKENS = 60
SIGMA = 1.0
MAX_TOKENS = 2048
# The words of an answer: an instruction-like sentence, repeated as far as the drawn length needs.
WORDS = ("Write a short explanation of how this part of the library behaves, what it returns and which "
         "errors it raises, for a reader who knows Python but has not used the module before.").split()


def output_tokens(key: str, max_tokens: int | None) -> tuple[int, bool]:
    """(tokens to generate, whether max_tokens cut them) for a request whose prompt (or messages) is `key`."""
    seed = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    natural = min(MAX_TOKENS, max(1, round(random.Random(seed).lognormvariate(math.log(MEDIAN_TOKENS), SIGMA))))
    if max_tokens is not None and 0 < max_tokens < natural:
        return max_tokens, True
    return natural, False


class Slots:
    """C slots handed out in arrival order (a FIFO of waiters, whatever the event loop's fairness)."""

    def __init__(self, capacity: int):
        self.capacity, self.busy = capacity, 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self) -> None:
        if self.busy < self.capacity and not self.waiters:
            self.busy += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        await fut  # the slot is handed over by release(); busy is unchanged

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.busy -= 1


class Simulator:
    def __init__(self, capacity: int, ms_per_token: float, model: str, max_model_len: int):
        self.capacity, self.s_per_token = capacity, ms_per_token / 1000.0
        self.model, self.max_model_len = model, max_model_len
        self.slots = Slots(capacity)
        self.reset()

    def reset(self) -> None:
        self.records: list[tuple[float, float, float]] = []  # (arrival, start, end), perf_counter seconds
        self.max_queue = 0

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "serving_sim", "root": self.model,
             "parent": None, "max_model_len": self.max_model_len}]})

    async def completions(self, request: web.Request) -> web.Response:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.Response:
        arrival = time.perf_counter()
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
        if chat:
            messages = body.get("messages") or []
            key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            prompt_chars = sum(len(m.get("content") or "") for m in messages if isinstance(m, dict))
        else:
            prompt = body.get("prompt") or ""
            key = prompt if isinstance(prompt, str) else json.dumps(prompt)
            prompt_chars = len(key)
        n, cut = output_tokens(key, body.get("max_tokens"))
        self.max_queue = max(self.max_queue, len(self.slots.waiters) + 1 if self.slots.busy >= self.capacity else 0)
        await self.slots.acquire()
        start = time.perf_counter()
        try:
            if self.s_per_token > 0:
                await asyncio.sleep(n * self.s_per_token)
        finally:
            self.slots.release()
        end = time.perf_counter()
        self.records.append((arrival, start, end))
        text = " ".join(WORDS[i % len(WORDS)] for i in range(n))
        finish = "length" if cut else "stop"
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return web.json_response({
            "id": f"cmpl-{len(self.records)}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": n,
                      "total_tokens": prompt_chars // 4 + n}})

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response(summarize(self.records, self.capacity, self.max_queue))

    async def reset_handler(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.add_routes([web.get("/v1/models", self.models), web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat), web.get("/stats", self.stats),
                        web.post("/reset", self.reset_handler)])
        return app


def summarize(records: list[tuple[float, float, float]], capacity: int, max_queue: int = 0) -> dict:
    """The figures of /stats (see the module docstring) for (arrival, start, end) records."""
    if not records:
        return {"capacity": capacity, "requests": 0}
    first_arrival = min(r[0] for r in records)
    last_arrival = max(r[0] for r in records)
    last_finish = max(r[2] for r in records)
    busy = sum(e - s for _, s, e in records)
    window = last_arrival - first_arrival
    in_window = sum(max(0.0, min(e, last_arrival) - max(s, first_arrival)) for _, s, e in records)
    # a client that sends everything at once: FIFO in arrival order onto C slots from the first arrival
    free = [0.0] * min(capacity, len(records))
    for _, s, e in sorted(records):
        heapq.heapreplace(free, free[0] + (e - s))
    span = last_finish - first_arrival
    return {"capacity": capacity, "requests": len(records), "busy_slot_s": busy,
            "first_arrival": first_arrival, "last_arrival": last_arrival, "last_finish": last_finish,
            "span_s": span, "ideal_span_s": max(free), "span_ratio": max(free) / span if span > 0 else None,
            "utilization": busy / (capacity * span) if span > 0 else None,
            "window_s": window, "window_utilization": in_window / (capacity * window) if window > 0 else None,
            "ideal_utilization": busy / (capacity * max(free)) if max(free) > 0 else None,
            "max_queue": max_queue, "mean_wait_s": sum(s - a for a, s, _ in records) / len(records)}


async def serve(sim: Simulator, port: int) -> None:
    runner = web.AppRunner(sim.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capacity", type=int, default=256, help="sequences served at once (C)")
    ap.add_argument("--ms-per-token", type=float, default=10.0)
    ap.add_argument("--model", default="sim", help="the served model name")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cpu", type=int, help="pin the server to this CPU")
    args = ap.parse_args()
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    sim = Simulator(args.capacity, args.ms_per_token, args.model, args.max_model_len)
    try:
        asyncio.run(serve(sim, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
