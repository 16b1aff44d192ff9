"""A generation stage as a batch job over candidate shards; the stage itself (inputs, prompt values,
parser, carried fields, gate) is its StageSpec in generation/stages.py, and the runner names none.

Work unit = a shard: worker I of W takes shards k with k % W == I (Slurm arrays, Kubernetes indexed
jobs). Shard k of every stage holds exactly the ids of candidates shard k, read beside the shards k of
the stages it reads (upstream, gate), so no shuffle is needed. A shard's data is written whole, then
its marker (`.metrics.json`: metrics and the provenance record of lifecycle/provenance.py). A rerun skips
a shard only when its marker, checksum, inputs' checksums and config all match; it resends just the
transient-failure rows of an otherwise complete shard (schemas/outcomes.py: final outcomes such as
content_filter are answers and are never resent while the config is unchanged), and redoes any other
shard, so nothing stale survives an upstream rerun (nor a complete shard's row that carries other
upstream fields than its upstream row holds now: it is remade). Outcomes are reproducible given the
seed: each row's seed is derived from its id, the stage and --seed.

Inside a shard, answered rows are checkpointed (`--checkpoint-rows` rows or `--checkpoint-s` seconds,
whichever comes first) as whole part files under `generations/<stage>/_checkpoints/<shard>/<config>/`;
a killed run loses at most what came after the last checkpoint, the rerun sends only the rest, and
the shard it writes is byte-identical to an uninterrupted run's (rows are reused by id and
input_hash, as from an older shard). The checkpoints of a shard go once its marker is written.
`bft plan --pilot N` sends a few rows of shards through the same path (StageRunner.pilot) and leaves
their answers as such checkpoints, which the night reuses.

Requests are dispatched as a stream (Engine.stream): prompts are prepared in batches (one batched
tokenizer call per PREPARE_CHUNK rows) while answers come back. On a `continuous` engine (openai,
vllm: a freed slot takes the next request at once, and an answer depends on its request alone) the
worker's pending shards share ONE stream, their requests in shard order, so the slots that shard k's
tail frees take shard k+1's rows instead of draining at the boundary; each shard (a PendingShard) is
written whole when its last request is answered, whatever the order of the answers, its rows in
candidates order. Other engines (hf: a batch's seed shapes its rows) get one stream per shard, so that
a shard's rows never depend on the shards pending beside it. The error budget (`--max-error-rate`)
is counted over the rows sent (in this run or before) in the shards this run wrote, all together: a
shard with transient failures is still written (its answers were paid for; the next run resends only
the failures), the other shards still run, and the stage then fails listing the failing shards.
Where the machine has cores to spare and the stage is not small, the prompts are prepared in worker
processes (generation/preparing.py): the same prompts, in the same order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

import pyarrow as pa

import schemas
import storage
from schemas.errors import UserError
from lifecycle import provenance
from lifecycle import state as stored
from schemas.keys import input_hash, row_seed
from schemas.layout import LayoutError, Rooted, RunLayout, parse_shard_name
from lifecycle.release import parquet_rows
from schemas.options import option, product_options, required
from schemas.outcomes import NOT_SENT, REFUSALS, category, engine_error, is_engine_error, refused, shard_summary
from schemas.recipes import GATE_STAGES, NO_GATE, gate_threshold, recorded_score_mode  # noqa: F401 (NO_GATE: re-exported)
from generation import parsing
from generation.batch import BatchDispatch, BatchesPending, submitted
from generation.budget import shared_prefix_tokens
from generation.engines import Completion, Engine, EngineConfig, Request, load_engine
from generation.preparing import PreparePool
from generation.progress import StageProgress
from generation.prompting import fallback_format, fit_prompts, n_tokens
from generation.stages import STAGES, Gate
from generation.templates import load_template

log = logging.getLogger("bft.generate")


class GenerationError(UserError):
    pass


class ErrorBudgetExceeded(GenerationError):
    """A stage whose transient failures exceeded --max-error-rate; `summary` is what the stage did."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


PREPARE_CHUNK = 64      # rows whose prompts are built and counted in one batched tokenizer call
# A gs:// root's lock is asked (one metadata read) at most this often between requests; each write asks it
# anyway (storage's fencing), and a lock known lost stops the next request and the next answer's take.
FENCE_CHECK_S = 1.0


