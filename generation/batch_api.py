"""OpenAI's Batch API (generation/batch.py runs a stage through it): its Files and Batches endpoints
(`BatchAPI`: a few tries on connection errors, 429 and 5xx; a create never sent twice blind), the
documented limits of an input file (`split`) and the reading of output and error files, line by line
and never past a cap (`read_jsonl`); `vllm run-batch` reads and writes the same files."""
from __future__ import annotations

import logging
import re
import time
from typing import Iterable, Iterator

import orjson

from generation.engines.openai.reader import OVER_CAP
from generation.engines.openai.transport import Endpoint
from schemas.errors import UserError

log = logging.getLogger("bft.batch")
MAX_REQUESTS = 50_000             # OpenAI's Batch API: requests per input file
MAX_BYTES = 200 * 1024 * 1024     # ... and bytes per input file
TRIES = 5                         # tries of one Batch API call (0.5 s back-off, doubling)


class BatchError(UserError):
    """The Batch API refused or failed a call (one line naming the call and the answer); `status`: the
    HTTP status of the last answer (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def split(lines: list[bytes], max_requests: int | None = None, max_bytes: int | None = None) -> list[list[bytes]]:
    """Lines (each ending in a newline) cut into input files of at most `max_requests` lines and
    `max_bytes` bytes, in order."""
    max_requests, max_bytes = max_requests or MAX_REQUESTS, max_bytes or MAX_BYTES
    files, current, size = [], [], 0
    for line in lines:
        if len(line) > max_bytes:
            raise BatchError(f"one request is {len(line):,} bytes, over the {max_bytes:,} bytes of a batch file")
        if current and (len(current) >= max_requests or size + len(line) > max_bytes):
            files.append(current)
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        files.append(current)
    return files


CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*"((?:[^"\\]|\\.)*)"')
LINE_MARGIN = 4096   # a line's own fields (id, custom_id, status, request_id) beside the answer's body


def read_jsonl(chunks: Iterable[bytes], cap: int) -> dict[str, dict]:
    """{custom_id: line} of an output or error file given as chunks of bytes, read line by line and
    never holding more than `cap` bytes of one line: a longer line is `{custom_id, OVER_CAP: its
    size}` (its custom_id read from its start; the row is answer_too_long). Lines that are not JSON
    objects with a custom_id are skipped (their rows count as missing, and are submitted again)."""
    out: dict[str, dict] = {}

    def take(head: bytes, size: int) -> None:
        if size > cap:
            found = CUSTOM_ID.search(head[:LINE_MARGIN])
            try:
                custom_id = orjson.loads(b'"' + found.group(1) + b'"') if found else None
            except ValueError:
                custom_id = None
            if isinstance(custom_id, str):
                out[custom_id] = {"custom_id": custom_id, OVER_CAP: size}
            return
        try:
            line = orjson.loads(head)
        except ValueError:
            return
        if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
            out[line["custom_id"]] = line

    head, size = bytearray(), 0
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:end if end >= 0 else len(chunk)]
            if len(head) <= cap:
                head += piece[:cap + 1 - len(head)]
            size += len(piece)
            if end < 0:
                break
            take(bytes(head), size)
            head, size, start = bytearray(), 0, end + 1
    if size:
        take(bytes(head), size)
    return out



class BatchAPI:
    """OpenAI's Files and Batches endpoints at `endpoint` (the engine's: its URL, key and timeout; sync httpx;
    a few tries on connection errors, 429 and 5xx)."""

    def __init__(self, endpoint: Endpoint):
        import httpx

        self.base_url, self.shown_url = endpoint.base_url, endpoint.shown_url
        self.client = httpx.Client(headers=endpoint.headers, timeout=endpoint.timeout_s, trust_env=True)

    def close(self) -> None:
        self.client.close()

    def _call(self, what: str, method: str, path: str, made=None, **kw):
        """The answer of a call, tried up to TRIES times on connection errors, 408/409/429 and 5xx.
        `made`, for a call that creates something (POST /batches): what finds it if it was created.
        After a try whose fate is unknown (a timeout, a dropped connection, a 408 or 5xx: the server
        may have created it, or may still be creating it) the call is never sent again: the remaining
        tries only ask `made`, and its answer is returned (None: not found yet)."""
        import httpx

        status = None
        for attempt in range(TRIES):
            try:
                resp = self.client.request(method, self.base_url + path, **kw)
            except httpx.HTTPError as e:
                problem, status = f"{type(e).__name__}: {e}", None
                # a connection never made sent nothing; any other error may follow a request the server got
                unknown = not isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout))
            else:
                status = resp.status_code
                if resp.status_code < 300:
                    return resp
                problem = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code not in (408, 409, 429) and resp.status_code < 500:
                    break
                unknown = resp.status_code >= 500 or resp.status_code == 408
            if unknown and made is not None:
                log.warning("the Batch API at %s: %s: %s; looking for what it may have made instead of trying "
                            "again", self.shown_url, what, problem)
                for look in range(attempt, TRIES):
                    time.sleep(min(30.0, 0.5 * 2 ** look))
                    found = made()
                    if found is not None:
                        return found
                return None
            time.sleep(min(30.0, 0.5 * 2 ** attempt))
        raise BatchError(f"the Batch API at {self.shown_url}: {what} failed: {problem}", status)

    def upload(self, data: bytes, name: str) -> str:
        resp = self._call(f"uploading {name}", "POST", "/files", data={"purpose": "batch"},
                          files={"file": (name, data, "application/jsonl")})
        return resp.json()["id"]

    def create(self, file_id: str, endpoint: str, metadata: dict) -> dict | None:
        """The batch made from the input file `file_id`: created, or (after a try whose fate is unknown)
        the one the listing shows; None when a try's fate is still unknown after every retry (the
        server may yet create it: the caller looks for it again later instead of creating another)."""
        found = self._call("creating a batch", "POST", "/batches", made=lambda: self.find(file_id),
                           json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
                                 "metadata": metadata})
        return found if found is None or isinstance(found, dict) else found.json()

    def get(self, batch_id: str) -> dict:
        return self._call(f"reading batch {batch_id}", "GET", f"/batches/{batch_id}").json()

    def find(self, input_file_id: str) -> dict | None:
        """The batch made from `input_file_id`, if one was created: GET /batches, newest first, page by
        page (`after`, `has_more`) until one is found or the listing is older than the file."""
        after = None
        for _ in range(100):   # 100 pages of 100: a kill is found within the last 10,000 batches
            params = {"limit": 100, **({"after": after} if after else {})}
            page = self._call("listing batches", "GET", "/batches", params=params).json()
            data = page.get("data") or []
            for batch in data:
                if batch.get("input_file_id") == input_file_id:
                    return batch
            if not page.get("has_more") or not data:
                return None
            after = data[-1].get("id")
        return None

    def content(self, file_id: str) -> Iterator[bytes]:
        """The bytes of a file, streamed in chunks (an output file may be gigabytes: never held whole);
        tried again as `_call` does until its first byte came (a stream cut later is a BatchError: the
        next invocation reads the file again)."""
        import httpx

        started, status = False, None
        for attempt in range(TRIES):
            try:
                with self.client.stream("GET", f"{self.base_url}/files/{file_id}/content") as resp:
                    if resp.status_code < 300:
                        for chunk in resp.iter_bytes(1 << 20):
                            started = True
                            yield chunk
                        return
                    status = resp.status_code
                    problem = f"HTTP {resp.status_code}: {resp.read()[:300]!r}"
                    if resp.status_code not in (408, 409, 429) and resp.status_code < 500:
                        break
            except httpx.HTTPError as e:
                problem, status = f"{type(e).__name__}: {e}", None
                if started:
                    break
            time.sleep(min(30.0, 0.5 * 2 ** attempt))
        raise BatchError(f"the Batch API at {self.shown_url}: reading file {file_id} failed: {problem}", status)
