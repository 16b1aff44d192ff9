"""`bft assemble`'s run: the options resolved once (config.resolve), the inputs planned and checked
(which shards to join, their lineage), then the release published (lifecycle.release.publish) with the
Beam pass, stats.json, the changes since the parent, the report and the card as its build step;
a release of the same config and inputs is reused, never rebuilt."""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict

import storage
from beam_pipelines.assemble import corpus_stats, decontaminate
from beam_pipelines.assemble.config import AssembleConfig, AssembleError, AssembleJob, resolve
from beam_pipelines.assemble.join import ShardInput
from beam_pipelines.assemble.pipeline import build
from beam_pipelines.report import changes
from beam_pipelines.runtime import progress
from beam_pipelines.runtime.options import pipeline_options
from beam_pipelines.tokens import paper_tokens
from beam_pipelines.tokens.load import prove, tokenizer_fingerprint
from lifecycle import provenance, release
from schemas.layout import DATA, STATS, RunLayout
from beam_pipelines.assemble.recipes import ALL_STAGES
from lifecycle.state import prepare_stats
from storage.claims import claim_folder, clear_dead_folders

log = logging.getLogger("bft.assemble")


def held_by(cfg: AssembleConfig, folder: str) -> list[str]:
    """The alerts (in the release's stats.json) that keep LATEST from moving to it: the critical ones
    unless --allow-empty; every one with --fail-on-alert."""
    stats = json.loads(storage.read_text(storage.join(folder, STATS)))
    if cfg.fail_on_alert:
        return stats.get("alerts") or []
    return [] if cfg.allow_empty else changes.critical(stats)


def plan_inputs(job: AssembleJob, layout: RunLayout) -> tuple[list[ShardInput], dict[int, int], int, dict]:
    """Which shards to join, which are missing generation output ({shard: candidate rows}), the
    number of shards, and the input lineage."""
    cands = layout.candidate_shards()
    needed = job.rules.stages
    shards, missing_files, skipped = [], [], {}
    lineage = {"candidates": [], "generations": {s: [] for s in needed}, "seed_data": None, "made_by": {}}
    checksums: dict[str, str] = {}
    makers = job.rules.recipe.stages
    for k, n, path in cands:
        stage_paths, missing_here, checks, made_by = [], [], [], []
        # the stages the rows need must be there and current; any other stage run is read for the
        # report's statistics when it is current, and left out (with a warning) when it is not. What
        # needs the files' bytes is checked by JoinShard as it reads them (each file read once)
        for stage in ALL_STAGES:
            out = layout.generation_shard(stage, k, n)
            if storage.exists(out):
                deferred: list = []
                why = shard_problem(layout, stage, k, n, checksums, deferred)
                if why and stage in needed:
                    raise AssembleError(f"{out}: {why}; rerun bft generate {stage}")
                if why:
                    log.warning("%s: %s; left out of the statistics", out, why)
                    continue
                stage_paths.append((stage, out))
                checks += [(file, digest, f"{out}: {error}", stage) for file, digest, error in deferred]
                if stage in makers:   # the stage config that made its rows, by key (the rows' made_by)
                    made = provenance.read_record(layout.generation_metrics(stage, k, n))["config"]
                    key = provenance.maker_key(stage, made)
                    lineage["made_by"][key] = {"stage": stage, "model": made.get("model"), "config": made}
                    made_by.append(key)
                lineage["generations"].setdefault(stage, []).append(content_of(out, checksums))
            elif stage in needed:
                missing_here.append(out)
        if missing_here:
            lineage["candidates"].append(content_of(path, checksums))
            missing_files += missing_here
            skipped[k] = release.parquet_rows(path)
        else:
            # as the markers record it (JoinShard proves it, or stops before anything is published)
            claimed = next((digest for file, digest, _, stage in checks if file == path and stage in needed), None)
            lineage["candidates"].append(content_of(path, checksums, claimed))
            shards.append(ShardInput(k, n, path, tuple(stage_paths), tuple(checks), tuple(made_by)))
    if missing_files and not job.options.allow_partial:
        raise AssembleError(f"recipe {job.rules.recipe.name} needs stages {needed}; {len(missing_files)} generation "
                            "shard(s) are missing (run bft generate for them, or pass --allow-partial):\n  "
                            + "\n  ".join(missing_files))
    if job.seed_data:
        if not storage.exists(job.seed_data):
            raise AssembleError(f"{job.seed_data}: seed data not found")
        lineage["seed_data"] = content_of(job.seed_data, checksums)
    lineage["tokenizer"] = tokenizer_fingerprint(job.tokenizer)  # the token counts in the stats
    return shards, skipped, cands[0][1], lineage


def content_of(path: str, checksums: dict[str, str], claimed: str | None = None) -> dict:
    """An input of the release as its lineage (and so its config hash) records it: path, bytes and
    sha256 of the content, so that an input edited in place with the same size is a change.
    The sha256 is the one the generation markers record (`checksums`, `claimed`: JoinShard checks it
    as it reads the file, before anything is published), or read now for a file no worker reads."""
    if claimed is not None:
        return {"path": path, "bytes": storage.size(path), "sha256": claimed}
    if path not in checksums:
        checksums[path] = release.sha256_of(path)
    return {"path": path, "bytes": storage.size(path), "sha256": checksums[path]}


def shard_problem(layout: RunLayout, stage: str, k: int, n: int, checksums: dict[str, str],
                  deferred: list | None = None) -> str | None:
    """Why shard k of `stage` is not current (its marker, checksum or inputs: lifecycle.provenance), or
    None; `checksums` caches the inputs' sha256 across shards; `deferred` receives the checks that
    need a file's bytes, for the reader to make."""
    out = layout.generation_shard(stage, k, n)
    return provenance.problem(layout, out, layout.generation_metrics(stage, k, n), checksums=checksums,
                              deferred=deferred)


