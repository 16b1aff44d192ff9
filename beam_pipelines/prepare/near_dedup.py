"""The near-dedup step (--near-dedup): of documents whose MinHash sketches (beam_pipelines/minhash.py,
computed in the read) say they are near-duplicates, one per cluster survives, by exact dedup's rule:
the smallest (sample_key(id, seed), id). The others become rejects naming their survivor.

    docs ─ KeyByNode ─┬─ BandKeys ─ GroupByBand ─ CandidatePairs (each bucket's star and path)
                      ├─ + the pairs: JoinSketches (by node) ─ GroupByPair ─ Verify (estimated Jaccard)
                      │     ─ Clusters: LargeStar ─ SmallStar (x rounds) ─ Labels ─ Settled (the check)
                      └─ + the labels: JoinLabels (by node) ─ survivors (main), rejects, tallies

Nodes are ranks, (sample_key(id, seed) - 2^63, id): the shift keeps the order and fits Beam's 64-bit
integer coder; ids are unique here (Deduplicate ran first). Clusters are the connected components of
the verified edges, by large-star/small-star (Kiveris et al., "Connected Components in MapReduce and
Beyond", SoCC 2014): each round groups edges by node, so only edges travel and a worker holds one
node's neighbours; a round keeps the components and the rounds end in one star per component around
its smallest node. The last check proves that: every edge then joins two nodes of the same label
(the smallest of a node and its neighbours), so labels are constant on components and equal to their
smallest node; if an edge does not, the run fails saying to raise --near-dedup-rounds.

Memory per worker: one band bucket's members (ranks), one node's neighbours (after the rounds, a
cluster's members at its smallest node), one candidate pair's two sketches; never every document's.
"""
from __future__ import annotations

from typing import Tuple

import apache_beam as beam
from apache_beam.typehints import KV

from beam_pipelines.minhash import band_keys, bucket_edges, similar
from beam_pipelines.prepare.config import PrepareConfig
from beam_pipelines.prepare.records import Doc, dropped, reject, tallied
from schemas.errors import UserError
from schemas.keys import sample_key

REASON = "near_duplicate"
_SHIFT = 1 << 63
NodeDoc = KV[Tuple[int, str], Doc]


def node_of(doc_id: str, seed: int) -> tuple[int, str]:
    """A document's rank as a node: its order is the survivor rule's, (sample_key(id, seed), id)."""
    return sample_key(doc_id, seed) - _SHIFT, doc_id


def _both_ways(edge):
    u, v = edge
    yield u, v
    yield v, u


def large_star(element):
    """Every neighbour larger than u joined to the smallest of u and its neighbours."""
    u, neighbours = element
    neighbours = set(neighbours)
    m = min(neighbours | {u})
    for v in neighbours:
        if v > u:
            yield m, v


def small_star(element):
    """u and its smaller neighbours joined to the smallest of them."""
    u, neighbours = element
    smaller = {v for v in neighbours if v < u}
    if smaller:
        m = min(smaller)
        for v in smaller | {u}:
            if v != m:
                yield m, v


def _label(element):
    """A node's label (the smallest of it and its neighbours), to itself and to every neighbour."""
    u, neighbours = element
    neighbours = set(neighbours)
    m = min(neighbours | {u})
    yield u, m
    for v in neighbours:
        yield v, m


