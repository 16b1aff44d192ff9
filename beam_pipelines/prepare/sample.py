"""The sample step (--target-docs): a deterministic bottom-k sample of the documents that survive the
length filter and dedup, measured in rounds so that the work follows the sample, not the corpus.
SampleToTarget is the sample's definition; SampleByKey computes the same result measuring only the
documents it needs (read.py measures them; dedup.py's rule makes the rounds decomposable)."""
from __future__ import annotations

import collections
import math
import zlib
from typing import Any

import apache_beam as beam
import numpy as np

import storage
from beam_pipelines.prepare import dolma
from beam_pipelines.prepare.config import PrepareConfig
from beam_pipelines.prepare.dedup import Deduplicate, id_rank
from beam_pipelines.prepare.read import READ_ERRORS, MeasureLines
from beam_pipelines.prepare.records import Doc, dropped, tally, tallied
from schemas.keys import sample_key


class SampleToTarget(beam.PTransform):
    """Keeps the `target` documents of smallest sample_key(id, seed): a bottom-k sample, exact in
    size, independent of order, and stable as the input grows (a kept document leaves only when a
    new one ranks below it). -> (kept documents, tallies): the others are counted as not_sampled,
    not listed as rejects."""

    def __init__(self, target: int, seed: int):
        super().__init__()
        self.target, self.seed = target, seed

    def expand(self, docs):
        seed, target = self.seed, self.target
        threshold = (docs
                     | "Rank" >> beam.Map(lambda d: (sample_key(d.id, seed), d.id))
                     | "BottomK" >> beam.combiners.Top.Smallest(target)
                     | "Threshold" >> beam.Map(lambda ranks: ranks[-1] if len(ranks) >= target else None))

        def split(d, limit):
            if limit is None or (sample_key(d.id, seed), d.id) <= tuple(limit):
                yield d
            else:
                yield tallied(dropped("not_sampled"))

        out = docs | "KeepSample" >> beam.FlatMap(split, limit=beam.pvalue.AsSingleton(threshold)).with_output_types(
            Doc).with_outputs("tallies", main="docs")
        return out.docs, out.tallies


KEY_SPACE = 1 << 64  # sample keys are xxh3_64 values: uniform in [0, KEY_SPACE)
ROUNDS = 3           # measuring rounds of SampleByKey (round 0 in the first read); the last one takes the rest
HEAD_BYTES = 1 << 20  # how much of one input file the driver reads to estimate the documents per byte


def key_limit(n_ranked: int, target: int, survival: float) -> int:
    """A sample-key limit under which enough documents fall for `target` to survive with margin, when a
    share `survival` of measured documents survives the length filter and dedup (KEY_SPACE: all)."""
    if survival < 0.02:
        return KEY_SPACE
    want = target / survival * 1.25 + 4 * math.sqrt(target) + 64
    return KEY_SPACE if want >= n_ranked else int(KEY_SPACE * want / n_ranked)


def next_window(n_ranked: int, window: tuple[int, int], survivors: int, measured: int, target: int,
                last: bool) -> tuple[int, int]:
    """The key window [lo, hi) of the next measuring round: empty when `survivors` (documents of key
    below window[1] that survive) already make the target or everything was measured; the rest of the
    key space in the last round; else widened by the survival rate seen so far (at least doubled)."""
    hi = window[1]
    if survivors >= target or hi >= KEY_SPACE:
        return hi, hi
    if last:
        return hi, KEY_SPACE
    return hi, max(key_limit(n_ranked, target, survivors / max(measured, 1)), min(2 * hi, KEY_SPACE))


def estimate_ranked(files: list[str], sizes: list[int], cfg: PrepareConfig) -> int:
    """About how many documents of `files` (of `sizes` bytes as stored) are selected: for the files of
    each compression (.gz, .zst, plain), the selected lines per stored byte of the head (HEAD_BYTES)
    of the first one with a complete line there, times their bytes. Read in the driver before the
    pipeline runs, for the round-0 key limit; it only needs to be reasonable (SampleByKey's rounds
    make the sample exact whatever it says)."""
    kinds: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for path, size in zip(files, sizes):
        kinds[storage.compression(path)].append((path, size))
    return sum(math.ceil(_per_byte([p for p, _ in group], cfg) * sum(n for _, n in group))
               for group in kinds.values())