def _stage_models(layout: RunLayout, shards: list[ShardInput]) -> dict[str, list[str]]:
    models: dict[str, set] = {}
    for s in shards:
        for stage, _ in s.stages:
            metrics = layout.generation_metrics(stage, s.shard, s.num_shards)
            if storage.exists(metrics):
                models.setdefault(stage, set()).add(json.loads(storage.read_text(metrics)).get("model"))
    return {k: sorted(m for m in v if m) for k, v in models.items()}


def run(cfg: AssembleConfig, beam_args: list[str], run_record: dict | None = None) -> dict:
    """Resolves `cfg` once (config.resolve), plans the inputs, then publishes the release
    (lifecycle.release.publish) with the Beam pass, stats, report and card as its build step; returns
    its stats, with "folder": the release's. When the same config was published before (that
    version, or LATEST when no version is named) nothing is built: its stats come back with
    "reused": true. `run_record` (what bft rebuild did) goes into the manifest."""
    layout = cfg.layout
    prep_stats = prepare_stats(layout) or {}   # a damaged one is set aside: "run bft prepare first" follows
    job = resolve(cfg, layout, prep_stats)
    opts = job.options
    eval_sets = decontaminate.read_eval_sets(opts.decontaminate, opts.decontaminate_field, opts.decontaminate_ngram)
    shards, skipped, num_shards, lineage = plan_inputs(job, layout)
    lineage["decontaminate"] = [s.content for s in eval_sets]   # another file's content: another release
    # what to do with the alerts is not what the release holds: outside the config hash
    config = {k: v for k, v in asdict(opts).items() if k not in ("allow_empty", "fail_on_alert")}

    def build_release(folder: str, version: str) -> dict:
        """The Beam pass into `folder`, then stats.json, report and card; returns the split counts."""
        proof = prove(job.tokenizer)  # loaded and proved once, here (only when a release is built)
        # parts left by killed runs go; a live run's folder (another assemble on this root) is never deleted
        clear_dead_folders(layout.assemble_tmp_root)
        tmp = layout.assemble_tmp(uuid.uuid4().hex[:12])
        claim_folder(tmp)
        t0 = time.perf_counter()
        try:
            with progress.running("assemble", pipeline_options(beam_args)) as p:
                build(p, job, shards, num_shards, folder, tmp, eval_sets, proof)
            summary = json.loads(storage.read_text(RunLayout.summary(tmp)))
            release.number_splits(folder)  # each split numbered on its own, before the manifest lists them
            return write_stats(folder, version, summary, tmp, time.perf_counter() - t0)
        finally:
            storage.delete_tree(tmp)

    def write_stats(folder: str, version: str, summary: dict, tmp: str, pipeline_s: float) -> dict:
        """stats.json, changes/, report and card of the release the pass wrote (`tmp`: its parts)."""
        t1 = time.perf_counter()
        stats = corpus_stats.release_stats(opts, version, summary, prep_stats, sorted(skipped),
                                           sum(skipped.values()), _stage_models(layout, shards),
                                           [s.summary() for s in eval_sets],
                                           threshold=job.rules.gate.threshold if job.rules.gate else None)
        # what changed since the release LATEST names now (the parent), and the alerts (beam_pipelines/report/changes.py)
        parent = release.parent_of(layout, version)
        parent_folder = layout.release(parent) if parent and release.is_published(layout.release(parent)) else None
        # the new release's data files, read once: their ids (the changes) and the web examples'
        # lengths in the paper's unit (Llama-2-structure tokens, for the report)
        # (the data files listed: the manifest that will list them is written after this build)
        new_ids, lengths = {}, paper_tokens.WebLengths()
        columns = ["id", "origin"] + (["instruction", "response"] if lengths.tok is not None else [])
        for path in sorted(storage.list_files(storage.join(folder, DATA))):
            if path.endswith(".parquet"):
                table = storage.read_parquet(path, columns)
                changes.add_ids(new_ids, table)
                lengths.add(table)
        stats["parent"] = parent
        stats["changes"] = changes.changes(parent_folder, parent, new_ids, stats, write_to=(folder, tmp))
        stats["alerts"] = changes.alerts(stats, stats["changes"], job.split.validation_fraction)
        stats["trend"] = changes.trend(layout.release, parent if parent_folder else None, stats)
        stats["paper_lengths"] = lengths.result()
        stats["timing"] = {"pipeline_s": round(pipeline_s, 3),
                           "stats_in_pipeline_worker_s": round(summary.get("timing", {}).get("stats_s", 0.0), 3),
                           "pipeline_worker_s": round(summary.get("timing", {}).get("work_s", 0.0), 3)}
        from beam_pipelines import report

        report.write_report(folder, stats)
        report.write_card(folder, stats, config)
        stats["timing"]["report_s"] = round(time.perf_counter() - t1, 3)
        storage.write_text(storage.join(folder, STATS), json.dumps(stats, indent=2) + "\n")
        return {split: stats["funnel"]["final"][split] for split in release.SPLITS}

    folder, built = release.publish(layout, version=opts.version, config=config, lineage=lineage,
                                    build=build_release, run=run_record, hold=lambda f: held_by(opts, f),
                                    hold_how="look at its report.html; --allow-empty publishes it as LATEST"
                                    if not opts.fail_on_alert else "--fail-on-alert holds it on any alert")
    stats = json.loads(storage.read_text(storage.join(folder, STATS)))
    stats["folder"] = folder  # what it wrote (or found current): the callers never work it out again
    return stats if built else {**stats, "reused": True}
