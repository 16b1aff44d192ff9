"""`bft rebuild --config FILE`: one run file, one command: prepare, the generation stages the recipe
needs, assemble, validate and publish, in order, each reusing what is still current.

Reuse rule (docs/OPERATIONS.md):
- prepare is reused when its config and the content of its input files (path, size and checksum of
  every file the globs match) are what ROOT/candidates/stats.json records; otherwise it is redone.
- a generation shard is reused when its recorded inputs (checksums of its candidates shard and
  upstream shards) and stage config are the current ones (lifecycle/provenance.py). When only its
  inputs changed (documents joined or left the candidates shard), its rows are reused one by one:
  a row whose prompt values (schemas.keys.input_hash) and carried upstream fields are unchanged is
  kept, the others are sent (or remade without a request when below the gate).
  Prepare keeps every document already seen in its shard (candidates/_prior/), so a night with a
  few new Dolma files sends requests for their documents only.
- assemble is reused when a release with the same config hash (config + every input shard) is
  published: then LATEST does not move and nothing new is published.

Before prepare, every server the run sends to from here answers the openai engine's preflight
(`run_file.check_servers`): a wrong model or URL is one line now, not after the stages before it.

A stage marked `external: true` in the run file runs elsewhere (a GPU cluster): rebuild checks its
shards, prints the command the workers run when some are missing, and stops (exit 75, EX_TEMPFAIL);
rerun later, or pass --wait to poll until the workers are done.

An input folder with no input file (no `prepare.input` glob matches a file at the night's start) is
"nothing new tonight": one line, nothing published, LATEST untouched, exit 0 (or --empty-exit-code).

The night's record and summary: bft/night.py; the run file read into every step's config, with the
run's one gate: bft/run_file.py.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass

import storage
from bft.night import Night, night_text, release_changes, stage_line, stage_values
from bft.run_file import RunPlan, StagePlan, check_servers, derived, load_run
from schemas.errors import EX_TEMPFAIL, JSON_ANSWERED, UserError, exit_status, one_line
from schemas.options import option


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


def write_worker_job(sp: StagePlan) -> str:
    """The external stage `sp` resolved once (generation.job.resolve_job: its gate, the run's, caps,
    sampling, template text) and written for its workers (ROOT/_jobs/STAGE.json, whole or not at
    all): every worker runs this one job, not options rebuilt from flags. Returns its path."""
    from generation.job import resolve_job

    path = sp.cfg.layout.stage_job(sp.stage)
    storage.write_text(path, resolve_job(sp.cfg).to_json() + "\n")
    return path


def worker_command(job_path: str, sp: StagePlan) -> str:
    """What the external workers of stage `sp` run: the job file (write_worker_job), with each
    worker's index when there are several."""
    command = f"bft generate {sp.stage} --job {shlex.quote(job_path)}"
    if sp.workers > 1:
        return (f"{command} --worker-index $I --num-workers {sp.workers}   # for I in 0..{sp.workers - 1}, "
                "one per GPU or node")
    return command


class _Out:
    """Progress lines on stdout (text format) or stderr (json format, so stdout is the JSON alone)."""

    def __init__(self, fmt: str):
        self.stream = sys.stderr if fmt == "json" else sys.stdout

    def __call__(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


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
    from beam_pipelines.assemble import driver as assemble
    from generation.batch import BatchesPending
    from generation.runner import StageRunner, stage_status
    from lifecycle import release

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
            if status["pending"]:   # tonight's job, written before anyone waits for the workers that run it
                command = worker_command(write_worker_job(sp), sp)
                if cfg.wait:
                    say(f"   the workers run:\n     {command}")
                    status = _wait(sp, cfg, say, lock)
            if status["pending"]:
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
                stage_cfg = derived(sp.cfg, plan.layout, wait=True,
                                    wait_timeout=min(sp.cfg.wait_timeout, cfg.wait_timeout))
            runner = StageRunner(stage_cfg)
            runner.on_paid = lambda paid, stage=sp.stage: night.live(stage, paid)
            try:
                with runner:  # closes the stage's engine before the next one loads
                    summary = runner.run()
            except BatchesPending as e:  # submitted or still running: not a failure, a state to wait out
                values = stage_values(sp, e.summary, time.perf_counter() - t, runner.paid)
                night.add(sp.stage, values)
                say(stage_line(values) + f"\n   {e}\n   then run this rebuild again (or with --wait)")
                night.save(f"waiting for {sp.stage}'s batches")
                return {"outcome": "waiting", "exit_code": EX_TEMPFAIL, "error": None, "message": str(e),
                        "night": night.record}
            except BaseException:  # over its error budget, failed or interrupted: what it paid for counts
                values = stage_values(sp, runner.summary, time.perf_counter() - t, runner.paid)
                night.add(sp.stage, values)
                say(stage_line(values))
                raise
            paid = runner.paid
        values = stage_values(sp, summary, time.perf_counter() - t, paid)
        night.add(sp.stage, values)
        say(stage_line(values))
    t = time.perf_counter()
    say(f"== assemble ({plan.assemble.recipe}) -> {plan.root}/sft")
    previous = release.latest_version(plan.layout)
    asm = derived(plan.assemble, plan.layout, allow_empty=plan.assemble.allow_empty or cfg.allow_empty,
                  fail_on_alert=plan.assemble.fail_on_alert or cfg.fail_on_alert)
    stats = assemble.run(asm, plan.assemble_beam_args, run_record=night.ending())
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
    from lifecycle.lock import LockHeld

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
    from lifecycle.lock import RootLock

    with RootLock(plan.layout) as lock:  # the steps run in-process below and take no lock of their own
        return rebuild(plan, cfg, lock)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `bft rebuild --config FILE`")