def _per_byte(files: list[str], cfg: PrepareConfig) -> float:
    """Selected documents per stored byte in the head of the first of `files` that has a complete
    line there (0 when none has: round 0 then measures every document)."""
    where = [dolma.parse_where(w) for w in cfg.select_where]
    for path in files:
        try:
            stored, text = _head(path)
        except READ_ERRORS:  # an unreadable file is the pipeline's to report (or skip)
            continue
        whole = text[:text.rfind(b"\n") + 1]  # complete lines only
        if not whole:
            continue
        docs = (dolma.parse_line(raw, cfg.max_line_bytes) for raw in whole.splitlines())
        selected = sum(isinstance(d, dolma.Document) and dolma.selected(d.record, where) for d in docs)
        return max(selected, 1) / (stored * len(whole) / len(text))
    return 0.0


def _head(path: str) -> tuple[int, bytes]:
    """(stored bytes read, their decompressed bytes) of the start of a file, .gz and .zst decompressed
    (at most 16 MB of .gz text: a highly compressed head is not read whole)."""
    with storage.open_read(path) as f:
        head = f.read(HEAD_BYTES)
    kind = storage.compression(path)
    if kind == ".gz":
        d = zlib.decompressobj(wbits=47)
        text = d.decompress(head, 16 << 20)
        return len(head) - len(d.unconsumed_tail), _ended(text, d.eof and len(head) < HEAD_BYTES)
    if kind == ".zst":
        import zstandard

        text = zstandard.ZstdDecompressor().decompressobj().decompress(head)
        return len(head), _ended(text, len(head) < HEAD_BYTES)
    return len(head), _ended(head, len(head) < HEAD_BYTES)


def _ended(text: bytes, whole_file: bool) -> bytes:
    """A whole file's last line is complete even without its newline."""
    return text + b"\n" if whole_file and text and not text.endswith(b"\n") else text


def _in_window(keys, window: tuple[int, int]):
    """The mask of `keys` (uint64 array) in [lo, hi); the bounds may be KEY_SPACE, past uint64."""
    lo, hi = window
    if lo >= KEY_SPACE or lo >= hi:
        return np.zeros(len(keys), bool)
    mask = keys >= np.uint64(lo)
    return mask if hi >= KEY_SPACE else mask & (keys < np.uint64(hi))


