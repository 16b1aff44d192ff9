"""The length filter on a batch of texts, in one call (`judge`), and the verdict on one count: the
decisions are always those of counting every text; the bounds and the prefix cut only save counting."""
from __future__ import annotations

from typing import NamedTuple

from beam_pipelines.tokens.counter import TokenCounter
from beam_pipelines.tokens.shape import CHUNKS
from beam_pipelines.tokens.stepwise import counted_judgment, length_verdict

__all__ = ["Judgment", "judge", "length_verdict"]


class Judgment(NamedTuple):
    """What the length filter decided of one text: its exact token count (None when a bound decided
    without counting: the bytes bound proved it too long, or the upper bound proved it kept), the
    reason it is dropped (None: kept), and why, in words."""

    n_tokens: int | None
    verdict: str | None
    detail: str


def judge(counter: "TokenCounter", texts: list[str], min_tokens: int, max_tokens: int,
          exact: bool = False) -> list[Judgment]:
    """The length filter on a batch, in one call: texts the upper bound proves kept are kept uncounted
    (`kept_by_bound`; never with `exact`, which counts every kept text), texts the bytes bound proves
    too long are dropped uncounted (`rejected_by_bound`). On the chunk path, while the cost switch counts
    by chunks, the others are decided by their cached chunks and a share of their missed ones counted
    (`stepwise.py`: `rejected_by_chunks`, `kept_by_chunks`, `rejected_by_share`, `kept_by_share`), or
    counted. Otherwise (and a text holding an added token's content) the chunk caches' bounds decide
    what they can; a long text's prefix at a proved cut is counted first, and the text dropped when
    that is over the limit (`rejected_by_prefix`), else its rest counted from the cut; the others are
    counted exactly. The decisions are those of counting every text."""
    out: list[Judgment | None] = [None] * len(texts)
    todo: list[int] = []
    heads: list[tuple[int, int]] = []
    unsure: list[int] = []
    for i, text in enumerate(texts):
        fits = 0 if exact else counter.bound_fits(text, min_tokens, max_tokens)
        too_long = 0 if fits else counter.bound_exceeds(text, max_tokens)
        if fits:
            counter.kept_by_bound += 1
            out[i] = Judgment(None, None, f"<= {fits} tokens (upper bound), allowed {min_tokens}..{max_tokens}")
        elif too_long:
            counter.rejected_by_bound += 1
            out[i] = Judgment(None, "too_long", f">= {too_long} tokens (bytes bound) > {max_tokens}")
        else:
            unsure.append(i)
    if counter.shape.path == CHUNKS:   # by chunks, a share of the missed ones at a time (stepwise.py)
        decided, unsure = counter.decide(texts, unsure, min_tokens, max_tokens, exact)
        for i, n, verdict, detail in decided:
            out[i] = Judgment(n, verdict, detail)
    for i in unsure:
        text = texts[i]
        lower, upper = counter.chunk_bounds(text, max_tokens)   # the caches alone: no tokenizer call
        if lower > max_tokens:
            counter.rejected_by_chunks += 1
            out[i] = Judgment(None, "too_long", f">= {lower} tokens (its cached chunks) > {max_tokens}")
            continue
        if not exact and upper is not None and upper <= max_tokens and lower >= min_tokens:
            counter.kept_by_chunks += 1
            out[i] = Judgment(None, None, f"<= {upper} tokens (its cached chunks, the others' upper bound), "
                                          f"allowed {min_tokens}..{max_tokens}")
            continue
        cut = counter.cut_past(text, max_tokens) or (0 if exact else counter.cut_to_keep(text, max_tokens))
        if cut:
            heads.append((i, cut))
        else:
            todo.append(i)
    counted: list[tuple[int, int]] = []   # (text, its count) of the cut texts whose prefix did not decide
    rests: list[tuple[int, int, int]] = []  # (text, cut, the prefix's count)
    for (i, cut), n in zip(heads, counter.count([texts[i][:cut] for i, cut in heads]) if heads else []):
        if n > max_tokens:
            counter.rejected_by_prefix += 1
            out[i] = Judgment(None, "too_long", f">= {n} tokens (its first {cut} characters) > {max_tokens}")
        elif (not exact and n >= min_tokens and n + len(texts[i]) - cut <= max_tokens   # cheap first: bytes >= chars
              and (bound := counter.tail_bound(texts[i][cut:])) is not None and n + bound <= max_tokens):
            counter.kept_by_prefix += 1
            out[i] = Judgment(None, None, f"<= {n + bound} tokens ({n} in its first {cut} characters, the rest's "
                                          f"upper bound {bound}), allowed {min_tokens}..{max_tokens}")
        else:  # sparser in tokens than the prefix was sized for: its rest, counted from the cut, adds up
            rests.append((i, cut, n))
    if rests:
        for (i, _, n), rest in zip(rests, counter.count_from_cuts([texts[i][cut:] for i, cut, _ in rests])):
            counted.append((i, n + rest))
    for i, n in counted + list(zip(todo, counter.count([texts[i] for i in todo]) if todo else [])):
        out[i] = Judgment(*counted_judgment(n, min_tokens, max_tokens))
    return out

