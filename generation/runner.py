"""A generation stage as a batch job over candidate shards; the stage itself (inputs, prompt values,
parser, carried fields, gate) is its StageSpec in generation/stages.py, and the runner names none.
What the stage does is its StageJob (generation/job.py), resolved once from the options; the shard in
flight and its checkpoints are generation/shard.py, the requests' stream generation/dispatch.py.

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

A killed run loses at most what came after its shards' last checkpoints; the rerun sends only the
rest, and the shard it writes is byte-identical to an uninterrupted run's (rows are reused by id and
input_hash, as from an older shard). `bft plan --pilot N` sends a few rows of shards through the same
path (StageRunner.pilot) and leaves their answers as such checkpoints, which the night reuses.

The error budget (`--max-error-rate`) is counted over the rows sent (in this run or before) in the
shards this run wrote, all together: a shard with transient failures is still written (its answers
were paid for; the next run resends only the failures), the other shards still run, and the stage
then fails listing the failing shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import pyarrow as pa

import schemas
import storage
from lifecycle import provenance
from schemas.keys import input_hash
from schemas.layout import LayoutError, parse_shard_name
from lifecycle.release import parquet_rows
from schemas.options import product_options
from schemas.outcomes import NOT_SENT, is_engine_error
from generation.batch import BatchDispatch, BatchesPending, submitted
from generation.budget import shared_prefix_tokens
from generation.dispatch import ShardDispatch
from generation.engines import Engine, load_engine
from generation.job import GenerateConfig, GenerationError, StageJob, resolve_job
from generation.preparing import PreparePool
from generation.progress import StageProgress
from generation.prompting import fallback_format
from generation.shard import Checkpoints, PendingShard, PilotShard, read_generation

log = logging.getLogger("bft.generate")


class ErrorBudgetExceeded(GenerationError):
    """A stage whose transient failures exceeded --max-error-rate; `summary` is what the stage did."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


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


class StageRunner(ShardDispatch):
    """Runs a StageJob (a GenerateConfig is resolved here, once: resolve_job) over this worker's shards;
    `engine`: an engine loaded by the caller (else the job's is loaded when first needed, and closed
    with the runner)."""

    def __init__(self, job: StageJob | GenerateConfig, engine: Engine | None = None):
        self.job = job if isinstance(job, StageJob) else resolve_job(job)
        self.cfg, self.spec = self.job.options, self.job.spec
        self.layout = self.cfg.layout
        self._engine = engine
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

    @property
    def gate(self):
        """The job's gate (None: every row is sent)."""
        return self.job.gate

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
            self._engine = load_engine(self.job.engine)
            problem = self._engine.logprob_problem() if self.job.logprob_prefix else None
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
            self._prefix.append(shared_prefix_tokens(self.engine.tokenizer, self.cfg.stage, self.job.template))
        return self._prefix[0]

    def product_config(self) -> dict:
        """What shapes a shard's rows: the options that are not run_only, the values the stage's
        defaults resolve to, the prompt template's text and the stage's stop strings, where it has any
        (a shard made otherwise is redone; the key is absent for a stage without, so that its config is
        the one recorded before stop strings existed). The gate is recorded resolved ([stage,
        threshold]); --min-score itself is not, so that a threshold given or defaulted to the same
        value is the same config."""
        options = {k: v for k, v in product_options(self.cfg).items() if k != "min_score"}
        job = self.job
        return {**options, "max_new_tokens": job.max_new_tokens, "temperature": job.temperature,
                "top_p": job.top_p, "gate": [job.gate.stage, job.gate.threshold] if job.gate else None,
                "template_text": [job.template.system, job.template.user],
                **({"stop": list(job.stop)} if job.stop else {})}

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

