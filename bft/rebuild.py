"""`bft rebuild --config FILE`: one run file, one command: prepare, the generation stages the recipe
needs, assemble, validate and publish, in order, each reusing what is still current.

Reuse rule (docs/OPERATIONS.md):
- prepare is reused when its config and the content of its input files (path, size and checksum of
  every file the globs match) are what ROOT/candidates/stats.json records; otherwise it is redone.
- a generation shard is reused when its recorded inputs (checksums of its candidates shard and
  upstream shards) and stage config are the current ones (schemas/provenance.py). When only its
  inputs changed (documents joined or left the candidates shard), its rows are reused one by one:
  a row whose prompt values are unchanged (schemas.keys.input_hash) is kept, the others are sent.
  Prepare keeps every document already seen in its shard (candidates/_prior/), so a night with a
  few new Dolma files sends requests for their documents only.
- assemble is reused when a release with the same config hash (config + every input shard) is
  published: then LATEST does not move and nothing new is published.

A stage marked `external: true` in the run file runs elsewhere (a GPU cluster): rebuild checks its
shards, prints the command the workers run when some are missing, and stops (exit 75, EX_TEMPFAIL);
rerun later, or pass --wait to poll until the workers are done.
"""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass

from bft import config
from schemas.errors import UserError
from schemas.options import option

EX_TEMPFAIL = 75


@dataclass
class RebuildConfig:
    """The options of `bft rebuild` (the run file holds the verbs' sections; these only steer the run)."""

    root: str | None = option(None, "run root (default: the run file's `root:`)")
    wait: bool = option(False, "wait for external generation workers instead of stopping")
    wait_timeout: float = option(6 * 3600.0, "seconds --wait waits before failing")
    poll_s: float = option(30.0, "seconds between checks of external workers' shards")


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


def load_run(path: str, root: str | None = None, stages: list[str] | None = None) -> RunPlan:
    """All configs of a run file, validated (an unknown key, a wrong type or a missing required key
    is an error naming the key and the file)."""
    from beam_pipelines.assemble import AssembleConfig
    from beam_pipelines.prepare import PrepareConfig
    from generation.runner import GenerateConfig
    from schemas.recipes import RECIPES

    doc = config.read_run_file(path)
    unknown = sorted(set(doc) - {"root", "prepare", "generate", "assemble", "rebuild", "seed", "train", "eval"})
    if unknown:
        raise config.ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}")
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
    wanted = stages or RECIPES[asm.recipe].stages
    gen = doc.get("generate") or {}
    plans = []
    for stage in wanted:
        if not isinstance(gen.get(stage), dict):
            raise config.ConfigError(f"{path}: recipe {asm.recipe} needs stage {stage}: add a `generate: {stage}:` "
                                     "section with at least engine and model")
        cfg, run_values = verb_config(GenerateConfig, "generate", stage)
        plans.append(StagePlan(stage, cfg, run_values.get("external", False), run_values.get("workers", 1),
                               run_values.get("tokens_per_s")))
    return RunPlan(path, prep.root, prep, prep_run.get("beam_args") or [], plans, asm, asm_run.get("beam_args") or [])


def worker_command(path: str, stage: str, workers: int) -> str:
    if workers > 1:
        return (f"bft generate {stage} --config {shlex.quote(path)} --worker-index $I --num-workers {workers}"
                "   # for I in 0..%d, one per GPU or node" % (workers - 1))
    return f"bft generate {stage} --config {shlex.quote(path)}"


def _say(text: str) -> None:
    print(text, flush=True)


