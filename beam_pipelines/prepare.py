"""Beam pass 1: Dolma head split -> exact length filter -> dedup -> token-balanced candidate shards.

    ListInputs ─┬─ other splits ─ CountLines ─────────────────────────────────────────────┐ tallies
                └─ head split ── ReadAndMeasure ─ Deduplicate ─────────────────────────┐  │
            or, with --target-docs: ReadAndMeasure(keys < limit0) ─┬─ SampleByKey ┤  │
                                                    └─ ranks ─┘              │  │
                                      └── rejects ─────────────────────────────────────│──┼─ WriteRejects
                         AssignShards (count -> hash buckets -> balance per bucket) <──┘  │
                         ─ GroupByKey(file) ─ WriteParts ─ GroupByKey(shard) ─ MergeShard ─ WriteStats

Only keys travel through shuffles: a document's text is read from its input file twice (once to
measure and hash it, once to write it into its shard) and never grouped, so the shuffle volume is
~100 bytes per document whatever its length. With --target-docs, only the documents measured for the
sample travel one by one; the others are 16 bytes each in one element per input file, and the
measured documents' fields are stashed in _tmp/ when measured, so that the input is read once. Each shard is
assembled from per-file parts by one worker, sorted by (n_tokens, id) and written whole-or-nothing;
stats.json is written last and marks the output complete.
"""
from __future__ import annotations

import array
import collections
import json
import logging
import math
import os
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

import schemas
from schemas.options import option, required
from beam_pipelines import dolma
import storage
from beam_pipelines.length import length_verdict, load_tokenizer, shared_counter, tokenizer_fingerprint
from beam_pipelines.options import configure_process
from beam_pipelines.shards import assign_bucket, balance, num_buckets
from schemas.errors import UserError
from schemas.keys import balance_bucket, sample_key, text_hash
from schemas.layout import RunLayout, parse_shard_name

log = logging.getLogger("bft.prepare")

# A kept document between stages: (id, text_hash, n_tokens, n_chars, file, line); `file` is the input
# file's index in the sorted list of head-split files (an int shuffles in ~2 bytes, a path in ~100)
ID, HASH, NTOK, NCHARS, FILE, LINE = range(6)
PRIOR = 6  # appended when the output being replaced is known: the document's shard there (or None)