@dataclass
class GenerateConfig(Rooted):
    """The options of `bft generate STAGE` (flags and the `generate:` section of a run file)."""

    stage: str = required("the stage to run", choices=sorted(STAGES))
    root: str = required("run root (local or gs://) holding candidates/", run_only=True)
    engine: str = required("vllm (in-process), openai (any compatible server) or hf (transformers)",
                           choices=["vllm", "openai", "hf"])
    model: str = required("model folder or hub id (for openai: the served model name)")
    tokenizer: str | None = option(None, "tokenizer of the model, if not the --model folder")
    base_url: str | None = option(None, "openai engine: the server, e.g. http://localhost:8000/v1", run_only=True)
    api: str = option("completions", "openai engine endpoint", choices=["completions", "chat"])
    server: str = option("auto", "openai engine: the kind of server, which decides the request fields sent: vllm "
                         "(its extensions: add_special_tokens, continue_final_message, 20 logprobs), openai "
                         "(OpenAI's or Azure's API: documented fields only, max_completion_tokens on chat, 5 "
                         "completion logprobs), generic (documented fields only); auto: from --base-url and "
                         "GET /models", choices=["auto", "vllm", "openai", "generic"], run_only=True)
    worker_index: int = option(0, "this worker's index: it takes shards k with k % num_workers == index",
                               run_only=True)
    num_workers: int = option(1, "workers sharing the stage", run_only=True)
    temperature: float | None = option(None, "sampling temperature (default: the stage's, 1.0 in the paper)")
    top_p: float | None = option(None, "nucleus sampling (default: the stage's, 0.9 in the paper)")
    max_new_tokens: int | None = option(None, "new-token cap (default: the stage's)")
    seed: int = option(0, "seed of every row's sampling seed")
    batch_size: int = option(16, "hf engine: prompts per generate call", run_only=True)
    max_model_len: int | None = option(None, "context length (default: the model's)")
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
    concurrency: int = option(256, "openai engine: requests in flight (256: vLLM's default max_num_seqs, so "
                              "a vllm serve batch is full; raise it with the server's --max-num-seqs)", run_only=True)
    request_timeout: float = option(600.0, "openai engine: seconds one HTTP request may take, as a whole",
                                    run_only=True)
    max_retries: int = option(8, "openai engine: retries of a request that failed for a transient reason "
                              "(429, 5xx, timeout, connection); the server's Retry-After, retry-after-ms and "
                              "x-ratelimit-reset-* are honoured", run_only=True)
    max_retry_time: float = option(900.0, "openai engine: seconds after a request's first try past which it is "
                                   "not retried again (a rate-limit window may be minutes)", run_only=True)
    checkpoint_rows: int = option(1000, "persist a shard's answered rows at least every this many rows",
                                  run_only=True)
    checkpoint_s: float = option(120.0, "... and at least every this many seconds (a kill loses at most that)",
                                 run_only=True)
    tensor_parallel_size: int = option(1, "vllm engine: GPUs per model", run_only=True)
    gpu_memory_utilization: float = option(0.9, "vllm engine: share of GPU memory to take", run_only=True)
    dtype: str = option("auto", "vllm and hf engines: weights' dtype", choices=["auto", "bf16", "fp16", "fp32"])
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
        self.check_root()

    def gate_rule(self, score_mode: str | None = None) -> Gate | None:
        """The gate rows must pass to be sent (None: every row is sent); `score_mode`: the mode the gate
        stage's scores were made in (logprob: expected scores, default threshold 4.5)."""
        stage = self.gate or STAGES[self.stage].gate
        if stage in (None, NO_GATE):
            return None
        return Gate(stage, gate_threshold(stage, score_mode) if self.min_score is None else self.min_score)

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
        return EngineConfig(self.engine, self.model, **{k: getattr(self, k) for k in (
            "tokenizer", "base_url", "api", "batch_size", "max_model_len", "concurrency", "tensor_parallel_size",
            "gpu_memory_utilization", "dtype", "seed", "request_timeout", "max_retries", "max_retry_time",
            "server")}, offline=self.batch == "vllm")


def read_generation(path: str) -> pa.Table:
    return schemas.validate(storage.read_parquet(path), schemas.GENERATION, path)


def clear_debris(cfg: GenerateConfig, started: float) -> None:
    """Removes the temporary files that writes of this worker's shards (data, marker, batch state)
    killed midway left, older than `started` (this run's start): other workers' are theirs."""
    def mine(name: str) -> bool:
        parsed = parse_shard_name(name)
        return parsed is not None and parsed[0] == cfg.stage and parsed[1] % cfg.num_workers == cfg.worker_index

    for folder in (cfg.layout.generations(cfg.stage), cfg.layout.generation_batches(cfg.stage)):
        removed = storage.clear_debris(folder, started, mine)
        if removed:
            log.info("%s: removed %d temporary file(s) of writes killed midway", folder, len(removed))


def stage_status(cfg: GenerateConfig) -> dict:
    """StageRunner(cfg).status(): the stage's complete and pending shards."""
    return StageRunner(cfg).status()