class ConnectedComponents(beam.PTransform):
    """Undirected edges (u, v) -> (labels: (node, smallest node of its component) for every node that
    is not the smallest, tallies: one "near_dedup/clusters" per component), by `rounds` rounds of
    large-star then small-star and the check that they settled (the module's docstring)."""

    def __init__(self, rounds: int):
        super().__init__()
        self.rounds = rounds

    def expand(self, edges):
        rounds = self.rounds
        for r in range(rounds):
            edges = (edges | f"LargeStarEdges{r}" >> beam.FlatMap(_both_ways)
                     | f"LargeStarGroup{r}" >> beam.GroupByKey() | f"LargeStar{r}" >> beam.FlatMap(large_star)
                     | f"SmallStarEdges{r}" >> beam.FlatMap(_both_ways)
                     | f"SmallStarGroup{r}" >> beam.GroupByKey() | f"SmallStar{r}" >> beam.FlatMap(small_star))

        def settled(element):
            node, labels = element
            labels = set(labels)
            if len(labels) > 1:
                raise UserError(f"near-duplicate clusters did not settle in {rounds} rounds: pass a larger "
                                "--near-dedup-rounds")
            label = labels.pop()
            if label == node:
                yield tallied("near_dedup/clusters")
            else:
                yield node, label

        return (edges | "LabelEdges" >> beam.FlatMap(_both_ways)
                | "GroupByNode" >> beam.GroupByKey() | "Labels" >> beam.FlatMap(_label)
                | "GroupLabels" >> beam.GroupByKey()
                | "Settled" >> beam.FlatMap(settled).with_outputs("tallies", main="labels"))


class NearDeduplicate(beam.PTransform):
    """Docs (with their sketches) -> (survivors without sketches, rejects, tallies)."""

    def __init__(self, cfg: PrepareConfig, files: list[str]):
        super().__init__()
        self.params, self.seed, self.rounds, self.files = cfg.minhash_params(), cfg.seed, cfg.near_dedup_rounds, files

    def expand(self, docs):
        params, seed, files = self.params, self.seed, self.files
        keyed = docs | "KeyByNode" >> beam.Map(lambda d: (node_of(d.id, seed), d)).with_output_types(NodeDoc)

        def candidates(element):
            _, members = element
            members = sorted(members)
            if len(members) > 1:
                for u, v in bucket_edges(members):
                    yield u, (u, v)
                    yield v, (u, v)

        ends = (keyed
                | "BandKeys" >> beam.FlatMap(lambda kv: ((key, kv[0]) for key in band_keys(kv[1].minhash, params)))
                | "GroupByBand" >> beam.GroupByKey()
                | "CandidatePairs" >> beam.FlatMap(candidates))
        sketches = keyed | "Sketches" >> beam.Map(lambda kv: (kv[0], kv[1].minhash))

        def with_sketch(element):
            _, group = element
            for sk in group["sketch"]:  # one: ids are unique
                for pair in set(group["pair"]):  # a pair met in several bands is checked once
                    yield pair, sk

        def verify(element):
            pair, (a, b) = element[0], list(element[1])
            yield tallied("near_dedup/candidate_pairs")
            if similar(a, b, params):
                yield tallied("near_dedup/similar_pairs")
                yield pair

        checked = ({"sketch": sketches, "pair": ends} | "JoinSketches" >> beam.CoGroupByKey()
                   | "PairSketches" >> beam.FlatMap(with_sketch)
                   | "GroupByPair" >> beam.GroupByKey()
                   | "Verify" >> beam.FlatMap(verify).with_outputs("tallies", main="edges"))
        labels = checked.edges | "Clusters" >> ConnectedComponents(self.rounds)

        def apply(element):
            _, group = element
            label = group["label"][0] if group["label"] else None
            for d in group["doc"]:
                if label is None:
                    yield d
                else:
                    yield reject(files[d.file], d.line, REASON, f"near duplicate of {label[1]}", d.id)
                    yield tallied(dropped(REASON))

        light = keyed | "DropSketches" >> beam.Map(lambda kv: (kv[0], kv[1]._replace(minhash=None))).with_output_types(
            NodeDoc)
        out = ({"doc": light, "label": labels.labels} | "JoinLabels" >> beam.CoGroupByKey()
               | "ApplyLabels" >> beam.FlatMap(apply).with_output_types(Doc).with_outputs(
                   "rejects", "tallies", main="docs"))
        zero = docs.pipeline | "NearDedupCounters" >> beam.Create(
            [(n, 0) for n in ("near_dedup/candidate_pairs", "near_dedup/similar_pairs", "near_dedup/clusters",
                                   dropped(REASON))])
        tallies = (checked.tallies, labels.tallies, out.tallies, zero) | "NearDedupTallies" >> beam.Flatten()
        return out.docs, out.rejects, tallies
