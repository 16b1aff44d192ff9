"""The way to an OpenAI-compatible server: the endpoint (`Endpoint`: URL, key, timeout; generation/batch.py
reaches the Batch API through the same), the preflight GET /models, and `Transport`: one aiohttp
session on one event loop for the engine's life, POSTs bounded in time and size, and the stream that
keeps `concurrency` requests in flight.

- Preflight (`preflight`; loading the engine runs the same checks): GET /models (a few tries within
  PREFLIGHT_S seconds), before any shard. A server that cannot be reached is one error naming the
  URL, in seconds; a 401/403 names the key's environment variable; an answer that is no OpenAI model
  listing (404, HTML, not JSON, no `data` list) says the URL is not an OpenAI-compatible server; and
  the model must be among the served ids (vLLM, SGLang, `transformers serve MODEL` and OpenAI list
  them; a server that ignores the name would answer with another model), else one line with the
  served names. Azure OpenAI's requests name a deployment that its /models does not list: not
  checked there.
- Dispatch is a stream (`Transport.stream`): `concurrency` requests are in flight at all times; a slot
  that frees takes the next request at once, there is no barrier per chunk, and the requests are
  prepared by the caller's generator in a thread beside the event loop. An interrupt (Ctrl-C, SIGTERM)
  stops the sending and lets the requests in flight come back (up to DRAIN_S) before it is raised, so
  that what was paid for is kept. One aiohttp session and one event loop are kept for the engine's
  life and closed by `close()`. aiohttp rather than httpx: at hundreds of requests in flight its
  per-request cost is several times lower (docs/BENCHMARKS.md), and the client must not be what leaves
  the GPU idle. Proxies come from the environment (HTTP_PROXY, NO_PROXY, ...; read once per session).
  `request_timeout` bounds each try as a whole (connect, send, every byte of the answer), so a server
  that drips its answer byte by byte cannot hold a slot longer; an answer's body is read in chunks and
  never past its cap (the rest is never read: a server answering 10 MB bodies costs a few KB per
  request, not an instruction of 10 MB). The API key comes from the environment variable named by
  `api_key_env` (default OPENAI_API_KEY) and is never logged; credentials in the URL are redacted.
"""
from __future__ import annotations

import asyncio
import collections
import difflib
import json
import os
import re
import signal
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
import orjson

from generation.engines.base import Completion, EngineConfig, EngineError, Request
from generation.engines.openai.reader import RETRY_STATUS, snippet
from lifecycle import signals

PREFLIGHT_S = 5.0
HAND_OFF = 16           # prepared requests handed from the preparing thread to the event loop at once
DRAIN_S = 10.0          # on an interrupt, what the requests in flight (paid for) get to come back: within the
                        # grace before SIGKILL of Kubernetes (30 s), Airflow (60 s) and systemd (90 s)
READ_CHUNK = 64 * 1024
JSON_HEADERS = {"Content-Type": "application/json"}   # of every POST (aiohttp copies it)
AZURE_HOSTS = re.compile(r"\.azure\.com$")
SHOWN_MODELS = 10    # served names listed in the error for a model that is not among them


@dataclass(frozen=True)
class Endpoint:
    """Where the API is and how to reach it: `base_url` (no trailing slash), `shown_url` (what messages
    show: no credentials), the key's environment variable, the headers carrying the key (never shown:
    not in the repr) and the seconds one try may take."""

    base_url: str
    shown_url: str
    key_env: str
    timeout_s: float
    headers: dict = field(default_factory=dict, repr=False, hash=False)

    @classmethod
    def of(cls, config: EngineConfig) -> Endpoint:
        base_url = (config.base_url or "").rstrip("/")
        return cls(base_url, redact(base_url), config.api_key_env, config.request_timeout, auth(config.api_key_env))

    def redacted(self, text: str) -> str:
        """`text` (an exception's, which may name the URL) without the URL's credentials."""
        return text.replace(self.base_url, self.shown_url) if self.base_url != self.shown_url else text


