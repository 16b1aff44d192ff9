"""`bft assemble`'s options (AssembleConfig), and the job they resolve to once per run (`resolve`):
a frozen AssembleJob that holds what the pass uses (the recipe and its gate decided by
schemas.recipes.resolve_gate, --same-ids-as's, the curation limits, the tokenizer, the cap and split)
and the options as the release records them. Nothing assigns to either after they are built; the
Beam steps receive the parts they use (Rules, Split), never the whole config."""
from __future__ import annotations

from dataclasses import dataclass, replace

from beam_pipelines.assemble import recipes
from schemas.errors import UserError
from schemas.layout import Rooted, RunLayout
from schemas.options import option, required
from schemas.recipes import DEFAULT_RECIPE, RECIPES, Gate, Recipe, recorded_score_mode, resolve_gate


class AssembleError(UserError):
    """The inputs of assemble are missing or inconsistent."""


@dataclass(frozen=True)
class AssembleConfig(Rooted):
    """The options of `bft assemble` (flags and the `assemble:` section of a run file)."""

    root: str = required("run root (local or gs://) with candidates/ and generations/")
    recipe: str = option(DEFAULT_RECIPE, "the paper's corpus variant", choices=sorted(recipes.RECIPES))
    min_score: float | None = option(None, "gate threshold (default: 5 for the score stage, 4.5 for rate, 4.5 for "
                                   "scores made in --score-mode logprob, read from their shards; may be fractional)")
    seed_data: str | None = option(None, "seed pairs to mix in: Parquet or JSON lines with instruction/response "
                                 "(e.g. the output of bft seed)")
    max_examples: int | None = option(None, "deterministic cap on the train split's web examples (the paper: "
                                      "12800, 25600, 51200); the validation split is taken beside it")
    validation_fraction: float = option(0.02, "share of the web examples in the validation split (when > 0, at "
                                        "least one example); with --max-examples, taken beside the cap, so the "
                                        "train split keeps the cap's count")
    seed_in_validation: bool = option(False, "let seed pairs go to the validation split too (default: every seed "
                                      "pair trains, as in the paper)")
    version: str | None = option(None, "release name (default: UTC date + config hash)")
    min_instruction_chars: int = option(10, "shorter instructions are dropped")
    max_instruction_chars: int = option(4000, "longer instructions are dropped (the paper's longest "
                                        "instructions, ~514 tokens, are ~2,100 characters)")
    seed_tag: str | None = option(None, "tag (system prompt) of seed examples (default: Li et al. 2023's, "
                                "Nguyen et al. 2024 App. A.3); '' for none")
    web_tag: str | None = option(None, "tag (system prompt) of web examples (default: Li et al. 2023's, "
                               "Nguyen et al. 2024 App. A.3); '' for none")
    no_tags: bool = option(False, "no data-source tags at all")
    tokenizer: str | None = option(None, "for token counts (default: the one prepare used)")
    allow_partial: bool = option(False, "publish without candidate shards whose generation output is missing "
                               "(reported)")
    seed: int = option(0, "seed of the cap sample and the validation split")
    same_ids_as: str | None = option(None, "keep only pairs that this other recipe keeps too (before dedup and "
                                     "--max-examples), e.g. filter+distill beside filter+rewrite: both releases "
                                     "then hold the same ids, as the paper compares them",
                                     choices=sorted(recipes.RECIPES))
    decontaminate: list[str] = option([], "evaluation prompts to keep out of the corpus (repeatable): a JSON list "
                                      "or JSON lines of objects (AlpacaEval's JSON, MT-Bench's question.jsonl); a "
                                      "pair whose instruction or response shares a word n-gram with one of them is "
                                      "dropped as contaminated:<file stem>")
    decontaminate_field: str | None = option(None, "the field of each object that holds its prompt (default: the "
                                             "first of instruction, turns, text, prompt; a list is one prompt per "
                                             "string)")
    decontaminate_ngram: int = option(13, "the shared n-gram's length in normalized words (GPT-3's and Llama 2's "
                                      "contamination analyses); a prompt of fewer words is one n-gram")
    allow_empty: bool = option(False, "point LATEST at the release even when a critical alert fires (no web "
                               "example, the gate passed nothing); without it such a release is published "
                               "without moving LATEST and assemble exits 1")
    fail_on_alert: bool = option(False, "any alert (not only the critical ones) leaves LATEST where it was and "
                                 "exits 1: for schedulers that fail the night on every alert")
    near_dup_instruction_threshold: float = option(0.8, "pairs whose instructions are near-duplicates (Jaccard of "
                                                   "their word 3-grams >= this, found by MinHash LSH) keep one: the "
                                                   "highest score, then the smallest id; 0 = off")

    def check(self) -> None:
        if self.recipe not in recipes.RECIPES:
            raise UserError(f"unknown recipe {self.recipe!r}; expected one of {sorted(recipes.RECIPES)}")
        if self.same_ids_as is not None and self.same_ids_as not in recipes.RECIPES:
            raise UserError(f"--same-ids-as: unknown recipe {self.same_ids_as!r}; expected one of "
                            f"{sorted(recipes.RECIPES)}")
        if not 0 <= self.validation_fraction < 1:
            raise UserError("--validation-fraction must be in [0, 1)")
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError("--max-examples must be >= 1")
        if self.min_instruction_chars > self.max_instruction_chars:
            raise UserError("--min-instruction-chars is larger than --max-instruction-chars")
        if self.decontaminate_ngram < 1:
            raise UserError("--decontaminate-ngram must be >= 1")
        if not 0 <= self.near_dup_instruction_threshold <= 1:
            raise UserError("--near-dup-instruction-threshold must be in [0, 1] (0 = off)")
        self.check_root()

    @property
    def tags(self) -> tuple[str | None, str | None]:
        return recipes.default_tags(self.no_tags, self.seed_tag, self.web_tag)

    def curation(self) -> recipes.Curation:
        return recipes.Curation(self.min_instruction_chars, self.max_instruction_chars)


