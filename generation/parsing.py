"""Parsing of model outputs (the papers' formats, generation/templates.py): never crash, never guess; a
failure has a reason.

Each parser returns (fields, parse_error); parse_error is None on success, else one of the reasons
below, recorded on the row so that the funnel can show why pairs were lost.
"""
from __future__ import annotations

import math
import re

_LABEL = re.compile(r"^\s*(?:\*\*)?(?:question|instruction|query|prompt|user)\s*(?:\*\*)?\s*[:：]\s*", re.I)
_ECHO_MARKERS = ("write the most likely question", "candidate answer to a question", "[inst]", "[/inst]")


def parse_instruction(text: str, document: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """Backtranslation output -> instruction. Failures: empty, echo (the prompt or the document
    copied back), truncated (cut by the token limit before a line ended)."""
    out = text.strip()
    out = _LABEL.sub("", out, count=1).strip()
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'“”":
        out = out[1:-1].strip()
    if not out:
        return {"instruction": None}, "empty"
    low = out.lower()
    if any(m in low for m in _ECHO_MARKERS):
        return {"instruction": None}, "echo"
    head = " ".join(document.split())[:200].lower()
    if len(head) >= 40 and (" ".join(low.split()).startswith(head[:120]) or head.startswith(" ".join(low.split()))):
        return {"instruction": None}, "echo"
    if finish_reason == "length":
        return {"instruction": out}, "truncated"
    return {"instruction": out}, None


_SCORE = re.compile(r"(?:\*\*|__)?score(?:\*\*|__)?\s*[:：]\s*(?:\*\*|__)?\s*(-?\d+(?:\.\d+)?)"
                    r"(?:\s*/\s*(\d+))?(\s*[-–~]\s*\d)?", re.I)


def parse_score(text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """Humpback rubric output -> score 1..5 and the reasoning before it.

    The LAST `Score: N` counts (case-insensitive, optional spaces, the label may be bold:
    `**Score**: 5`). N must be a whole number 1..5, written as an integer or with a zero fraction
    (5, 5.0), optionally followed by "/5" or ".". Failures: no_match, truncated (no match and the
    output hit the token limit), out_of_range (8, 10, 91, 0, 4.5, 3/10: another scale), ambiguous
    (a range such as 4-5).
    """
    matches = list(_SCORE.finditer(text))
    if not matches:
        return {"score": None, "reasoning": text.strip() or None}, "truncated" if finish_reason == "length" else "no_match"
    last = matches[-1]
    reasoning = text[: last.start()].strip() or None
    raw, scale, span = last.groups()
    if span:
        return {"score": None, "reasoning": reasoning}, "ambiguous"
    value = float(raw)
    if (scale and scale != "5") or value not in (1, 2, 3, 4, 5):
        return {"score": None, "reasoning": reasoning}, "out_of_range"
    return {"score": value, "reasoning": reasoning}, None


def score_from_probs(probs: dict[str, float]) -> tuple[dict, str | None]:
    """Logprob score mode: probabilities of the next token being "1".."5" after "Score:" ->
    the expected score (renormalized over the five) and the argmax."""
    values = [probs.get(str(k), 0.0) for k in range(1, 6)]
    if not all(isinstance(p, (int, float)) and math.isfinite(p) and p >= 0 for p in values):
        return {"score": None, "reasoning": None}, "non_finite_probability"   # a NaN weight or logprob
    total = sum(values)
    if not total > 0:
        return {"score": None, "reasoning": None}, "no_digit_probability"
    expected = sum(k * probs.get(str(k), 0.0) for k in range(1, 6)) / total
    argmax = max(range(1, 6), key=lambda k: (probs.get(str(k), 0.0), k))
    return {"score": round(expected, 4), "reasoning": f"argmax={argmax} p({argmax})={probs.get(str(argmax), 0.0) / total:.4f} mass={total:.4f}"}, None


_RES = re.compile(r"\[RES\]((?:(?!\[RES\]).)*?)\[/RES\]", re.S)
RES_CLOSE = "[/RES]"    # the rewrite's end: the stop string of its requests (generation/stages.py)


def parse_rewrite(text: str, finish_reason: str | None, stopped: bool | None = False) -> tuple[dict, str | None]:
    """Rewrite output -> the text between [RES] and [/RES]: the one rule of a rewrite, which assemble
    follows (a row this parses with no parse_error is whole: assemble keeps it).

    The answer is the first complete block: the text after the last [RES] before the first [/RES]
    (`[RES] a [RES] b [/RES]` gives "b": the model restarted its answer). Whatever follows that
    [/RES] is not part of the answer: later blocks (repeats the chat model adds) are ignored, and a
    token cap hit after it is no truncation. The requests stop at [/RES] (RES_CLOSE), which servers
    leave out of the text, so an output that ends inside an open block is complete when it ended at
    that stop string: `stopped` True (the engine says so: vLLM's stop_reason, the hf engine's own
    cut), or None (the server does not say which, as a generic OpenAI-compatible server's
    finish_reason "stop" does not) with finish_reason "stop": the model ended its answer there
    either way, at the stop string or at its own end of sequence; only the cap cuts an answer. An
    open block is otherwise `truncated` when the output hit the cap, else `unclosed` (the model ended
    without closing it). No [RES] at all is `unparsed`; an empty answer is `empty`.
    """
    match = _RES.search(text)
    if match:
        response = match.group(1)
    elif "[RES]" in text and (stopped or stopped is None and finish_reason == "stop"):
        response = text.rsplit("[RES]", 1)[1]
    elif "[RES]" in text:
        return {"response": None}, "truncated" if finish_reason == "length" else "unclosed"
    else:
        return {"response": None}, "unparsed"
    response = response.strip()
    return ({"response": response}, None) if response else ({"response": None}, "empty")


def parse_distill(text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """Distillation output -> the chat model's answer. `truncated` keeps the text; `empty` does not."""
    response = text.strip()
    if not response:
        return {"response": None}, "empty"
    return {"response": response}, ("truncated" if finish_reason == "length" else None)


_RATING = re.compile(r"^\s*(?:score\s*[:：]?\s*)?\**\s*(\d+(?:\.\d+)?)\s*\**\s*(?:/\s*(\d+(?:\.\d+)?))?", re.I)


def parse_rating(text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """AlpaGasus output -> the number on the first line, 0..5, fractional allowed."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return {"score": None, "reasoning": None}, "truncated" if finish_reason == "length" else "empty"
    m = _RATING.match(lines[0])
    reasoning = "\n".join(lines[1:]).strip() or None
    if not m:
        return {"score": None, "reasoning": text.strip()}, "no_match"
    value = float(m.group(1))
    if m.group(2) is not None and float(m.group(2)) != 5:   # "5/10", "3/4": another scale, not the prompt's
        return {"score": None, "reasoning": reasoning}, "out_of_range"
    if not 0 <= value <= 5:
        return {"score": None, "reasoning": reasoning}, "out_of_range"
    return {"score": value, "reasoning": reasoning}, None
