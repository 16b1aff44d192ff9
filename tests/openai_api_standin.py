"""A STAND-IN for OpenAI's hosted API (api.openai.com/v1), for tests: what a vLLM stand-in cannot show,
the validation of a server that is not vLLM. Not OpenAI: an http.server on loopback, written from
OpenAI's API reference (platform.openai.com/docs/api-reference: Chat, Completions (legacy), Models,
Files, Batch) and the error bodies the API returns:

- GET /v1/models: `{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}`;
  no context length (OpenAI lists none).
- POST /v1/chat/completions and /v1/completions accept only their documented request fields: any
  other is a 400 `{"error": {"message": "Unrecognized request argument supplied: <field>", "type":
  "invalid_request_error", "param": null, "code": null}}` (the first unknown field, as the API names
  it). Chat: `top_logprobs` 0..20 and only with `logprobs: true`; `max_tokens` is refused in favour of
  `max_completion_tokens` (`reasoning=True`, the default: reasoning models refuse it, and it is
  deprecated for all) and both at once are a 400; `stop` is refused the same way with `reasoning` (as
  OpenAI's reasoning models refuse it). Completions: `logprobs` 0..5. `stop` at most 4,
  `temperature` 0..2, `top_p` 0..1, `seed` an integer; `messages` a non-empty list of
  {role, content}; a prompt + cap over `context` tokens is a 400 with code context_length_exceeded.
- Answers have the real shapes: chat `choices[0].{index, message: {role, content, refusal,
  annotations}, logprobs: null | {content: [{token, logprob, bytes, top_logprobs: [{token, logprob,
  bytes}]}], refusal: null}, finish_reason}`; completions `choices[0].{text, index, logprobs: null |
  {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}, finish_reason}`; `usage`
  {prompt_tokens, completion_tokens, total_tokens, *_tokens_details}; `system_fingerprint`. A stop
  string ends the text before it (it is left out) with finish_reason "stop", and no field names it.
  Tokens are counted as words and punctuation (not tiktoken): the tests read counts, not their values.
- Files and Batches (the Batch API): POST /v1/files (multipart: `purpose`, `file`; purpose `batch`
  needs a .jsonl of at most 50,000 lines and 200 MB, each `{custom_id (unique), method: POST, url, body}`),
  GET /v1/files/{id}/content; POST /v1/batches (`input_file_id`, `endpoint` equal to every line's url,
  `completion_window: "24h"`, `metadata`), GET /v1/batches/{id}, GET /v1/batches (newest first, `limit`, `after`), POST /v1/batches/{id}/cancel. A
  batch walks validating -> in_progress -> finalizing -> completed, one step per GET while `hold` is
  off (`finish()` ends every batch at once). Its fate is the next of `fates` (default "completed"):
  "failed" (validation failed: `errors`, no output), "expired" and "cancelled" (the first half of the
  lines ran; the rest are error-file lines with no response and error code batch_expired /
  batch_cancelled), "missing" (completed, the first line in neither file), "server_error" (completed,
  the first line answered 500 in the error file). Each line runs as the online endpoint would
  (`generate`): 200s go to the output file, refusals (400 ...) to the error file, with the real
  line shape `{id, custom_id, response: {status_code, request_id, body}, error}`.

Test hooks (not OpenAI): `answer(body) -> str`, the text the "model" writes for a request (default:
`method_answer`, a deterministic answer per prompt of the method's stages); a prompt that ends with
"Score:" on a logprob request gets " N" and top logprobs over the digits (`digit_logprobs`); `plan`, a
list of answers the next POSTs to the generation endpoints get instead ({"status", "headers",
"body"}); `refuse(body)`: a 200 with finish_reason content_filter; `requests`: each POST's path,
body, status and arrival time; `listings`: how many GET /v1/models it answered; `creates`: what the
next POSTs to /v1/batches do instead of answering at once: {"delay": s} (a slow server: the batch is
made after s seconds, whether the client still waits or not) or {"status": 500} (an error, no batch);
`proxied`: the URL of each request that came as to a forward proxy (the stand-in named by HTTP_PROXY
answers them as if it were the host they name).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.vllm_standin.openai_server import send_json

COMMON = {"model", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty", "seed",
          "stop", "stream", "stream_options", "temperature", "top_p", "user"}
CHAT_FIELDS = COMMON | {"messages", "audio", "function_call", "functions", "max_completion_tokens", "metadata",
                        "modalities", "parallel_tool_calls", "prediction", "prompt_cache_key", "reasoning_effort",
                        "response_format", "safety_identifier", "service_tier", "store", "tool_choice", "tools",
                        "top_logprobs", "verbosity", "web_search_options"}
COMPLETION_FIELDS = COMMON | {"prompt", "best_of", "echo", "suffix"}
TOKEN = re.compile(r"\w+|[^\w\s]")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def stops(body: dict) -> list[str]:
    """The request's stop strings (`stop`: a string or a list of up to 4)."""
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else list(stop or [])


