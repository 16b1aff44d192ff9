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
- Preflight (`preflight`; loading the engine runs the same checks): GET /models (a few tries within
  PREFLIGHT_S seconds), before any shard. A server that cannot be reached is one error naming the
  URL, in seconds; a 401/403 names the key's environment variable; an answer that is no OpenAI model
  listing (404, HTML, not JSON, no `data` list) says the URL is not an OpenAI-compatible server; and
  the model must be among the served ids (vLLM, SGLang, `transformers serve MODEL` and OpenAI list
  them; a server that ignores the name would answer with another model), else one line with the
  served names. Azure OpenAI's requests name a deployment that its /models does not list: not
  checked there. The context length is --max-model-len, else the server's listing (`max_model_len`,
  as vLLM returns it), else the local model folder's config.json; it is asked of the user only when
  the server lists the model without one.
- Chat API without --tokenizer: no local tokenizer is loaded; documents are cut by the byte bound of
  prompting.py and token counts come from the response's `usage`.
- Server kinds (`server`, SERVERS): OpenAI's API answers 400 "Unrecognized request argument supplied"
  to a field it does not know, so each kind is sent only what it accepts. `auto` decides from the URL
  (api.openai.com, Azure OpenAI hosts: openai) and GET /models (vLLM's model cards say `owned_by:
  vllm`; OpenAI's `openai`, `system`, `openai-internal`), else `generic`. vllm: the fields above
  (`add_special_tokens`, `continue_final_message`, `add_generation_prompt`), `max_tokens`, up to 20
  logprobs (vLLM's default --max-logprobs) and its /tokenize. openai: only the documented fields;
  chat takes `max_completion_tokens` (`max_tokens` is deprecated there and refused by reasoning
  models), completions `max_tokens`; completions `logprobs` <= 5, chat `top_logprobs` <= 20; the BOS
  text is taken off a completions prompt. generic (SGLang, TGI, transformers serve, gateways): the
  documented fields with `max_tokens` (what most servers read), 5 completion logprobs, the BOS text
  taken off when the local tokenizer adds it; `--server vllm` sends vLLM's fields to a server that
  takes them.
- Logprob score mode: the prompt ends where the digit token begins (prompting.score_prompt; it needs a
  tokenizer); on the chat API the assistant turn is prefilled (`continue_final_message`, vLLM's
  parameter) and the first generated position that is not whitespace is read, as a server may strip
  the prefill's trailing space. Only the five digits matter, so OpenAI's 5 completion logprobs do:
  the prompt ends where the digit begins, and a digit outside the five most likely tokens has less
  probability than each of them (it counts as 0, as one outside vLLM's 20 does). OpenAI's chat API
  and a generic server have no assistant prefill, so the answer cannot be made to begin at the digit:
  the stage refuses logprob mode there in one line (`logprob_problem`) instead of scoring whatever
  the model writes first.
- Stop strings (a stage's `stop`: rewrite's `[/RES]`) go to vllm and generic servers, online and in
  batch files; the text comes back without them (vLLM's include_stop_str_in_output is false by
  default, OpenAI's API never includes them). A finish_reason "stop" is read with the choice's
  `stop_reason` (vLLM) or `matched_stop` (SGLang) into Completion.stopped; a server that names
  neither leaves it unknown (None), and the parser decides (parsing.parse_rewrite). OpenAI's own API
  gets no stop strings: its reasoning models answer 400 "Unsupported parameter: 'stop'", which would
  fail every request and batch line; an answer there is paid up to the model's end of turn, as before.
- Outcomes (schemas/outcomes.py). FINAL, never resent while the config is unchanged: finish_reason
  content_filter; a chat answer whose `refusal` is set; a 400 saying the prompt exceeds the context;
  a 200 whose body is over its byte cap (below).
  TRANSIENT, retried here with back-off and resent by a later run: connection errors, timeouts,
  408/409/429/5xx, a 200 whose body is broken or has no usable choice, any other finish reason
  (vLLM's abort), any other 4xx (a server or config problem, which the error budget then stops).
  A retry waits what the server asks: `retry-after-ms`, else `Retry-After` (seconds or an HTTP date),
  else on a 429 the `x-ratelimit-reset-requests`/`-tokens` durations (OpenAI's "1s", "6m0s", "20ms"),
  else exponential back-off (0.5 s doubling, capped at 60 s, times a jitter of 0.5-1.5); never past
  `max_retry_time` seconds from the first try. Proxies come from the environment (HTTPS_PROXY, ...).
  `request_timeout` bounds each try as a whole (connect, send, every byte of the answer), so a
  server that drips its answer byte by byte cannot hold a slot longer.
- Bounded answers: an answer's body is read in chunks and never past `answer_cap` bytes (the
  request's new-token cap at BYTES_PER_TOKEN each, plus BODY_MARGIN); a 200 over it (by its
  Content-Length or by what came) is a FINAL outcome, answer_too_long, the rest never read: a server
  answering 10 MB bodies costs a few KB per request, not an instruction of 10 MB. A batch output line
  is held to the same cap (generation/batch.py reads its files line by line).
- Dispatch is a stream (`stream`): `concurrency` requests are in flight at all times; a slot that
  frees takes the next request at once, there is no barrier per chunk, and the requests are prepared
  by the caller's generator in a thread beside the event loop. An interrupt (Ctrl-C, SIGTERM) stops
  the sending and lets the requests in flight come back (up to DRAIN_S) before it is raised, so that
  what was paid for is kept (`stream`). One aiohttp session and one event loop
  are kept for the engine's life and closed by `close()`. aiohttp rather than httpx: at hundreds of
  requests in flight its per-request cost is several times lower (docs/BENCHMARKS.md), and the client
  must not be what leaves the GPU idle. The API key comes from the environment variable named by
  `api_key_env` (default OPENAI_API_KEY) and is never logged; credentials in the URL are redacted.
"""
from __future__ import annotations

import asyncio
import collections
import difflib
import email.utils
import json
import logging
import math
import os
import random
import re
import signal
import threading
import time
import urllib.parse
from typing import Any, Callable, Iterable

import aiohttp
import orjson

from generation.engines.base import (ANSWER_TOO_LONG, PROMPT_TOO_LONG, REFUSAL, Completion, Engine, EngineConfig,
                                     EngineError, Request, failed, finished, model_context_length)
from lifecycle import signals

# /completions `logprobs` each kind of server accepts at most (OpenAI's API reference: 5; vLLM's
# default --max-logprobs: 20); chat `top_logprobs` is at most 20 on both.
COMPLETION_LOGPROBS = {"vllm": 20, "openai": 5, "generic": 5}
CHAT_TOP_LOGPROBS = 20
# Hosts of OpenAI's own API (and Azure OpenAI's, which validates requests the same way).
OPENAI_HOSTS = re.compile(r"(^|\.)(api\.openai\.com|openai\.azure\.com|services\.ai\.azure\.com|"
                          r"cognitiveservices\.azure\.com)$")
OPENAI_OWNERS = {"openai", "system", "openai-internal"}
# Where a choice names the stop string that ended it: vLLM's `stop_reason`, SGLang's `matched_stop`
# (a string, a stop token id, or null at the model's end of sequence).
STOP_REASON_FIELDS = ("stop_reason", "matched_stop")
OVER_CAP = "bft_over_cap"   # a batch output line read no further than its cap: its size (generation/batch.py)


def server_kind(option: str, base_url: str, models: list, model: str) -> str:
    """The kind of server (SERVERS) behind `base_url`: the option when it is not auto, else OpenAI's
    hosts by name, else the `owned_by` of the /models listing (our model's card if listed, else any)."""
    if option != "auto":
        return option
    if OPENAI_HOSTS.search(urllib.parse.urlsplit(base_url).hostname or ""):
        return "openai"
    cards = [m for m in models if isinstance(m, dict)]
    owners = {m.get("owned_by") for m in ([m for m in cards if m.get("id") == model] or cards)}
    if "vllm" in owners:
        return "vllm"
    if owners & OPENAI_OWNERS:
        return "openai"
    return "generic"

log = logging.getLogger("bft.engine.openai")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0
PREFLIGHT_S = 5.0
HAND_OFF = 16           # prepared requests handed from the preparing thread to the event loop at once
DRAIN_S = 10.0          # on an interrupt, what the requests in flight (paid for) get to come back: within the
                        # grace before SIGKILL of Kubernetes (30 s), Airflow (60 s) and systemd (90 s)
# An answer's body may hold at most this much (`answer_cap`): its new tokens at BYTES_PER_TOKEN each (a
# token is a few bytes of text; JSON's \u escapes, six bytes a character, logprobs and the fields around
# it fit in the rest) plus BODY_MARGIN for the envelope (id, usage, the prompt's logprobs of a score prefill).
BYTES_PER_TOKEN = 64
BODY_MARGIN = 64 * 1024
READ_CHUNK = 64 * 1024
# How servers say a prompt does not fit: vLLM ("This model's maximum context length is N tokens",
# V1 "The decoder prompt (length N) is longer than the maximum model length of M", "... is too long"),
# OpenAI (code context_length_exceeded), SGLang / TGI ("exceeds the model's context length",
# "must have less than N tokens").
TOO_LONG = re.compile(r"maximum context length|context_length_exceeded|longer than the maximum model length|"
                      r"prompt is too long|exceeds? (?:the )?(?:model'?s? )?(?:maximum )?context|"
                      r"must have less than \d+ (?:input )?tokens|max_model_len", re.I)


def answer_cap(r: Request) -> int:
    """The most bytes an answer's body to `r` may hold (BYTES_PER_TOKEN, BODY_MARGIN)."""
    return r.max_new_tokens * BYTES_PER_TOKEN + BODY_MARGIN


def too_long(size: int, r: Request) -> Completion:
    """The final outcome of an answer over `answer_cap(r)` bytes (`size`: what was seen of it)."""
    return failed(f"answer over {answer_cap(r):,} bytes ({size:,} or more; the cap for {r.max_new_tokens} new tokens): "
                  "not read further", refusal=ANSWER_TOO_LONG)


def redact(url: str) -> str:
    """`url` without the user:password part it may carry."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}" + (f":{parts.port}" if parts.port else "")))


def _auth(key_env: str) -> dict:
    """The request headers carrying the API key of environment variable `key_env` (none without one)."""
    key = os.environ.get(key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---- the preflight: GET /models, before any request is prepared -------------------------------------

async def list_models(session: aiohttp.ClientSession, base_url: str, shown_url: str, key_env: str,
                      timeout_s: float) -> list[dict]:
    """The model cards of the server's GET /models (read_listing), asked a few times within PREFLIGHT_S
    while the server cannot be reached or answers a status worth retrying; EngineError naming the URL
    when it never answers."""
    url = base_url + "/models"
    deadline = time.monotonic() + PREFLIGHT_S
    while True:
        try:
            async with session.get(url, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=min(timeout_s, PREFLIGHT_S))) as resp:
                status, headers, body = resp.status, resp.headers, await resp.read()
            if status not in RETRY_STATUS:
                return read_listing(status, headers, body, shown_url, key_env)
            problem = f"it answered {status}: {_snippet(body, 200)}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            problem = (f"{type(e).__name__}: {_redacted(str(e), base_url, shown_url) or 'no answer'}; "
                       "is it running, and is --base-url right?")
        if time.monotonic() >= deadline:  # a server down, or a gateway whose backend is
            raise EngineError(f"cannot reach the server at {shown_url}: {problem}") from None
        await asyncio.sleep(0.5)


def read_listing(status: int, headers, body: bytes, shown_url: str, key_env: str) -> list[dict]:
    """The model cards (`data`) of a GET /models answer. EngineError for a key the server refuses
    (401/403), and for an answer that is no OpenAI model listing (another status, a body that is not
    JSON, no `data` list): what answers there is not an OpenAI-compatible server, or --base-url lacks
    its /v1."""
    if status in (401, 403):
        raise EngineError(f"{shown_url}/models answered {status}: the server refuses the API key "
                          f"(environment variable {key_env})")
    listing: Any = None
    if status != 200:
        location = headers.get("location") if 300 <= status < 400 else None
        problem = f"answered {status}" + (f" (redirect to {location})" if location else "")
    else:
        try:
            listing = json.loads(body)
            problem = (None if isinstance(listing, dict) and isinstance(listing.get("data"), list)
                       else "answered 200 with JSON without a `data` list")
        except (ValueError, RecursionError):
            problem = "answered 200 with a body that is not JSON"
    if problem:
        text = _snippet(body, 120)
        raise EngineError(f"{shown_url} is not an OpenAI-compatible server (GET {shown_url}/models {problem}"
                          f"{': ' + text if text else ''}); is --base-url the API's root (most servers serve it "
                          "under /v1)?")
    return [m for m in listing["data"] if isinstance(m, dict)]


AZURE_HOSTS = re.compile(r"\.azure\.com$")
SHOWN_MODELS = 10    # served names listed in the error for a model that is not among them


def check_served(models: list[dict], model: str, base_url: str, shown_url: str) -> None:
    """EngineError unless `model` is the id of one of the served model cards: a server answers (or
    ignores the name and answers with another model) only for what it serves. Azure OpenAI is not
    checked: its requests name a deployment, which its /models (base models) does not list."""
    if AZURE_HOSTS.search(urllib.parse.urlsplit(base_url).hostname or ""):
        return
    ids = [m["id"] for m in models if isinstance(m.get("id"), str)]
    if model in ids:
        return
    close = difflib.get_close_matches(model, ids, n=1)
    ids = sorted(ids, key=lambda i: i not in close)   # the closest first, then the listing's order
    shown = ", ".join(ids[:SHOWN_MODELS]) + (f" and {len(ids) - SHOWN_MODELS} more" if len(ids) > SHOWN_MODELS else "")
    raise EngineError(f"model {model!r} is not served at {shown_url}; it serves: {shown or 'no model'}"
                      + (f" (did you mean {close[0]!r}?)" if close else ""))


def served_context(models: list[dict], model: str) -> int | None:
    """The served `max_model_len` of `model` (vLLM lists it), or None."""
    for m in models:
        if m.get("id") == model and isinstance(m.get("max_model_len"), int):
            return m["max_model_len"]
    return None


def preflight(config: EngineConfig, listings: dict | None = None) -> list[dict]:
    """What loading the openai engine checks first, alone (`bft plan`, and `bft rebuild` before its
    first step): the server answers GET /models as an OpenAI-compatible server and serves
    `config.model`; returns the model cards. `listings` keeps each server's listing for the run, so
    that stages sharing a server ask it once. EngineError (one line) when not."""
    config.check()
    base_url = (config.base_url or "").rstrip("/")
    shown_url = redact(base_url)
    key = (base_url, config.api_key_env)

    async def ask() -> list[dict]:
        async with aiohttp.ClientSession(headers=_auth(config.api_key_env), trust_env=True) as session:
            return await list_models(session, base_url, shown_url, config.api_key_env, config.request_timeout)

    if listings is not None and key in listings:
        models = listings[key]
    else:
        models = asyncio.run(ask())
        if listings is not None:
            listings[key] = models
    check_served(models, config.model, base_url, shown_url)
    return models


class OpenAIEngine(Engine):
    name = "openai"
    continuous = True       # `stream` keeps `concurrency` requests in flight; each has its own seed
    server = "generic"      # the kind of server (SERVERS), decided when the engine loads

    def __init__(self, config: EngineConfig):
        self.model = config.model
        self.base_url = (config.base_url or "").rstrip("/")
        self.shown_url = redact(self.base_url)
        self.api = config.api
        self.server = config.server        # auto until the preflight has read /models
        self.concurrency, self.max_retries = config.concurrency, config.max_retries
        self.timeout_s, self.max_retry_time = config.request_timeout, config.max_retry_time
        self.key_env = config.api_key_env
        self._headers = _auth(config.api_key_env)
        self._strip_bos = None  # set once a server refuses add_special_tokens: the BOS text to take off
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        self.tokenizer = None
        self.count_messages = None
        self._counter = None
        try:  # whatever fails here closes the session and the loop first (no "Unclosed client session")
            if config.offline:  # batch files for `vllm run-batch`: no server to ask
                served, models = None, []
                self.server = "vllm" if config.server == "auto" else config.server
            else:
                async def ask() -> list[dict]:  # the session is made on the loop that keeps it
                    return await list_models(self._open(), self.base_url, self.shown_url, self.key_env,
                                             self.timeout_s)

                models = self._loop.run_until_complete(ask())
                check_served(models, self.model, self.base_url, self.shown_url)
                served = served_context(models, self.model)
                self.server = server_kind(config.server, self.base_url, models, self.model)
            log.info("%s: %s server", self.shown_url, self.server)
            if config.api == "completions" or config.tokenizer:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
                if self.server == "openai":    # no add_special_tokens there; its models add no BOS
                    self._strip_bos = self.tokenizer.bos_token or ""
                elif self.server == "generic":  # a server that tokenizes with special tokens adds it again
                    self._strip_bos = _added_bos(self.tokenizer)
            self.max_model_len = (config.max_model_len or served
                                  or _local_context_length(config.tokenizer or config.model))
            self.count_messages = (self._server_counter() if self.api == "chat" and self.tokenizer is None
                                   and self.server == "vllm" and not config.offline else None)
            if not self.max_model_len:
                raise EngineError(f"{self.shown_url}/models lists {self.model!r} without a max_model_len and it is no "
                                  "local model folder: give --max-model-len (the served context length)")
        except BaseException:
            self.close()
            raise

    # ---- the session ------------------------------------------------------------------------------
    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency,
                                             enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers, trust_env=True,
                                                  timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    def close(self) -> None:
        """Close the HTTP session and its event loop."""
        if getattr(self, "_counter", None) is not None:
            self._counter.close()
            self._counter = None
        if self._loop.is_closed():
            return
        if self._session is not None:
            self._loop.run_until_complete(self._session.close())
            self._session = None
        self._loop.close()

    def logprob_problem(self) -> str | None:
        if self.api == "chat" and self.server != "vllm":
            return (f"the {self.server} server's chat API has no assistant prefill (vLLM's continue_final_message), "
                    "so the answer cannot begin at the score digit after 'Score:'; use --api completions, "
                    "--score-mode generate, or --server vllm for a server that takes vLLM's parameters")
        return None

    # ---- the server's own token counts (chat API without a tokenizer) ------------------------------
    def _server_counter(self):
        """`count_messages` when the server counts chat messages for us (vLLM's POST /tokenize at the
        server's root, TokenizeChatRequest: the same template and prefill flags as the chat request),
        else None (OpenAI's API and most gateways have no such endpoint: the byte bound stays)."""
        import httpx

        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self._tokenize_url = root + "/tokenize"
        self._counter = httpx.Client(headers=self._headers, timeout=min(self.timeout_s, 30.0), trust_env=True)
        probe = self._count_one([{"role": "user", "content": "hi"}])
        if probe is None:
            self._counter.close()
            self._counter = None
            return None
        log.info("%s/tokenize counts prompts: documents are cut by the server's count, not the byte bound",
                 self.shown_url)
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
        """`concurrency` requests in flight, each freed slot taking the next item at once (`chunk` is
        not used: no barrier). `items` is advanced in a thread of its own, so that preparing requests
        overlaps waiting for answers; `emit` runs on the event loop's thread. Ctrl-C and SIGTERM are
        held meanwhile (lifecycle.signals.deferred), so an interrupt never lands between an answer and
        its `emit`: no request is sent after it, those in flight get DRAIN_S seconds to come back (they
        are paid for: their answers are emitted, and the runner keeps them), the rest are cancelled and
        the interrupt is raised. A second Ctrl-C cancels at once."""
        if self._loop.is_closed():
            raise RuntimeError("the engine is closed")
        halt, now = asyncio.Event(), asyncio.Event()

        def interrupted(signum: int) -> None:   # on the loop's thread
            if halt.is_set() and signum == signal.SIGINT:
                now.set()
            halt.set()

        try:
            with signals.deferred(lambda signum: self._loop.call_soon_threadsafe(interrupted, signum)):
                self._loop.run_until_complete(self._stream(iter(items), emit, halt, now))
        except BaseException:  # a failed emit (or a signal no handler held): end every request in flight
            self._cancel_all()
            raise

    def _cancel_all(self) -> None:
        """Cancel the loop's pending tasks (requests in flight, the stream) and let them unwind, so that
        nothing is left half-run or reported as destroyed while pending."""
        tasks = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

    async def _stream(self, items, emit, halt: asyncio.Event, now: asyncio.Event) -> None:
        """Workers take requests from a local deque that the preparing thread fills a batch at a time
        (one hand-off per batch, not per request), kept at most 2 x concurrency ahead of dispatch.
        `halt` (an interrupt): the workers take no more requests, and those still waiting for an answer
        are cancelled after DRAIN_S seconds or when `now` is set."""
        loop = asyncio.get_running_loop()
        ready: collections.deque = collections.deque()
        arrived = asyncio.Event()
        state = {"finished": False}
        stop, problem = threading.Event(), []
        ahead = 2 * self.concurrency
        workers: list[asyncio.Task] = []

        def arrive(batch: list, last: bool) -> None:   # on the loop's thread
            ready.extend(batch)
            state["finished"] = state["finished"] or last
            arrived.set()

        def produce() -> None:
            batch: list = []
            try:
                for item in items:
                    batch.append(item)
                    if len(batch) >= HAND_OFF:
                        while len(ready) >= ahead and not stop.is_set():
                            time.sleep(0.002)
                        if stop.is_set():
                            return
                        loop.call_soon_threadsafe(arrive, batch, False)
                        batch = []
            except BaseException as e:  # handed to the loop's thread, raised there
                problem.append(e)
            finally:
                if not stop.is_set():
                    loop.call_soon_threadsafe(arrive, batch, True)

        async def worker() -> None:
            while True:
                while not ready and not state["finished"] and not halt.is_set():
                    arrived.clear()
                    await arrived.wait()
                if halt.is_set() or not ready:
                    return
                key, request = ready.popleft()
                emit(key, await self._one(request))  # no await between the answer and its emit

        async def drain() -> None:
            await halt.wait()
            stop.set()
            arrived.set()   # the idle workers end
            try:
                await asyncio.wait_for(now.wait(), DRAIN_S)
            except TimeoutError:
                pass
            for task in workers:
                task.cancel()

        producer = threading.Thread(target=produce, name="bft-prepare", daemon=True)
        producer.start()
        drainer = loop.create_task(drain())
        try:
            async with asyncio.TaskGroup() as group:
                workers += [group.create_task(worker()) for _ in range(self.concurrency)]
        except BaseExceptionGroup as group_error:  # what a worker raised (in emit: a UserError), as itself
            raise group_error.exceptions[0] from None
        finally:
            drainer.cancel()
            await asyncio.gather(drainer, return_exceptions=True)
            stop.set()
            await loop.run_in_executor(None, producer.join)
        if problem:
            raise problem[0]

    def _body(self, r: Request) -> tuple[str, dict]:
        """(path, body) of a request, with only the fields this kind of server accepts (module docstring)."""
        vllm = self.server == "vllm"
        cap = "max_completion_tokens" if self.api == "chat" and self.server == "openai" else "max_tokens"
        body: dict = {"model": self.model, cap: r.max_new_tokens,   # what the prompt's budget reserved
                      "temperature": r.temperature, "top_p": r.top_p}
        if r.seed is not None:
            body["seed"] = r.seed
        if r.stop and self.server != "openai":   # OpenAI's reasoning models refuse `stop` (module docstring)
            body["stop"] = r.stop
        if self.api == "chat":
            body["messages"] = r.messages
            if vllm and r.messages and r.messages[-1]["role"] == "assistant":  # a prefill the model continues
                body.update(continue_final_message=True, add_generation_prompt=False)
            if r.digit_probs:
                body.update(logprobs=True, top_logprobs=CHAT_TOP_LOGPROBS, temperature=0.0)
            return "/chat/completions", body
        if vllm and self._strip_bos is None:
            body.update(prompt=r.prompt, add_special_tokens=False)
        else:
            bos = self._strip_bos
            body["prompt"] = r.prompt[len(bos):] if bos and r.prompt.startswith(bos) else r.prompt
        if r.digit_probs:
            body.update(logprobs=COMPLETION_LOGPROBS[self.server], temperature=0.0)
        return "/completions", body

    async def _post_once(self, path: str, body: dict, cap: int) -> tuple[int, Any, bytes, int | None]:
        """(status, headers, body, None), or for a body over `cap` bytes: its first `cap` bytes and the
        size seen (the Content-Length said, or what came), the rest unread."""
        async with self._session.post(self.base_url + path, data=orjson.dumps(body), allow_redirects=False,
                                      headers={"Content-Type": "application/json"}) as resp:
            data = bytearray()
            async for chunk in resp.content.iter_chunked(READ_CHUNK):
                data += chunk
                if len(data) > cap:   # leaving the block closes the connection with the rest unread
                    return resp.status, resp.headers, bytes(data[:cap]), max(len(data), resp.content_length or 0)
            return resp.status, resp.headers, bytes(data), None

    async def _post(self, r: Request) -> tuple[int, Any, bytes, int | None]:
        """POST the request (one try, bounded as a whole by request_timeout, its answer by answer_cap);
        a server that refuses `add_special_tokens` gets it again without."""
        path, body = self._body(r)
        cap = answer_cap(r)
        status, headers, content, over = await asyncio.wait_for(self._post_once(path, body, cap), self.timeout_s)
        if status in (400, 422) and "add_special_tokens" in body and b"add_special_tokens" in content:
            self._strip_bos = _added_bos(self.tokenizer)
            path, body = self._body(r)
            status, headers, content, over = await asyncio.wait_for(self._post_once(path, body, cap), self.timeout_s)
        return status, headers, content, over

    async def _one(self, r: Request) -> Completion:
        self._open()
        start, error = time.monotonic(), ""
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                status, headers, content, over = await self._post(r)
                text = content[:500].decode("utf-8", "replace")
                if over is not None and status == 200:   # a final answer, too long to be one
                    return too_long(over, r)
                if status in RETRY_STATUS:
                    error = f"HTTP {status}: {text[:200]}"
                    wait = retry_wait(headers, status)
                else:
                    return self.outcome(status, headers, content, r)
            except orjson.JSONEncodeError as e:  # text JSON cannot carry (a lone surrogate): no retry helps
                return failed(f"the request cannot be encoded as JSON: {e}")
            except asyncio.TimeoutError:
                error = f"ReadTimeout: no whole answer within --request-timeout {self.timeout_s:g} s"
            except (aiohttp.ClientError, OSError) as e:
                error = f"{type(e).__name__}: {_redacted(str(e), self.base_url, self.shown_url)}"
            if attempt == self.max_retries:
                break
            delay = wait if wait is not None else min(MAX_BACKOFF_S, 0.5 * 2 ** attempt) * (0.5 + random.random())
            if time.monotonic() + delay - start > self.max_retry_time:
                return failed(f"gave up after {attempt} retries (--max-retry-time {self.max_retry_time:g} s "
                              f"would pass): {error}")
            log.warning("request failed (%s); retry %d/%d in %.1fs", error, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
        return failed(f"gave up after {self.max_retries} retries: {error}")

    def outcome(self, status: int, headers, content: bytes, r: Request) -> Completion:
        """The Completion of an answer that is not retried (any status but RETRY_STATUS): the one
        reading of an answer, online and from a batch's output and error files (generation/batch.py)."""
        text = content[:500].decode("utf-8", "replace")
        if status == 400 and TOO_LONG.search(text):
            return failed(f"HTTP 400: {text}", refusal=PROMPT_TOO_LONG)
        if status >= 300:
            where = f" (redirect to {headers.get('location')})" if 300 <= status < 400 else ""
            return failed(f"HTTP {status}{where}: {text}")
        return self._parse(content, r)

    # ---- batch files (generation/batch.py): the same bodies and the same reading as online -------------
    def batch_line(self, custom_id: str, r: Request) -> dict:
        """A line of a batch input file (OpenAI's Batch API, `vllm run-batch`): the request's body as it
        would be sent online to this kind of server."""
        path, body = self._body(r)
        return {"custom_id": custom_id, "method": "POST", "url": "/v1" + path, "body": body}

    def batch_outcome(self, line: dict | None, r: Request) -> Completion | None:
        """The Completion of a batch output or error-file line for `r`, read as the same answer online
        would be; None when there is none to keep: the line is missing, it carries no response (the
        batch expired, was cancelled or failed before the request ran) or a status online would retry
        (429, 5xx): the row is submitted again."""
        if isinstance(line, dict) and isinstance(line.get(OVER_CAP), int):   # batch.read_jsonl cut it
            return too_long(line[OVER_CAP], r)
        response = line.get("response") if isinstance(line, dict) else None
        status = response.get("status_code") if isinstance(response, dict) else None
        if not isinstance(status, int) or status in RETRY_STATUS:
            return None
        try:
            content = orjson.dumps(response.get("body"))
        except orjson.JSONEncodeError:
            return failed("the batch output holds a body that is not JSON")
        if status == 200 and len(content) > answer_cap(r):
            return too_long(len(content), r)
        return self.outcome(status, {}, content, r)

    def _parse(self, content: bytes, r: Request) -> Completion:
        """A 200 answer -> Completion; anything malformed is a (transient) error row saying what was wrong."""
        try:  # orjson: ~3x json's speed; refuses lone surrogates and nesting past 1024 levels
            data = orjson.loads(content)
        except (ValueError, RecursionError):
            return failed(f"the server answered 200 with a body that is not JSON: {content[:200]!r}")
        choices = data.get("choices") if isinstance(data, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return failed(f"the server answered 200 without a choice: {content[:200]!r}")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        message = choice.get("message") if self.api == "chat" else None
        if self.api == "chat" and not isinstance(message, dict):
            return failed(f"the server answered 200 with a choice without a message: {content[:200]!r}")
        if message is not None and isinstance(message.get("refusal"), str) and message["refusal"]:
            return failed(f"refusal: {message['refusal'][:200]}", _count(usage.get("prompt_tokens")), refusal=REFUSAL)
        text = choice.get("text") if self.api == "completions" else message.get("content")
        if not isinstance(text, str):
            return failed(f"the server answered 200 with a choice without text: {content[:200]!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\\ud800") would fail the shard's write later
            return failed(f"the server answered 200 with text that is not valid Unicode: {content[:200]!r}")
        comp = finished(text, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")),
                        choice.get("finish_reason"))
        comp.served_model = data.get("model") if isinstance(data.get("model"), str) else None
        if comp.finish_reason == "stop" and r.stop:
            said = [choice[k] for k in STOP_REASON_FIELDS if k in choice]
            comp.stopped = (said[0] in r.stop) if said else None   # None: a server that names no stop reason
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


def _count(value) -> int | None:
    """A token count from `usage`, or None when it is not a plausible one."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 31 else None


def _snippet(body: bytes, limit: int) -> str:
    """The start of an answer's body on one line (an error message is one line)."""
    return " ".join(body[:limit].decode("utf-8", "replace").split())


def _redacted(text: str, url: str, shown: str) -> str:
    return text.replace(url, shown) if url != shown else text


def _seconds(value: str | None) -> float | None:
    """A finite, non-negative number of seconds, or None."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def duration(value: str | None) -> float | None:
    """OpenAI's x-ratelimit-reset-* durations ("1s", "6m0s", "20ms", "1h2m3.5s") -> seconds."""
    if not value:
        return None
    value = value.strip()
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return _seconds(value)
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or
    unreadable (nan, inf and negative numbers included)."""
    if not value:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, IndexError):
        return None


def retry_wait(headers, status: int) -> float | None:
    """What the server asks us to wait before the next try (module docstring), or None."""
    ms = _seconds(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    seconds = retry_after(headers.get("retry-after"))
    if seconds is not None or status != 429:
        return seconds
    resets = [duration(headers.get(h)) for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
    resets = [s for s in resets if s is not None]
    return max(resets) if resets else None


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
    """{token: logprob} at the position of the score digit, or None when the choice has none or it is
    malformed (a logprob that is not a finite number <= 0 makes the position unusable)."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    if api == "completions":
        tops = lp.get("top_logprobs")
        top = tops[0] if isinstance(tops, list) and tops else None
        return _valid_top(top.items()) if isinstance(top, dict) else None
    for position in lp.get("content") or [] if isinstance(lp.get("content"), list) else []:
        if not isinstance(position, dict) or not isinstance(position.get("token"), str):
            return None
        entries = position.get("top_logprobs")
        if not isinstance(entries, list) or not all(isinstance(t, dict) for t in entries):
            return None
        top = _valid_top((t.get("token"), t.get("logprob")) for t in entries)
        if top and position["token"].strip(" ▁Ġ\n"):
            return top
    return None


def _valid_top(pairs) -> dict[str, float] | None:
    out = {}
    for token, logprob in pairs:
        if not isinstance(token, str) or isinstance(logprob, bool) or not isinstance(logprob, (int, float)) \
                or not math.isfinite(logprob) or logprob > 0:
            return None
        out[token] = float(logprob)
    return out
