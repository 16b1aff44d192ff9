"""The pass that wires the steps (build) and the run around it (run): reuse of a complete output of
the same config and inputs, the cleanup before a run, and the ids of the output being replaced."""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter

import apache_beam as beam
from apache_beam.typehints import KV

import storage
from beam_pipelines.prepare import dolma
from beam_pipelines.tokens.load import prove
from beam_pipelines.tokens.shape import TokenizerProof
from beam_pipelines.prepare import sample
from beam_pipelines.prepare.config import (PrepareConfig, check_output,
                                           input_fingerprint, list_inputs, size_or_zero)
from beam_pipelines.prepare.dedup import Deduplicate
from beam_pipelines.prepare.near_dedup import NearDeduplicate
from beam_pipelines.prepare.read import CountLines, ReadAndMeasure
from beam_pipelines.prepare.records import KEPT, Doc, tally
from beam_pipelines.prepare.sample import SampleByKey, SampleToTarget, key_limit
from beam_pipelines.prepare.write import (AssignShards, MergeShard, WriteParts, WriteRejects, keep_prior, read_prior,
                                          write_stats)
from schemas.errors import UserError
from lifecycle.state import prepare_stats

log = logging.getLogger("bft.prepare")


def build(p: beam.Pipeline, cfg: PrepareConfig, run_id: str | None = None, files: list[str] | None = None,
          fingerprint: list[dict] | None = None, prior: list[str] | None = None,
          proof: TokenizerProof | None = None):
    """Adds the prepare pass to pipeline `p`; returns the PCollection of the final stats dict.
    `proof`: the tokenizer proved by the driver (tokens.load.prove), handed to every measuring step."""
    proof = prove(cfg.tokenizer) if proof is None else proof
    files = list_inputs(cfg.input) if files is None else files
    selected = [f for f in files if not cfg.splits or dolma.split_of(f, cfg.splits)]
    others = [f for f in files if f not in set(selected)]
    layout = cfg.layout
    tmp_dir = layout.prepare_tmp(run_id or uuid.uuid4().hex[:12])

    limit0 = None
    # near-duplicate clusters are not decomposable by sample key (a chain may pass through documents
    # of any key): with --near-dedup a sample is taken from the survivors of every document
    by_key = cfg.target_docs and not cfg.near_dedup
    stash = tmp_dir if by_key else None  # a sample re-reads its few documents from a stash
    if by_key:  # round 0 of the sample, measured in the first read: its key limit from an estimate
        stored = {i["path"]: i.get("bytes", 0) for i in fingerprint or []}
        sizes = [stored[f] if f in stored else size_or_zero(f) for f in selected]
        limit0 = key_limit(sample.estimate_ranked(selected, sizes, cfg), cfg.target_docs, 1.0)
    read = (p | "HeadSplitFiles" >> beam.Create(selected)  # Create spreads its elements (a reshuffle)
            | "ReadAndMeasure" >> beam.ParDo(ReadAndMeasure(cfg, selected, limit0, stash, proof)).with_output_types(
                Doc).with_outputs(
                "rejects", "tallies", "unreadable", "ranks", main="docs"))
    if by_key:
        docs, kept_rejects, kept_tallies = ((read.docs, read.ranks)
                                            | "SampleByKey" >> SampleByKey(cfg, selected, limit0, stash, proof))
    else:
        docs, kept_rejects, kept_tallies = read.docs | "Deduplicate" >> Deduplicate(cfg.seed, selected)
    rejects = [read.rejects, kept_rejects]
    tallies = [read.tallies, kept_tallies]
    if cfg.near_dedup:
        docs, near_rejects, near_tallies = docs | "NearDeduplicate" >> NearDeduplicate(cfg, selected)
        rejects.append(near_rejects)
        tallies.append(near_tallies)
        if cfg.target_docs:
            docs, sample_tallies = docs | "Sample" >> SampleToTarget(cfg.target_docs, cfg.seed)
            tallies.append(sample_tallies)
    unreadable = [read.unreadable]
    if others:  # no stage for an empty list
        other = (p | "OtherSplitFiles" >> beam.Create(others)
                 | "CountLines" >> beam.ParDo(CountLines(cfg.skip_unreadable_files)).with_outputs(
                     "unreadable", "tallies", main="nothing"))
        tallies.append(other.tallies)
        unreadable.append(other.unreadable)

    if prior:  # documents already seen keep their shard: their generations are reused
        seen = p | "PriorFiles" >> beam.Create(prior) | "ReadPrior" >> beam.FlatMap(read_prior)
        docs = ({"doc": docs | "KeyDocById" >> beam.Map(lambda d: (d.id, d)).with_output_types(KV[str, Doc]),
                 "prior": seen}
                | "JoinPrior" >> beam.CoGroupByKey()
                | "WithPrior" >> beam.FlatMap(lambda kv: [d._replace(prior=next(iter(kv[1]["prior"]), None))
                                                          for d in kv[1]["doc"]]).with_output_types(Doc))
    parts = (docs
             | "AssignShards" >> AssignShards(cfg.num_shards)
             | "GroupByFile" >> beam.GroupByKey()
             | "WriteParts" >> beam.ParDo(WriteParts(cfg, tmp_dir, selected, stashed=stash is not None)))
    every_shard = p | "ShardNumbers" >> beam.Create([(k, None) for k in range(cfg.num_shards)], reshuffle=False)
    shards = ((parts, every_shard) | "AllShards" >> beam.Flatten()
              | "GroupByShard" >> beam.GroupByKey()
              | "MergeShard" >> beam.ParDo(MergeShard(layout, cfg.num_shards)))
    tallies.append(shards | "KeptTally" >> beam.Map(lambda s: tally(KEPT, s["rows"])))

    reject_files = (rejects | "AllRejects" >> beam.Flatten()
                    | "WriteRejects" >> WriteRejects(layout, cfg.reject_shards))
    totals = (tallies | "AllTallies" >> beam.Flatten()
              | "SumTallies" >> beam.CombinePerKey(sum)
              | "TallyDict" >> beam.combiners.ToDict())
    unreadable = unreadable | "AllUnreadable" >> beam.Flatten()
    return (p | "Finish" >> beam.Create([None])
            | "WriteStats" >> beam.Map(
                lambda _, t, s, r, u: write_stats(cfg, files, selected, t, s, r, u, fingerprint,
                                                     proof.file, cfg.balanced_by(proof.shape)),
                t=beam.pvalue.AsSingleton(totals), s=beam.pvalue.AsList(shards),
                r=beam.pvalue.AsList(reject_files), u=beam.pvalue.AsList(unreadable)))


