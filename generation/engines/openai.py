"""Any OpenAI-compatible server (vllm serve, SGLang, transformers serve, hosted APIs).

`/v1/completions` with the rendered prompt (default: the chat template is applied here, so every
server sees the same text), or `/v1/chat/completions` with the messages (`api="chat"`: the server
applies its template; needed for hosted chat-only APIs).

- BOS: servers tokenize a completions prompt WITH special tokens (vLLM: `add_special_tokens` defaults
  to true), and the chat template already wrote BOS, so the body says `add_special_tokens: false`
  (vLLM's and SGLang's parameter): the server sees exactly the tokens counted here. Taking the BOS
  text off the prompt instead is not exact: a sentencepiece that prepends "▁" to the first text then
  tokenizes the start differently. A server that refuses the parameter (transformers serve answers 422
  "Unexpected fields") gets, from then on, the prompt without its leading BOS text when the tokenizer
  adds BOS itself: one BOS again, the first token possibly tokenized differently.
- Chat API without --tokenizer: no local tokenizer is loaded. The context length is --max-model-len,
  else the server's model listing (GET /models, `max_model_len` as vLLM returns it), else the local
  model folder's config.json, else an error; documents are cut by the byte bound of prompting.py and
  token counts come from the response's `usage`.
- Logprob score mode: the prompt ends where the digit token begins (prompting.score_prompt; it needs a
  tokenizer); on the chat API the assistant turn is prefilled (`continue_final_message`, vLLM's
  parameter) and the first generated position that is not whitespace is read, as a server may strip
  the prefill's trailing space.
- Failures: 408/409/429/5xx, timeouts (`request_timeout` per request) and connection errors are retried
  `max_retries` times, waiting `Retry-After` when a 429/503 gives it (capped at MAX_RETRY_AFTER_S),
  else exponential backoff with jitter. Other 4xx, a body that is not JSON, a 200 without a usable
  choice, and any finish reason other than stop/length (content_filter, abort, ...) become error rows.
- Requests run concurrently up to `concurrency` on one event loop and one HTTP client, kept for the
  engine's life and closed by `close()`. The API key comes from the environment variable named by
  `api_key_env` (default OPENAI_API_KEY) and is never logged.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import time

import httpx

from generation.engines.base import (Completion, Engine, EngineConfig, EngineError, Request, failed, finished,
                                     model_context_length)

log = logging.getLogger("bft.engine.openai")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 300.0


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, config: EngineConfig):
        self.model = config.model
        self.base_url = config.base_url.rstrip("/")
        self.api = config.api
        self.concurrency, self.max_retries = config.concurrency, config.max_retries
        self.timeout_s = config.request_timeout
        key = os.environ.get(config.api_key_env)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.tokenizer = None
        if config.api == "completions" or config.tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.max_model_len = config.max_model_len or self._server_context_length() or _local_context_length(
            config.tokenizer or config.model)
        if not self.max_model_len:
            raise EngineError(f"{self.base_url}/models gives no max_model_len for {self.model!r} and it is no local "
                              "model folder: give --max-model-len (the served context length)")
        self._strip_bos = None  # set once a server refuses add_special_tokens: the BOS text to take off
        self._loop = asyncio.new_event_loop()
        self._client: httpx.AsyncClient | None = None

    def _server_context_length(self) -> int | None:
        """`max_model_len` of the served model in GET /models (vLLM lists it), else None."""
        try:
            resp = httpx.get(self.base_url + "/models", headers=self._headers, timeout=min(self.timeout_s, 30.0))
            models = resp.json().get("data") or [] if resp.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        for m in models:
            if isinstance(m, dict) and m.get("id") == self.model and isinstance(m.get("max_model_len"), int):
                return m["max_model_len"]
        return None

    def generate(self, requests: list[Request]) -> list[Completion]:
        if self._loop.is_closed():
            raise RuntimeError("the engine is closed")
        return self._loop.run_until_complete(self._all(requests))

    def close(self) -> None:
        """Close the HTTP client and its event loop."""
        if self._loop.is_closed():
            return
        if self._client is not None:
            self._loop.run_until_complete(self._client.aclose())
            self._client = None
        self._loop.close()

    async def _all(self, requests: list[Request]) -> list[Completion]:
        if self._client is None:
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            self._client = httpx.AsyncClient(timeout=self.timeout_s, headers=self._headers, limits=limits)
        sem = asyncio.Semaphore(self.concurrency)

        async def one(r: Request) -> Completion:
            async with sem:
                return await self._one(r)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    def _body(self, r: Request) -> tuple[str, dict]:
        body: dict = {"model": self.model, "max_tokens": 1 if r.digit_probs else r.max_new_tokens,
                      "temperature": r.temperature, "top_p": r.top_p}
        if r.seed is not None:
            body["seed"] = r.seed
        if r.stop:
            body["stop"] = r.stop
        if self.api == "chat":
            body["messages"] = r.messages
            if r.messages and r.messages[-1]["role"] == "assistant":  # a prefill the model continues
                body.update(continue_final_message=True, add_generation_prompt=False)
            if r.digit_probs:
                body.update(logprobs=True, top_logprobs=20, temperature=0.0, max_tokens=2)
            return "/chat/completions", body
        if self._strip_bos is None:
            body.update(prompt=r.prompt, add_special_tokens=False)
        else:
            bos = self._strip_bos
            body["prompt"] = r.prompt[len(bos):] if bos and r.prompt.startswith(bos) else r.prompt
        if r.digit_probs:
            body.update(logprobs=20, temperature=0.0)
        return "/completions", body

    async def _post(self, r: Request) -> httpx.Response:
        """POST the request; a server that refuses `add_special_tokens` gets it again without."""
        path, body = self._body(r)
        resp = await self._client.post(self.base_url + path, json=body)
        if resp.status_code in (400, 422) and "add_special_tokens" in body and "add_special_tokens" in resp.text:
            self._strip_bos = _added_bos(self.tokenizer)
            path, body = self._body(r)
            resp = await self._client.post(self.base_url + path, json=body)
        return resp

    async def _one(self, r: Request) -> Completion:
        error = ""
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                resp = await self._post(r)
                if resp.status_code in RETRY_STATUS:
                    error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    if resp.status_code in (429, 503):
                        wait = retry_after(resp.headers.get("retry-after"))
                elif resp.status_code >= 400:
                    return failed(f"HTTP {resp.status_code}: {resp.text[:500]}")
                else:
                    return self._parse(resp.content, r)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                delay = wait if wait is not None else min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random())
                log.warning("request failed (%s); retry %d/%d in %.1fs", error, attempt + 1, self.max_retries, delay)
                await asyncio.sleep(delay)
        return failed(f"gave up after {self.max_retries} retries: {error}")

    def _parse(self, content: bytes, r: Request) -> Completion:
        """A 200 answer -> Completion; anything malformed is an error row saying what was wrong."""
        try:
            data = json.loads(content)
        except ValueError:
            return failed(f"the server answered 200 with a body that is not JSON: {content[:200]!r}")
        choices = data.get("choices") if isinstance(data, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return failed(f"the server answered 200 without a choice: {content[:200]!r}")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        text = choice.get("text") if self.api == "completions" else (choice.get("message") or {}).get("content")
        if not isinstance(text, str):
            return failed(f"the server answered 200 with a choice without text: {content[:200]!r}")
        comp = finished(text, usage.get("prompt_tokens"), usage.get("completion_tokens"), choice.get("finish_reason"))
        if r.digit_probs and comp.finish_reason != "error":
            top = _top_logprobs(choice, self.api)
            if top is None:
                return failed("the server returned no logprobs: the logprob score mode needs a server that "
                              "supports them (vllm serve, SGLang, OpenAI), not transformers serve", comp.prompt_tokens)
            probs = {d: 0.0 for d in "12345"}
            for token, logprob in top.items():
                t = token.strip().lstrip("▁Ġ")
                if t in probs:
                    probs[t] += math.exp(logprob)
            comp.digit_probs = probs
        return comp


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped; None if
    absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _added_bos(tokenizer) -> str:
    """The BOS text a server adds again when it tokenizes with special tokens, or ""."""
    if not tokenizer.bos_token:
        return ""
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else ""


def _local_context_length(model: str) -> int | None:
    """The context length from a local model folder's config.json; None for a remote model."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return None
    from transformers import PretrainedConfig

    with open(path) as f:
        return model_context_length(PretrainedConfig(**json.load(f)))


def _top_logprobs(choice: dict, api: str) -> dict[str, float] | None:
    """{token: logprob} at the position of the score digit, or None when the choice has none."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    if api == "completions":
        tops = lp.get("top_logprobs") or []
        return dict(tops[0]) if tops and isinstance(tops[0], dict) else None
    for position in lp.get("content") or []:
        top = {t["token"]: t["logprob"] for t in position.get("top_logprobs") or []}
        if top and position.get("token", "").strip(" ▁Ġ\n"):
            return top
    return None
