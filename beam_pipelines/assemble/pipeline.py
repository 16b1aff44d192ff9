"""The assemble pass's wiring (`build`): one named composite per step, as the diagram reads.

    JoinShards ─┬─ web parts (tmp) ───────────────────────────────────────────────────────────┐
    (per shard: │  the recipe, curation, decontamination)                                     │
                └─ instruction keys ─ DeduplicateInstructions ─┬─ losers, near losers ────────┤
                                                      winners ─┴─ CapToMaxExamples ─ cutoff ──┤
    SeedData ─ seed parts (tmp) ──────────────────────────────────────────────────────────────┤
    winners within the cap (+ seed ids) ─ ValidationRule ─ rule ──────────────────────────────┤
                                  FinalizeShards ─ data/split={train,validation}/part-SSSSS-of-NNNNN
    every step's partial statistics ─ WriteSummary ─ summary (tmp)

Output shard k holds the web examples of candidates shard k (plus the seed examples hashed to k), so
shard sizes follow the token-balanced candidate shards. As in prepare, only keys travel through the
shuffle; examples go from JoinShard to FinalizeShard through per-shard Parquet parts. The steps get
the parts of the resolved job they use (config.AssembleJob: Rules, Split), never the options.
"""
from __future__ import annotations

import apache_beam as beam

from beam_pipelines.assemble import decontaminate
from beam_pipelines.assemble.config import AssembleJob
from beam_pipelines.assemble.dedup import DeduplicateInstructions
from beam_pipelines.assemble.finalize import CapToMaxExamples, FinalizeShards, ValidationRule, WriteSummary
from beam_pipelines.assemble.join import JoinShards, ShardInput
from beam_pipelines.assemble.seed import SeedData
from beam_pipelines.tokens.shape import TokenizerProof
from schemas.layout import RunLayout


def build(p: beam.Pipeline, job: AssembleJob, shards: list[ShardInput], num_shards: int, folder: str, tmp: str,
          eval_sets: list[decontaminate.EvalSet], proof: TokenizerProof):
    """Adds the pass to `p`: the release's data files into `folder`, its parts and summary into `tmp`.
    `proof`: the job's tokenizer as the driver proved it (tokens.load.prove), for the steps that count."""
    joined = p | "JoinShards" >> JoinShards(shards, job.rules, job.tokenizer, proof, tmp, eval_sets)
    winners, losers, near_losers = (joined.keys | "DeduplicateInstructions" >> DeduplicateInstructions(
        job.split.seed, job.rules.near_dup_threshold))
    cutoff, web_ids = winners | "CapToMaxExamples" >> CapToMaxExamples(job.split)
    seed = p | "SeedData" >> SeedData(job.seed_data, job.seed_tag, job.tokenizer, proof, tmp, num_shards)
    validation = (web_ids, seed.ids) | "ValidationRule" >> ValidationRule(job.split)
    finals = ({"web": joined.parts, "losers": losers, "near": near_losers, "seed": seed.parts}
              | "FinalizeShards" >> FinalizeShards(job.split, folder, num_shards, tmp, cutoff, validation))
    return (joined.partials, seed.partials, finals) | "WriteSummary" >> WriteSummary(RunLayout.summary(tmp))
