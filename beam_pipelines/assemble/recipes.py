"""The paper's corpus recipes (the table is schemas.recipes) applied, and the curation after them, as
pure functions on Arrow tables.

`verdicts` gives every candidate row exactly one outcome: kept (null) or the first reason it was
dropped, in pipeline order: the backtranslate row missing or failed (`<stage>:<parse_error category>`),
the gate stage's row missing, failed or made from a cut document (`<stage>:input_truncated`), the gate
itself (`<stage>_below_threshold`), then the answering stage's row the same way, then curation
(instruction length bounds in characters, empty response). A stage row counts as good only when its
parse_error is null, as in the generation runner itself: whether an answer is whole is its parser's
rule alone (generation/parsing.py: a rewrite whose [RES] block closed is whole even when the output
then ran to the cap; a distilled answer cut by the cap is `truncated`), never the finish_reason. The gate comes before the
answer, so a rewrite the runner did not send because the pair failed the gate (`not_sent: below_gate`)
counts as dropped by the gate, not as a failed rewrite. `restrict` drops rows another recipe drops
(assemble's --same-ids-as).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import schemas
from schemas import drops
from schemas.drops import EMPTY, TOO_LONG, TOO_SHORT
from schemas.recipes import RECIPES, STAGES, Gate, Recipe  # noqa: F401 (a contract)
from schemas.outcomes import categories
from schemas.examples import SEED_TAG, WEB_TAG, examples, messages_column  # noqa: F401 (used by assemble)


# Every generation stage, in pipeline order (schemas.recipes.STAGES: the one list).
ALL_STAGES = list(STAGES)

# The columns each stage contributes to the join, renamed `<stage>.<column>`.
STAGE_COLUMNS = ["instruction", "score", "response", "parse_error", "finish_reason", "input_truncated",
                 "raw_output"]   # raw_output: what a dropped row's model wrote, for the report


@dataclass(frozen=True)
class Curation:
    min_instruction_chars: int
    max_instruction_chars: int


def join_stages(candidates: pa.Table, stages: dict[str, pa.Table]) -> pa.Table:
    """candidates (id, text, n_tokens, url, crawl_date) left-joined with each stage's rows by id, sorted by id.

    A stage's columns come as `<stage>.<column>` plus `<stage>.present` (null when the stage has no
    row for the id)."""
    joined = candidates.select(["id", "text", "n_tokens", "url", "crawl_date"])
    for stage, table in stages.items():
        cols = table.select(["id"] + STAGE_COLUMNS)
        cols = cols.rename_columns(["id"] + [f"{stage}.{c}" for c in STAGE_COLUMNS])
        cols = cols.append_column(f"{stage}.present", pa.array(np.ones(cols.num_rows, bool)))
        joined = joined.join(cols, keys="id", join_type="left outer")
    return joined.sort_by("id")


def _first_reason(reason: pa.Array, cond, label) -> pa.Array:
    """`label` where no reason is set yet and `cond` holds (null counts as false)."""
    cond = pc.fill_null(cond, False)
    return pc.if_else(pc.and_(pc.is_null(reason), cond), label, reason)


def _stage_outcome(reason: pa.Array, joined: pa.Table, stage: str, whole_input: bool) -> pa.Array:
    """A stage's row missing or failed; with `whole_input`, also made from a cut document."""
    reason = _first_reason(reason, pc.is_null(joined[f"{stage}.present"]), drops.stage_failed(stage, "missing_row"))
    err = joined[f"{stage}.parse_error"]
    reason = _first_reason(reason, pc.is_valid(err), pc.binary_join_element_wise(drops.stage_prefix(stage), categories(err), ""))
    if whole_input:
        reason = _first_reason(reason, joined[f"{stage}.input_truncated"], drops.stage_failed(stage, drops.INPUT_TRUNCATED))
    return reason


def verdicts(joined: pa.Table, recipe: Recipe, curation: Curation, gate: Gate | None) -> pa.Array:
    """One reason per joined row (null = kept); see the module docstring for the order. `gate`: the
    recipe's, as schemas.recipes.resolve_gate decided it (None for a recipe without one)."""
    if (gate.stage if gate else None) != recipe.gate:
        raise ValueError(f"recipe {recipe.name} gates on {recipe.gate}, not by {gate}")
    reason = _stage_outcome(pa.nulls(joined.num_rows, pa.string()), joined, "backtranslate", False)
    if gate:
        reason = _stage_outcome(reason, joined, gate.stage, True)
        score = joined[f"{gate.stage}.score"]
        reason = _first_reason(reason, pc.is_null(score), drops.no_score(gate.stage))
        reason = _first_reason(reason, gate.below(score), drops.below_threshold(gate.stage))
    if recipe.answer:
        reason = _stage_outcome(reason, joined, recipe.answer, True)
    instruction = pc.utf8_trim_whitespace(joined["backtranslate.instruction"])
    chars = pc.utf8_length(instruction)
    reason = _first_reason(reason, pc.less(chars, curation.min_instruction_chars), TOO_SHORT)
    reason = _first_reason(reason, pc.greater(chars, curation.max_instruction_chars), TOO_LONG)
    response = response_column(joined, recipe)
    reason = _first_reason(reason, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(response)), 0), EMPTY)
    return reason


def restrict(reason: pa.Array, other: pa.Array, other_recipe: str) -> pa.Array:
    """`reason`, plus `not_kept_by:<other_recipe>` where it keeps a row that the other verdicts drop."""
    return _first_reason(reason, pc.is_valid(other), drops.not_kept_by(other_recipe))


def response_column(joined: pa.Table, recipe: Recipe):
    return joined[f"{recipe.answer}.response"] if recipe.answer else joined["text"]


def web_examples(joined: pa.Table, keep: pa.Array, recipe: Recipe, tag: str | None, count_tokens,
                 made_by: list[str] | None = None) -> pa.Table:
    """The kept joined rows as SFT examples, with their lineage (`made_by`: the maker keys of the
    recipe's stages, lifecycle.provenance.maker_key). `count_tokens(list[str]) -> list[int]`."""
    rows = joined.filter(keep)
    instructions = pc.utf8_trim_whitespace(rows["backtranslate.instruction"]).combine_chunks()
    responses = pc.utf8_trim_whitespace(response_column(rows, recipe)).combine_chunks()
    if recipe.answer:
        n_resp = count_tokens(responses.to_pylist())
    else:  # the document is the response: prepare's count, counted here where prepare kept it uncounted
        n_resp = rows["n_tokens"].combine_chunks()
        if n_resp.null_count:
            missing = pc.is_null(n_resp)
            counts = iter(count_tokens(responses.filter(missing).to_pylist()))
            n_resp = pa.array([next(counts) if n is None else n for n in n_resp.to_pylist()], pa.int32())
    scores = rows[f"{recipe.gate}.score"] if recipe.gate else None
    return examples(instructions, responses, ids=rows["id"], origin="web", recipe=recipe.name, tag=tag,
                    scores=scores, n_tokens_instruction=count_tokens(instructions.to_pylist()),
                    n_tokens_response=n_resp, urls=rows["url"].combine_chunks(),
                    crawl_dates=rows["crawl_date"].combine_chunks(), made_by=made_by)


def default_tags(no_tags: bool, seed_tag: str | None, web_tag: str | None) -> tuple[str | None, str | None]:
    if no_tags:
        return None, None
    return (SEED_TAG if seed_tag is None else seed_tag) or None, (WEB_TAG if web_tag is None else web_tag) or None
