"""What a generation row's `parse_error` says, and the summary of a generation shard.

A row of a stage shard is good when its parse_error is null. Otherwise the text before the first ':'
is its category, and what follows, the detail:

    engine_error: <what the engine said>      TRANSIENT: the request failed for a reason a resend may
                                               cure (connection, timeout, 429, 5xx, a broken body),
                                               after the engine's retries; resent by the next run and
                                               counted against the stage's error budget
    content_filter: <detail>                   FINAL refusals: the server answered, and a resend of the
    refusal: <detail>                          same prompt with the same config would not change it
    prompt_too_long: <detail>                  (finish_reason content_filter; a chat `refusal`; a prompt
    answer_too_long: <detail>                  the server or engine rejects as longer than its context;
                                               an answer whose body is over the request's byte cap,
                                               generation.engines.openai.dialect.answer_cap, never read whole).
                                               Never resent while the stage's config is unchanged, not
                                               budgeted, dropped by assemble as `<stage>:<category>`
    upstream_failed:<upstream category>        the upstream stage's row failed: nothing was sent
    missing_upstream_row                       the upstream shard has no row for this id
    missing_text                               the candidate has no text
    not_sent: below_gate                       the row did not pass the stage's gate (rewrite/distill
                                               send only pairs whose score passed): nothing was sent
    <parser category>[: detail]                the output could not be parsed (generation/parsing.py)

Every category but engine_error is final: a parse failure is the model's answer too, and is kept.
These spellings are used by the generation runner (which writes them and counts engine errors),
by its per-shard metrics and by assemble's statistics and recipes (which read them); the summary
below is the one computation of a shard's statistics that both the runner's metrics and assemble use.
"""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ENGINE_ERROR = "engine_error"
UPSTREAM_FAILED = "upstream_failed"
MISSING_UPSTREAM_ROW = "missing_upstream_row"
MISSING_TEXT = "missing_text"
NOT_SENT = "not_sent"               # the finish_reason of a row that was never sent to a model
BELOW_GATE = f"{NOT_SENT}: below_gate"  # the parse_error of a row its stage's gate kept from the model
# Final refusals: the server's answer, not a failure to get one (module docstring)
CONTENT_FILTER, REFUSAL, PROMPT_TOO_LONG = "content_filter", "refusal", "prompt_too_long"
ANSWER_TOO_LONG = "answer_too_long"
REFUSALS = (CONTENT_FILTER, REFUSAL, PROMPT_TOO_LONG, ANSWER_TOO_LONG)

# Score histogram bins: [0, 0.5), [0.5, 1), ... [5, 5.5): generated scores are integers, logprob
# scores and AlpaGasus ratings may be fractional.
SCORE_EDGES = [x / 2 for x in range(1, 12)]


def engine_error(detail: str) -> str:
    return f"{ENGINE_ERROR}: {detail}"


def refused(kind: str, detail: str) -> str:
    """The parse_error of a final refusal (`kind` one of REFUSALS)."""
    if kind not in REFUSALS:
        raise ValueError(f"{kind!r} is no refusal category {REFUSALS}")
    return f"{kind}: {detail}"


def refused_text(refusals: dict[str, int] | None) -> str:
    """{"content_filter": 1} -> "1 refused (content_filter 1)"; {} -> "0 refused": how every summary
    line (bft generate, bft rebuild's stage lines and night) says what was refused."""
    refusals = {k: v for k, v in (refusals or {}).items() if v}
    detail = ", ".join(f"{k} {v}" for k, v in sorted(refusals.items()))
    return f"{sum(refusals.values())} refused" + (f" ({detail})" if detail else "")


def upstream_failed(upstream_category: str) -> str:
    return f"{UPSTREAM_FAILED}:{upstream_category}"


def category(parse_error: str | None) -> str | None:
    """'engine_error: timeout' -> 'engine_error'; 'upstream_failed:echo' -> 'upstream_failed'."""
    return None if parse_error is None else parse_error.split(":", 1)[0]


def is_engine_error(parse_error: str | None) -> bool:
    """Whether the row is a transient failure (the only outcome a rerun sends again)."""
    return category(parse_error) == ENGINE_ERROR


def categories(parse_error: pa.ChunkedArray | pa.Array) -> pa.Array:
    """`category` of every row, vectorized (nulls stay null)."""
    return pc.replace_substring_regex(parse_error, r"(?s):.*$", "")


def value_counts(arr, null: str = "none") -> dict[str, int]:
    vc = pc.value_counts(pc.fill_null(arr, null))
    return {str(v): int(c) for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())}


def histogram(values, edges: list[float]) -> list[int]:
    """Counts per bin: [<edges[0]], [edges[0], edges[1]), ..., [>=edges[-1]]; nulls are skipped."""
    arr = np.asarray(pc.drop_null(values).to_numpy(zero_copy_only=False), dtype=float)
    return np.bincount(np.searchsorted(edges, arr, side="right"), minlength=len(edges) + 1).tolist()


def shard_summary(table: pa.Table, scored: bool) -> dict:
    """A generation shard (GENERATION schema): rows, good rows, finish reasons (`not_sent` for rows
    never sent), parse failures by category, engine errors (transient), final refusals by category,
    truncated inputs, tokens, and for a scoring stage the score histogram. Mergeable: every leaf is a number or a list of counts."""
    errors = table["parse_error"]
    failures = value_counts(pc.drop_null(categories(errors)))
    out = {"rows": table.num_rows, "ok": errors.null_count,
           "finish_reasons": value_counts(table["finish_reason"], NOT_SENT),
           "parse_failures": failures,
           "engine_errors": failures.get(ENGINE_ERROR, 0),
           "refusals": {k: n for k, n in failures.items() if k in REFUSALS},
           "input_truncated": int(pc.sum(pc.fill_null(table["input_truncated"], False).cast(pa.int64())).as_py() or 0),
           "prompt_tokens": int(pc.sum(table["prompt_tokens"]).as_py() or 0),
           "output_tokens": int(pc.sum(table["output_tokens"]).as_py() or 0)}
    if scored:
        out["score_histogram"] = histogram(table["score"], SCORE_EDGES)
    return out


# A logprob score's reasoning (generation/parsing.py `score_from_probs` writes it): its argmax, that
# digit's probability and the digits' mass, which assemble's statistics read back for the gate's alert.
_MASS = re.compile(r"^argmax=[1-5] p\([1-5]\)=[0-9.]+ mass=([0-9.]+)$")


def digit_mass(reasoning: str | None) -> float | None:
    """The digits' probability mass recorded in a logprob score's reasoning (how much of the next
    token's probability went to "1".."5": near 1 when the model answers the rubric), or None for a
    score of the generate mode."""
    m = _MASS.match(reasoning or "")
    return float(m.group(1)) if m else None
