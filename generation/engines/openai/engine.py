"""`OpenAIEngine`: an OpenAI-compatible server behind the Engine interface, tying the parts together:
the dialect (dialect.py) writes each request's body, the transport (transport.py) sends it and keeps
`concurrency` in flight, the reader (reader.py) turns the answer into a Completion; here are the tries
and the server's own token counts.

- Loading checks first what `transport.preflight` checks (the server, its listing, the model), then
  decides the kind of server (dialect.server_kind), loads the tokenizer (completions, or --tokenizer)
  and the context length (dialect.py).
- Tries: a TRANSIENT outcome (reader.py) is tried again, up to `max_retries` times; each retry waits
  what the server asks (reader.retry_wait), else exponential back-off (0.5 s doubling, capped at
  MAX_BACKOFF_S, times a jitter of 0.5-1.5); never past `max_retry_time` seconds from the first try.
- Chat API without --tokenizer: no local tokenizer is loaded; documents are cut by the byte bound of
  prompting.py and token counts come from the response's `usage`, or from vLLM's POST /tokenize when
  the server has it (`count_messages`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import Any, Callable, Iterable

import aiohttp
import orjson

from generation.engines.base import Completion, Engine, EngineConfig, EngineError, Request, failed
from generation.engines.openai.dialect import (Dialect, added_bos, answer_cap, bos_to_strip, local_context_length,
                                               served_context, server_kind)
from generation.engines.openai.reader import RETRY_STATUS, outcome, retry_wait, too_long
from generation.engines.openai.transport import Endpoint, Transport, check_served

log = logging.getLogger("bft.engine.openai")
MAX_BACKOFF_S = 60.0


class OpenAIEngine(Engine):
    name = "openai"
    continuous = True       # `stream` keeps `concurrency` requests in flight; each has its own seed

    def __init__(self, config: EngineConfig):
        self.model = config.model
        self.endpoint = Endpoint.of(config)
        self.max_retries, self.max_retry_time = config.max_retries, config.max_retry_time
        self.transport = Transport(self.endpoint, config.concurrency)
        self.tokenizer = None
        self.count_messages = None
        self._counter = None
        try:  # whatever fails here closes the session and the loop first (no "Unclosed client session")
            if config.offline:  # batch files for `vllm run-batch`: no server to ask
                served, server = None, "vllm" if config.server == "auto" else config.server
            else:
                models = self.transport.run(self.transport.models())
                check_served(models, self.model, self.endpoint.base_url, self.endpoint.shown_url)
                served = served_context(models, self.model)
                server = server_kind(config.server, self.endpoint.base_url, models, self.model)
            log.info("%s: %s server", self.endpoint.shown_url, server)
            if config.api == "completions" or config.tokenizer:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
            self.dialect = Dialect(self.model, config.api, server, bos_to_strip(server, self.tokenizer))
            self.max_model_len = (config.max_model_len or served
                                  or local_context_length(config.tokenizer or config.model))
            self.count_messages = (self._server_counter() if config.api == "chat" and self.tokenizer is None
                                   and server == "vllm" and not config.offline else None)
            if not self.max_model_len:
                raise EngineError(f"{self.endpoint.shown_url}/models lists {self.model!r} without a max_model_len and "
                                  "it is no local model folder: give --max-model-len (the served context length)")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the HTTP session and its event loop."""
        if getattr(self, "_counter", None) is not None:
            self._counter.close()
            self._counter = None
        self.transport.close()

    def logprob_problem(self) -> str | None:
        return self.dialect.logprob_problem()

    # ---- the server's own token counts (chat API without a tokenizer) ------------------------------
    def _server_counter(self):
        """`count_messages` when the server counts chat messages for us (vLLM's POST /tokenize at the
        server's root, TokenizeChatRequest: the same template and prefill flags as the chat request),
        else None (OpenAI's API and most gateways have no such endpoint: the byte bound stays)."""
        import httpx

        base_url = self.endpoint.base_url
        root = base_url[:-3] if base_url.endswith("/v1") else base_url
        self._tokenize_url = root + "/tokenize"
        self._counter = httpx.Client(headers=self.endpoint.headers, timeout=min(self.endpoint.timeout_s, 30.0),
                                     trust_env=True)
        probe = self._count_one([{"role": "user", "content": "hi"}])
        if probe is None:
            self._counter.close()
            self._counter = None
            return None
        log.info("%s/tokenize counts prompts: documents are cut by the server's count, not the byte bound",
                 self.endpoint.shown_url)
        return self._count_many

    def _count_one(self, msgs: list[dict]) -> int | None:
        body: dict = {"model": self.model, "messages": msgs}
        if msgs and msgs[-1]["role"] == "assistant":
            body.update(continue_final_message=True, add_generation_prompt=False)
        try:
            resp = self._counter.post(self._tokenize_url, content=orjson.dumps(body),
                                      headers={"Content-Type": "application/json"})
            count = resp.json().get("count") if resp.status_code == 200 else None
        except Exception:  # httpx.HTTPError, a body that is not JSON or not an object
            return None
        return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None

    def _count_many(self, messages_list: list[list[dict]]) -> list[int] | None:
        """The server's token count of each prompt (chat messages), or None when it could not count one."""
        out = []
        for msgs in messages_list:
            n = self._count_one(msgs)
            if n is None:
                return None
            out.append(n)
        return out

    # ---- dispatch -----------------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[Completion]:
        return self.generate_through_stream(requests)

    def stream(self, items: Iterable[tuple[Any, Request]], emit: Callable[[Any, Completion], None],
               chunk: int = 512) -> None:
        """`concurrency` requests in flight (Transport.stream; `chunk` is not used: no barrier)."""
        self.transport.stream(items, self._one, emit)

    async def _post(self, r: Request) -> tuple[int, Any, bytes, int | None]:
        """POST the request (one try, bounded as a whole by request_timeout, its answer by answer_cap);
        a server that refuses `add_special_tokens` gets it again without, and so does every later request."""
        path, body = self.dialect.body(r)
        cap = answer_cap(r)
        status, headers, content, over = await self.transport.post(path, body, cap)
        if status in (400, 422) and "add_special_tokens" in body and b"add_special_tokens" in content:
            self.dialect = dataclasses.replace(self.dialect, strip_bos=added_bos(self.tokenizer))
            path, body = self.dialect.body(r)
            status, headers, content, over = await self.transport.post(path, body, cap)
        return status, headers, content, over

    async def _one(self, r: Request) -> Completion:
        start, error = time.monotonic(), ""
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                status, headers, content, over = await self._post(r)
                if over is not None and status == 200:   # a final answer, too long to be one
                    return too_long(over, r)
                if status in RETRY_STATUS:
                    error = f"HTTP {status}: {content[:500].decode('utf-8', 'replace')[:200]}"
                    wait = retry_wait(headers, status)
                else:
                    return outcome(status, headers, content, r, self.dialect.api)
            except orjson.JSONEncodeError as e:  # text JSON cannot carry (a lone surrogate): no retry helps
                return failed(f"the request cannot be encoded as JSON: {e}")
            except asyncio.TimeoutError:
                error = f"ReadTimeout: no whole answer within --request-timeout {self.endpoint.timeout_s:g} s"
            except (aiohttp.ClientError, OSError) as e:
                error = f"{type(e).__name__}: {self.endpoint.redacted(str(e))}"
            if attempt == self.max_retries:
                break
            delay = wait if wait is not None else min(MAX_BACKOFF_S, 0.5 * 2 ** attempt) * (0.5 + random.random())
            if time.monotonic() + delay - start > self.max_retry_time:
                return failed(f"gave up after {attempt} retries (--max-retry-time {self.max_retry_time:g} s "
                              f"would pass): {error}")
            log.warning("request failed (%s); retry %d/%d in %.1fs", error, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
        return failed(f"gave up after {self.max_retries} retries: {error}")