def count_tokens(text: str) -> int:
    return len(TOKEN.findall(text or ""))


def method_answer(text: str) -> str:
    """A deterministic answer of the method's stages to a prompt (which stage, from its template's
    words), distinct per prompt, parseable by generation/parsing.py."""
    h = hashlib.sha256(text.encode()).hexdigest()[:8]
    if "Write the most likely question" in text:
        return f"What does the text {h} explain?"
    if "Please assign a score" in text:
        return f"The answer is on topic ({h}).\nScore: {int(h, 16) % 5 + 1}"
    if "rewrite the draft" in text:
        return f"[RES] A rewritten answer {h}. [/RES]"
    if "Please rate according to the accuracy" in text:
        return f"{(int(h, 16) % 11) / 2:g}\nThe response is accurate ({h})."
    return f"A direct answer {h}."


def digit_logprobs(text: str) -> list[tuple[str, float]]:
    """Top alternatives (token, logprob) for the score digit after a prompt ending in "Score:", most
    likely first: a distribution over " 1".." 5" that depends on the prompt."""
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    weights = [1.0 + ((h >> (4 * d)) & 15) for d in range(5)]
    total = sum(weights)
    pairs = [(f" {d + 1}", math.log(w / total)) for d, w in enumerate(weights)]
    return sorted(pairs, key=lambda p: -p[1])


def check_body(path: str, body: dict, reasoning: bool = True) -> None:
    """APIError for what OpenAI's API refuses in a generation request (module docstring)."""
    chat = path.endswith("/chat/completions")
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for field in body:
        if field not in known:
            raise APIError(400, f"Unrecognized request argument supplied: {field}")
    if not isinstance(body.get("model"), str):
        raise APIError(400, "you must provide a model parameter", "model")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > 4:
        raise APIError(400, f"{stop!r} is too long - 'stop'", "stop")
    t, p = body.get("temperature", 1), body.get("top_p", 1)
    if not (isinstance(t, (int, float)) and 0 <= t <= 2):
        raise APIError(400, f"{t!r} is greater than the maximum of 2 - 'temperature'", "temperature")
    if not (isinstance(p, (int, float)) and 0 <= p <= 1):
        raise APIError(400, f"{p!r} is greater than the maximum of 1 - 'top_p'", "top_p")
    if "seed" in body and not isinstance(body["seed"], int):
        raise APIError(400, f"{body['seed']!r} is not of type 'integer' - 'seed'", "seed")
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ("system", "developer", "user", "assistant", "tool")
                for m in msgs):
            raise APIError(400, "Invalid 'messages': expected a non-empty array of messages.", "messages")
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise APIError(400, "max_tokens and max_completion_tokens cannot both be set", "max_tokens")
        if "max_tokens" in body and reasoning:
            raise APIError(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                                "'max_completion_tokens' instead.", "max_tokens", "unsupported_parameter")
        if "stop" in body and reasoning:
            raise APIError(400, "Unsupported parameter: 'stop' is not supported with this model.", "stop",
                           "unsupported_parameter")
        top = body.get("top_logprobs")
        if top is not None:
            if not body.get("logprobs"):
                raise APIError(400, "Invalid value for 'top_logprobs': 'logprobs' must be set to true", "top_logprobs")
            if not isinstance(top, int) or not 0 <= top <= 20:
                raise APIError(400, f"Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, "
                                    f"but got {top} instead.", "top_logprobs", "integer_above_max_value")
    else:
        if not isinstance(body.get("prompt"), str):
            raise APIError(400, "Invalid 'prompt': expected a string.", "prompt")
        lp = body.get("logprobs")
        if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= 5):
            raise APIError(400, f"{lp!r} is greater than the maximum of 5 - 'logprobs'", "logprobs")