def rebuild(plan: RunPlan, cfg: RebuildConfig) -> int:
    """Runs the plan; returns the exit status (0 done, 75 waiting for external workers)."""
    from beam_pipelines import assemble, prepare
    from generation.runner import StageRunner, stage_status
    from schemas import release

    record = {"config_file": plan.path, "stages": {}}
    t0 = time.perf_counter()
    _say(f"== prepare -> {plan.root}/candidates")
    stats = prepare.run(plan.prepare, plan.prepare_beam_args)
    record["stages"]["prepare"] = {"reused": bool(stats.get("reused")), "seconds": round(time.perf_counter() - t0, 3),
                                   "inputs": len(stats.get("inputs") or []), "candidates": stats["kept"]}
    _say(f"   {'reused (config and input files unchanged)' if stats.get('reused') else 'done'}: "
         f"{stats['input_records']:,} input records -> {stats['kept']:,} candidates")
    for sp in plan.stages:
        t = time.perf_counter()
        _say(f"== generate {sp.stage} ({sp.cfg.engine}: {sp.cfg.model})" + (" [external]" if sp.external else ""))
        if sp.external:
            status = stage_status(sp.cfg)
            if status["pending"] and cfg.wait:
                status = _wait(sp, cfg)
            if status["pending"]:
                _say(f"   {len(status['complete'])} of {status['shards']} shards complete; the workers run:\n     "
                     + worker_command(plan.path, sp.stage, sp.workers)
                     + f"\n   then run this rebuild again (or with --wait)")
                return EX_TEMPFAIL
            summary = {"shards_done": [], "shards_skipped": status["complete"], "rows": 0, "sent": 0, "errors": 0}
        else:
            with StageRunner(sp.cfg) as runner:  # closes the stage's engine before the next one loads
                summary = runner.run()
        record["stages"][sp.stage] = {"reused_shards": len(summary["shards_skipped"]),
                                      "generated_shards": len(summary["shards_done"]),
                                      "requests_sent": summary["sent"], "external": sp.external,
                                      "model": sp.cfg.model, "seconds": round(time.perf_counter() - t, 3)}
        _say(f"   shards generated {summary['shards_done'] or 'none'}, reused {len(summary['shards_skipped'])}; "
             f"{summary['sent']:,} requests sent, {summary['errors']} engine errors")
    t = time.perf_counter()
    _say(f"== assemble ({plan.assemble.recipe}) -> {plan.root}/sft")
    record["stages"]["assemble"] = {}
    stats = assemble.run(plan.assemble, plan.assemble_beam_args, run_record=record)
    record["stages"]["assemble"] = {"reused": bool(stats.get("reused")), "seconds": round(time.perf_counter() - t, 3)}
    folder = release.release_dir(plan.root, stats["version"])
    manifest = release.validate(folder)
    f = stats["funnel"]
    _say(f"   {'reused: release ' + stats['version'] + ' is current, nothing new published' if stats.get('reused') else 'published release ' + stats['version']}"
         f" ({f['final']['train']:,} train, {f['final']['validation']:,} validation)")
    _say(f"== validate: {len(manifest['files'])} files checked\nrelease: {folder}\nreport: {folder}/report.html")
    return 0


def _wait(sp: StagePlan, cfg: RebuildConfig) -> dict:
    from generation.runner import stage_status

    deadline = time.monotonic() + cfg.wait_timeout
    while True:
        status = stage_status(sp.cfg)
        _say(f"   waiting for workers: {len(status['complete'])} of {status['shards']} shards complete")
        if not status["pending"]:
            return status
        if time.monotonic() > deadline:
            raise UserError(f"generate {sp.stage}: {len(status['pending'])} shard(s) still missing after "
                            f"--wait-timeout {cfg.wait_timeout:g} s: {status['pending'][:10]}")
        time.sleep(cfg.poll_s)


def main_rebuild(cfg: RebuildConfig, run_file: str | None) -> int:
    if not run_file:
        raise UserError("bft rebuild needs --config FILE (the run file)")
    plan = load_run(run_file, cfg.root)
    from schemas.lock import RootLock

    with RootLock(plan.root):  # the steps run in-process below and take no lock of their own
        return rebuild(plan, cfg)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `bft rebuild --config FILE`")
