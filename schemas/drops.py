"""Every reason a row is dropped, declared once with the funnel step that drops it.

A drop reason is written to disk as a plain string (stats.json's funnel keys, the `reason` column of
the rejects, verdicts and changes/removed.parquet files), so `Drop` is a `str`: the bytes written stay
the reason itself, and the step travels with it. Readers (the report, the alerts, `bft show`) ask a
reason's `step` (`parse` for a string read back from a file): they never match strings themselves.

    step                  reasons (in the order assemble decides them; prepare's before)
    prepare               dolma's unusable lines (empty_line, malformed_json, ...), counted in candidates/stats.json
    missing shards        missing_generation_shard (--allow-partial)
    stage                 <stage>:<parse error category> (backtranslate:echo, score:input_truncated, rewrite:truncated)
    gate                  <stage>:no_score, <stage>_below_threshold
    curation              instruction_too_short, instruction_too_long, empty_response
    decontamination       contaminated:<evaluation set>
    duplicates            duplicate_instruction
    near-duplicates       near_duplicate_instruction
    cap                   over_cap
    other                 not_kept_by:<recipe> (--same-ids-as), and any reason not declared here
"""
from __future__ import annotations

from enum import Enum


class Step(Enum):
    """A step of the funnel, in pipeline order; `label` is how the report names it (a stage's and
    the gate's name their stage)."""

    PREPARE = "prepare"
    MISSING_SHARDS = "missing generation shards"
    STAGE = "{stage}: failed or missing"
    GATE = "gate: {stage} below threshold"
    CURATION = "curation: length or empty"
    DECONTAMINATION = "decontamination (--decontaminate)"
    DUPLICATES = "curation: duplicate instructions"
    NEAR_DUPLICATES = "curation: near-duplicate instructions"
    CAP = "cap (--max-examples)"
    OTHER = "other"

    def label(self, stage: str | None = None) -> str:
        return self.value.format(stage=stage)


class Drop(str):
    """A drop reason: the string written to disk, with its funnel `step`, the generation `stage` it
    belongs to (stage and gate drops) and its `detail` (a parse error category, an evaluation set, a
    recipe)."""

    step: Step
    stage: str | None
    detail: str | None

    def __new__(cls, reason: str, step: Step, stage: str | None = None, detail: str | None = None):
        out = super().__new__(cls, reason)
        out.step, out.stage, out.detail = step, stage, detail
        return out

    def __reduce__(self):   # pickled by Beam inside partials: rebuilt with its step
        return Drop, (str(self), self.step, self.stage, self.detail)

    def label(self) -> str:
        """The report's name of this reason's funnel step."""
        return self.step.label(self.stage)


# prepare: one Dolma line that is not a document (beam_pipelines.prepare.dolma.parse_line)
DOLMA_LINE_DROPS = tuple(Drop(r, Step.PREPARE) for r in (
    "empty_line", "too_large", "invalid_utf8", "malformed_json", "not_an_object", "missing_id",
    "missing_text", "blank_text"))
MISSING_SHARD = Drop("missing_generation_shard", Step.MISSING_SHARDS)
# assemble's curation drops (beam_pipelines.assemble.recipes.verdicts), in the order they are checked. An
# answer cut by the token cap is its stage's parse failure (`rewrite:truncated`), not a curation drop.
CURATION_DROPS = TOO_SHORT, TOO_LONG, EMPTY = tuple(Drop(r, Step.CURATION) for r in (
    "instruction_too_short", "instruction_too_long", "empty_response"))
DUPLICATE_INSTRUCTION = Drop("duplicate_instruction", Step.DUPLICATES)
NEAR_DUPLICATE = Drop("near_duplicate_instruction", Step.NEAR_DUPLICATES)
OVER_CAP = Drop("over_cap", Step.CAP)
LATE_DROPS = (DUPLICATE_INSTRUCTION, NEAR_DUPLICATE, OVER_CAP)   # after decontamination, in this order

CONTAMINATED = "contaminated:"      # contaminated:<evaluation set name>
NOT_KEPT_BY = "not_kept_by:"        # not_kept_by:<recipe> (assemble --same-ids-as)
NO_SCORE = "no_score"               # <gate stage>:no_score
BELOW_THRESHOLD = "_below_threshold"    # <gate stage>_below_threshold
INPUT_TRUNCATED = "input_truncated"     # <stage>:input_truncated: the stage's prompt held a cut document


def stage_failed(stage: str, category: str) -> Drop:
    """The stage's row is missing (`missing_row`), failed to parse (its parse error's category) or was
    made from a cut document (`input_truncated`)."""
    return Drop(f"{stage}:{category}", Step.STAGE, stage, category)


def stage_prefix(stage: str) -> str:
    """What every `stage_failed` reason of `stage` starts with (verdicts joins the category to it,
    vectorized)."""
    return f"{stage}:"


def no_score(stage: str) -> Drop:
    return Drop(f"{stage}:{NO_SCORE}", Step.GATE, stage, NO_SCORE)


def below_threshold(stage: str) -> Drop:
    return Drop(f"{stage}{BELOW_THRESHOLD}", Step.GATE, stage)


def contaminated(eval_set: str) -> Drop:
    return Drop(CONTAMINATED + eval_set, Step.DECONTAMINATION, detail=eval_set)


def not_kept_by(recipe: str) -> Drop:
    return Drop(NOT_KEPT_BY + recipe, Step.OTHER, detail=recipe)


_FIXED = {r: r for r in (*DOLMA_LINE_DROPS, MISSING_SHARD, *CURATION_DROPS, *LATE_DROPS)}


def parse(reason: str) -> Drop:
    """A reason read back from a file as its declared `Drop` (an undeclared one: Step.OTHER)."""
    if isinstance(reason, Drop):
        return reason
    if reason in _FIXED:
        return _FIXED[reason]
    if reason.startswith(CONTAMINATED):
        return contaminated(reason[len(CONTAMINATED):])
    if reason.startswith(NOT_KEPT_BY):
        return not_kept_by(reason[len(NOT_KEPT_BY):])
    if reason.endswith(BELOW_THRESHOLD) and ":" not in reason:
        return below_threshold(reason[:-len(BELOW_THRESHOLD)])
    stage, sep, category = reason.partition(":")
    if sep and stage:
        return no_score(stage) if category == NO_SCORE else stage_failed(stage, category)
    return Drop(reason, Step.OTHER)
