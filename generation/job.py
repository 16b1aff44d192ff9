"""What `bft generate STAGE` does, decided once: `GenerateConfig` holds the options as given (flags and
the run file's `generate:` section, frozen), and `resolve_job` turns them into a frozen `StageJob`: the
gate (schemas.recipes.resolve_gate, given the mode the gate stage's shards were scored in), the
new-token cap, the sampling, the stop strings, the prompt template's text and the EngineConfig. The
runner, its shards and its dispatch only read the job; an external worker can be handed the same job
(`StageJob.to_json` / `from_json`) instead of flags rebuilt from it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import storage

from generation.engines.base import ENGINES, EngineConfig, EngineOptions
from generation.stages import STAGES, Gate, StageSpec
from generation.templates import Template, load_template
from schemas.errors import UserError
from schemas.layout import RunLayout, Rooted, normalize_root
from schemas.options import option, required
from schemas.recipes import GATE_STAGES, NO_GATE, recorded_score_mode, resolve_gate


class GenerationError(UserError):
    pass


@dataclass(frozen=True)
class GenerateConfig(Rooted, EngineOptions):
    """The options of `bft generate STAGE` (flags and the `generate:` section of a run file)."""

    stage: str = required("the stage to run", choices=sorted(STAGES))
    root: str = required("run root (local or gs://) holding candidates/", run_only=True)
    engine: str = required("vllm (in-process), openai (any compatible server) or hf (transformers)",
                           choices=list(ENGINES))
    model: str = required("model folder or hub id (for openai: the served model name)")
    worker_index: int = option(0, "this worker's index: it takes shards k with k % num_workers == index",
                               run_only=True)
    num_workers: int = option(1, "workers sharing the stage", run_only=True)
    job: str | None = option(None, "a job file bft rebuild wrote for an external stage (ROOT/_jobs/STAGE.json: the "
                             "run's options resolved once, its gate included): run as is, with this worker's "
                             "--worker-index and --num-workers (no other option may be given with it)",
                             run_only=True)
    temperature: float | None = option(None, "sampling temperature (default: the stage's, 1.0 in the paper)")
    top_p: float | None = option(None, "nucleus sampling (default: the stage's, 0.9 in the paper)")
    max_new_tokens: int | None = option(None, "new-token cap (default: the stage's)")
    seed: int = option(0, "seed of every row's sampling seed")
    score_mode: str = option("generate", "score stage: the paper's generated reasoning + score, or the next-token "
                             "probabilities of 1..5 after 'Score:'", choices=["generate", "logprob"])
    template: str | None = option(None, "file replacing the stage's prompt template")
    gate: str | None = option(None, "rewrite and distill: send only rows whose pair passed this stage's gate "
                              "(default: score, as the filter recipes; rate for alpagasus) or none (send every "
                              "row: the rewrite-only recipe); rows not sent are written with parse_error "
                              "'not_sent: below_gate'", choices=GATE_STAGES + [NO_GATE])
    min_score: float | None = option(None, "the gate's threshold (default: the recipe's: 5 for score, 4.5 for rate, "
                                     "4.5 for score made in --score-mode logprob, whose scores are expectations)")
    max_error_rate: float = option(0.02, "error budget: fail the stage (exit 1, after every shard ran) when more "
                                   "than this share of the rows sent in the shards this run wrote failed for a "
                                   "transient reason (connection, timeout, 429, 5xx, broken answer) after every "
                                   "retry; final outcomes (content_filter, refusal, prompt_too_long, unparseable) "
                                   "are not counted", run_only=True)
    checkpoint_rows: int = option(1000, "persist a shard's answered rows at least every this many rows",
                                  run_only=True)
    checkpoint_s: float = option(120.0, "... and at least every this many seconds (a kill loses at most that)",
                                 run_only=True)
    chunk_rows: int = option(512, "hf engine: rows per engine call (the openai engine streams, vllm takes a "
                             "whole shard)",
                             run_only=True)
    batch: str = option("none", "openai engine: send the requests as batch files instead of one HTTP request per "
                        "row: openai (OpenAI's Batch API at --base-url: half the price, answered within 24 h) or vllm "
                        "(input files for `vllm run-batch`, whose output files a later run reads); the stage exits 75 "
                        "while batches run (generation/batch.py)", choices=["none", "openai", "vllm"], run_only=True)
    wait: bool = option(False, "--batch: poll until every batch has ended instead of exiting 75", run_only=True)
    poll_s: float = option(60.0, "--batch --wait: seconds between polls", run_only=True)
    wait_timeout: float = option(26 * 3600.0, "--batch --wait: seconds to wait before failing (the Batch API "
                                 "answers within 24 h)", run_only=True)

    def __post_init__(self) -> None:
        # the root in RunLayout's form (a local one made absolute), fixed as the config is built, so that
        # every path a step records names the same file from any directory
        object.__setattr__(self, "root", normalize_root(self.root))

    def share_layout(self, layout: RunLayout) -> None:
        """Works under `layout`, another step's of the same run (bft rebuild: one RunLayout per run):
        the root is already the layout's (both normalized), so only the RunLayout object is shared."""
        if layout.root != self.root:
            raise ValueError(f"the run's layout is under {layout.root}, not this stage's root {self.root}")
        self.__dict__["_layout"] = layout

    def check(self) -> None:
        if self.stage not in STAGES:
            raise UserError(f"unknown stage {self.stage!r}; expected one of {sorted(STAGES)}")
        if not 0 <= self.worker_index < self.num_workers:
            raise UserError("--worker-index must be in 0..--num-workers-1")
        if self.chunk_rows < 1 or self.batch_size < 1 or self.concurrency < 1 or self.checkpoint_rows < 1:
            raise UserError("--chunk-rows, --batch-size, --concurrency and --checkpoint-rows must be >= 1")
        if not 0 <= self.max_error_rate <= 1:
            raise UserError(f"--max-error-rate {self.max_error_rate:g}: a share, from 0 to 1")
        if self.batch != "none" and self.engine != "openai":
            raise UserError(f"--batch {self.batch} sends the openai engine's requests as batch files; use --engine "
                            f"openai, not {self.engine}")
        if self.poll_s <= 0 or self.wait_timeout < 0:
            raise UserError("--poll-s must be > 0 and --wait-timeout >= 0")
        spec = STAGES[self.stage]
        if spec.gate is None and (self.gate or self.min_score is not None):
            raise UserError(f"--gate and --min-score are for stages with a gate "
                            f"({sorted(s for s, v in STAGES.items() if v.gate)}), not {self.stage}")
        if self.gate == NO_GATE and self.min_score is not None:
            raise UserError("--min-score sets the gate's threshold; it contradicts --gate none")
        if self.score_mode == "logprob" and spec.logprob_prefix is None:
            raise UserError(f"--score-mode logprob is for stages {sorted(s for s, v in STAGES.items() if v.logprob_prefix)}, "
                            f"not {self.stage}")

    @property
    def gate_stage(self) -> str | None:
        """The stage whose score gates the rows sent (--gate, else the stage's default); None or "none": no gate."""
        return self.gate or STAGES[self.stage].gate

    def gate_rule(self, score_mode: str | None = None) -> Gate | None:
        """The gate rows must pass to be sent (None: every row is sent), by schemas.recipes.resolve_gate;
        `score_mode`: the mode the gate stage's scores were made in (logprob: expected scores, default
        threshold 4.5)."""
        return resolve_gate(self.gate_stage, score_mode, self.min_score)

    def new_token_cap(self) -> int:
        """The new tokens each request asks for, which the prompt budget reserves too (one number, so a
        prompt at the budget plus its request never passes the context): the stage's cap or
        --max-new-tokens; in logprob mode 1, or 2 on the openai engine's chat API, where a server may
        strip the prefill's trailing space so that the digit comes second."""
        spec = STAGES[self.stage]
        if self.score_mode == "logprob" and spec.logprob_prefix:
            return 2 if self.engine == "openai" and self.api == "chat" else 1
        return self.max_new_tokens or spec.max_new_tokens

    def engine_config(self) -> EngineConfig:
        return self.for_engine(self.engine, self.model, seed=self.seed, offline=self.batch == "vllm")