def redact(url: str) -> str:
    """`url` without the user:password part it may carry."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}" + (f":{parts.port}" if parts.port else "")))


def auth(key_env: str) -> dict:
    """The request headers carrying the API key of environment variable `key_env` (none without one)."""
    key = os.environ.get(key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---- the preflight: GET /models, before any request is prepared -------------------------------------

async def list_models(session: aiohttp.ClientSession, endpoint: Endpoint, proxy: dict | None = None) -> list[dict]:
    """The model cards of the server's GET /models (read_listing), asked a few times within PREFLIGHT_S
    while the server cannot be reached or answers a status worth retrying; EngineError naming the URL
    when it never answers. `proxy`: the proxy arguments of a session that does not read the environment."""
    url = endpoint.base_url + "/models"
    deadline = time.monotonic() + PREFLIGHT_S
    while True:
        try:
            async with session.get(url, allow_redirects=False, **(proxy or {}),
                                   timeout=aiohttp.ClientTimeout(total=min(endpoint.timeout_s, PREFLIGHT_S))) as resp:
                status, headers, body = resp.status, resp.headers, await resp.read()
            if status not in RETRY_STATUS:
                return read_listing(status, headers, body, endpoint.shown_url, endpoint.key_env)
            problem = f"it answered {status}: {snippet(body, 200)}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            problem = (f"{type(e).__name__}: {endpoint.redacted(str(e)) or 'no answer'}; "
                       "is it running, and is --base-url right?")
        if time.monotonic() >= deadline:  # a server down, or a gateway whose backend is
            raise EngineError(f"cannot reach the server at {endpoint.shown_url}: {problem}") from None
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
        text = snippet(body, 120)
        raise EngineError(f"{shown_url} is not an OpenAI-compatible server (GET {shown_url}/models {problem}"
                          f"{': ' + text if text else ''}); is --base-url the API's root (most servers serve it "
                          "under /v1)?")
    return [m for m in listing["data"] if isinstance(m, dict)]


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


def preflight(config: EngineConfig, listings: dict | None = None) -> list[dict]:
    """What loading the openai engine checks first, alone (`bft plan`, and `bft rebuild` before its
    first step): the server answers GET /models as an OpenAI-compatible server and serves
    `config.model`; returns the model cards. `listings` keeps each server's listing for the run, so
    that stages sharing a server ask it once. EngineError (one line) when not."""
    config.check()
    endpoint = Endpoint.of(config)
    key = (endpoint.base_url, config.api_key_env)

    async def ask() -> list[dict]:
        async with aiohttp.ClientSession(headers=endpoint.headers, trust_env=True) as session:
            return await list_models(session, endpoint)

    if listings is not None and key in listings:
        models = listings[key]
    else:
        models = asyncio.run(ask())
        if listings is not None:
            listings[key] = models
    check_served(models, config.model, endpoint.base_url, endpoint.shown_url)
    return models


class Transport:
    """One aiohttp session on one event loop for the engine's life (`close()` ends both): the requests
    of `endpoint`, at most `concurrency` at once."""

    def __init__(self, endpoint: Endpoint, concurrency: int):
        self.endpoint, self.concurrency = endpoint, concurrency
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        self._proxy: dict = {}

    def run(self, coro: Awaitable):
        """`coro` run to its end on the transport's loop (the session is made on the loop that keeps it)."""
        return self._loop.run_until_complete(coro)

    def session(self) -> aiohttp.ClientSession:
        """The session, made on first use. What aiohttp's trust_env reads from the environment for every
        request, each time in a thread of the loop's executor (two thread hops per request: more CPU
        than the rest of the request), is read here once, with aiohttp's own functions, as every
        request goes to the same host: the proxy for the URL (and its credentials) and the .netrc entry
        of its host (the default auth: credentials in the URL still come first)."""
        if self._session is None:
            from aiohttp.helpers import basicauth_from_netrc, get_env_proxy_for_url, netrc_from_env
            from yarl import URL

            url = URL(self.endpoint.base_url)
            try:
                proxy, proxy_auth = get_env_proxy_for_url(url)
                self._proxy = {"proxy": proxy, **({"proxy_auth": proxy_auth} if proxy_auth else {})}
            except LookupError:   # no proxy for this URL (none set, or NO_PROXY names its host)
                self._proxy = {}
            try:
                netrc = {"auth": basicauth_from_netrc(netrc_from_env(), url.host)} if url.host else {}
            except LookupError:
                netrc = {}
            connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency,
                                             enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector, headers=self.endpoint.headers, **netrc,
                                                  timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    def close(self) -> None:
        """Close the HTTP session and its event loop."""
        if self._loop.is_closed():
            return
        if self._session is not None:
            self._loop.run_until_complete(self._session.close())
            self._session = None
        self._loop.close()

    async def models(self) -> list[dict]:
        """The model cards of GET /models (list_models)."""
        return await list_models(self.session(), self.endpoint, self._proxy)

    async def post(self, path: str, body: dict, cap: int) -> tuple[int, Any, bytes, int | None]:
        """One try, bounded as a whole by the endpoint's timeout: (status, headers, body, None), or for a
        body over `cap` bytes: its first `cap` bytes and the size seen (the Content-Length said, or what
        came), the rest unread."""
        session = self.session()
        async with asyncio.timeout(self.endpoint.timeout_s):   # no task per request, as wait_for would make
            async with session.post(self.endpoint.base_url + path, data=orjson.dumps(body), allow_redirects=False,
                                    headers=JSON_HEADERS, **self._proxy) as resp:
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(READ_CHUNK):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > cap:   # leaving the block closes the connection with the rest unread
                        return resp.status, resp.headers, b"".join(chunks)[:cap], max(size, resp.content_length or 0)
                return resp.status, resp.headers, b"".join(chunks), None

    # ---- dispatch -----------------------------------------------------------------------------------
    def stream(self, items, one: Callable[[Request], Awaitable[Completion]],
               emit: Callable[[Any, Completion], None]) -> None:
        """`concurrency` requests in flight (`one(request)` each), each freed slot taking the next item at
        once. `items` is advanced in a thread of its own, so that preparing requests overlaps waiting for
        answers; `emit` runs on the event loop's thread. Ctrl-C and SIGTERM are held meanwhile
        (lifecycle.signals.deferred), so an interrupt never lands between an answer and its `emit`: no
        request is sent after it, those in flight get DRAIN_S seconds to come back (they are paid for:
        their answers are emitted, and the runner keeps them), the rest are cancelled and the interrupt
        is raised. A second Ctrl-C cancels at once."""
        if self._loop.is_closed():
            raise RuntimeError("the engine is closed")
        halt, now = asyncio.Event(), asyncio.Event()

        def interrupted(signum: int) -> None:   # on the loop's thread
            if halt.is_set() and signum == signal.SIGINT:
                now.set()
            halt.set()

        try:
            with signals.deferred(lambda signum: self._loop.call_soon_threadsafe(interrupted, signum)):
                self._loop.run_until_complete(self._stream(iter(items), one, emit, halt, now))
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

    async def _stream(self, items, one, emit, halt: asyncio.Event, now: asyncio.Event) -> None:
        """Workers take requests from a local deque that the preparing thread fills a batch at a time
        (one hand-off per batch, not per request), kept at most 2 x concurrency ahead of dispatch; a
        batch wakes as many idle workers as it holds requests (not all of them: most would find nothing).
        `halt` (an interrupt): the workers take no more requests, and those still waiting for an answer
        are cancelled after DRAIN_S seconds or when `now` is set."""
        loop = asyncio.get_running_loop()
        ready: collections.deque = collections.deque()
        idle: collections.deque[asyncio.Future] = collections.deque()   # one per worker waiting for a request
        state = {"finished": False}
        stop, problem = threading.Event(), []
        ahead = 2 * self.concurrency
        workers: list[asyncio.Task] = []

        def wake(n: int) -> None:   # up to n idle workers look at `ready` again
            while n > 0 and idle:
                waiting = idle.popleft()
                if not waiting.done():   # done: its worker was cancelled
                    waiting.set_result(None)
                    n -= 1

        def arrive(batch: list, last: bool) -> None:   # on the loop's thread
            ready.extend(batch)
            state["finished"] = state["finished"] or last
            wake(len(idle) if last else len(batch))   # the last: the workers with nothing left to take end

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
                    waiting = loop.create_future()
                    idle.append(waiting)
                    await waiting
                if halt.is_set() or not ready:
                    return
                key, request = ready.popleft()
                emit(key, await one(request))  # no await between the answer and its emit

        async def drain() -> None:
            await halt.wait()
            stop.set()
            wake(len(idle))   # the idle workers end
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