class StageRunner:
    def __init__(self, cfg: GenerateConfig, engine: Engine | None = None):
        cfg.check()
        self.cfg, self.spec = cfg, STAGES[cfg.stage]
        self.layout = cfg.layout
        self.template = load_template(cfg.stage, cfg.template)
        self._engine = engine
        gate_stage = cfg.gate or self.spec.gate
        self.gate = cfg.gate_rule(recorded_score_mode(self.layout, gate_stage)
                                  if cfg.min_score is None and gate_stage not in (None, NO_GATE) else None)
        self.logprob_prefix = self.spec.logprob_prefix if cfg.score_mode == "logprob" else None
        self.max_new = cfg.new_token_cap()
        self.temperature = self.spec.temperature if cfg.temperature is None else cfg.temperature
        self.top_p = self.spec.top_p if cfg.top_p is None else cfg.top_p
        self.stop = () if self.logprob_prefix else self.spec.stop   # a logprob request is one token
        self._owns_engine = engine is None
        self._served: set[str] = set()   # the model names the server said answered
        self.summary: dict = {}          # what run() did so far: read after a failure too
        # Every answer this runner got, counted as it comes (so also when run() ends in a failure or an
        # interrupt, or the shard is not written yet): each is a request paid for. `on_paid(paid)` is
        # called after each (bft rebuild keeps the night's count with it).
        self.paid: dict = {"requests_sent": 0, "transient_errors": 0, "refusals": {}}
        self.on_paid = None
        self._pool: PreparePool | None = None   # prompt preparation in worker processes, for one run()
        self._prefix: list[int | None] = []     # [shared_prefix_tokens], once known

    def __enter__(self) -> "StageRunner":
        return self

    def __exit__(self, *exc) -> None:
        """Close the engine if the runner loaded it (an engine passed in belongs to the caller)."""
        if self._owns_engine and self._engine is not None:
            self._engine.close()
            self._engine = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = load_engine(self.cfg.engine_config())
            problem = self._engine.logprob_problem() if self.logprob_prefix else None
            if problem:  # before any request: a logprob score read off another position is no score
                if self._owns_engine:
                    self._engine.close()
                self._engine = None
                raise GenerationError(f"{self.cfg.stage}: --score-mode logprob cannot run here: {problem}")
            fallback = fallback_format(self._engine.tokenizer)
            if fallback:
                log.warning("%s: the tokenizer has no chat template: prompts use %s", self.cfg.stage, fallback)
        return self._engine

    def prefix_tokens(self) -> int | None:
        """Tokens every prompt of the stage begins with (budget.shared_prefix_tokens: what a prefix cache
        reuses), recorded in each shard's metrics; None without a tokenizer."""
        if not self._prefix:
            self._prefix.append(shared_prefix_tokens(self.engine.tokenizer, self.cfg.stage, self.cfg.template))
        return self._prefix[0]

    def product_config(self) -> dict:
        """What shapes a shard's rows: the options that are not run_only, the values the stage's
        defaults resolve to, the prompt template's text and the stage's stop strings, where it has any
        (a shard made otherwise is redone; the key is absent for a stage without, so that its config is
        the one recorded before stop strings existed). The gate is recorded resolved ([stage,
        threshold]); --min-score itself is not, so that a threshold given or defaulted to the same
        value is the same config."""
        options = {k: v for k, v in product_options(self.cfg).items() if k != "min_score"}
        return {**options, "max_new_tokens": self.max_new, "temperature": self.temperature,
                "top_p": self.top_p, "gate": [self.gate.stage, self.gate.threshold] if self.gate else None,
                "template_text": [self.template.system, self.template.user],
                **({"stop": list(self.stop)} if self.stop else {})}

    def inputs(self, k: int, n: int, cand_path: str) -> dict[str, str]:
        """{name: path} of the files shard k is made from; GenerationError when a stage it reads has
        no complete, intact shard k."""
        paths = {"candidates": cand_path}
        for stage in self.spec.reads(self.gate):
            path = self.layout.generation_shard(stage, k, n)
            why = provenance.problem(self.layout, path, self.layout.generation_metrics(stage, k, n))
            if why:
                raise GenerationError(f"{path}: {why}; run `bft generate {stage}` for shard {k} first")
            paths[stage] = path
        return paths

    def status(self) -> dict:
        """Which shards of the stage (all workers') are complete and current, without loading a model:
        {"shards": n, "complete": [k...], "pending": [k...]}; what `bft rebuild` checks before it hands
        a stage to external workers."""
        complete, pending, total = [], [], 0
        for k, n, cand_path in self.layout.candidate_shards():
            total = n
            try:
                why = self.check(k, n, cand_path)[-1]
            except GenerationError:  # an upstream shard is not there yet
                why = provenance.MISSING
            (complete if why is None else pending).append(k)
        return {"shards": total, "complete": complete, "pending": pending}

    def check(self, k: int, n: int, cand_path: str) -> tuple[str, str, dict[str, str], dict, str | None]:
        """(output path, marker, inputs, what it is to be made from, why it is not complete and current
        or None) of shard k; GenerationError when an input shard is missing or damaged."""
        out, marker = self.layout.generation_shard(self.cfg.stage, k, n), self.layout.generation_metrics(
            self.cfg.stage, k, n)
        inputs = self.inputs(k, n, cand_path)
        made = provenance.made_from(self.layout, inputs, self.product_config())
        return out, marker, inputs, made, provenance.problem(self.layout, out, marker, made)

    def run(self) -> dict:
        """Every shard of this worker that is not complete and current; returns what the stage did:
        shards written and skipped, rows, requests sent, rows reused, transient errors, final
        refusals by category, seconds. ErrorBudgetExceeded (after every shard ran) when the stage is
        over --max-error-rate."""
        cfg, t0 = self.cfg, time.perf_counter()
        try:
            all_shards = self.layout.candidate_shards()
        except LayoutError as e:
            raise GenerationError(str(e)) from e
        clear_debris(cfg, time.time())
        summary = self.summary = {"stage": cfg.stage, "shards_done": [], "shards_skipped": [], "rows": 0, "sent": 0,
                                  "reused": 0, "answered": 0, "errors": 0, "refusals": {}, "failing_shards": [],
                                  "seconds": 0.0}
        work = []
        for k, n, cand_path in all_shards:
            if k % cfg.num_workers != cfg.worker_index:
                continue
            out, marker, inputs, made, why = self.check(k, n, cand_path)
            previous = None
            if why is None:
                previous = read_generation(out)
                stale = self._stale_row(inputs, previous)
                if stale is None and not any(is_engine_error(e) for e in previous["parse_error"].to_pylist()):
                    log.info("%s is complete; skipped", out)
                    summary["shards_skipped"].append(k)
                    continue
                if stale is None:
                    log.info("%s: resending its transient-failure rows", out)
                else:
                    log.warning("%s: row %s carries other %s than its %s row; remaking the rows that do", out,
                                stale, "/".join(self.spec.carries), self.spec.upstream)
            elif provenance.reusable(why, marker, made, row_level=("gate",)):
                log.info("%s: %s; reusing the rows whose input is unchanged", out, why)
                previous = read_generation(out)
            elif why != provenance.MISSING:
                log.warning("%s: %s; regenerating it", out, why)
            work.append((k, n, inputs, made, out, previous))
        storage.check_fences(self.layout.root)   # a holder woken after its lock was taken over sends nothing
        if work and cfg.batch == "none":
            self._refuse_over_batches(work)
        if work:
            self.engine  # noqa: B018 - load it now: an unreachable server fails here, before any shard
        batches = (BatchDispatch(self.engine, self.layout, cfg.stage, self._config_key(), cfg.batch, cfg.model)
                   if work and cfg.batch != "none" else None)
        progress = StageProgress(cfg.stage, sum(parquet_rows(w[2]["candidates"]) for w in work))
        self._pool = PreparePool.start(self.engine.tokenizer, progress.total) if work else None

        def account(k: int, metrics: dict) -> None:
            summary["shards_done"].append(k)
            summary["rows"] += metrics["rows"]
            summary["sent"] += metrics["sent_now"]
            summary["reused"] += metrics["reused_rows"]
            summary["errors"] += metrics["errors_now"]
            summary["answered"] += metrics["rows"] - (metrics["finish_reasons"] or {}).get(NOT_SENT, 0)
            for reason, count in metrics["refusals_now"].items():
                summary["refusals"][reason] = summary["refusals"].get(reason, 0) + count
            if metrics["errors_now"]:
                summary["failing_shards"].append({"shard": k, "sent": metrics["sent_now"],
                                                  "errors": metrics["errors_now"], "first": metrics["first_error"]})

        pending = []
        try:
            if batches is None:
                # one stream for every pending shard where the engine keeps its slots full across them
                for group in ([work] if work and self.engine.continuous else [[w] for w in work]):
                    self.stream_shards(group, progress, account)
            deadline = time.monotonic() + cfg.wait_timeout
            waiting = work if batches is not None else []
            while waiting:
                for w in waiting:
                    metrics = self.batch_shard(*w, progress, batches)
                    if metrics is None:   # its rows wait in batches
                        pending.append(w)
                    else:
                        account(w[0], metrics)
                if not (pending and cfg.wait):
                    break
                if time.monotonic() > deadline:
                    raise GenerationError(f"{cfg.stage}: shards {[w[0] for w in pending][:20]} still wait for their "
                                          f"batches after --wait-timeout {cfg.wait_timeout:g} s; run again later")
                time.sleep(cfg.poll_s)
                waiting, pending = pending, []
        except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: every row answered is in a shard or a checkpoint
            interrupt.kept_rows = progress.answered
            raise
        finally:
            progress.close()
            if batches is not None:
                batches.close()
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            if cfg.num_workers == 1:   # the root's one writer: no other worker is about to fill it
                storage.remove_empty_folder(self.layout.all_generation_checkpoints(cfg.stage))
        summary["shards_done"].sort()    # in the order written: a stream finishes shards in any order
        summary["failing_shards"].sort(key=lambda f: f["shard"])
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        if pending:
            summary["pending_shards"] = [w[0] for w in pending]
            summary["batch_requests_submitted"] = batches.submitted
            how = ("run each on a GPU box, then run this again:\n" + "\n".join(f"  {c}" for c in batches.commands)
                   if batches.commands else "run this again later (or with --wait) to collect them")
            raise BatchesPending(f"{cfg.stage}: shards {summary['pending_shards'][:20]} wait for their batches "
                                 f"({batches.submitted:,} requests submitted now); " + how, summary)
        if summary["errors"] and summary["errors"] / summary["answered"] > cfg.max_error_rate:
            shards = ", ".join(f"{f['shard']} ({f['errors']} of {f['sent']})" for f in summary["failing_shards"][:20])
            raise ErrorBudgetExceeded(
                f"{cfg.stage}: {summary['errors']:,} of the {summary['answered']:,} rows sent in the shards this run "
                f"wrote failed for a transient reason ({100 * summary['errors'] / summary['answered']:.1f}%), over "
                f"--max-error-rate {cfg.max_error_rate:g} (run file: generate: max_error_rate); shards with failures "
                f"(of the requests sent now): {shards}. Their answers are written; a rerun resends only the failed "
                f"rows. First: {summary['failing_shards'][0]['first']}", summary)
        return summary

    def _stale_row(self, inputs: dict[str, str], shard: pa.Table) -> str | None:
        """The id of the first row of a complete shard that carries other fields than its upstream row
        holds now, or None. A shard made before rows below the gate were keyed by them may hold such
        rows while its inputs are current: assemble refuses it and tells to rerun this stage, which
        then remakes those rows (open_shard) instead of skipping the shard."""
        if not self.spec.carries:
            return None
        up, columns = self.spec.upstream, ["id", "parse_error", *self.spec.carries]
        upstream = {r["id"]: r for r in storage.read_parquet(inputs[up], columns).to_pylist()}
        for old in shard.select(columns).to_pylist():
            if self.spec.stale_carried(old, {"inputs": {up: upstream.get(old["id"])}}):
                return old["id"]
        return None

    def _refuse_over_batches(self, work: list[tuple]) -> None:
        """GenerationError (one line) when a shard to write online has batches submitted (--batch) for
        this config: sending their rows online would pay for them twice; `--batch` collects them."""
        batches = submitted(self.layout, self.cfg.stage, [(w[0], w[1]) for w in work], self._config_key())
        if not batches:
            return
        ids = [str(b.get("id") or b.get("input_file_id")) for k in sorted(batches) for b in batches[k]]
        mode = "vllm" if any("command" in b for bs in batches.values() for b in bs) else "openai"
        raise GenerationError(
            f"{self.cfg.stage}: shards {sorted(batches)[:20]} have batches submitted ({', '.join(ids[:5])}"
            f"{f' and {len(ids) - 5} more' if len(ids) > 5 else ''}; {self.layout.generation_batches(self.cfg.stage)}): "
            f"sending their rows online would pay for them twice; collect them first with `bft generate "
            f"{self.cfg.stage} --batch {mode}` and this run's other options (--wait to wait for them), then run "
            "online for what is left")

    def _joined_rows(self, inputs: dict[str, str], only: set[str] | None = None,
                     upstream: dict[str, dict[str, dict]] | None = None) -> tuple[list[str], list[dict]]:
        """(candidate ids in shard order, joined rows: see generation.stages); a pilot's: only the ids
        `only`, joined with the rows `upstream` ({stage: {id: row}}) instead of the stages' shards."""
        cands = schemas.validate(storage.read_parquet(inputs["candidates"]), schemas.CANDIDATE, inputs["candidates"])
        rows = cands.select(["id", "text"]).to_pylist()
        if only is not None:
            rows = [r for r in rows if r["id"] in only]
        read = {stage: upstream[stage] if upstream is not None else
                {r["id"]: r for r in read_generation(inputs[stage]).to_pylist()}
                for stage in self.spec.reads(self.gate)}
        for row in rows:
            row["inputs"] = {stage: by_id.get(row["id"]) for stage, by_id in read.items()}
        return [r["id"] for r in rows], rows

    def _requests(self, todo: list[tuple[dict, dict]]):
        """((row, truncated, request), request) for each (row, template values), prepared PREPARE_CHUNK
        at a time (prompting.fit_prompts: one batched tokenizer call), lazily: the engine draws from it;
        in the run's PreparePool when it has one (generation/preparing.py: the same prompts, in order)."""
        eng = self.engine
        budget = eng.max_model_len - self.max_new
        chunks = [todo[start:start + PREPARE_CHUNK] for start in range(0, len(todo), PREPARE_CHUNK)]
        values = ([v for _, v in chunk] for chunk in chunks)
        if self._pool is not None:
            fitted_chunks = self._pool.fit(self.template, values, self.spec.doc_field, budget,
                                           self.logprob_prefix or "")
        else:
            fitted_chunks = (fit_prompts(eng.tokenizer, self.template, v, self.spec.doc_field, budget,
                                         self.logprob_prefix or "", count=getattr(eng, "count_messages", None))
                             for v in values)
        for chunk, fitted in zip(chunks, fitted_chunks):
            for (row, _), (prompt, msgs, truncated, count) in zip(chunk, fitted):
                storage.check_fences(self.layout.root, FENCE_CHECK_S)   # a holder that lost the root's lock stops
                req = Request(prompt, msgs, self.max_new, self.temperature, self.top_p,
                              row_seed(row["id"], self.cfg.stage, self.cfg.seed), stop=list(self.stop),
                              digit_probs=self.logprob_prefix is not None, prompt_tokens=count)
                yield (row, truncated, req), req

    def _config_key(self) -> str:
        """A short name of the product config but the gate (checkpoints of another config are never
        reused; the gate's effect on a row is in its input_hash, as for a shard's rows)."""
        config = {k: v for k, v in self.product_config().items() if k != "gate"}
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

    def open_shard(self, k: int, n: int, inputs: dict[str, str], made: dict, out: str,
                   previous: pa.Table | None = None, only: set[str] | None = None,
                   upstream: dict[str, dict[str, dict]] | None = None) -> tuple["PendingShard", list[tuple[dict, dict]]]:
        """Shard k as a PendingShard, and its (row, template values) still to send; with `only` (a
        pilot: see `pilot`) a PilotShard of those ids, joined with the `upstream` rows. `previous`: an intact
        shard of the same config (of the same inputs when only its transient failures are to be resent,
        or of older inputs when documents joined or left the candidates shard); rows of this shard's
        checkpoints are taken the same way: a row is kept when its id, input_hash
        (schemas.keys.input_hash: the prompt values, or why it was not sent) and carried fields
        (StageSpec.stale_carried: a row below the gate holds its upstream's instruction) are the current
        ones and it is not a transient failure; every other row is sent again, or remade unsent. Reads
        files only: it touches nothing that another shard's answers touch."""
        ids, rows = self._joined_rows(inputs, only, upstream)
        ckpt = Checkpoints(self.layout, self.cfg.stage, k, n, self._config_key())
        kept = {r["id"]: r for r in previous.to_pylist() if not is_engine_error(r["parse_error"])} if previous else {}
        kept.update((r["id"], r) for r in ckpt.rows() if not is_engine_error(r["parse_error"]))
        results: list[dict] = []
        todo: list[tuple[dict, dict]] = []
        reused = 0
        for row in rows:
            values, reason = self.spec.format_input(row, self.gate)
            row["input_hash"] = input_hash(values, reason)
            old = kept.get(row["id"])
            if (old is not None and old.get("input_hash") == row["input_hash"]
                    and not self.spec.stale_carried(old, row)):
                results.append(old)
                reused += 1
            elif values is None:
                results.append(self._row(row, None, None, False, reason))
            else:
                todo.append((row, values))
        return (PilotShard if only is not None else PendingShard)(self, k, n, out, made, ids, results, len(todo),
                                                                  reused, ckpt), todo

    def pilot(self, sample: dict[int, set[str]], upstream: dict[str, dict[str, dict]]) -> dict:
        """`bft plan --pilot` (bft/plan.py): the rows `sample` ({shard k: ids}) sent as run() sends them
        (same prompts, config and row seeds), their answers left as checkpoint parts of their shards
        (no shard file, no marker), so that the night's run() reuses them (open_shard) and no request
        is paid twice. `upstream`: {stage: {id: row}}, the rows of the stages this one reads (the
        pilot's of them). A row already answered (an earlier pilot's checkpoint, or a complete and
        current shard) is reused, not sent. Returns {"rows": {id: row} (sent, reused, or not sent),
        "sent_now", "output_tokens_now", "seconds"}."""
        t0 = time.perf_counter()
        work = []
        for k, n, cand_path in self.layout.candidate_shards():
            if not sample.get(k):
                continue
            out, previous = self.layout.generation_shard(self.cfg.stage, k, n), None
            try:
                _, marker, _, made, why = self.check(k, n, cand_path)
            except GenerationError:   # an upstream shard not written yet: the pilot's rows stand for it
                pass
            else:
                if why is None or provenance.reusable(why, marker, made, row_level=("gate",)):
                    previous = read_generation(out)
            work.append((k, n, {"candidates": cand_path}, {}, out, previous, set(sample[k]), upstream))
        result = {"rows": {}, "sent_now": 0, "output_tokens_now": 0}

        def keep(k: int, shard: dict) -> None:
            result["rows"].update((r["id"], r) for r in shard["rows"])
            result["sent_now"] += shard["sent_now"]
            result["output_tokens_now"] += shard["output_tokens_now"]

        progress = StageProgress(self.cfg.stage, sum(len(w[6]) for w in work))
        try:
            for group in ([work] if work and self.engine.continuous else [[w] for w in work]):
                self.stream_shards(group, progress, keep)
        finally:
            progress.close()
        result["seconds"] = round(time.perf_counter() - t0, 3)
        return result

    def stream_shards(self, work: list[tuple], progress: StageProgress, done) -> None:
        """Writes the shards of `work` (open_shard's arguments each) through ONE Engine.stream: their
        requests in shard order, a shard opened (its inputs read) only when the stream draws its first
        request, and written (data, marker; `done(k, metrics)`; a pilot's: `done(k, rows)`, PilotShard)
        as soon as its last request is answered, while the next shards' requests keep the engine busy. A shard with
        nothing to send is written when the stream reaches it. The openai engine draws requests on a
        thread of its own and answers on its event loop's, hence the lock around what they share."""
        lock = threading.Lock()
        opened: list[PendingShard] = []

        def finish(shard: PendingShard) -> None:   # with the lock held
            opened.remove(shard)   # a write that fails does not flush its buffered rows (a kill would not)
            done(shard.k, shard.write())

        def items():
            for w in work:
                shard, todo = self.open_shard(*w)
                with lock:
                    progress.skip(shard.rows - len(todo))
                    opened.append(shard)
                    if not todo:
                        finish(shard)
                for (row, truncated, req), request in self._requests(todo):
                    yield (shard, row, truncated, req), request

        def emit(key, comp: Completion) -> None:
            shard, row, truncated, req = key
            with lock:
                if self._take(shard, row, truncated, req, comp, progress):
                    finish(shard)

        try:
            self.engine.stream(items(), emit, self.cfg.chunk_rows)
        except BaseException:
            for shard in opened:
                shard.ckpt.flush()  # an interrupt or an engine that broke keeps what was answered
            raise
        if opened:  # an engine that answered too few requests: never a short shard
            raise GenerationError(f"{opened[0].out}: the engine answered {len(opened[0].answered)} of its "
                                  f"{opened[0].sent} requests; not written")

    def batch_shard(self, k: int, n: int, inputs: dict[str, str], made: dict, out: str, previous: pa.Table | None,
                    progress: StageProgress, batches: BatchDispatch) -> dict | None:
        """--batch: shard k's rows to send go through batch files (generation/batch.py): the answers of
        ended batches are taken (and checkpointed) and the rest submitted; the shard is written (its
        metrics returned) once every row is answered, None while some rows still wait in a batch."""
        shard, todo = self.open_shard(k, n, inputs, made, out, previous)
        progress.skip(shard.rows - len(todo))

        def emit(key, comp: Completion) -> None:
            self._take(shard, *key, comp, progress)

        try:
            if batches.shard(k, n, self._requests(todo), emit, shard.ckpt.flush):
                shard.ckpt.flush()
                return None
        except BaseException:
            shard.ckpt.flush()
            raise
        if len(shard.answered) != shard.sent:
            raise GenerationError(f"{out}: the batches answered {len(shard.answered)} of {shard.sent} requests; "
                                  "not written")
        metrics = shard.write()
        batches.clear(k, n)
        return metrics

    def _take(self, shard: "PendingShard", row: dict, truncated: bool, req: Request, comp: Completion,
              progress: StageProgress) -> bool:
        """`comp` as the shard's row, counted and checkpointed; True when it was the shard's last answer."""
        answered = self._row(row, req, comp, truncated, None)
        error, kind = is_engine_error(answered["parse_error"]), category(answered["parse_error"])
        progress.answer(comp.output_tokens or 0, error, kind in REFUSALS)
        self.paid["requests_sent"] += 1
        self.paid["transient_errors"] += error
        if kind in REFUSALS:
            self.paid["refusals"][kind] = self.paid["refusals"].get(kind, 0) + 1
        if self.on_paid is not None:
            self.on_paid(self.paid)
        # on the event loop's thread: no read of a gs:// lock here (FENCE_CHECK_S paces those), only
        # whether it is known lost, which stops the stream (every request in flight is cancelled)
        storage.check_fences(self.layout.root, float("inf"))
        return shard.answer(answered, comp.output_tokens or 0)

    def _row(self, row: dict, req: Request | None, comp: Completion | None, truncated: bool, reason: str | None) -> dict:
        base = {"id": row["id"], "stage": self.cfg.stage, "model": self.cfg.model, "prompt_tokens": None,
                "output_tokens": None, "finish_reason": None, "raw_output": None, "instruction": None,
                "score": None, "reasoning": None, "response": None, "parse_error": reason,
                "input_truncated": truncated, "seed": req.seed if req else None, "input_hash": row["input_hash"],
                **self.spec.carried(row)}
        if comp is None:
            return base
        if comp.served_model and comp.served_model != self.cfg.model and comp.served_model not in self._served:
            log.warning("the server says %r answered, not %r (--model)", comp.served_model, self.cfg.model)
        if comp.served_model:
            self._served.add(comp.served_model)
        prompt_tokens = comp.prompt_tokens if comp.prompt_tokens is not None else req.prompt_tokens
        base.update(prompt_tokens=prompt_tokens if prompt_tokens is not None else n_tokens(self.engine.tokenizer,
                                                                                             req.prompt),
                    output_tokens=comp.output_tokens, finish_reason=comp.finish_reason, raw_output=comp.text)
        if comp.finish_reason == "error":
            if comp.refusal:
                base["finish_reason"] = comp.refusal
                base["parse_error"] = refused(comp.refusal, comp.error or comp.refusal)
            else:
                base["parse_error"] = engine_error(comp.error)
            return base
        if self.logprob_prefix:
            fields, error = parsing.score_from_probs(comp.digit_probs or {})
        else:
            fields, error = self.spec.format_output(comp.text, row, comp.finish_reason, comp.stopped)
        base.update(fields)
        base["parse_error"] = error
        return base