INPUT = "input_records"
KEPT = "kept"
PART_CHARS = 32 << 20  # document text a worker holds before it writes it to _tmp/ (~100 MB)
_STASH = pa.schema([("line", pa.int64()), ("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                    ("url", pa.string())])  # a --target-docs sample's measured documents (_Measurer)


class UnreadableFileError(UserError):
    """An input file is truncated or corrupt."""


@dataclass
class PrepareConfig:
    """The options of `bft prepare` (flags and the `prepare:` section of a run file)."""

    input: list[str] = required("glob of Dolma JSON-lines files, local or gs:// (repeatable)")
    root: str = required("run root (local or gs://); writes ROOT/candidates/")
    tokenizer: str = required("tokenizer.json, a folder with one, a gs:// path or a hub id")
    max_tokens: int = option(3520, "keep documents of at most this many tokens (3520 = Llama-2's 4096 context minus "
                           "backtranslation's 512 new tokens and 64 for its prompt: every document is backtranslated "
                           "whole; see docs/ARCHITECTURE.md)")
    min_tokens: int = option(0, "drop documents of fewer tokens")
    splits: list[str] = option(["cc_en_head"], "split folders to select; '' selects every file", comma=True)
    select_where: list[str] = option([], "also require a record field (dotted, e.g. metadata.bucket) to have one "
                                     "of the values, as FIELD=V1,V2 (repeatable)")
    num_shards: int = option(16, "candidate shards (balanced by tokens)")
    target_docs: int | None = option(None, "deterministic bottom-k sample of this many documents")
    seed: int = option(0, "seed of the sample")
    max_line_bytes: int = option(1 << 20, "longer lines are rejected as too_large")
    skip_unreadable_files: bool = option(False, "count a truncated/corrupt input file and go on instead of failing")
    reject_shards: int = option(4, "files of rejects")
    batch_docs: int = option(256, "documents measured per tokenizer call")
    overwrite: bool = option(False, "redo a complete output (with another config too)", run_only=True)

    def check(self) -> None:
        if self.num_shards < 1 or self.reject_shards < 1 or self.batch_docs < 1:
            raise UserError("--num-shards, --reject-shards and --batch-docs must be >= 1")
        if self.min_tokens > self.max_tokens:
            raise UserError(f"--min-tokens {self.min_tokens} is larger than --max-tokens {self.max_tokens}")
        if self.target_docs is not None and self.target_docs < 1:
            raise UserError("--target-docs must be >= 1")
        if not self.input:
            raise UserError("--input: give at least one glob of Dolma files")
        self.root = RunLayout(self.root).root
        # recorded paths must name the same files from any directory (assemble reads them back)
        self.input = [p if storage.is_gcs(p) else os.path.abspath(os.path.expanduser(p)) for p in self.input]
        if not storage.is_gcs(self.tokenizer) and os.path.exists(self.tokenizer):
            self.tokenizer = os.path.abspath(self.tokenizer)

    def identity(self) -> dict:
        """What determines the output: every option but the run-only ones and the root (a run root
        copied or moved elsewhere holds the same output)."""
        return {k: v for k, v in asdict(self).items()
                if k != "root" and not PrepareConfig.__dataclass_fields__[k].metadata.get("run_only")}


def _tally(name: str, n: int = 1) -> tuple[str, int]:
    Metrics.counter("bft.prepare", name).inc(n)
    return name, n


def _dropped(reason: str) -> str:
    return f"dropped/{reason}"


def _reject_row(file: str, line: int, reason: str, detail: str, doc_id=None, raw=None) -> dict:
    return {"file": file, "line": line, "id": doc_id, "reason": reason, "detail": detail, "raw": raw}


def list_inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        if not storage.is_gcs(pattern):
            pattern = os.path.abspath(os.path.expanduser(pattern))
        matched = storage.glob(pattern)
        if not matched:
            raise UserError(f"--input {pattern!r} matches no file")
        files.extend(matched)
    return sorted(set(files))


_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


class CountLines(beam.DoFn):
    """Files of other splits: their documents are counted, not parsed."""

    def __init__(self, skip_unreadable: bool):
        self.skip_unreadable = skip_unreadable

    def process(self, path: str):
        n = 0
        try:
            for _ in storage.open_lines(path):
                n += 1
        except _READ_ERRORS as e:
            yield from _unreadable(path, n, e, self.skip_unreadable)
        yield beam.pvalue.TaggedOutput("tallies", _tally(INPUT, n))
        yield beam.pvalue.TaggedOutput("tallies", _tally(_dropped("other_split"), n))


def _unreadable(path: str, lines_read: int, error: Exception, skip: bool):
    if not skip:
        raise UnreadableFileError(
            f"{path}: unreadable after {lines_read} lines ({type(error).__name__}: {error}); "
            "fix or remove the file, or pass --skip-unreadable-files to count it and go on") from error
    log.warning("%s: unreadable after %d lines (%s); skipped the rest", path, lines_read, error)
    yield beam.pvalue.TaggedOutput("tallies", _tally("unreadable_files", 1))
    yield beam.pvalue.TaggedOutput("unreadable", {"file": path, "lines_read": lines_read, "error": str(error)})


class _Measurer(beam.DoFn):
    """Counts tokens of batches of parsed documents: kept-document keys (main), rejects, tallies.

    With `stash_tmp` (the --target-docs path, where the measured documents are a small share of each
    file) the fields of every document that passes the length filter are also written under
    `stash_tmp` (RunLayout.prepare_stash, by input file, at most PART_CHARS of text per write), so that
    WriteParts reads them there instead of decompressing and parsing the whole input file again."""

    def __init__(self, cfg: PrepareConfig, files: list[str], stash_tmp: str | None = None):
        self.cfg, self.files, self.stash_tmp = cfg, files, stash_tmp

    def setup(self):
        configure_process()
        self.counter = shared_counter(self.cfg.tokenizer)  # loaded and proved once per worker thread
        self._file_index = {f: i for i, f in enumerate(self.files)}
        self._stash: list[dict] = []
        self._stashed_chars = 0

    def _keep(self, path: str, line_no: int, doc) -> None:
        if self.stash_tmp is None:
            return
        self._stash.append({"line": line_no, "id": doc.id, "text": doc.text, "source": doc.source, "url": doc.url})
        self._stashed_chars += len(doc.text)
        if self._stashed_chars > PART_CHARS:
            self._write_stash(path)

    def _write_stash(self, path: str) -> None:
        """Writes the stashed documents of input file `path` (called at the end of each file)."""
        if self._stash:
            target = storage.join(RunLayout(self.cfg.root).prepare_stash(self.stash_tmp, path),
                                  f"{uuid.uuid4().hex}.parquet")
            storage.write_parquet(pa.Table.from_pylist(self._stash, schema=_STASH), target, "lz4")
        self._stash, self._stashed_chars = [], 0

    def _measure(self, path, batch, tallies):
        if not batch:
            return
        cfg, counter, file_index = self.cfg, self.counter, self._file_index[path]
        todo, bounds = [], {}
        for line_no, doc in batch:
            lb = counter.bound_exceeds(doc.text, cfg.max_tokens)
            if lb:
                bounds[line_no] = lb
            else:
                todo.append((line_no, doc))
        pieces, full = counter.counted_pieces, counter.counted_full
        counts = dict(zip((ln for ln, _ in todo), counter.count([d.text for _, d in todo])))
        # the counter is shared by the steps of this thread (length.shared_counter): its totals are
        # read around this one call, which no other step interleaves with
        tallies["length/counted_pieces"] += counter.counted_pieces - pieces
        tallies["length/counted_full"] += counter.counted_full - full
        tallies["length/measured"] += len(batch)
        tallies["length/rejected_by_bound"] += len(bounds)
        for line_no, doc in batch:
            if line_no in bounds:
                verdict, detail = "too_long", f">= {bounds[line_no]} tokens (bytes bound) > {cfg.max_tokens}"
            else:
                n = counts[line_no]
                verdict = length_verdict(n, cfg.min_tokens, cfg.max_tokens)
                detail = f"{n} tokens, allowed {cfg.min_tokens}..{cfg.max_tokens}"
            if verdict:
                tallies[_dropped(verdict)] += 1
                yield beam.pvalue.TaggedOutput("rejects", _reject_row(path, line_no, verdict, detail, doc.id))
            else:
                self._keep(path, line_no, doc)
                yield (doc.id, text_hash(doc.text), counts[line_no], len(doc.text), file_index, line_no)

    def _counted(self, path, tallies):
        self._write_stash(path)
        tallies.setdefault("length/counted_pieces", 0)
        tallies.setdefault("length/counted_full", 0)
        for name, n in sorted(tallies.items()):
            yield beam.pvalue.TaggedOutput("tallies", _tally(name, n))


class ReadAndMeasure(_Measurer):
    """A head-split file -> kept-document keys (main), rejects, and tallies.

    Parses every line, routes bad ones to rejects, applies the metadata predicate, hashes the
    normalized text and counts its tokens exactly; the text itself does not leave this step.
    With `key_limit` (the --target-docs path: round 0 of SampleByKey, fused into this read) only the
    selected documents of sample key below it are measured; the others are not yielded one by one
    but as ONE element per file on the "ranks" output: (file, selected documents, their unmeasured
    sample keys, their line numbers), numpy arrays in line order, for the later rounds to pick from.
    """

    def __init__(self, cfg: PrepareConfig, files: list[str], key_limit: int | None = None,
                 stash_tmp: str | None = None):
        super().__init__(cfg, files, stash_tmp)
        self.key_limit = key_limit
        self.where = [dolma.parse_where(w) for w in cfg.select_where]

    def process(self, path: str):
        tallies: collections.Counter = collections.Counter()
        batch: list[tuple[int, dolma.Document]] = []
        line_no = selected = 0
        limit, seed = self.key_limit, self.cfg.seed
        keys, lines = array.array("Q"), array.array("Q")  # the unmeasured documents: 16 bytes each
        try:
            for line_no, raw in enumerate(storage.open_lines(path), start=1):
                tallies[INPUT] += 1
                item = dolma.parse_line(raw, self.cfg.max_line_bytes)
                if isinstance(item, dolma.Reject):
                    tallies[_dropped(item.reason)] += 1
                    yield beam.pvalue.TaggedOutput("rejects", _reject_row(
                        path, line_no, item.reason, item.detail, item.id, item.raw))
                    continue
                if not dolma.selected(item.record, self.where):
                    tallies[_dropped("not_selected")] += 1
                    continue
                if limit is not None:
                    selected += 1
                    key = sample_key(item.id, seed)
                    if key >= limit:
                        keys.append(key)
                        lines.append(line_no)
                        continue
                batch.append((line_no, item))
                if len(batch) >= self.cfg.batch_docs:
                    yield from self._measure(path, batch, tallies)
                    batch = []
        except _READ_ERRORS as e:
            yield from _unreadable(path, line_no, e, self.cfg.skip_unreadable_files)
        yield from self._measure(path, batch, tallies)
        yield from self._counted(path, tallies)
        if limit is not None:
            yield beam.pvalue.TaggedOutput("ranks", (path, selected, _array(keys), _array(lines)))


def _array(values: array.array):
    import numpy as np

    return np.frombuffer(values, dtype=np.uint64) if len(values) else np.zeros(0, np.uint64)


def reread(path: str, wanted: dict[int, Any], max_line_bytes: int, stashed=None):
    """(line, document, wanted[line]) for each line of input file `path` in `wanted` (which it empties),
    in line order: parsed from the file, or taken from `stashed` ((line, Document) in line order); it
    stops reading once every wanted line is found. RuntimeError when one no longer holds a document
    or is missing: the file changed while the job ran."""
    lines = stashed if stashed is not None else enumerate(storage.open_lines(path), start=1)
    for line_no, item in lines:
        w = wanted.pop(line_no, None)
        if w is None:
            continue
        doc = item if stashed is not None else dolma.parse_line(item, max_line_bytes)
        if isinstance(doc, dolma.Reject):
            raise RuntimeError(f"{path}:{line_no}: changed while the job ran (no document there any more)")
        yield line_no, doc, w
        if not wanted:
            return
    if wanted:
        raise RuntimeError(f"{path}: {len(wanted)} wanted documents missing on the second read")


class MeasureLines(_Measurer):
    """(file, line numbers, their sample keys) -> the same outputs as ReadAndMeasure for those lines
    only: the file is read again and only the wanted lines are parsed and measured."""

    def process(self, element):
        path, lines, keys = element
        tallies: collections.Counter = collections.Counter()
        batch: list[tuple[int, dolma.Document]] = []
        for line_no, doc, key in reread(path, dict(zip(lines.tolist(), keys.tolist())), self.cfg.max_line_bytes):
            if sample_key(doc.id, self.cfg.seed) != key:
                raise RuntimeError(f"{path}:{line_no}: changed while the job ran (another document than "
                                   "on the first read)")
            batch.append((line_no, doc))
            if len(batch) >= self.cfg.batch_docs:
                yield from self._measure(path, batch, tallies)
                batch = []
        yield from self._measure(path, batch, tallies)
        yield from self._counted(path, tallies)


def id_rank(doc: tuple) -> tuple:
    """Of documents sharing an id, the one of smallest id_rank is kept (Deduplicate, and the sample's
    stopping rule in SurvivorsAndMeasured)."""
    return doc[HASH], doc[FILE], doc[LINE]


def keep_first(docs: Iterable[tuple], order, reason: str, detail, files: list[str]):
    """Of documents sharing a key, the first by `order` is kept; the others become rejects."""
    docs = sorted(docs, key=order)
    yield docs[0]
    for d in docs[1:]:
        yield beam.pvalue.TaggedOutput("rejects", _reject_row(files[d[FILE]], d[LINE], reason, detail(docs[0]),
                                                              d[ID]))
        yield beam.pvalue.TaggedOutput("tallies", _tally(_dropped(reason)))


class Deduplicate(beam.PTransform):
    """Ids must be unique (the smallest text_hash wins), then texts (the document that ranks first in
    the sample wins: smallest (sample_key(id, seed), id)). Ranking duplicates by the sample key makes
    the --target-docs sample decomposable: a document measured for the sample can only lose to a
    duplicate of lower key, which is measured too (see SampleByKey)."""

    def __init__(self, seed: int, files: list[str]):
        super().__init__()
        self.seed, self.files = seed, files

    def expand(self, docs):
        seed, files = self.seed, self.files
        by_id = (docs
                 | "KeyById" >> beam.Map(lambda d: (d[ID], d))
                 | "GroupById" >> beam.GroupByKey()
                 | "UniqueIds" >> beam.FlatMap(
                     lambda kv: keep_first(kv[1], id_rank, "duplicate_id",
                                           lambda w: f"id also at {files[w[FILE]]}:{w[LINE]}", files))
                 .with_outputs("rejects", "tallies", main="docs"))
        by_text = (by_id.docs
                   | "KeyByHash" >> beam.Map(lambda d: (d[HASH], d))
                   | "GroupByHash" >> beam.GroupByKey()
                   | "UniqueTexts" >> beam.FlatMap(
                       lambda kv: keep_first(kv[1], lambda d: (sample_key(d[ID], seed), d[ID], d[FILE], d[LINE]),
                                             "duplicate", lambda w: f"same normalized text as {w[ID]}", files))
                   .with_outputs("rejects", "tallies", main="docs"))
        rejects = (by_id.rejects, by_text.rejects) | "DedupRejects" >> beam.Flatten()
        tallies = (by_id.tallies, by_text.tallies) | "DedupTallies" >> beam.Flatten()
        return by_text.docs, rejects, tallies


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
                     | "Rank" >> beam.Map(lambda d: (sample_key(d[ID], seed), d[ID]))
                     | "BottomK" >> beam.combiners.Top.Smallest(target)
                     | "Threshold" >> beam.Map(lambda ranks: ranks[-1] if len(ranks) >= target else None))

        def split(d, limit):
            if limit is None or (sample_key(d[ID], seed), d[ID]) <= tuple(limit):
                yield d
            else:
                yield beam.pvalue.TaggedOutput("tallies", _tally(_dropped("not_sampled")))

        out = docs | "KeepSample" >> beam.FlatMap(split, limit=beam.pvalue.AsSingleton(threshold)).with_outputs(
            "tallies", main="docs")
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
        kinds[_compression(path)].append((path, size))
    return sum(math.ceil(_per_byte([p for p, _ in group], cfg) * sum(n for _, n in group))
               for group in kinds.values())


def _per_byte(files: list[str], cfg: PrepareConfig) -> float:
    """Selected documents per stored byte in the head of the first of `files` that has a complete
    line there (0 when none has: round 0 then measures every document)."""
    where = [dolma.parse_where(w) for w in cfg.select_where]
    for path in files:
        try:
            stored, text = _head(path)
        except _READ_ERRORS:  # an unreadable file is the pipeline's to report (or skip)
            continue
        whole = text[:text.rfind(b"\n") + 1]  # complete lines only
        if not whole:
            continue
        docs = (dolma.parse_line(raw, cfg.max_line_bytes) for raw in whole.splitlines())
        selected = sum(isinstance(d, dolma.Document) and dolma.selected(d.record, where) for d in docs)
        return max(selected, 1) / (stored * len(whole) / len(text))
    return 0.0


def _compression(path: str) -> str:
    return ".gz" if path.endswith(".gz") else ".zst" if path.endswith((".zst", ".zstd")) else ""


def _head(path: str) -> tuple[int, bytes]:
    """(stored bytes read, their decompressed bytes) of the start of a file, .gz and .zst decompressed
    (at most 16 MB of .gz text: a highly compressed head is not read whole)."""
    with storage.open_read(path) as f:
        head = f.read(HEAD_BYTES)
    if _compression(path) == ".gz":
        d = zlib.decompressobj(wbits=47)
        text = d.decompress(head, 16 << 20)
        return len(head) - len(d.unconsumed_tail), _ended(text, d.eof and len(head) < HEAD_BYTES)
    if _compression(path) == ".zst":
        import zstandard

        text = zstandard.ZstdDecompressor().decompressobj().decompress(head)
        return len(head), _ended(text, len(head) < HEAD_BYTES)
    return len(head), _ended(head, len(head) < HEAD_BYTES)


def _ended(text: bytes, whole_file: bool) -> bytes:
    """A whole file's last line is complete even without its newline."""
    return text + b"\n" if whole_file and text and not text.endswith(b"\n") else text


def _in_window(keys, window: tuple[int, int]):
    """The mask of `keys` (uint64 array) in [lo, hi); the bounds may be KEY_SPACE, past uint64."""
    import numpy as np

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

    def __init__(self, cfg: PrepareConfig, files: list[str], limit0: int, stash_tmp: str | None = None):
        super().__init__()
        self.cfg, self.files, self.limit0, self.stash_tmp = cfg, files, limit0, stash_tmp

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
                measure = MeasureLines(cfg, self.files, self.stash_tmp)
                out = wanted | f"Measure{j}" >> beam.ParDo(measure).with_outputs(
                    "rejects", "tallies", main="docs")
                progress += [wanted | f"CountWanted{j}" >> beam.Map(lambda e: ("m", len(e[1]))),
                             out.docs | f"Progress{j}" >> beam.Map(_progress)]
                rounds.append(out.docs)
                rejects.append(out.rejects)
                tallies.append(out.tallies)
            tallies.append(window | f"Round{j}" >> beam.Map(lambda w: _tally("sample/rounds", int(w[0] < w[1]))))

        tallies.append(pending | "Unmeasured" >> beam.Map(
            lambda r, w: _tally(_dropped("not_sampled"), int(_in_window(r[2], (w[1], KEY_SPACE)).sum())),
            w=beam.pvalue.AsSingleton(window)))
        docs, dedup_rejects, dedup_tallies = rounds | "AllMeasured" >> beam.Flatten() | "Deduplicate" >> Deduplicate(
            cfg.seed, self.files)
        docs, sample_tallies = docs | "Sample" >> SampleToTarget(target, cfg.seed)
        rejects.append(dedup_rejects)
        tallies += [dedup_tallies, sample_tallies]
        return (docs, rejects | "SampleRejects" >> beam.Flatten(), tallies | "SampleTallies" >> beam.Flatten())


def _progress(doc: tuple) -> tuple:
    return "d", doc[ID], id_rank(doc)


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


class AssignShards(beam.PTransform):
    """Kept documents -> (file, (line, id, shard, n_tokens, text_hash)), balanced bucket by bucket
    (beam_pipelines/shards.py): what is global is the count of kept documents."""

    def __init__(self, num_shards: int):
        super().__init__()
        self.num_shards = num_shards

    def expand(self, docs):
        n = docs | "CountKept" >> beam.combiners.Count.Globally()
        return (docs
                | "KeyByBucket" >> beam.Map(lambda d, n: (balance_bucket(d[ID], num_buckets(n)), d),
                                            n=beam.pvalue.AsSingleton(n))
                | "GroupByBucket" >> beam.GroupByKey()
                | "BalanceBucket" >> beam.FlatMap(_route_bucket, self.num_shards))


def _route_bucket(element, num_shards: int):
    bucket, docs = element
    docs = list(docs)
    prior = {d[ID]: d[PRIOR] for d in docs if len(d) > PRIOR and d[PRIOR] is not None}
    shard_of = assign_bucket(((d[ID], d[NTOK]) for d in docs), num_shards, bucket, prior)
    for d in docs:
        yield d[FILE], (d[LINE], d[ID], shard_of[d[ID]], d[NTOK], d[HASH])


class WriteParts(beam.DoFn):
    """Re-reads one input file and writes its kept documents into part files by shard: one per shard,
    or more when the file's kept text passes PART_CHARS (memory stays bounded whatever the file's
    size)."""

    def __init__(self, cfg: PrepareConfig, tmp_dir: str, files: list[str], stashed: bool = False):
        self.cfg, self.tmp_dir, self.files, self.stashed = cfg, tmp_dir, files, stashed
        self.layout = RunLayout(cfg.root)

    def setup(self):
        configure_process()

    def _stashed(self, path: str):
        """(line, document) of the input file's stash (`_Measurer`), in line order."""
        for stash in sorted(storage.list_files(self.layout.prepare_stash(self.tmp_dir, path))):
            for row in storage.read_parquet(stash).to_pylist():
                yield row["line"], dolma.Document(id=row["id"], text=row["text"], source=row["source"],
                                                  url=row["url"], record={})

    def process(self, element):
        index, wanted = element
        path = self.files[index]
        by_line = {w[0]: w for w in wanted}
        del wanted
        rows: dict[int, list[dict]] = collections.defaultdict(list)
        held = 0
        tag = f"{zlib.crc32(path.encode()):08x}-{uuid.uuid4().hex[:8]}"
        stashed = self._stashed(path) if self.stashed else None
        for line_no, doc, (_, doc_id, shard, n_tokens, h) in reread(path, by_line, self.cfg.max_line_bytes, stashed):
            if doc.id != doc_id:
                raise RuntimeError(f"{path}:{line_no}: changed while the job ran (expected document {doc_id})")
            rows[shard].append({"id": doc.id, "text": doc.text, "source": doc.source, "url": doc.url,
                                "n_chars": len(doc.text), "n_tokens": n_tokens, "shard": shard, "text_hash": h})
            held += len(doc.text)
            if held > PART_CHARS:
                yield from self._write(rows, f"{tag}-{line_no}")
                held = 0
        yield from self._write(rows, tag)

    def _write(self, rows: dict[int, list[dict]], tag: str):
        for shard in sorted(rows):
            part = self.layout.prepare_part(self.tmp_dir, shard, tag)
            # a part lives until its shard is merged: lz4 writes and reads ~3x faster than zstd
            storage.write_parquet(schemas.to_table(rows.pop(shard), schemas.CANDIDATE, part), part, "lz4")
            yield shard, part


class MergeShard(beam.DoFn):
    """A shard's parts -> candidates-SSSSS-of-NNNNN.parquet, rows sorted by (n_tokens, id)."""

    def __init__(self, layout: RunLayout, num_shards: int):
        self.layout, self.num_shards = layout, num_shards

    def setup(self):
        configure_process()

    def process(self, element):
        import pyarrow as pa

        shard, parts = element
        parts = sorted(p for p in parts if p is not None)
        tables = [schemas.validate(storage.read_parquet(p), schemas.CANDIDATE, p) for p in parts]
        table = pa.concat_tables(tables) if tables else schemas.CANDIDATE.empty_table()
        del tables
        table = table.sort_by([("n_tokens", "ascending"), ("id", "ascending")])
        path = self.layout.candidates_shard(shard, self.num_shards)
        table = schemas.validate(table.replace_schema_metadata(schemas.CANDIDATE.metadata), schemas.CANDIDATE, path)
        size = storage.write_parquet(table, path)
        tokens = int(pa.compute.sum(table["n_tokens"]).as_py() or 0)
        yield {"shard": shard, "path": path, "rows": table.num_rows, "tokens": tokens, "bytes": size}


class WriteRejects(beam.PTransform):
    """Rejects -> rejects/rejects-SSSSS-of-NNNNN.parquet, sorted by (file, line)."""

    def __init__(self, layout: RunLayout, num_shards: int):
        super().__init__()
        self.layout, self.num_shards = layout, num_shards

    def expand(self, rejects):
        n, layout = self.num_shards, self.layout
        keyed = rejects | "KeyReject" >> beam.Map(lambda r: (zlib.crc32(r["file"].encode()) % n, r))
        # markers only, flattened into a GroupByKey: no reshuffle of their own (one stage less)
        empties = rejects.pipeline | "RejectShards" >> beam.Create([(k, None) for k in range(n)], reshuffle=False)

        def write(element):
            shard, rows = element
            rows = sorted((r for r in rows if r is not None), key=lambda r: (r["file"], r["line"]))
            path = layout.rejects_shard(shard, n)
            storage.write_parquet(schemas.to_table(rows, schemas.REJECT, path), path)
            return {"path": path, "rows": len(rows)}

        return ((keyed, empties) | "AllRejectShards" >> beam.Flatten()
                | "GroupRejects" >> beam.GroupByKey() | "WriteRejectShard" >> beam.Map(write))


def build(p: beam.Pipeline, cfg: PrepareConfig, run_id: str | None = None, files: list[str] | None = None,
          fingerprint: list[dict] | None = None, prior: list[str] | None = None,
          tokenizer_file: dict | None = None):
    """Adds the prepare pass to pipeline `p`; returns the PCollection of the final stats dict."""
    files = list_inputs(cfg.input) if files is None else files
    selected = [f for f in files if not cfg.splits or dolma.split_of(f, cfg.splits)]
    others = [f for f in files if f not in set(selected)]
    layout = RunLayout(cfg.root)
    tmp_dir = layout.prepare_tmp(run_id or uuid.uuid4().hex[:12])

    limit0 = None
    stash = tmp_dir if cfg.target_docs else None  # a sample re-reads its few documents from a stash
    if cfg.target_docs:  # round 0 of the sample, measured in the first read: its key limit from an estimate
        stored = {i["path"]: i.get("bytes", 0) for i in fingerprint or []}
        sizes = [stored[f] if f in stored else _size_or_zero(f) for f in selected]
        limit0 = key_limit(estimate_ranked(selected, sizes, cfg), cfg.target_docs, 1.0)
    read = (p | "HeadSplitFiles" >> beam.Create(selected)  # Create spreads its elements (a reshuffle)
            | "ReadAndMeasure" >> beam.ParDo(ReadAndMeasure(cfg, selected, limit0, stash)).with_outputs(
                "rejects", "tallies", "unreadable", "ranks", main="docs"))
    if cfg.target_docs:
        docs, kept_rejects, kept_tallies = ((read.docs, read.ranks)
                                            | "SampleByKey" >> SampleByKey(cfg, selected, limit0, stash))
    else:
        docs, kept_rejects, kept_tallies = read.docs | "Deduplicate" >> Deduplicate(cfg.seed, selected)
    rejects = [read.rejects, kept_rejects]
    tallies = [read.tallies, kept_tallies]
    unreadable = [read.unreadable]
    if others:  # no stage for an empty list
        other = (p | "OtherSplitFiles" >> beam.Create(others)
                 | "CountLines" >> beam.ParDo(CountLines(cfg.skip_unreadable_files)).with_outputs(
                     "unreadable", "tallies", main="nothing"))
        tallies.append(other.tallies)
        unreadable.append(other.unreadable)

    if prior:  # documents already seen keep their shard: their generations are reused
        seen = p | "PriorFiles" >> beam.Create(prior) | "ReadPrior" >> beam.FlatMap(_read_prior)
        docs = ({"doc": docs | "KeyDocById" >> beam.Map(lambda d: (d[ID], d)), "prior": seen}
                | "JoinPrior" >> beam.CoGroupByKey()
                | "WithPrior" >> beam.FlatMap(lambda kv: [d + (next(iter(kv[1]["prior"]), None),)
                                                          for d in kv[1]["doc"]]))
    parts = (docs
             | "AssignShards" >> AssignShards(cfg.num_shards)
             | "GroupByFile" >> beam.GroupByKey()
             | "WriteParts" >> beam.ParDo(WriteParts(cfg, tmp_dir, selected, stashed=stash is not None)))
    every_shard = p | "ShardNumbers" >> beam.Create([(k, None) for k in range(cfg.num_shards)], reshuffle=False)
    shards = ((parts, every_shard) | "AllShards" >> beam.Flatten()
              | "GroupByShard" >> beam.GroupByKey()
              | "MergeShard" >> beam.ParDo(MergeShard(layout, cfg.num_shards)))
    tallies.append(shards | "KeptTally" >> beam.Map(lambda s: _tally(KEPT, s["rows"])))

    reject_files = (rejects | "AllRejects" >> beam.Flatten()
                    | "WriteRejects" >> WriteRejects(layout, cfg.reject_shards))
    totals = (tallies | "AllTallies" >> beam.Flatten()
              | "SumTallies" >> beam.CombinePerKey(sum)
              | "TallyDict" >> beam.combiners.ToDict())
    unreadable = unreadable | "AllUnreadable" >> beam.Flatten()
    return (p | "Finish" >> beam.Create([None])
            | "WriteStats" >> beam.Map(
                lambda _, t, s, r, u: write_stats(cfg, files, selected, t, s, r, u, fingerprint,
                                                     tokenizer_file),
                t=beam.pvalue.AsSingleton(totals), s=beam.pvalue.AsList(shards),
                r=beam.pvalue.AsList(reject_files), u=beam.pvalue.AsList(unreadable)))


def funnel(totals: dict[str, int]) -> dict:
    """The accounting: every input record is kept or dropped with a reason."""
    dropped = {k.split("/", 1)[1]: v for k, v in sorted(totals.items()) if k.startswith("dropped/")}
    return {"input_records": totals.get(INPUT, 0), "kept": totals.get(KEPT, 0), "dropped": dropped}


UNLISTED = ("other_split", "not_selected", "not_sampled")  # dropped reasons counted in stats, not listed as rejects


def write_stats(cfg, files, selected, totals, shards, reject_files, unreadable, fingerprint=None,
                tokenizer_file=None) -> dict:
    acc = funnel(totals)
    if acc["input_records"] != acc["kept"] + sum(acc["dropped"].values()):
        raise RuntimeError(f"accounting broken: {acc['input_records']} input records != {acc['kept']} kept + "
                           f"{sum(acc['dropped'].values())} dropped ({acc['dropped']})")
    n_rejects = sum(r["rows"] for r in reject_files)
    listed = sum(v for k, v in acc["dropped"].items() if k not in UNLISTED)
    if n_rejects != listed:
        raise RuntimeError(f"rejects written ({n_rejects}) != dropped documents to list ({listed})")
    shards = sorted(shards, key=lambda s: s["shard"])
    shard_tokens = [s["tokens"] for s in shards]
    stats = {
        **acc,
        "tokens": {"total": sum(shard_tokens), "max_tokens": cfg.max_tokens, "min_tokens": cfg.min_tokens},
        "length_filter": {
            "counted_from_pieces": totals.get("length/counted_pieces", 0),
            "tokenized_in_full": totals.get("length/counted_full", 0),
            "rejected_by_bound": totals.get("length/rejected_by_bound", 0),
            "measured": totals.get("length/measured", 0),
            "sample_rounds": totals.get("sample/rounds", 0),
        },
        "shards": {"num_shards": cfg.num_shards, "balance_max_over_mean": round(balance(shard_tokens), 6),
                   "files": [{k: s[k] for k in ("path", "rows", "tokens", "bytes")} for s in shards]},
        "rejects": {"rows": n_rejects, "files": [r["path"] for r in sorted(reject_files, key=lambda r: r["path"])]},
        "input_files": {"total": len(files), "head_split": len(selected), "other_splits": len(files) - len(selected)},
        "unreadable_files": sorted(unreadable, key=lambda u: u["file"]),
        "root": cfg.root,
        "config": cfg.identity(),
        "inputs": fingerprint,
        "tokenizer_file": tokenizer_file,
        "schema_version": schemas.SCHEMA_VERSION,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # _tmp/ before the marker: a kill in between leaves no complete output with document texts in _tmp/
    storage.delete_tree(RunLayout(cfg.root).prepare_tmp_root)
    storage.delete_tree(RunLayout(cfg.root).prepare_prior)
    storage.write_text(RunLayout(cfg.root).prepare_stats, json.dumps(stats, indent=2, sort_keys=False) + "\n")
    return stats


def run(cfg: PrepareConfig, beam_args: list[str]) -> dict:
    """Runs the pass unless ROOT/candidates/stats.json records a complete output of the same config;
    returns the stats (with "reused": true when nothing was run).

    A complete output of another config is an error naming the keys that differ (--overwrite redoes
    it). Before a run, whatever is under ROOT/candidates (an output being overwritten, or the debris
    of a killed run: shards, rejects, _tmp/ parts) is removed, the completion marker first, so that a
    run killed at any point leaves an output that is visibly incomplete and a rerun starts clean.
    """
    from beam_pipelines import progress
    from beam_pipelines.options import pipeline_options

    layout = RunLayout(cfg.root)
    files = list_inputs(cfg.input)
    fingerprint = input_fingerprint(files)
    check_tokenizer(cfg.tokenizer)
    tokenizer = tokenizer_fingerprint(cfg.tokenizer)
    if storage.exists(layout.prepare_stats) and not cfg.overwrite:
        stats = json.loads(storage.read_text(layout.prepare_stats))
        differ = config_differences(stats.get("config") or {}, cfg.identity())
        if differ:
            raise UserError(f"{layout.candidates} holds a complete prepare output of another config ("
                            + "; ".join(differ) + "): pass --overwrite to redo it, or use another --root")
        if stats.get("inputs") == fingerprint and stats.get("tokenizer_file") == tokenizer:
            log.info("%s exists with the same config and inputs: prepare is complete, skipping", layout.prepare_stats)
            storage.delete_tree(layout.prepare_tmp_root)  # document texts left by a run killed after its marker
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
            build(p, cfg, files=files, fingerprint=fingerprint, prior=prior, tokenizer_file=tokenizer)
    except KeyboardInterrupt:  # the output stays visibly incomplete (no marker); its document texts go
        storage.delete_tree(layout.prepare_tmp_root)
        raise
    return json.loads(storage.read_text(layout.prepare_stats))


def keep_prior(layout: RunLayout, num_shards: int) -> list[str]:
    """The ids of the output being replaced, by shard, under candidates/_prior/ (one small file per
    shard, written shard by shard: the driver never holds every id). From a complete output of the
    same --num-shards; else what a killed run kept; else nothing. Removed when the new output is
    complete (with _tmp/, before the marker)."""
    kept = sorted(p for p in storage.list_files(layout.prepare_prior)
                  if (parse_shard_name(p) or (None, None, None))[2] == num_shards)
    if storage.exists(layout.prepare_stats):  # a complete output (its marker not yet removed)
        try:
            old = layout.candidate_shards()
        except UserError:
            old = []
        if old and old[0][1] == num_shards:
            storage.delete_tree(layout.prepare_prior)
            kept = []
            for k, n, path in old:
                ids = storage.read_parquet(path, columns=["id"])
                target = layout.prior_shard(k, n)
                storage.write_parquet(ids, target)
                kept.append(target)
    return kept


def _read_prior(path: str):
    """(id, shard) of one prior file."""
    _, shard, _ = parse_shard_name(path)
    for doc_id in storage.read_parquet(path, columns=["id"]).column("id").to_pylist():
        yield doc_id, shard


def _size_or_zero(path: str) -> int:
    """A file's stored bytes for the sample's estimate; 0 for one that cannot be read (reported by the
    read pass)."""
    try:
        return storage.size(path)
    except OSError:
        return 0


def input_fingerprint(files: list[str]) -> list[dict]:
    """What the output was made from: every input file's path, size and content checksum. A file
    that cannot be read (deleted after it was listed, access denied) is recorded with its error, and
    the read pass reports it (or skips it under --skip-unreadable-files) as any unreadable file."""
    out = []
    for f in files:
        try:
            out.append({"path": f, **storage.fingerprint(f)})
        except OSError as e:  # storage.StorageError on gs://
            out.append({"path": f, "unreadable": str(e)[:300]})
    return out


def config_differences(recorded: dict, current: dict) -> list[str]:
    """'key: recorded -> current' for every key whose value differs."""
    keys = sorted(set(recorded) | set(current))
    return [f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in keys if recorded.get(k) != current.get(k)]


def check_output(folder: str) -> None:
    """Fails at once, in one line, when the output folder cannot be written (a file stands in its
    path, or it is read-only), instead of after the whole read pass."""
    try:
        storage.check_writable(folder)
    except Exception as e:  # OSError locally; google.api_core's Forbidden and the like on gs://
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--root: cannot write {folder} ({reason})") from e


def check_tokenizer(path: str) -> None:
    """Loads the tokenizer in the driver, so that a bad --tokenizer is one clear error, not a worker
    traceback."""
    try:
        load_tokenizer(path)
    except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise UserError(f"--tokenizer {path!r}: cannot load it as a Hugging Face tokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
