"""An answer of an OpenAI-compatible server -> `Completion`: the one reading of an answer, online
(engine.py) and from a batch's output and error files (generation/batch.py), and how long the server
asks us to wait before the next try. Pure: bytes and headers in, a Completion or seconds out.

- Outcomes (schemas/outcomes.py). FINAL, never resent while the config is unchanged: finish_reason
  content_filter; a chat answer whose `refusal` is set; a 400 saying the prompt exceeds the context;
  a 200 whose body is over its byte cap (dialect.answer_cap).
  TRANSIENT, retried with back-off (engine.py) and resent by a later run: connection errors, timeouts,
  408/409/429/5xx (RETRY_STATUS), a 200 whose body is broken or has no usable choice, any other finish
  reason (vLLM's abort), any other 4xx (a server or config problem, which the error budget then stops).
- Retry waits (`retry_wait`): `retry-after-ms`, else `Retry-After` (seconds or an HTTP date), else on a
  429 the `x-ratelimit-reset-requests`/`-tokens` durations (OpenAI's "1s", "6m0s", "20ms").
- Stop strings: a finish_reason "stop" is read with the choice's `stop_reason` (vLLM) or
  `matched_stop` (SGLang) into Completion.stopped; a server that names neither leaves it unknown
  (None), and the parser decides (parsing.parse_rewrite).
- Bounded answers: a 200 over its cap (by its Content-Length or by what came) is a FINAL outcome,
  answer_too_long (`too_long`), the rest never read. A batch output line is held to the same cap
  (generation/batch.py reads its files line by line and marks a longer one OVER_CAP).
"""
from __future__ import annotations

import email.utils
import math
import re
import time

import orjson

from generation.engines.base import ANSWER_TOO_LONG, PROMPT_TOO_LONG, REFUSAL, Completion, Request, failed, finished
from generation.engines.openai.dialect import answer_cap

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Where a choice names the stop string that ended it: vLLM's `stop_reason`, SGLang's `matched_stop`
# (a string, a stop token id, or null at the model's end of sequence).
STOP_REASON_FIELDS = ("stop_reason", "matched_stop")
OVER_CAP = "bft_over_cap"   # a batch output line read no further than its cap: its size (generation/batch_api.py)
# How servers say a prompt does not fit: vLLM ("This model's maximum context length is N tokens",
# V1 "The decoder prompt (length N) is longer than the maximum model length of M", "... is too long"),
# OpenAI (code context_length_exceeded), SGLang / TGI ("exceeds the model's context length",
# "must have less than N tokens").
TOO_LONG = re.compile(r"maximum context length|context_length_exceeded|longer than the maximum model length|"
                      r"prompt is too long|exceeds? (?:the )?(?:model'?s? )?(?:maximum )?context|"
                      r"must have less than \d+ (?:input )?tokens|max_model_len", re.I)


def too_long(size: int, r: Request) -> Completion:
    """The final outcome of an answer over `answer_cap(r)` bytes (`size`: what was seen of it)."""
    return failed(f"answer over {answer_cap(r):,} bytes ({size:,} or more; the cap for {r.max_new_tokens} new tokens): "
                  "not read further", refusal=ANSWER_TOO_LONG)


def outcome(status: int, headers, content: bytes, r: Request, api: str) -> Completion:
    """The Completion of an answer that is not retried (any status but RETRY_STATUS), on API `api`."""
    text = content[:500].decode("utf-8", "replace")
    if status == 400 and TOO_LONG.search(text):
        return failed(f"HTTP 400: {text}", refusal=PROMPT_TOO_LONG)
    if status >= 300:
        where = f" (redirect to {headers.get('location')})" if 300 <= status < 400 else ""
        return failed(f"HTTP {status}{where}: {text}")
    return parse(content, r, api)


def batch_outcome(line: dict | None, r: Request, api: str) -> Completion | None:
    """The Completion of a batch output or error-file line for `r`, read as the same answer online
    would be; None when there is none to keep: the line is missing, it carries no response (the
    batch expired, was cancelled or failed before the request ran) or a status online would retry
    (429, 5xx): the row is submitted again."""
    if isinstance(line, dict) and isinstance(line.get(OVER_CAP), int):   # batch_api.read_jsonl cut it
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
    return outcome(status, {}, content, r, api)


def parse(content: bytes, r: Request, api: str) -> Completion:
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
    message = choice.get("message") if api == "chat" else None
    if api == "chat" and not isinstance(message, dict):
        return failed(f"the server answered 200 with a choice without a message: {content[:200]!r}")
    if message is not None and isinstance(message.get("refusal"), str) and message["refusal"]:
        return failed(f"refusal: {message['refusal'][:200]}", _count(usage.get("prompt_tokens")), refusal=REFUSAL)
    text = choice.get("text") if api == "completions" else message.get("content")
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
        top = _top_logprobs(choice, api)
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


def snippet(body: bytes, limit: int) -> str:
    """The start of an answer's body on one line (an error message is one line)."""
    return " ".join(body[:limit].decode("utf-8", "replace").split())


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


# ---- how long the server asks us to wait -------------------------------------------------------------

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
