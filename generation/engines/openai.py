"""Any OpenAI-compatible server (vllm serve, SGLang, transformers serve, hosted APIs).

`/v1/completions` with the rendered prompt (default: the chat template is applied here, so every
server sees the same text), or `/v1/chat/completions` with the messages (`api="chat"`: the server
applies its template; needed for hosted chat-only APIs). Requests run concurrently up to
`concurrency`; 429, 5xx, timeouts and connection errors are retried with exponential backoff and
jitter. The API key comes from the environment variable named by `api_key_env` (default
OPENAI_API_KEY) and is never logged. The logprob score mode needs a server that returns logprobs
(vllm serve, SGLang, OpenAI); `transformers serve` does not, and the engine says so.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import random

import httpx
from transformers import AutoTokenizer

from generation.engines.base import Completion, Engine, Request, model_context_length

log = logging.getLogger("bft.engine.openai")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, tokenizer: str | None = None, api: str = "completions",
                 concurrency: int = 16, max_retries: int = 5, timeout_s: float = 600.0, api_key_env: str = "OPENAI_API_KEY",
                 max_model_len: int | None = None, served_model: str | None = None, **_):
        if not base_url:
            raise ValueError("--engine openai needs --base-url (e.g. http://localhost:8000/v1)")
        if api not in ("completions", "chat"):
            raise ValueError("--api must be completions or chat")
        self.model = model
        self.served_model = served_model or model
        self.base_url = base_url.rstrip("/")
        self.api = api
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.max_model_len = max_model_len or _local_context_length(tokenizer or model)
        self.concurrency, self.max_retries, self.timeout_s = concurrency, max_retries, timeout_s
        key = os.environ.get(api_key_env)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    def generate(self, requests: list[Request]) -> list[Completion]:
        return asyncio.run(self._all(requests))

    async def _all(self, requests: list[Request]) -> list[Completion]:
        sem = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout_s, headers=self._headers, limits=limits) as client:
            async def one(r: Request) -> Completion:
                async with sem:
                    return await self._one(client, r)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    def _body(self, r: Request) -> tuple[str, dict]:
        body: dict = {"model": self.served_model, "max_tokens": 1 if r.digit_probs else r.max_new_tokens,
                      "temperature": r.temperature, "top_p": r.top_p}
        if r.seed is not None:
            body["seed"] = r.seed
        if r.stop:
            body["stop"] = r.stop
        if self.api == "chat":
            body["messages"] = r.messages
            if r.digit_probs:
                body.update(logprobs=True, top_logprobs=20, temperature=0.0)
            return "/chat/completions", body
        body["prompt"] = r.prompt
        if r.digit_probs:
            body.update(logprobs=20, temperature=0.0)
        return "/completions", body

    async def _one(self, client: httpx.AsyncClient, r: Request) -> Completion:
        path, body = self._body(r)
        error = ""
        for attempt in range(self.max_retries + 1):
            try:
                resp = await client.post(self.base_url + path, json=body)
                if resp.status_code in RETRY_STATUS:
                    error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                elif resp.status_code >= 400:
                    return Completion("", None, None, "error", error=f"HTTP {resp.status_code}: {resp.text[:500]}")
                else:
                    return self._parse(resp.json(), r)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                delay = min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random())
                log.warning("request failed (%s); retry %d/%d in %.1fs", error, attempt + 1, self.max_retries, delay)
                await asyncio.sleep(delay)
        return Completion("", None, None, "error", error=f"gave up after {self.max_retries} retries: {error}")

    def _parse(self, data: dict, r: Request) -> Completion:
        choice = (data.get("choices") or [{}])[0]
        usage = data.get("usage") or {}
        text = choice.get("text") if self.api == "completions" else (choice.get("message") or {}).get("content")
        finish = choice.get("finish_reason") or "stop"
        finish = "length" if finish == "length" else "stop"
        comp = Completion(text or "", usage.get("prompt_tokens"), usage.get("completion_tokens"), finish)
        if r.digit_probs:
            top = _top_logprobs(choice, self.api)
            if top is None:
                return Completion("", comp.prompt_tokens, comp.output_tokens, "error",
                                  error="the server returned no logprobs: the logprob score mode needs a server "
                                        "that supports them (vllm serve, SGLang, OpenAI), not transformers serve")
            probs = {d: 0.0 for d in "12345"}
            for token, logprob in top.items():
                t = token.strip().lstrip("▁Ġ")
                if t in probs:
                    probs[t] += math.exp(logprob)
            comp.digit_probs = probs
        return comp


def _local_context_length(model: str, default: int = 4096) -> int:
    """The context length from a local model folder's config.json; `default` for a remote model."""
    import json

    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return default
    from transformers import PretrainedConfig

    with open(path) as f:
        return model_context_length(PretrainedConfig(**json.load(f)), default)


def _top_logprobs(choice: dict, api: str) -> dict[str, float] | None:
    lp = choice.get("logprobs")
    if not lp:
        return None
    if api == "completions":
        tops = lp.get("top_logprobs") or []
        return dict(tops[0]) if tops and tops[0] else None
    content = lp.get("content") or []
    if not content:
        return None
    return {t["token"]: t["logprob"] for t in content[0].get("top_logprobs") or []}
