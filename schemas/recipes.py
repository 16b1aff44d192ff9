"""The paper's corpus recipes: which generation stages a corpus variant needs, which stage's score
gates a pair and at what threshold, and which stage answers (Nguyen et al. 2024, Table 2; Chen et al.
2023 for AlpaGasus). A contract between `bft generate` (which stages to run, the gate before the
answering stage) and `bft assemble` (what it keeps).

    recipe           gate (keep when score >= threshold)   response
    filter           score  >= 5                           the original document
    rewrite          (none)                                the rewrite
    filter+rewrite   score  >= 5                           the rewrite            (default)
    filter+distill   score  >= 5                           the distilled answer
    alpagasus        rate   >= 4.5                         the original document
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class Recipe:
    name: str
    gate: str | None        # the stage whose score gates a pair
    answer: str | None      # the stage whose response is used; None = the document itself
    threshold: float | None

    @property
    def stages(self) -> list[str]:
        return ["backtranslate"] + [s for s in (self.gate, self.answer) if s]


RECIPES = {
    "filter": Recipe("filter", "score", None, 5.0),
    "rewrite": Recipe("rewrite", None, "rewrite", None),
    "filter+rewrite": Recipe("filter+rewrite", "score", "rewrite", 5.0),
    "filter+distill": Recipe("filter+distill", "score", "distill", 5.0),
    "alpagasus": Recipe("alpagasus", "rate", None, 4.5),
}
DEFAULT_RECIPE = "filter+rewrite"
# The generation stages, in pipeline order: the one list (run-file sections, the shards assemble reads,
# the plan's order); generation/stages.py has one StageSpec per name (tests/test_layers.py checks it).
STAGES = ("backtranslate", "score", "rewrite", "distill", "rate")
ANSWER_STAGES = tuple(s for s in STAGES if any(r.answer == s for r in RECIPES.values()))  # sent past a gate
GATE_STAGES = sorted({r.gate for r in RECIPES.values() if r.gate})   # the stages that write scores


def default_gate(stage: str) -> str | None:
    """The gate `bft generate STAGE` applies unless told (--gate): that of the first recipe (the
    default one first) that answers with `stage` behind a gate; None for a stage no recipe gates.
    `bft rebuild` sets each run's own from its recipe (a recipe without a gate: --gate none)."""
    for recipe in sorted(RECIPES.values(), key=lambda r: r.name != DEFAULT_RECIPE):
        if recipe.answer == stage and recipe.gate:
            return recipe.gate
    return None


@dataclass(frozen=True)
class Gate:
    """The one rule a pair passes: its `stage` row parsed (parse_error null), was made from the whole
    document (not input_truncated: assemble could not keep it), and scored a number >= threshold (NaN
    never passes). The generation runner sends the answering stage only such pairs (`passes`, a row),
    and assemble and the plan count them (`failing`, vectorized): one rule, both ways."""

    stage: str
    threshold: float

    def passes(self, row: dict | None) -> bool:
        if row is None or row.get("parse_error") is not None or row.get("input_truncated"):
            return False
        score = row.get("score")
        return isinstance(score, (int, float)) and not isinstance(score, bool) and score >= self.threshold

    def below(self, score) -> pa.Array:
        """Where a present score fails the threshold (NaN included; null scores are false: no score)."""
        return pc.invert(pc.fill_null(pc.greater_equal(score, self.threshold), True))

    def passing(self, parse_error, input_truncated, score) -> pa.Array:
        """`passes` of every row of a stage's columns (no nulls in the result)."""
        whole = pc.invert(pc.fill_null(input_truncated, False))
        return pc.fill_null(pc.and_(pc.and_(pc.is_null(parse_error), whole),
                                    pc.greater_equal(score, self.threshold)), False)


# The logprob score mode is this project's option, not the paper's: Humpback keeps pairs whose
# generated (integer) score is >= k (its A5: score 5; Li et al. 2023, section 2.3). A logprob score is
# an expectation over 1..5, below 5 unless p(5) = 1, so 5 would keep nothing; its default 4.5 is
# AlpaGasus's threshold on its (fractional) ratings (Chen et al. 2023, section 4), borrowed here.
LOGPROB_THRESHOLD = 4.5


NO_GATE = "none"        # --gate none: the answering stages send every row


def resolve_gate(stage: str | None, score_mode: str | None = None, given: float | None = None) -> Gate | None:
    """The one place a gate is decided, for `bft generate`, `bft assemble`, `bft rebuild` and the plan:
    the `stage` whose score gates (None or "none": no gate) at the threshold `given` by the user, else
    the default for the stage and the mode its shards were scored in (`gate_threshold`)."""
    if stage in (None, NO_GATE):
        return None
    return Gate(stage, float(gate_threshold(stage, score_mode) if given is None else given))


def gate_threshold(stage: str, score_mode: str | None = None) -> float:
    """The default threshold of a gate stage: the paper's (5 for score, 4.5 for AlpaGasus's rate), or
    4.5 for score in the logprob mode (`score_mode` "logprob": expected scores)."""
    if stage == "score" and score_mode == "logprob":
        return LOGPROB_THRESHOLD
    limits = {r.threshold for r in RECIPES.values() if r.gate == stage}
    if len(limits) != 1:
        raise ValueError(f"{stage!r} gates no recipe (gate stages: {GATE_STAGES})")
    return limits.pop()


def recorded_score_mode(layout, stage: str) -> str | None:
    """The score mode a gate stage's shards were made in (their markers' config), or None when no
    shard says (none written yet, or a stage without modes)."""
    import json

    import storage

    try:
        shards = layout.candidate_shards()
    except Exception:  # no complete prepare output: nothing recorded
        return None
    for k, n, _ in shards:
        marker = layout.generation_metrics(stage, k, n)
        if storage.exists(marker):
            try:
                return (json.loads(storage.read_text(marker)).get("config") or {}).get("score_mode")
            except (ValueError, AttributeError):
                continue
    return None