class OpenAIStandin:
    """The stand-in server (module docstring); `url` ends in /v1. Stop it with `stop()`."""

    def __init__(self, models=("gpt-standin",), context: int = 8192, reasoning: bool = True,
                 owned_by: str = "system"):
        self.models, self.context, self.reasoning, self.owned_by = list(models), context, reasoning, owned_by
        self.answer = None
        self.refuse = None
        self.plan: list[dict] = []
        self.requests: list[dict] = []
        self.listings = 0           # GET /v1/models answered
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.fates: list[str] = []
        self.hold = False
        self.creates: list[dict] = []
        self.proxied: list[str] = []
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def statuses(self) -> list[int]:
        return [r["status"] for r in self.requests]

    # ---- routes (BatchStandin adds its own) ------------------------------------------------------
    def get(self, path: str, query: dict | None = None):
        if path == "/v1/batches":   # newest first, `limit` (1..100, default 20) and `after` a batch id
            with self._lock:
                return 200, self.list_batches(query or {}), {}
        if path == "/v1/models":
            with self._lock:
                self.listings += 1
            return 200, {"object": "list", "data": [{"id": m, "object": "model", "created": 1700000000,
                                                     "owned_by": self.owned_by} for m in self.models]}
        m = re.fullmatch(r"/v1/files/([\w-]+)/content", path)
        if m:
            if m.group(1) not in self.files:
                raise APIError(404, f"No such File object: {m.group(1)}", "id")
            return 200, self.files[m.group(1)]["content"], {}
        m = re.fullmatch(r"/v1/batches/([\w-]+)", path)
        if m:
            with self._lock:
                batch = self._batch(m.group(1))
                if not self.hold:
                    self._advance(batch)
                return 200, self._public(batch), {}
        raise APIError(404, f"Invalid URL (GET {path})")

    def post(self, path: str, handler) -> tuple[int, dict | bytes, dict]:
        raw = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        if path == "/v1/files":
            return 200, self.upload(handler.headers.get("Content-Type", ""), raw), {}
        body = json.loads(raw or b"{}")
        if path == "/v1/batches":
            with self._lock:
                step = self.creates.pop(0) if self.creates else {}
            if "status" in step:
                return step["status"], {"error": {"message": "The server had an error while processing your "
                                                  "request.", "type": "server_error", "param": None, "code": None}}, {}
            time.sleep(step.get("delay", 0))   # made even when the client stopped waiting
            with self._lock:
                return 200, self.create_batch(body), {}
        m = re.fullmatch(r"/v1/batches/([\w-]+)/cancel", path)
        if m:
            with self._lock:
                batch = self._batch(m.group(1))
                if batch["status"] in ("validating", "in_progress", "finalizing"):
                    batch["fate"] = "cancelled"
                    self._end(batch)
                return 200, self._public(batch), {}
        record = {"path": path, "body": body, "time": time.monotonic()}
        with self._lock:
            self.requests.append(record)
            step = self.plan.pop(0) if self.plan else {}
        try:
            if "status" in step:
                record["status"] = step["status"]
                return step["status"], step.get("body", {}), step.get("headers") or {}
            answer = self.generate(path, body)
        except APIError as e:
            record["status"] = e.status
            return e.status, e.body, {}
        record["status"] = 200
        return 200, answer, {}

    # ---- Files and Batches -------------------------------------------------------------------------
    def upload(self, content_type: str, raw: bytes) -> dict:
        from email.parser import BytesParser
        from email.policy import HTTP

        if not content_type.startswith("multipart/form-data"):
            raise APIError(400, "Invalid file upload: expected multipart/form-data")
        msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        fields = {part.get_param("name", header="content-disposition"): part for part in msg.iter_parts()}
        if "file" not in fields or "purpose" not in fields:
            raise APIError(400, "Missing required parameter: 'file'" if "file" not in fields else
                           "Missing required parameter: 'purpose'")
        purpose = fields["purpose"].get_payload(decode=True).decode()
        name = fields["file"].get_filename() or "upload"
        data = fields["file"].get_payload(decode=True)
        if purpose == "batch":
            if not name.endswith(".jsonl"):
                raise APIError(400, "Invalid file format for Batch API. Must be .jsonl")
            lines = data.splitlines()
            if len(lines) > 50_000 or len(data) > 200 * 1024 * 1024:
                raise APIError(400, "The batch input file is larger than the 200 MB or 50,000 requests limit")
        fid = f"file-{len(self.files):06d}{hashlib.sha256(data).hexdigest()[:8]}"
        self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                           "filename": name, "purpose": purpose, "content": data}
        return {k: v for k, v in self.files[fid].items() if k != "content"} | {"status": "processed"}

    def create_batch(self, body: dict) -> dict:
        for field in body:
            if field not in ("input_file_id", "endpoint", "completion_window", "metadata",
                             "output_expires_after"):
                raise APIError(400, f"Unrecognized request argument supplied: {field}")
        if body.get("completion_window") != "24h":
            raise APIError(400, "Invalid value for 'completion_window': expected '24h'", "completion_window")
        if body.get("endpoint") not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"):
            raise APIError(400, f"Invalid value for 'endpoint': {body.get('endpoint')!r}", "endpoint")
        f = self.files.get(body.get("input_file_id"))
        if f is None or f["purpose"] != "batch":
            raise APIError(400, f"Invalid 'input_file_id': {body.get('input_file_id')!r}", "input_file_id")
        bid = f"batch_{len(self.batches):06d}"
        now = int(time.time())
        self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                             "input_file_id": f["id"], "completion_window": "24h", "status": "validating",
                             "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                             "expires_at": now + 86400, "finalizing_at": None, "completed_at": None,
                             "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                             "request_counts": {"total": 0, "completed": 0, "failed": 0},
                             "metadata": body.get("metadata"), "fate": self.fates.pop(0) if self.fates else "completed",
                             "history": ["validating"]}
        return self._public(self.batches[bid])

    def list_batches(self, query: dict) -> dict:
        limit = int((query.get("limit") or ["20"])[0])
        if not 1 <= limit <= 100:
            raise APIError(400, "Invalid 'limit': integer below minimum value or above maximum value", "limit")
        newest = [self._public(b) for b in reversed(self.batches.values())]
        after = (query.get("after") or [None])[0]
        if after is not None:
            ids = [b["id"] for b in newest]
            if after not in ids:
                raise APIError(400, f"Invalid 'after': {after!r}", "after")
            newest = newest[ids.index(after) + 1:]
        page = newest[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(newest) > limit}

    def finish(self) -> None:
        """Every running batch ends now, as its fate says."""
        with self._lock:
            for batch in self.batches.values():
                while batch["status"] in ("validating", "in_progress", "finalizing"):
                    self._advance(batch)

    def _batch(self, bid: str) -> dict:
        if bid not in self.batches:
            raise APIError(404, f"No batch found with id '{bid}'.", "batch_id")
        return self.batches[bid]

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in ("fate", "history")}

    def _advance(self, batch: dict) -> None:
        status, fate = batch["status"], batch["fate"]
        if status == "validating":
            if fate == "failed" or not self._valid(batch):
                batch.update(status="failed", failed_at=int(time.time()))
                batch["errors"] = batch["errors"] or {"object": "list", "data": [
                    {"code": "invalid_request", "message": "The batch failed validation (scripted).", "param": None,
                     "line": 1}]}
            else:
                batch.update(status="in_progress", in_progress_at=int(time.time()))
        elif status == "in_progress":
            if fate in ("expired", "cancelled"):
                self._end(batch)
            else:
                batch.update(status="finalizing", finalizing_at=int(time.time()))
        elif status == "finalizing":
            self._end(batch)
        batch["history"].append(batch["status"])

    def _valid(self, batch: dict) -> bool:
        lines, seen = self.files[batch["input_file_id"]]["content"].splitlines(), set()
        for i, raw in enumerate(lines, 1):
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            problem = None
            if not isinstance(line, dict) or set(line) != {"custom_id", "method", "url", "body"}:
                problem = "each line must hold exactly custom_id, method, url and body"
            elif line["custom_id"] in seen:
                problem = f"The custom_id {line['custom_id']!r} is duplicated"
            elif line["method"] != "POST" or line["url"] != batch["endpoint"]:
                problem = f"The url {line['url']!r} does not match the batch's endpoint {batch['endpoint']!r}"
            if problem:
                batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": problem,
                                                               "param": None, "line": i}]}
                return False
            seen.add(line["custom_id"])
        return True

    def _end(self, batch: dict) -> None:
        """Runs the batch's lines as its fate says and writes its output and error files."""
        fate = batch["fate"]
        lines = [json.loads(raw) for raw in self.files[batch["input_file_id"]]["content"].splitlines()]
        out, err = [], []
        ran = lines[: len(lines) // 2] if fate in ("expired", "cancelled") else lines
        for i, line in enumerate(lines):
            rid = f"batch_req_{batch['id']}_{i}"
            if i >= len(ran):
                code = "batch_expired" if fate == "expired" else "batch_cancelled"
                err.append({"id": rid, "custom_id": line["custom_id"], "response": None,
                            "error": {"code": code, "message": "This request could not be executed before the "
                                      "completion window expired." if fate == "expired" else
                                      "This request was cancelled before it ran."}})
                continue
            if i == 0 and fate == "missing":
                continue
            if i == 0 and fate == "server_error":
                err.append({"id": rid, "custom_id": line["custom_id"], "response": {
                    "status_code": 500, "request_id": rid, "body": {"error": {
                        "message": "The server had an error while processing your request.", "type": "server_error",
                        "param": None, "code": None}}}, "error": None})
                continue
            try:
                status, answer = 200, self.generate(line["url"], line["body"])
            except APIError as e:
                status, answer = e.status, e.body
            entry = {"id": rid, "custom_id": line["custom_id"],
                     "response": {"status_code": status, "request_id": rid, "body": answer}, "error": None}
            (out if status == 200 else err).append(entry)
        now = int(time.time())
        for kind, entries in (("output_file_id", out), ("error_file_id", err)):
            if entries:
                data = b"".join(json.dumps(e).encode() + b"\n" for e in entries)
                fid = f"file-{len(self.files):06d}{kind[:3]}"
                self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": now,
                                   "filename": f"{batch['id']}_{kind[:-8]}.jsonl", "purpose": "batch_output",
                                   "content": data}
                batch[kind] = fid
        status = {"expired": "expired", "cancelled": "cancelled"}.get(fate, "completed")
        batch.update(status=status, request_counts={"total": len(lines), "completed": len(out), "failed": len(err)})
        batch[{"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]] = now

    def generate(self, path: str, body: dict) -> dict:
        """The answer to one generation request (also what a batch's output line holds as its body)."""
        if path not in ("/v1/chat/completions", "/v1/completions"):
            raise APIError(404, f"Invalid URL (POST {path})")
        check_body(path, body, self.reasoning)
        if body["model"] not in self.models:
            raise APIError(404, f"The model `{body['model']}` does not exist or you do not have access to it.",
                           None, "model_not_found")
        chat = path == "/v1/chat/completions"
        text = (body["messages"][-1].get("content") or "") if chat else body["prompt"]
        whole = "\n".join(str(m.get("content")) for m in body["messages"]) if chat else text
        cap = body.get("max_completion_tokens", body.get("max_tokens", 16)) if chat else body.get("max_tokens", 16)
        prompt_tokens = count_tokens(whole) + (3 * len(body["messages"]) if chat else 0)
        if prompt_tokens + (cap or 0) > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {prompt_tokens + cap} tokens ({prompt_tokens} in the messages, {cap} in "
                                "the completion). Please reduce the length of the messages or completion.",
                           "messages" if chat else "prompt", "context_length_exceeded")
        wants_lp = bool(body.get("logprobs"))
        n_top = (body.get("top_logprobs") or 0) if chat else (body.get("logprobs") or 0)
        if wants_lp and text.rstrip().endswith("Score:"):
            tops = digit_logprobs(whole)
            out, finish = tops[0][0], "stop"
        else:
            tops = None
            out = (self.answer or method_answer)(whole)
            finish = "stop"
        hits = [out.index(s) for s in stops(body) if s in out]
        if hits:                      # a stop string ends the answer and is left out of it; no stop reason
            out = out[: min(hits)]
        words = TOKEN.findall(out)
        if len(words) > cap:          # the cap cuts the answer, as a model is cut
            out, finish = " ".join(words[:cap]), "length"
        if self.refuse is not None and self.refuse(body):
            out, finish = "", "content_filter"
        completion_tokens = count_tokens(out)
        logprobs = None
        if wants_lp:
            first = tops or [(words[0] if words else "", -0.01)]
            rest = [(w, -0.01) for w in TOKEN.findall(out)[1:]] if tops is None else []
            positions = [(first[0][0], first[0][1], first[:n_top])] + [(w, lp, [(w, lp)][:n_top]) for w, lp in rest]
            if chat:
                logprobs = {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                         "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())}
                                                          for a, b in alts]} for t, lp, alts in positions],
                            "refusal": None}
            else:
                logprobs = {"tokens": [t for t, _, _ in positions], "token_logprobs": [lp for _, lp, _ in positions],
                            "top_logprobs": [dict(alts) for _, _, alts in positions],
                            "text_offset": list(range(len(positions)))}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                               "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
        rid = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out, "refusal": None, "annotations": []},
                      "logprobs": logprobs, "finish_reason": finish}
            return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"], "choices": [choice], "usage": usage, "service_tier": "default",
                    "system_fingerprint": "fp_standin"}
        choice = {"text": out, "index": 0, "logprobs": logprobs, "finish_reason": finish}
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                "choices": [choice], "usage": usage, "system_fingerprint": "fp_standin"}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body, headers: dict | None = None):
                try:
                    send_json(self, status, body, headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client stopped waiting (a timeout, or an answer it would not read whole)

            def _route(self) -> tuple[str, str]:
                """(path, query); a request sent through a proxy names the whole URL."""
                url = urllib.parse.urlsplit(self.path)
                if url.scheme:
                    server.proxied.append(self.path)
                return url.path.rstrip("/"), url.query

            def do_GET(self):
                try:
                    path, query = self._route()
                    self._send(*server.get(path, urllib.parse.parse_qs(query)))
                except APIError as e:
                    self._send(e.status, e.body)

            def do_POST(self):
                try:
                    self._send(*server.post(self._route()[0], self))
                except APIError as e:
                    self._send(e.status, e.body)

        return Handler
