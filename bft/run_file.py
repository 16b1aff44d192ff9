"""A run file read into every verb's config (`RunPlan`), for `bft rebuild`, `bft plan` and `bft status`.

Everything is resolved here, once, before anything runs: each section's options checked (an unknown
key, a wrong type or a missing required key is an error naming the key and the file), the run's one
gate decided (`run_gate`: one `schemas.recipes.resolve_gate` call, whose Gate filters the answering
stage's requests and whose threshold assemble keeps pairs at), and each step's config built from that
decision: nothing is assigned to a config afterwards (a change is a new config, `dataclasses.replace`).
Every step shares the run's one RunLayout.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from bft import config
from schemas.recipes import NO_GATE, RECIPES, Gate, resolve_gate


@dataclass(frozen=True)
class StagePlan:
    stage: str
    cfg: object                  # GenerateConfig
    external: bool = False
    workers: int = 1
    tokens_per_s: float | None = None
    gate: Gate | None = None     # the run's gate when it filters this stage's requests (the answering stage)


@dataclass(frozen=True)
class RunPlan:
    """Every verb's config, built and checked from the run file before anything runs."""

    path: str
    root: str
    prepare: object              # PrepareConfig
    prepare_beam_args: list[str]
    stages: tuple[StagePlan, ...]
    assemble: object             # AssembleConfig
    assemble_beam_args: list[str]
    gate: Gate | None            # the recipe's gate at the run's threshold (run_gate); None: the recipe has none

    @property
    def layout(self):
        """The run's one RunLayout (schemas.layout), which every step's config shares (load_run)."""
        return self.prepare.layout


def derived(cfg, layout, **changes):
    """A new config: `cfg` with `changes`, under the run's one `layout` (a config in use is never
    changed)."""
    new = replace(cfg, **changes)
    new.share_layout(layout)
    return new


def load_run(path: str, root: str | None = None, stages: list[str] | None = None) -> RunPlan:
    """All configs of a run file, validated, with the run's gate resolved once (module docstring)."""
    from beam_pipelines.assemble.config import AssembleConfig
    from beam_pipelines.prepare import PrepareConfig
    from generation.job import GenerateConfig

    doc = config.read_run_file(path)
    config.check_sections(doc, path)
    if root:
        doc = {**doc, "root": root}
    if not doc.get("root"):
        raise config.ConfigError(f"{path}: no `root:` (the run root, local or gs://)")

    def verb_config(cls, verb, sub=None):
        values, run_values, where = config.section_values(cls, doc, path, verb, sub)
        fixed = {"stage": sub} if sub and verb == "generate" else {}
        return config.build(cls, values, fixed, where), run_values

    prep, prep_run = verb_config(PrepareConfig, "prepare")
    asm, asm_run = verb_config(AssembleConfig, "assemble")
    recipe = RECIPES[asm.recipe]
    gen = doc.get("generate") or {}
    mode = (verb_config(GenerateConfig, "generate", recipe.gate)[0].score_mode
            if recipe.gate and isinstance(gen.get(recipe.gate), dict) else None)
    gate = run_gate(asm, mode)
    if asm.min_score is None and mode == "logprob" and gate is not None:
        # expected scores: assemble's config names the 4.5 the gate uses (AlpaGasus's threshold), not 5
        asm = replace(asm, min_score=gate.threshold)
    plans = []
    for stage in stages or recipe.stages:
        if not isinstance(gen.get(stage), dict):
            raise config.ConfigError(f"{path}: recipe {asm.recipe} needs stage {stage}: add a `generate: {stage}:` "
                                     "section with at least engine and model")
        cfg, run_values = verb_config(GenerateConfig, "generate", stage)
        changes, stage_gate = _stage_gate(path, stage, cfg, asm, gate)
        plans.append(StagePlan(stage, derived(cfg, prep.layout, **changes), run_values.get("external", False),
                               run_values.get("workers", 1), run_values.get("tokens_per_s"), stage_gate))
    asm.share_layout(prep.layout)   # one RunLayout per run, built here and handed to every step
    return RunPlan(path, prep.root, prep, prep_run.get("beam_args") or [], tuple(plans), asm,
                   asm_run.get("beam_args") or [], gate)


def run_gate(asm, score_mode: str | None) -> Gate | None:
    """The run's one gate: the recipe's gate stage at assemble.min_score, else the recipe's default
    for the mode the gate stage scores in (`score_mode`, from its section: logprob, 4.5); None for a
    recipe without a gate. The one decision that both the answering stage's requests and assemble's
    pairs follow (_stage_gate)."""
    return resolve_gate(RECIPES[asm.recipe].gate, score_mode, asm.min_score)


def _stage_gate(path: str, stage: str, cfg, asm, gate: Gate | None) -> tuple[dict, Gate | None]:
    """(the changes to the stage's config, the run's gate where it filters the stage's requests). One
    gate and one threshold per run, the recipe's. A recipe without a gate (rewrite) answers every pair
    whose instruction parsed: its answering stage is sent them all (`--gate none`; the stage's own
    default gate, score, would need score shards the recipe does not make), and a gate or threshold
    named for it is refused. Otherwise the run's gate (its threshold: assemble.min_score, else the
    recipe's default) gates the answering stage and keeps the pair in assemble. A stage whose gate is
    the recipe's gate and that names no threshold takes it; one that names another is refused, naming
    both keys (a rewrite gate at 5 with assemble at 4 published the same pairs; at 0 with assemble at
    5, it paid for rewrites assemble then dropped)."""
    from generation.stages import STAGES

    recipe = RECIPES[asm.recipe]
    if stage == recipe.answer and recipe.gate is None:
        if cfg.gate not in (None, NO_GATE) or cfg.min_score is not None:
            named = f"gate {cfg.gate}" if cfg.gate not in (None, NO_GATE) else f"min_score {cfg.min_score:g}"
            raise config.ConfigError(f"{path}: generate.{stage}.{named.replace(' ', ': ', 1)}: the {asm.recipe} "
                                     f"recipe has no gate (assemble keeps every answered pair); remove it, or "
                                     "choose a recipe with a gate (filter+rewrite)")
        return {"gate": NO_GATE}, None
    own = cfg.gate or STAGES[stage].gate   # the stage the runner would gate on
    if gate is None or own != gate.stage or stage != recipe.answer:
        return {}, None
    if cfg.min_score is None:
        return {"min_score": gate.threshold}, gate
    if cfg.min_score != gate.threshold:
        said = "assemble.min_score" if asm.min_score is not None else f"the {asm.recipe} recipe's default"
        raise config.ConfigError(f"{path}: generate.{stage}.min_score {cfg.min_score:g} and {said} "
                                 f"{gate.threshold:g} differ: one threshold gates the {stage} requests and keeps "
                                 f"the pairs; set assemble.min_score alone")
    return {}, gate


def check_servers(plan: RunPlan) -> None:
    """The openai engine's preflight (generation.engines.openai.preflight) of every stage this run
    sends from this machine (not an external stage, whose workers may reach another network; not
    `batch: vllm`, which writes files): each server answers as an OpenAI-compatible one and serves
    the stage's model. Each server is asked once. EngineError naming the run file and the stage."""
    from generation.engines import EngineError
    from generation.engines.openai import preflight

    listings: dict = {}
    for sp in plan.stages:
        if sp.cfg.engine != "openai" or sp.external or sp.cfg.batch == "vllm":
            continue
        try:
            preflight(sp.cfg.engine_config(), listings)
        except EngineError as e:
            raise EngineError(f"{plan.path}: generate.{sp.stage}: {e}") from None