def recipe_gates(recipe: str, same_ids_as: str | None = None, min_score: float | None = None,
                 score_mode: str | None = None) -> tuple[Gate | None, Gate | None]:
    """The recipe's gate (resolve_gate: `min_score`, else its stage's default in the `score_mode` its
    shards were made in) and --same-ids-as's: that same gate when both recipes gate on one stage (one
    threshold keeps the pairs of both), else the other stage's default; None where a recipe has none."""
    own = RECIPES[recipe]
    gate = resolve_gate(own.gate, score_mode, min_score)
    if same_ids_as is None:
        return gate, None
    other = RECIPES[same_ids_as]
    return gate, gate if other.gate == own.gate else resolve_gate(other.gate)


@dataclass(frozen=True)
class Rules:
    """What decides each candidate's row (JoinShard) and which instructions are near-duplicates: the
    recipe and its gate, --same-ids-as's recipe and gate, the curation limits, the web examples' tag,
    the near-duplicate threshold."""

    recipe: Recipe
    gate: Gate | None
    curation: recipes.Curation
    web_tag: str | None
    near_dup_threshold: float   # 0: near-duplicate instructions are not looked for
    other: Recipe | None = None
    other_gate: Gate | None = None

    @property
    def stages(self) -> list[str]:
        """The generation stages the rows need: the recipe's, and --same-ids-as's."""
        return list(dict.fromkeys(self.recipe.stages + (self.other.stages if self.other else [])))


@dataclass(frozen=True)
class Split:
    """How the web examples are capped and the release split in train and validation (the cap, the
    validation rule, FinalizeShard)."""

    seed: int
    validation_fraction: float
    seed_in_validation: bool
    max_examples: int | None


@dataclass(frozen=True)
class AssembleJob:
    """One assemble run's options, resolved (`resolve`): what the pass uses, and `options`, the options
    as the release records them (its config hash and stats.json): --tokenizer as resolved, and
    --min-score as given or as the gate stage's score mode set it."""

    rules: Rules
    split: Split
    tokenizer: str
    seed_data: str | None
    seed_tag: str | None
    options: AssembleConfig


def resolve(cfg: AssembleConfig, layout: RunLayout, prep_stats: dict) -> AssembleJob:
    """The job of `cfg` on the run at `layout` (`prep_stats`: prepare's stats.json): the gates, by the
    score mode the gate stage's shards record (logprob scores are expectations: 4.5, not 5), and the
    tokenizer, prepare's unless --tokenizer names one."""
    recipe = RECIPES[cfg.recipe]
    mode = recorded_score_mode(layout, recipe.gate) if recipe.gate else None
    gate, other_gate = recipe_gates(cfg.recipe, cfg.same_ids_as, cfg.min_score, mode)
    tokenizer = cfg.tokenizer or (prep_stats.get("config") or {}).get("tokenizer")
    if not tokenizer:
        raise AssembleError("no --tokenizer given and candidates/stats.json names none")
    # a threshold the score mode set is this release's own (another config hash than the paper's 5)
    min_score = gate.threshold if cfg.min_score is None and mode == "logprob" else cfg.min_score
    seed_tag, web_tag = cfg.tags
    rules = Rules(recipe, gate, cfg.curation(), web_tag, cfg.near_dup_instruction_threshold,
                  RECIPES[cfg.same_ids_as] if cfg.same_ids_as else None, other_gate)
    return AssembleJob(rules, Split(cfg.seed, cfg.validation_fraction, cfg.seed_in_validation, cfg.max_examples),
                       tokenizer, cfg.seed_data, seed_tag, replace(cfg, min_score=min_score, tokenizer=tokenizer))
