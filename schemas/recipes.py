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
# assemble's curation drops (beam_pipelines.recipes.verdicts), in the order they are checked
CURATION_DROPS = TOO_SHORT, TOO_LONG, EMPTY, TRUNCATED = (
    "instruction_too_short", "instruction_too_long", "empty_response", "truncated_response")
GATE_STAGES = sorted({r.gate for r in RECIPES.values() if r.gate})   # the stages that write scores


def gate_threshold(stage: str) -> float:
    """The paper's threshold for a gate stage (5 for score, 4.5 for rate): the one the recipes gated
    by `stage` use (they agree)."""
    limits = {r.threshold for r in RECIPES.values() if r.gate == stage}
    if len(limits) != 1:
        raise ValueError(f"{stage!r} gates no recipe (gate stages: {GATE_STAGES})")
    return limits.pop()