class PendingShard:
    """A shard in flight: the rows it already has (reused, or not sent) and the requests it has out.
    Each answered row comes through `answer` (checkpointed as it comes); once the last is in, `write`
    writes the shard whole, its rows in candidates order (so the file never depends on the order in
    which the answers came), then its marker, and removes its checkpoints."""

    def __init__(self, runner: StageRunner, k: int, n: int, out: str, made: dict, ids: list[str],
                 results: list[dict], sent: int, reused: int, ckpt: "Checkpoints"):
        self.runner, self.k, self.n, self.out, self.made = runner, k, n, out, made
        self.ids, self.results, self.sent, self.reused, self.ckpt = ids, results, sent, reused, ckpt
        self.rows = len(ids)
        self.answered: list[dict] = []
        self.tokens = 0
        self.t0 = time.perf_counter()

    def answer(self, row: dict, output_tokens: int) -> bool:
        """Takes one answered row; True when it is the shard's last."""
        if len(self.answered) >= self.sent:
            raise GenerationError(f"{self.out}: the engine answered more than the {self.sent} requests sent; "
                                  "not written")
        cfg = self.runner.cfg
        self.answered.append(row)
        self.ckpt.add(row, cfg.checkpoint_rows, cfg.checkpoint_s)
        self.tokens += output_tokens
        return len(self.answered) == self.sent

    def write(self) -> dict:
        """Writes the shard (data, then its marker with metrics and provenance); returns the metrics."""
        runner, cfg = self.runner, self.runner.cfg
        results = self.results + self.answered
        failed = [r["parse_error"] for r in self.answered if is_engine_error(r["parse_error"])]
        order = {doc_id: i for i, doc_id in enumerate(self.ids)}
        results.sort(key=lambda r: order[r["id"]])
        table = schemas.to_table(results, schemas.GENERATION, self.out)
        storage.write_parquet(table, self.out)
        refusals = dict(Counter(c for c in map(category, (r["parse_error"] for r in self.answered)) if c in REFUSALS))
        metrics = {"stage": cfg.stage, "shard": self.k, "model": cfg.model, "engine": cfg.engine,
                   "wall_s": round(time.perf_counter() - self.t0, 3), **shard_summary(table, runner.spec.scored),
                   "sent_now": self.sent, "reused_rows": self.reused, "errors_now": len(failed),
                   "refusals_now": refusals, "first_error": failed[0] if failed else None,
                   "output_tokens_now": self.tokens, "prefix_tokens": runner.prefix_tokens(),
                   "served_models": sorted(runner._served),
                   "config": {k: v for k, v in asdict(cfg).items() if k != "base_url"},
                   provenance.KEY: provenance.seal(self.out, self.made)}
        storage.write_text(runner.layout.generation_metrics(cfg.stage, self.k, self.n),
                           json.dumps(metrics, indent=2) + "\n")
        self.ckpt.clear()
        log.info("%s written: %d rows, %d sent now, %d reused", self.out, self.rows, self.sent, self.reused)
        return metrics


