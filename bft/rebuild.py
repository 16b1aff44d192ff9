"""`bft rebuild --config FILE`: one run file, one command: prepare, the generation stages the recipe
needs, assemble, validate and publish, in order, each reusing what is still current.

Reuse rule (docs/OPERATIONS.md):
- prepare is reused when its config and the content of its input files (path, size and checksum of
  every file the globs match) are what ROOT/candidates/stats.json records; otherwise it is redone.
- a generation shard is reused when its recorded inputs (checksums of its candidates shard and
  upstream shards) and stage config are the current ones (schemas/provenance.py). When only its
  inputs changed (documents joined or left the candidates shard), its rows are reused one by one:
  a row whose prompt values (schemas.keys.input_hash) and carried upstream fields are unchanged is
  kept, the others are sent (or remade without a request when below the gate).
  Prepare keeps every document already seen in its shard (candidates/_prior/), so a night with a
  few new Dolma files sends requests for their documents only.
- assemble is reused when a release with the same config hash (config + every input shard) is
  published: then LATEST does not move and nothing new is published.

Before prepare, every server the run sends to from here answers the openai engine's preflight
(`check_servers`): a wrong model or URL is one line now, not after the stages before it.

A stage marked `external: true` in the run file runs elsewhere (a GPU cluster): rebuild checks its
shards, prints the command the workers run when some are missing, and stops (exit 75, EX_TEMPFAIL);
rerun later, or pass --wait to poll until the workers are done.

An input folder with no input file (no `prepare.input` glob matches a file at the night's start) is
"nothing new tonight": one line, nothing published, LATEST untouched, exit 0 (or --empty-exit-code).

The night: what every invocation did until a release is published (or found current) is one record,
kept in ROOT/_night.json between invocations (an exit 75, a stage over its error budget, a failure or
an interrupt: each invocation's status is its one-line error), written into the release's manifest
(`run`), kept in ROOT/_last_night.json once the night ended (`bft status`), and printed at the end
however the night ends, with the difference from the release LATEST named before when one was
published (text, or --format json: one JSON document on stdout, the error and exit status in it).
Every request the generation stages were answered is counted, also those of an invocation that failed,
was interrupted or was killed (Night.live).
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, replace

import storage
from bft import config
from schemas import state as stored
from schemas.outcomes import refused_text
from schemas.errors import JSON_ANSWERED, UserError, exit_status, one_line
from schemas.options import option

EX_TEMPFAIL = 75


@dataclass
class RebuildConfig:
    """The options of `bft rebuild` (the run file holds the verbs' sections; these only steer the run).
    Exit 0 also when nothing is new tonight (no input file; see --empty-exit-code)."""

    root: str | None = option(None, "run root (default: the run file's `root:`)")
    wait: bool = option(False, "wait for external generation workers instead of stopping")
    wait_timeout: float = option(6 * 3600.0, "seconds --wait waits before failing")
    poll_s: float = option(30.0, "seconds between checks of external workers' shards")
    format: str = option("text", "the night's summary at the end, however the night ends: text, or one JSON "
                         "document on stdout (the error and exit status in it when it failed)", choices=["text", "json"])
    empty_exit_code: int = option(0, "exit status when no input glob matches a file at the night's start (nothing "
                                  "new tonight: nothing is published): 0, or a code your scheduler tells apart")
    allow_empty: bool = option(False, "move LATEST to tonight's release even when a critical alert fires (no web "
                               "example, the gate passed nothing); without it the night fails (exit 1) and LATEST "
                               "stays (the run file's assemble.allow_empty, too)")
    fail_on_alert: bool = option(False, "any alert fails the night (exit 1) and leaves LATEST where it was")

    def check(self) -> None:
        if not 0 <= self.empty_exit_code <= 255:
            raise UserError(f"--empty-exit-code {self.empty_exit_code}: an exit status, from 0 to 255")


@dataclass
class StagePlan:
    stage: str
    cfg: object                  # GenerateConfig
    external: bool = False
    workers: int = 1
    tokens_per_s: float | None = None


@dataclass
class RunPlan:
    """Every verb's config, built and checked from the run file before anything runs."""

    path: str
    root: str
    prepare: object              # PrepareConfig
    prepare_beam_args: list[str]
    stages: list[StagePlan]
    assemble: object             # AssembleConfig
    assemble_beam_args: list[str]

    @property
    def layout(self):
        """The run's one RunLayout (schemas.layout), which every step's config shares (load_run)."""
        return self.prepare.layout


def load_run(path: str, root: str | None = None, stages: list[str] | None = None) -> RunPlan:
    """All configs of a run file, validated (an unknown key, a wrong type or a missing required key
    is an error naming the key and the file)."""
    from beam_pipelines.assemble.pipeline import AssembleConfig
    from beam_pipelines.prepare import PrepareConfig
    from generation.job import GenerateConfig
    from schemas.recipes import RECIPES, gate_threshold

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
    gate = RECIPES[asm.recipe].gate
    if asm.min_score is None and gate and isinstance((doc.get("generate") or {}).get(gate), dict):
        mode = verb_config(GenerateConfig, "generate", gate)[0].score_mode
        if mode == "logprob":    # expected scores: the gate and assemble default to 4.5 (AlpaGasus's threshold), not 5
            asm.min_score = gate_threshold(gate, mode)
    wanted = stages or RECIPES[asm.recipe].stages
    gen = doc.get("generate") or {}
    plans = []
    for stage in wanted:
        if not isinstance(gen.get(stage), dict):
            raise config.ConfigError(f"{path}: recipe {asm.recipe} needs stage {stage}: add a `generate: {stage}:` "
                                     "section with at least engine and model")
        cfg, run_values = verb_config(GenerateConfig, "generate", stage)
        cfg = _one_threshold(path, stage, cfg, asm)
        plans.append(StagePlan(stage, cfg, run_values.get("external", False), run_values.get("workers", 1),
                               run_values.get("tokens_per_s")))
    for step in (asm, *(sp.cfg for sp in plans)):
        step.share_layout(prep.layout)   # one RunLayout per run, built here and handed to every step
    return RunPlan(path, prep.root, prep, prep_run.get("beam_args") or [], plans, asm, asm_run.get("beam_args") or [])


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


def _one_threshold(path: str, stage: str, cfg, asm):
    """One gate and one threshold per run, the recipe's. A recipe without a gate (rewrite) answers
    every pair whose instruction parsed: its answering stage is sent them all (`--gate none`; the
    stage's own default gate, score, would need score shards the recipe does not make), and a gate or
    threshold named for it is refused. Otherwise the recipe's threshold (assemble.min_score, else the
    recipe's default) gates the answering stage and keeps the pair in assemble. A stage whose gate is
    the recipe's gate and that names no threshold takes it; one that names another is refused, naming
    both keys (a rewrite gate at 5 with assemble at 4 published the same pairs; at 0 with assemble at
    5, it paid for rewrites assemble then dropped)."""
    from schemas.recipes import NO_GATE
    from schemas.recipes import RECIPES

    recipe = RECIPES[asm.recipe]
    if stage == recipe.answer and recipe.gate is None:
        if cfg.gate not in (None, NO_GATE) or cfg.min_score is not None:
            named = f"gate {cfg.gate}" if cfg.gate not in (None, NO_GATE) else f"min_score {cfg.min_score:g}"
            raise config.ConfigError(f"{path}: generate.{stage}.{named.replace(' ', ': ', 1)}: the {asm.recipe} "
                                     f"recipe has no gate (assemble keeps every answered pair); remove it, or "
                                     "choose a recipe with a gate (filter+rewrite)")
        return replace(cfg, gate=NO_GATE)
    gate = cfg.gate_rule()
    if gate is None or recipe.gate is None or gate.stage != recipe.gate or stage != recipe.answer:
        return cfg
    if cfg.min_score is None:
        return replace(cfg, min_score=asm.threshold)
    elif cfg.min_score != asm.threshold:
        said = "assemble.min_score" if asm.min_score is not None else f"the {asm.recipe} recipe's default"
        raise config.ConfigError(f"{path}: generate.{stage}.min_score {cfg.min_score:g} and {said} "
                                 f"{asm.threshold:g} differ: one threshold gates the {stage} requests and keeps "
                                 f"the pairs; set assemble.min_score alone")
    return cfg


def worker_command(path: str, stage: str, workers: int, cfg=None) -> str:
    """What an external worker runs; with the stage's config `cfg`, a gate's threshold resolved from
    the recipe (`_one_threshold`) is passed on, so the workers gate as the rebuild checks (`--gate none`
    for a recipe without a gate)."""
    from schemas.recipes import NO_GATE

    gate = cfg.gate_rule() if cfg is not None else None
    extra = f" --min-score {gate.threshold:g}" if gate is not None else ""
    if cfg is not None and cfg.gate == NO_GATE:   # the recipe sends the stage every pair (_one_threshold)
        extra = f" --gate {NO_GATE}"
    if workers > 1:
        return (f"bft generate {stage} --config {shlex.quote(path)}{extra} --worker-index $I --num-workers {workers}"
                "   # for I in 0..%d, one per GPU or node" % (workers - 1))
    return f"bft generate {stage} --config {shlex.quote(path)}{extra}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


WORK = ("requests_sent", "rows_reused", "transient_errors", "refusals", "generated_shards", "seconds")
LIVE_SAVE_S = 5.0   # a stage's running count of paid requests is saved at most this often (Night.live)
UNCLOSED = "ended without closing its record (killed?)"


class Night:
    """The record of one night: every invocation until a release is published or found current
    (module docstring). `stages` sums what each stage did over the invocations."""

    def __init__(self, layout, config_file: str):
        self.path, self.last_path = layout.night_record, layout.last_night_record
        names = {layout.relative(self.path), layout.relative(self.last_path)}
        storage.clear_debris(layout.root, time.time(), names.__contains__)   # of a write killed midway
        record = read_record(layout, self.path)
        if record is None or record.get("ended_at"):   # none, unreadable, or one that ended (killed as it closed)
            record = {"config_file": config_file, "started_at": _now(), "invocations": [], "stages": {}}
        for invocation in record["invocations"]:
            # one that never closed its record (kill -9, a lost machine; this run holds the root's lock, so
            # it is not running): what its stages had paid, saved as it went (live), is the night's too
            if invocation.get("status") == "running":
                invocation["status"] = UNCLOSED
            for stage, values in invocation.pop("live", {}).items():
                self._sum(record, stage, values)
        record["invocations"].append({"started_at": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                                      "status": "running"})
        self.record = record
        self.closed = False     # saved or finished: this invocation's status is written
        self._saved_at = 0.0

    def add(self, stage: str, values: dict) -> dict:
        """Adds what `stage` did in this invocation: the work (WORK: requests, rows reused, failures,
        refusals by reason, shards generated, seconds) is summed over the invocations; the rest is a
        state (candidates, shards reused, model) and the last invocation's value stands. The stage's
        running count (`live`) is replaced by these values."""
        self.record["invocations"][-1].get("live", {}).pop(stage, None)
        return self._sum(self.record, stage, values)

    @staticmethod
    def _sum(record: dict, stage: str, values: dict) -> dict:
        into = record["stages"].setdefault(stage, {})
        for key, value in values.items():
            if key not in WORK:
                into[key] = value
            elif isinstance(value, dict):
                sub = into.setdefault(key, {})
                for k, v in value.items():
                    sub[k] = sub.get(k, 0) + v
            else:
                into[key] = round(into.get(key, 0) + value, 3)
        return into

    def live(self, stage: str, paid: dict) -> None:
        """What `stage` has paid for so far in this invocation (StageRunner.paid: requests answered,
        transient failures, refusals), saved in the record at most every LIVE_SAVE_S: a run killed
        without a word (kill -9) leaves it, and the next invocation counts it (__init__). A stage that
        ends, fails or is interrupted replaces it with its values (add)."""
        self.record["invocations"][-1].setdefault("live", {})[stage] = json.loads(json.dumps(paid))
        if time.monotonic() - self._saved_at >= LIVE_SAVE_S:
            self._write(self.path)

    def _write(self, path: str) -> None:
        self._saved_at = time.monotonic()
        storage.write_text(path, json.dumps(self.record, indent=2) + "\n")

    def save(self, status: str) -> None:
        self.closed = True
        self.record["invocations"][-1].update(status=status, ended_at=_now())
        self._write(self.path)

    def finish(self, outcome: str) -> None:
        """The night ended (`outcome`: published, current, nothing new): its record becomes the last
        night's (ROOT/_last_night.json, `bft status`), and the next invocation starts a new night."""
        self.closed = True
        self.record["invocations"][-1].update(status="done", ended_at=_now())
        self.record.update(ended_at=_now(), outcome=outcome)
        self._write(self.last_path)
        storage.delete(self.path)


# what Night sums and reads of a record: a stage's work, per stage and in an invocation's live counts
_WORK = {key: stored.Maybe(stored.MapOf(stored.NUMBER) if key == "refusals" else stored.NUMBER) for key in WORK}
RECORD = {"stages": stored.MapOf(_WORK), "ended_at": stored.Maybe(str),
          "invocations": [{"status": stored.Maybe(str), "live": stored.Maybe(stored.MapOf(_WORK))}]}


def read_record(layout, path: str, set_aside: bool = True) -> dict | None:
    """A night's record (Night), or None when there is none or it is damaged (schemas.state: set
    aside, unless `set_aside` is False, so that the night starts a new record and never writes the
    damaged one back)."""
    return stored.read_json(layout, path, RECORD, set_aside)


class _Out:
    """Progress lines on stdout (text format) or stderr (json format, so stdout is the JSON alone)."""

    def __init__(self, fmt: str):
        self.stream = sys.stderr if fmt == "json" else sys.stdout

    def __call__(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _stage_line(r: dict) -> str:
    return (f"   shards generated {r['generated']}, reused {r['reused_shards']}; {r['requests_sent']:,} requests "
            f"sent, {r['transient_errors']} engine errors (transient), {refused_text(r.get('refusals'))}, "
            f"{r['rows_reused']:,} rows reused, {r['seconds']:.1f} s")


def rebuild(plan: RunPlan, cfg: RebuildConfig, lock=None) -> int:
    """Runs the plan and prints the night's summary however the night ends (text, or one JSON
    document); returns the exit status: 0 done (published, current), --empty-exit-code when nothing
    is new tonight, 75 waiting for external workers or batches. A failure (an error, an interrupt)
    is recorded and summed up with its one line and exit status, then raised: bft.cli prints the line
    on stderr and exits. `lock`: the root's lock this run holds, let go while --wait waits for
    external workers (they take it)."""
    say = _Out(cfg.format)
    night = Night(plan.layout, plan.path)
    try:
        result = _run_night(plan, cfg, night, say, lock)
    except BaseException as e:  # a failure anywhere (prepare, a stage, assemble) or an interrupt: the record stays
        error = one_line(e)   # an interrupt's is the CLI's line: "interrupted" or "interrupted by SIGTERM"
        interrupted = isinstance(e, KeyboardInterrupt)
        if not night.closed:
            night.save(error if interrupted else f"failed: {error}")
        _answer(cfg, {"outcome": "interrupted" if interrupted else "failed", "exit_code": exit_status(e),
                      "error": error, "night": night.record,
                      "alerts": getattr(e, "alerts", [])})   # a release held by its alerts (HeldRelease)
        if cfg.format == "json":
            setattr(e, JSON_ANSWERED, True)
        raise
    _answer(cfg, result)
    return result["exit_code"]


def _answer(cfg: RebuildConfig, result: dict) -> None:
    """The night's summary on stdout: one JSON document, or text."""
    print(json.dumps(result, indent=2) if cfg.format == "json" else night_text(result), flush=True)


def no_input(prepare_cfg) -> str | None:
    """"<folder> has no input files" when none of prepare's input globs matches a file (the folder: a
    glob's part before its first wildcard), else None."""
    from beam_pipelines.prepare.config import matching

    patterns = []
    for pattern in prepare_cfg.input:
        pattern, files = matching(pattern)
        if files:
            return None
        patterns.append(pattern)
    folders = sorted({p[:min((p.find(c) for c in "*?[" if c in p), default=len(p))].rsplit("/", 1)[0] or "/"
                      for p in patterns})
    return f"{', '.join(folders)} has no input files (input {', '.join(map(repr, patterns))})"


def _run_night(plan: RunPlan, cfg: RebuildConfig, night: "Night", say, lock) -> dict:
    from beam_pipelines import prepare
    from beam_pipelines.assemble import pipeline as assemble
    from generation.batch import BatchesPending
    from generation.runner import StageRunner, stage_status
    from schemas import release

    empty = no_input(plan.prepare)
    if empty:   # an input folder not filled yet: a state, not a failure
        message = f"nothing new tonight: {empty}; nothing published, LATEST unchanged"
        night.finish("nothing new")
        return {"outcome": "nothing new", "exit_code": cfg.empty_exit_code, "error": None, "message": message,
                "night": night.record}
    t0 = time.perf_counter()
    say(f"== prepare -> {plan.root}/candidates")
    stats = prepare.run(plan.prepare, plan.prepare_beam_args)
    reused = bool(stats.get("reused"))
    earlier = bool(night.record["stages"].get("prepare", {}).get("ran_tonight"))   # by an earlier invocation
    night.add("prepare", {"reused": reused, "ran_tonight": earlier or not reused,
                          "seconds": round(time.perf_counter() - t0, 3),
                          "inputs": len(stats.get("inputs") or []), "candidates": stats["kept"]})
    state = "done" if not reused else "done earlier tonight" if earlier else "reused"
    say(f"   {state}{' (config and input files unchanged)' if reused else ''}: "
        f"{stats['input_records']:,} input records -> {stats['kept']:,} candidates")
    for sp in plan.stages:
        t = time.perf_counter()
        say(f"== generate {sp.stage} ({sp.cfg.engine}: {sp.cfg.model})" + (" [external]" if sp.external else ""))
        if sp.external:
            status = stage_status(sp.cfg)
            if status["pending"] and cfg.wait:
                status = _wait(sp, cfg, say, lock)
            if status["pending"]:
                command = worker_command(plan.path, sp.stage, sp.workers, sp.cfg)
                say(f"   {len(status['complete'])} of {status['shards']} shards complete; the workers run:\n     "
                    f"{command}\n   then run this rebuild again (or with --wait)")
                night.save("waiting for external workers")
                return {"outcome": "waiting", "exit_code": EX_TEMPFAIL, "error": None, "night": night.record,
                        "message": f"{len(status['complete'])} of {status['shards']} shards of {sp.stage} complete; "
                                   f"the workers run: {command}"}
            summary = {"shards_done": [], "shards_skipped": status["complete"], "reused": 0}
            paid = None
        else:
            stage_cfg = sp.cfg
            if cfg.wait and sp.cfg.batch != "none":  # rebuild --wait waits for a stage's batches too
                stage_cfg = replace(sp.cfg, wait=True, wait_timeout=min(sp.cfg.wait_timeout, cfg.wait_timeout))
            runner = StageRunner(stage_cfg)
            runner.on_paid = lambda paid, stage=sp.stage: night.live(stage, paid)
            try:
                with runner:  # closes the stage's engine before the next one loads
                    summary = runner.run()
            except BatchesPending as e:  # submitted or still running: not a failure, a state to wait out
                values = _stage_values(sp, e.summary, time.perf_counter() - t, runner.paid)
                night.add(sp.stage, values)
                say(_stage_line(values) + f"\n   {e}\n   then run this rebuild again (or with --wait)")
                night.save(f"waiting for {sp.stage}'s batches")
                return {"outcome": "waiting", "exit_code": EX_TEMPFAIL, "error": None, "message": str(e),
                        "night": night.record}
            except BaseException:  # over its error budget, failed or interrupted: what it paid for counts
                values = _stage_values(sp, runner.summary, time.perf_counter() - t, runner.paid)
                night.add(sp.stage, values)
                say(_stage_line(values))
                raise
            paid = runner.paid
        values = _stage_values(sp, summary, time.perf_counter() - t, paid)
        night.add(sp.stage, values)
        say(_stage_line(values))
    t = time.perf_counter()
    say(f"== assemble ({plan.assemble.recipe}) -> {plan.root}/sft")
    previous = release.latest_version(plan.layout)
    night.record["stages"]["assemble"] = {}
    night.record["ended_at"] = _now()
    night.record["invocations"][-1].update(status="done", ended_at=_now())  # as the manifest records it
    plan.assemble.allow_empty = plan.assemble.allow_empty or cfg.allow_empty
    plan.assemble.fail_on_alert = plan.assemble.fail_on_alert or cfg.fail_on_alert
    stats = assemble.run(plan.assemble, plan.assemble_beam_args, run_record=night.record)
    night.add("assemble", {"reused": bool(stats.get("reused")), "seconds": round(time.perf_counter() - t, 3)})
    folder = stats["folder"]
    manifest = release.validate(folder)
    f = stats["funnel"]
    say(f"   {'reused: release ' + stats['version'] + ' is current, nothing new published' if stats.get('reused') else 'published release ' + stats['version']}"
        f" ({f['final']['train']:,} train, {f['final']['validation']:,} validation)")
    say(f"== validate: {len(manifest['files'])} files checked\nrelease: {folder}\nreport: {folder}/report.html")
    outcome = "current" if stats.get("reused") else "published"
    night.finish(outcome)
    return {"outcome": outcome, "exit_code": 0, "error": None, "night": night.record,
            "release": {"version": stats["version"], "published": not stats.get("reused"), "folder": folder,
                        "train": f["final"]["train"], "validation": f["final"]["validation"]},
            "changes": release_changes(plan.layout, previous, stats),
            "alerts": stats.get("alerts") or []}


def _stage_values(sp: StagePlan, summary: dict, seconds: float, paid: dict | None) -> dict:
    """A stage's values for the night: its shards from `summary` (StageRunner.summary, also a partial
    one), its requests, failures and refusals from `paid` (StageRunner.paid: every answer, those of
    shards not written yet included; None for an external stage, whose workers count their own), and
    the output tokens per row and shared-prefix share over the stage's shards (budget.token_figures)."""
    from generation.budget import token_figures

    paid = paid or {"requests_sent": 0, "transient_errors": 0, "refusals": {}}
    done = summary.get("shards_done") or []
    return {**token_figures(sp.cfg.layout, sp.stage),
            "generated": done or "none", "reused_shards": len(summary.get("shards_skipped") or []),
            "generated_shards": len(done), "requests_sent": paid["requests_sent"],
            "rows_reused": summary.get("reused", 0), "transient_errors": paid["transient_errors"],
            "refusals": dict(paid["refusals"]), "external": sp.external, "model": sp.cfg.model,
            "seconds": round(seconds, 3)}


def release_changes(layout, previous: str | None, stats: dict) -> dict:
    """How the release of `stats` (assemble.run's) differs from `previous` (LATEST before this night):
    examples added, removed and kept by origin, the kept share, the error share and the stages' pass
    rates (beam_pipelines.report.changes, the same comparison the release's own report shows against its
    parent: taken from its stats when the parent is `previous`)."""
    from beam_pipelines.report import changes
    from schemas import release

    version = stats["version"]
    if previous is None or previous == version:
        return {"previous": previous, "same_release": previous == version}
    diff = stats.get("changes") if stats.get("parent") == previous else None
    if not diff:
        try:
            new_ids = changes.release_ids(stats["folder"])
        except (OSError, ValueError, release.ReleaseError) as e:
            return {"previous": previous, "error": f"the new release cannot be read: {e}"}
        diff = changes.changes(layout.release(previous), previous, new_ids, stats)
    if diff.get("error"):
        return {"previous": previous, "error": diff["error"]}
    return {"previous": previous, "same_release": False, **{k: v for k, v in diff.items() if k != "parent"}}


def night_text(result: dict) -> str:
    """The night's summary as text (`result`: rebuild's answer, however the night ended)."""
    from beam_pipelines.report.changes import pct

    night, rel, changes = result["night"], result.get("release"), result.get("changes") or {}
    if result["outcome"] == "nothing new":
        return result["message"]
    lines = [f"== the night ({len(night['invocations'])} invocation(s) since {night['started_at']})"]
    for stage, r in night["stages"].items():
        if stage == "prepare":
            state = ("done earlier tonight" if r.get("reused") and r.get("ran_tonight") else
                     "reused" if r.get("reused") else "ran")
            lines.append(f"   prepare: {state}, {r.get('candidates', 0):,} candidates, {r.get('seconds', 0):.1f} s")
        elif stage == "assemble":
            lines.append(f"   assemble: {'reused' if r.get('reused') else 'built'}, {r.get('seconds', 0):.1f} s")
        else:
            lines.append(f"   {stage}: {r.get('requests_sent', 0):,} sent, {r.get('rows_reused', 0):,} reused, "
                         f"{refused_text(r.get('refusals'))}, {r.get('transient_errors', 0)} transient failures, "
                         f"{r.get('seconds', 0):.1f} s" + _tokens_text(r))
    if len(night["invocations"]) > 1 or result["outcome"] not in ("published", "current"):
        lines.append("   invocations: " + "; ".join(f"{i + 1}. {inv.get('started_at', '?')} {inv.get('status', '?')}"
                                                    for i, inv in enumerate(night["invocations"])))
    if result["outcome"] in ("failed", "interrupted"):
        lines.append(f"   {result['outcome'].upper()} (exit {result['exit_code']}): {result['error']}")
    elif result["outcome"] == "waiting":
        lines.append(f"   waiting (exit {result['exit_code']}): {result['message']}")
    if rel is None:
        return "\n".join(lines + [f"   ALERT: {a}" for a in result.get("alerts") or []])
    lines.append(f"   release {rel['version']}: {'published' if rel['published'] else 'current, nothing new'} "
                 f"({rel['train']:,} train, {rel['validation']:,} validation)")
    if changes.get("previous") is None:
        lines.append("   no previous release to compare with")
    elif changes.get("same_release"):
        lines.append(f"   same as the previous release {changes['previous']}")
    elif changes.get("error"):
        lines.append(f"   vs {changes['previous']}: {changes['error']}")
    else:
        parts = [f"{o}: +{v['added']} -{v['removed']} ={v['kept']}" for o, v in changes["examples"].items()]
        lines.append(f"   vs {changes['previous']}: examples {'; '.join(parts) or 'none in either'}; kept share "
                     f"{pct(changes['kept_share']['parent'])} -> {pct(changes['kept_share']['now'])}; "
                     f"error share {pct(changes['error_share']['parent'])} -> "
                     f"{pct(changes['error_share']['now'])}")
    lines += [f"   ALERT: {a}" for a in result.get("alerts") or []]
    return "\n".join(lines)


def _tokens_text(r: dict) -> str:
    """The stage's output tokens per row and the share of its prompt tokens a prefix cache reuses."""
    out, share = r.get("output_tokens_per_row"), r.get("prefix_share")
    return ((f"; {out:,.1f} output tokens per row" if out is not None else "")
            + (f", {share:.1%} of prompt tokens in the shared prefix (prefix cache)" if share is not None else ""))


def _wait(sp: StagePlan, cfg: RebuildConfig, say, lock=None) -> dict:
    """Polls the stage's shards until the external workers wrote them all. The root's lock is let go
    meanwhile (a single worker, `bft generate STAGE` without --num-workers, takes it to write) and
    taken again before the next step: LockHeld (exit 1) when another writer still holds the root a minute
    after the shards are complete."""
    from generation.runner import stage_status

    deadline = time.monotonic() + cfg.wait_timeout
    if lock is not None:
        lock.release()
    try:
        while True:
            status = stage_status(sp.cfg)
            say(f"   waiting for workers: {len(status['complete'])} of {status['shards']} shards complete")
            if not status["pending"]:
                return status
            if time.monotonic() > deadline:
                raise UserError(f"generate {sp.stage}: {len(status['pending'])} shard(s) still missing after "
                                f"--wait-timeout {cfg.wait_timeout:g} s: {status['pending'][:10]}")
            time.sleep(cfg.poll_s)
    finally:
        if lock is not None:
            _take_back(lock, cfg.poll_s)


def _take_back(lock, poll_s: float, grace_s: float = 60.0) -> None:
    """Takes the root's lock again after the wait. A worker that just wrote its last shard may hold it a
    moment longer (it ends its run first): wait up to `grace_s` before LockHeld stands."""
    from schemas.lock import LockHeld

    deadline = time.monotonic() + grace_s
    while True:
        try:
            lock.acquire()
            return
        except LockHeld:
            if time.monotonic() > deadline:
                raise
            time.sleep(min(max(poll_s, 0.05), 1.0))


def main_rebuild(cfg: RebuildConfig, run_file: str | None) -> int:
    if not run_file:
        raise UserError("needs --config FILE (the run file)")
    plan = load_run(run_file, cfg.root)
    check_servers(plan)   # a wrong model or URL is found now, not after prepare and the stages before it
    from schemas.lock import RootLock

    with RootLock(plan.layout) as lock:  # the steps run in-process below and take no lock of their own
        return rebuild(plan, cfg, lock)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `bft rebuild --config FILE`")