def run(cfg: PrepareConfig, beam_args: list[str]) -> dict:
    """Runs the pass unless ROOT/candidates/stats.json records a complete output of the same config;
    returns the stats (with "reused": true when nothing was run).

    A complete output of another config is an error naming the keys that differ (--overwrite redoes
    it). Before a run, whatever is under ROOT/candidates (an output being overwritten, or the debris
    of a killed run: shards, rejects, _tmp/ parts) is removed, the completion marker first, so that a
    run killed at any point leaves an output that is visibly incomplete and a rerun starts clean.
    """
    from beam_pipelines.runtime import progress
    from beam_pipelines.runtime.options import pipeline_options

    layout = cfg.layout
    storage.clear_debris(layout.candidates, time.time())   # stats.json's temporary file of a write killed midway
    files = list_inputs(cfg.input)
    fingerprint = input_fingerprint(files)
    proof = prove(cfg.tokenizer)  # loaded and proved once, here; the workers get the proof
    tokenizer = proof.file
    stats = None if cfg.overwrite else prepare_stats(layout)   # a damaged marker is set aside: prepare runs again
    if stats is not None:
        differ = cfg.differences_from(stats.get("config") or {})
        if differ:
            raise UserError(f"{layout.candidates} holds a complete prepare output of another config ("
                            + "; ".join(differ) + "): pass --overwrite to redo it, or use another --root")
        if stats.get("inputs") == fingerprint and stats.get("tokenizer_file") == tokenizer:
            log.info("%s exists with the same config and inputs: prepare is complete, skipping", layout.prepare_stats)
            storage.delete_tree(layout.prepare_tmp_root)  # document texts left by a run killed after its marker
            check_kept(stats, cfg, files)
            return {**stats, "reused": True}
        log.warning("the input files or the tokenizer's file changed since %s was written: prepare runs again",
                    layout.prepare_stats)
    check_output(layout.candidates)
    options = pipeline_options(beam_args)
    prior = keep_prior(layout, cfg.num_shards)
    storage.delete(layout.prepare_stats)  # the marker first: from here the output is visibly incomplete
    for path in storage.list_files(layout.candidates):
        if not path.startswith(layout.prepare_prior + "/"):
            storage.delete(path)
    try:
        with progress.running("prepare", options) as p:
            build(p, cfg, files=files, fingerprint=fingerprint, prior=prior, proof=proof)
    except KeyboardInterrupt:  # the output stays visibly incomplete (no marker); its document texts go
        storage.delete_tree(layout.prepare_tmp_root)
        raise
    stats = json.loads(storage.read_text(layout.prepare_stats))
    check_kept(stats, cfg, files)
    return stats


def check_kept(stats: dict, cfg: PrepareConfig, files: list[str]) -> None:
    """A pass that kept no document is an error naming what took every record (and, when the split
    filter did, the split folders the input has), unless --allow-empty: an empty night is then chosen,
    not a typo in --splits that every later stage would carry on with."""
    if stats["kept"] or cfg.allow_empty:
        return
    why = ", ".join(f"{n:,} {reason}" for reason, n in sorted(stats["dropped"].items(), key=lambda kv: -kv[1]))
    message = f"prepare kept 0 of {stats['input_records']:,} input records ({why or 'the input has no record'})"
    if stats["dropped"].get("other_split"):
        found = Counter(path.rstrip("/").rsplit("/", 2)[-2] for path in files)
        message += (f"; --splits {','.join(cfg.splits)} matches none of the input's split folders ("
                    + ", ".join(f"{name}: {n} files" for name, n in sorted(found.items())) + ")")
    raise UserError(message + "; pass --allow-empty to accept an empty candidates set")
