"""The five LLM stages as pure pieces (distilabel's format_input / format_output): which shards a stage
reads, a row's template values or the reason it is not sent, how an output becomes fields, which
fields it carries from its upstream row, its gate, and the sampling defaults. The runner names no
stage: adding a stage is a StageSpec here and a template in generation/templates.py.

A joined row, as the runner builds it for shard k: {"id", "text", "inputs": {stage: that stage's row
of shard k (a dict) or None when it has none}} for every stage the spec reads (`reads`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from generation import parsing
from generation.engines.base import TEMPERATURE, TOP_P
from generation.prompting import SCORE_PREFIX
from schemas.outcomes import BELOW_GATE, MISSING_TEXT, MISSING_UPSTREAM_ROW, category, upstream_failed
from schemas.recipes import GATE_STAGES, Gate, default_gate  # noqa: F401 (Gate: the one rule, owned by schemas/recipes.py)

# Rewrite and distill answer the same instructions and are compared in the paper (Nguyen et al. 2024,
# Table 2): one new-token cap for both.
ANSWER_MAX_NEW_TOKENS = 2048
# Backtranslation's cap: an instruction cut by it is dropped (`backtranslate:truncated`), so it must hold
# every instruction assemble keeps (800 characters by default) and the paper's longest (~514 Llama-2
# tokens). Measured: 800-character windows of real technical English (the standard
# library's docstrings, 3,767 windows) take median 223, p99 286, max 375 tokens with Llama-2's
# sentencepiece structure (196 / 255 / 331 with tekken), over the 256 we had. 512 holds them all.
BACKTRANSLATE_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class StageSpec:
    name: str
    upstream: str | None            # the generation stage whose shard k it reads beside candidates shard k
    doc_field: str | None           # the template value that is cut when a prompt is too long
    prompt: Callable[[str, str | None], dict[str, str]]     # (document, instruction) -> template values
    # (output, row, finish_reason, stopped: see Completion.stopped) -> fields, error
    parse: Callable[[str, dict, str | None, bool | None], tuple[dict, str | None]]
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    max_new_tokens: int = 512
    gate: str | None = None         # the gate stage used by default (--gate); None: the stage has no gate
    carries: tuple[str, ...] = ()   # fields copied from the upstream row into every output row
    logprob_prefix: str | None = None   # --score-mode logprob: the digit's probability after this text
    stop: tuple[str, ...] = ()      # where the output format ends: requests stop there (nothing is paid after)

    @property
    def scored(self) -> bool:
        return self.name in GATE_STAGES

    def reads(self, gate: Gate | None) -> list[str]:
        """The generation stages whose shard k this stage reads (upstream first, then the gate)."""
        return [s for s in (self.upstream, gate.stage if gate else None) if s]

    def format_input(self, row: dict, gate: Gate | None) -> tuple[dict[str, str] | None, str | None]:
        """(template values, None) for a joined row, or (None, why it is not sent)."""
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            return None, MISSING_TEXT
        instruction = None
        if self.upstream:
            up = row["inputs"].get(self.upstream)
            if up is None:
                return None, MISSING_UPSTREAM_ROW
            instruction = up.get("instruction")
            if up.get("parse_error") or not instruction:
                return None, upstream_failed(category(up.get("parse_error")) or "no_instruction")
        if gate and not gate.passes(row["inputs"].get(gate.stage)):
            return None, BELOW_GATE
        return self.prompt(text, instruction), None

    def carried(self, row: dict) -> dict:
        """The fields every output row of `row` carries from its upstream row (sent or not)."""
        up = row["inputs"].get(self.upstream) if self.upstream else None
        return {f: up.get(f) if up and not up.get("parse_error") else None for f in self.carries}

    def stale_carried(self, old: dict, row: dict) -> bool:
        """Whether the output row `old` carries other fields than the joined `row`'s upstream row holds
        now: the part of a row's input that its input_hash does not cover when it was not sent (a row
        below the gate holds its upstream's instruction, which no prompt value holds)."""
        return {f: old.get(f) for f in self.carries} != self.carried(row)

    def format_output(self, text: str, row: dict, finish_reason: str | None,
                      stopped: bool | None = False) -> tuple[dict, str | None]:
        fields, error = self.parse(text, row, finish_reason, stopped)
        return {**self.carried(row), **fields}, error


STAGES = {
    "backtranslate": StageSpec("backtranslate", None, "response", lambda doc, _: {"response": doc},
                               lambda out, row, fin, _: parsing.parse_instruction(out, row["text"], fin),
                               max_new_tokens=BACKTRANSLATE_MAX_NEW_TOKENS),
    # score: no stop string. Its format ends at a line "Score: N" whose N varies (a literal stop string
    # would need one per digit and spelling, and OpenAI's API takes 4 at most), and the parser takes the
    # LAST `Score: N` (Humpback's rubric: a model may revise its score), which a stop at the first would change.
    "score": StageSpec("score", "backtranslate", "response", lambda doc, ins: {"instruction": ins, "response": doc},
                       lambda out, row, fin, _: parsing.parse_score(out, fin), max_new_tokens=512,
                       carries=("instruction",), logprob_prefix=SCORE_PREFIX),
    "rewrite": StageSpec("rewrite", "backtranslate", "response",
                         lambda doc, ins: {"instruction": ins, "response": doc},
                         lambda out, row, fin, stopped: parsing.parse_rewrite(out, fin, stopped),
                         max_new_tokens=ANSWER_MAX_NEW_TOKENS, gate=default_gate("rewrite"), carries=("instruction",),
                         stop=(parsing.RES_CLOSE,)),
    "distill": StageSpec("distill", "backtranslate", None, lambda doc, ins: {"instruction": ins},
                         lambda out, row, fin, _: parsing.parse_distill(out, fin),
                         max_new_tokens=ANSWER_MAX_NEW_TOKENS, gate=default_gate("distill"), carries=("instruction",)),
    "rate": StageSpec("rate", "backtranslate", "response",
                      lambda doc, ins: {"instruction": ins, "input": "", "response": doc},
                      lambda out, row, fin, _: parsing.parse_rating(out, fin), max_new_tokens=256,
                      temperature=0.0, top_p=1.0, carries=("instruction",)),   # AlpaGasus's rating script
}