class PilotShard(PendingShard):
    """The rows of a shard that a pilot sends (StageRunner.pilot): once the last is answered, `write`
    leaves every answer in the shard's checkpoints, which the night's run reuses, and writes no
    shard file and no marker (the shard is not whole); it returns the rows."""

    def write(self) -> dict:
        self.ckpt.flush()
        return {"rows": self.results + self.answered, "sent_now": self.sent, "output_tokens_now": self.tokens}


PART = re.compile(r"part-(\d{5})\.parquet")


class Checkpoints:
    """The answered rows of one shard in flight, persisted as whole part files
    (RunLayout.generation_checkpoints: one folder per shard and product config)."""

    def __init__(self, layout: RunLayout, stage: str, k: int, n: int, config_key: str):
        self.layout = layout
        self.shard_dir = layout.generation_checkpoints(stage, k, n)
        self.folder = storage.join(self.shard_dir, config_key)
        self.buffer: list[dict] = []
        self.last = time.monotonic()
        self.parts = 0

    def rows(self) -> list[dict]:
        """The rows of every part of this config; parts of other configs are removed, and a damaged
        part is set aside (lifecycle.state): its rows are sent again."""
        out = []
        for path in sorted(storage.list_files(self.shard_dir)):
            part = PART.fullmatch(path.rsplit("/", 1)[-1])
            if storage.parent(path) != self.folder or not part:
                storage.delete(path)   # another config's parts, or the temporary file of a write killed midway
                continue
            self.parts = max(self.parts, int(part.group(1)))   # new parts are numbered after every old one
            table = stored.read_table(self.layout, path, schemas.GENERATION)
            if table is not None:
                out += table.to_pylist()
        return out

    def add(self, row: dict, every_rows: int, every_s: float) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= every_rows or time.monotonic() - self.last >= every_s:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.parts += 1
            path = storage.join(self.folder, f"part-{self.parts:05d}.parquet")
            storage.write_parquet(schemas.to_table(self.buffer, schemas.GENERATION, path), path)
            self.buffer = []
        self.last = time.monotonic()

    def clear(self) -> None:
        self.buffer = []
        storage.delete_tree(self.shard_dir)