class SampleByKey(beam.PTransform):
    """--target-docs with work that follows the sample: (round-0 measured documents, ranks) -> (kept
    documents, rejects, tallies), exactly the bottom-N sample of the full computation.

    Round 0 is fused into the first read (ReadAndMeasure with `limit0`): it measured (counted the
    tokens of, hashed) the documents of sample key below a limit estimated in the driver before the
    pipeline ran (estimate_ranked, key_limit: N x 1.25 + margin of the ranked documents); every other
    selected document is only in `ranks`, one element per file: (file, selected, keys, lines). Each
    next round widens the window [lo, hi) by the survival rate seen so far, only while fewer than N
    survive, picks each file's documents of key in it (vectorized) and re-reads only those files
    (MeasureLines); the last round takes the rest. The windows are contiguous from 0, so the
    documents of key below the final limit are exactly those the full computation would measure with
    such a key, and since a duplicate loses only to one of lower key (Deduplicate), the survivors
    among them are exactly the full computation's survivors of key below the limit: when at least N
    survive, the bottom N of them is the full computation's sample, whatever the estimate was (a low
    one costs rounds, a high one measures more in round 0). The others are counted as not_sampled,
    never measured nor listed. What is global: a count, a few limits, and the bottom-N ranks
    (SampleToTarget): memory follows N, not the corpus; a file's element holds 16 bytes per
    unmeasured document."""

    def __init__(self, cfg: PrepareConfig, files: list[str], limit0: int, stash_tmp: str | None = None,
                 proof=None):
        super().__init__()
        self.cfg, self.files, self.limit0, self.stash_tmp, self.proof = cfg, files, limit0, stash_tmp, proof

    def expand(self, inputs):
        measured0, ranks = inputs
        # the steps that wait on the windows (side inputs computed from the counts below and from the
        # read's other output) read the ranks in a stage of their own: without this boundary Beam 2.77's
        # local runner stops with "watermark-pending bundles did not execute"
        pending = ranks | "RanksToPick" >> beam.Reshuffle()
        cfg, target, limit0 = self.cfg, self.cfg.target_docs, self.limit0
        n_ranked = ranks | "CountRanked" >> beam.Map(lambda r: r[1]) | "SumRanked" >> beam.CombineGlobally(sum)
        # windows hold KEY_SPACE = 2^64, past the 64-bit integer coder Beam would infer: typed Any
        window = n_ranked | "Window0" >> beam.Map(lambda n: (0, limit0)).with_output_types(Any)
        # what each round learns, as elements of one combine (few stages per round: the local runner
        # spends ~0.1 s on every stage, however small): ("m", documents measured) and, per measured
        # document that passed the length filter, ("d", id, (text_hash, file, line))
        progress = [ranks | "CountMeasured0" >> beam.Map(lambda r: ("m", r[1] - len(r[2]))),
                    measured0 | "Progress0" >> beam.Map(_progress)]
        rounds, rejects, tallies = [measured0], [], []
        for j in range(ROUNDS):
            if j:
                so_far = (progress | f"UpTo{j}" >> beam.Flatten()
                          | f"Survivors{j}" >> beam.CombineGlobally(SurvivorsAndMeasured()))
                window = n_ranked | f"Window{j}" >> beam.Map(
                    lambda n, w, sm, last: next_window(n, tuple(w), sm[0], sm[1], target, last),
                    w=beam.pvalue.AsSingleton(window), sm=beam.pvalue.AsSingleton(so_far),
                    last=j == ROUNDS - 1).with_output_types(Any)
                wanted = pending | f"Want{j}" >> beam.FlatMap(_wanted, window=beam.pvalue.AsSingleton(window))
                measure = MeasureLines(cfg, self.files, self.stash_tmp, self.proof)
                out = wanted | f"Measure{j}" >> beam.ParDo(measure).with_output_types(Doc).with_outputs(
                    "rejects", "tallies", main="docs")
                progress += [wanted | f"CountWanted{j}" >> beam.Map(lambda e: ("m", len(e[1]))),
                             out.docs | f"Progress{j}" >> beam.Map(_progress)]
                rounds.append(out.docs)
                rejects.append(out.rejects)
                tallies.append(out.tallies)
            tallies.append(window | f"Round{j}" >> beam.Map(lambda w: tally("sample/rounds", int(w[0] < w[1]))))

        tallies.append(pending | "Unmeasured" >> beam.Map(
            lambda r, w: tally(dropped("not_sampled"), int(_in_window(r[2], (w[1], KEY_SPACE)).sum())),
            w=beam.pvalue.AsSingleton(window)))
        docs, dedup_rejects, dedup_tallies = rounds | "AllMeasured" >> beam.Flatten() | "Deduplicate" >> Deduplicate(
            cfg.seed, self.files)
        docs, sample_tallies = docs | "Sample" >> SampleToTarget(target, cfg.seed)
        rejects.append(dedup_rejects)
        tallies += [dedup_tallies, sample_tallies]
        return (docs, rejects | "SampleRejects" >> beam.Flatten(), tallies | "SampleTallies" >> beam.Flatten())


def _progress(doc: Doc) -> tuple:
    return "d", doc.id, id_rank(doc)


class SurvivorsAndMeasured(beam.CombineFn):
    """(survivors, measured) of the rounds so far: `measured` sums the ("m", n) elements; `survivors`
    counts what Deduplicate would keep of the ("d", id, id_rank) documents (per id the smallest
    id_rank, then one per text_hash), exactly, holding one entry per measured
    document: memory follows the sample, not the corpus."""

    def create_accumulator(self):
        return {}, 0

    def add_input(self, acc, element):
        best, measured = acc
        if element[0] == "m":
            return best, measured + element[1]
        _, doc_id, rank = element
        if doc_id not in best or tuple(rank) < tuple(best[doc_id]):
            best[doc_id] = rank
        return best, measured

    def merge_accumulators(self, accs):
        best, measured = {}, 0
        for other, m in accs:
            measured += m
            for doc_id, rank in other.items():
                if doc_id not in best or tuple(rank) < tuple(best[doc_id]):
                    best[doc_id] = rank
        return best, measured

    def extract_output(self, acc):
        best, measured = acc
        return len({rank[0] for rank in best.values()}), measured


def _wanted(rank, window):
    """A file's rank element -> (file, line numbers, sample keys) of its documents in `window`, if any."""
    path, _, keys, lines = rank
    mask = _in_window(keys, tuple(window))
    if mask.any():
        yield path, lines[mask], keys[mask]