@dataclass(frozen=True)
class StageJob:
    """A stage's options with everything they leave open decided: what the runner reads, and nothing
    it changes. `options`: the GenerateConfig as given; `gate`: None when every row is sent."""

    options: GenerateConfig
    gate: Gate | None
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]            # where a request stops (none for a logprob request: one token)
    logprob_prefix: str | None       # --score-mode logprob: the digit's probability after this text
    template: Template
    engine: EngineConfig

    @property
    def spec(self) -> StageSpec:
        return STAGES[self.options.stage]

    def to_json(self) -> str:
        """The job as one JSON document (`from_json` reads it back equal)."""
        return json.dumps({"options": asdict(self.options), "gate": asdict(self.gate) if self.gate else None,
                           "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                           "top_p": self.top_p, "stop": list(self.stop), "logprob_prefix": self.logprob_prefix,
                           "template": asdict(self.template), "engine": asdict(self.engine)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "the stage job") -> "StageJob":
        """The job `to_json` wrote; GenerationError (one line naming `where`) for anything else."""
        try:
            d = json.loads(text)
            options = GenerateConfig(**d["options"])
            options.check()
            return cls(options, Gate(**d["gate"]) if d["gate"] else None, d["max_new_tokens"], d["temperature"],
                       d["top_p"], tuple(d["stop"]), d["logprob_prefix"], Template(**d["template"]),
                       EngineConfig(**d["engine"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise GenerationError(f"{where}: not a stage job as StageJob.to_json writes it ({type(e).__name__}: "
                                  f"{e}); write it again from the run file") from None


def resolve_job(cfg: GenerateConfig) -> StageJob:
    """The StageJob of `cfg` (checked): the gate by resolve_gate, at --min-score or else the default for
    the mode the gate stage's shards were scored in (read from their markers, once); the stage's
    sampling and new-token cap unless the options set them; the template's text, loaded."""
    cfg.check()
    spec = STAGES[cfg.stage]
    recorded = (recorded_score_mode(cfg.layout, cfg.gate_stage)
                if cfg.min_score is None and cfg.gate_stage not in (None, NO_GATE) else None)
    logprob_prefix = spec.logprob_prefix if cfg.score_mode == "logprob" else None
    return StageJob(cfg, cfg.gate_rule(recorded), cfg.new_token_cap(),
                    spec.temperature if cfg.temperature is None else cfg.temperature,
                    spec.top_p if cfg.top_p is None else cfg.top_p,
                    () if logprob_prefix else spec.stop, logprob_prefix, load_template(cfg.stage, cfg.template),
                    cfg.engine_config())


# what `bft generate STAGE --job FILE` takes besides the job: which worker this is
WORKER_FLAGS = ("stage", "job", "worker_index", "num_workers")
JOB_LIMIT = 1 << 20   # a job file is a few KB (the template's text included)


def read_job(path: str) -> StageJob:
    """The job file `bft rebuild` wrote for an external stage (RunLayout.stage_job)."""
    try:
        text = storage.read_input(path, JOB_LIMIT, "the stage job").decode("utf-8", "replace")
    except OSError as e:
        raise GenerationError(f"{path}: cannot read the stage job ({e}); bft rebuild writes it") from None
    return StageJob.from_json(text, path)


def job_options(flags: dict, config_file: str | None) -> dict:
    """The options `bft generate STAGE --job FILE` runs with: the job's own, as bft rebuild resolved
    them, with this worker's --worker-index and --num-workers; any other option is refused, so that
    every worker runs the one job."""
    path = flags["job"]
    extra = sorted(set(flags) - set(WORKER_FLAGS))
    if extra or config_file:
        named = ", ".join(["--config"] * bool(config_file) + ["--" + n.replace("_", "-") for n in extra])
        raise UserError(f"--job {path} fixes the stage's options: give only --worker-index and --num-workers "
                        f"with it, not {named}")
    job = read_job(path)
    if flags.get("stage") != job.options.stage:
        raise UserError(f"--job {path} is a job of stage {job.options.stage}, not {flags.get('stage')}")
    return {k: v for k, v in asdict(job.options).items() if k not in WORKER_FLAGS}


def worker_job(cfg: GenerateConfig) -> StageJob | GenerateConfig:
    """What `bft generate` runs: the job file's StageJob with this worker's options (`cfg`, built by
    job_options), or `cfg` itself without --job (resolved by the runner). The options must be the
    job's own but for the worker's index and count: a `job:` key in a run file, or a job file written
    again since job_options read it, is refused."""
    if not cfg.job:
        return cfg
    job = read_job(cfg.job)
    if replace(job.options, worker_index=cfg.worker_index, num_workers=cfg.num_workers, job=cfg.job) != cfg:
        raise GenerationError(f"--job {cfg.job}: the stage runs the job's options as bft rebuild wrote them; give "
                              "the job with --job alone (not in a run file), with only --worker-index and "
                              "--num-workers beside it")
    return replace(job, options=cfg)
