"""Instruction dedup, on keys only: one example per normalized instruction (the smallest id wins, as in
prepare's text dedup), then, with --near-dup-instruction-threshold, the winners whose instructions a
better-ranked near-duplicate dominates (MinHash bands grouped in Beam; the rule is
decontaminate.dominated). What crosses the shuffles is ids, keys and 3-gram hashes, never examples."""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from beam_pipelines.assemble import decontaminate
from schemas.keys import sample_key


class KeepSmallestId(beam.DoFn):
    """One example per normalized instruction: the smallest id wins (as in prepare's text dedup).
    Main output: (sample key, id) of winners; tagged "losers": (shard, id); with near-duplicate
    instructions on, tagged "bands": ((band, key), decontaminate.Member) of the winner, per band."""

    def __init__(self, seed: int):
        self.seed = seed

    def process(self, element):
        _, members = element
        members = sorted(members)     # ids are unique: the smallest id first
        winner = members[0]
        yield sample_key(winner[0], self.seed), winner[0]
        for loser in members[1:]:
            yield beam.pvalue.TaggedOutput("losers", (loser[1], loser[0]))
        if len(winner) > 2:
            doc_id, shard, score, bands, shingles = winner
            if shingles:   # an instruction without words has no near-duplicates
                member = decontaminate.Member(decontaminate.rank_of(doc_id, score), doc_id, shard, shingles)
                for band, key in enumerate(np.frombuffer(bands, np.uint64).tolist()):
                    yield beam.pvalue.TaggedOutput("bands", ((band, key), member))


def near_duplicates(element, threshold: float):
    """A band group's dominated instructions (decontaminate.dominated): (id, (shard, the dominating
    instruction's rank)); several groups may name one id, CombinePerKey(min) keeps the best rank."""
    _, members = element
    for loser, by in decontaminate.dominated(list(members), threshold):
        yield loser.id, (loser.shard, by.rank)


def not_near_duplicate(element):
    """(sample key, id) of an exact-dedup winner that no near-duplicate dominates."""
    doc_id, grouped = element
    if not list(grouped["near"]):
        for key in grouped["winner"]:
            yield key, doc_id


class DeduplicateInstructions(beam.PTransform):
    """JoinShard's (instruction key, member) -> (winners: (sample key, id), losers: (shard, id), near
    losers: (shard, (id, the dominating instruction's id))); `threshold` 0: no near-duplicate step."""

    def __init__(self, seed: int, threshold: float):
        super().__init__()
        self.seed, self.threshold = seed, threshold

    def expand(self, keys):
        dedup = (keys
                 | "GroupByInstruction" >> beam.GroupByKey()
                 | "KeepSmallestId" >> beam.ParDo(KeepSmallestId(self.seed)).with_outputs("losers", "bands",
                                                                                          main="winners"))
        if not self.threshold:
            return dedup.winners, dedup.losers, keys.pipeline | "NoNearDuplicates" >> beam.Create([])
        # band keys grouped in Beam: each group decides alone which of its members a better-ranked
        # near-duplicate dominates; an instruction dominated in any group is dropped
        near = (dedup.bands
                | "GroupByBand" >> beam.GroupByKey()
                | "NearDuplicates" >> beam.FlatMap(near_duplicates, self.threshold)
                | "OneVerdictPerId" >> beam.CombinePerKey(min))
        winners = ({"winner": dedup.winners | "WinnerById" >> beam.Map(lambda kv: (kv[1], kv[0])), "near": near}
                   | "JoinNearDuplicates" >> beam.CoGroupByKey()
                   | "NotNearDuplicates" >> beam.FlatMap(not_near_duplicate))
        near_losers = near | "NearByShard" >> beam.Map(lambda kv: (kv[1][0], (kv[0], kv[1][1][1])))
        return winners, dedup.losers, near_losers
