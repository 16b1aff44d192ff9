"""The read step: input files -> kept-document records (Doc), rejects, tallies.

Head-split files are parsed, selected, hashed and measured (the exact length filter) batch by batch;
files of other splits are only counted. With --target-docs, ReadAndMeasure measures round 0 of the
sample and MeasureLines the later rounds' lines (sample.py decides which); the measured documents'
fields are stashed in _tmp/ so that the write step does not read those input files again.
"""
from __future__ import annotations

import array
import logging
import uuid
import zlib
from typing import Any

import apache_beam as beam
import pyarrow as pa

import storage
from beam_pipelines.prepare import dolma
from beam_pipelines.tokens.judge import judge
from beam_pipelines.tokens.load import shared_tokenizer
from beam_pipelines.tokens.shape import TokenizerProof, utf8_bytes
from beam_pipelines.minhash import sketch
from beam_pipelines.runtime.options import configure_process
from beam_pipelines.prepare import records
from beam_pipelines.prepare.config import TOKENS, PrepareConfig, UnreadableFileError
from beam_pipelines.prepare.records import INPUT, Doc, Tallies, dropped, reject, tallied
from schemas.keys import sample_key, text_hash

log = logging.getLogger("bft.prepare")
# what the counter did (tokens.counter.TokenCounter.totals), tallied per step as "length/<name>", and the name
# stats.json's length_filter section gives it: which way texts were counted (CostSwitch chooses by
# measured time, so these vary from run to run; the counts never do)
COUNTING_PATHS = {"counted_pieces": "counted_from_pieces", "counted_full": "tokenized_in_full",
                  "full_by_switch": "in_full_by_switch", "chunk_lookups": "chunk_lookups",
                  "chunk_misses": "chunk_misses", "rejected_by_bound": "rejected_by_bound",
                  "kept_by_bound": "kept_by_bound", "rejected_by_prefix": "rejected_by_prefix",
                  "kept_by_prefix": "kept_by_prefix", "kept_by_chunks": "kept_by_chunks",
                  "rejected_by_chunks": "rejected_by_chunks", "kept_by_share": "kept_by_share",
                  "rejected_by_share": "rejected_by_share", "share_chars": "share_chars", "rest_chars": "rest_chars"}


def limit_detail(verdict: str, min_tokens: int, max_tokens: int) -> str:
    """A length reject's detail: the limit the document failed (the same whichever way it was decided)."""
    return f"more than {max_tokens} tokens" if verdict == "too_long" else f"fewer than {min_tokens} tokens"


def length_filter_stats(totals: dict[str, int]) -> dict[str, int]:
    """stats.json's length_filter counts from the pass's summed tallies (what _Measurer tallied)."""
    counts = {shown: totals.get(f"length/{name}", 0) for name, shown in COUNTING_PATHS.items()}
    return {**counts, "measured": totals.get("length/measured", 0)}

_STASH = pa.schema([("line", pa.int64()), ("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                    ("url", pa.string()), ("crawl_date", pa.string())])  # a --target-docs sample's measured documents (_Measurer)


READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


class CountLines(beam.DoFn):
    """Files of other splits: their documents are counted, not parsed."""

    def __init__(self, skip_unreadable: bool):
        self.skip_unreadable = skip_unreadable

    def process(self, path: str):
        n = 0
        try:
            for _ in storage.open_lines(path):
                n += 1
        except READ_ERRORS as e:
            yield from unreadable(path, n, e, self.skip_unreadable)
        yield tallied(INPUT, n)
        yield tallied(dropped("other_split"), n)


def unreadable(path: str, lines_read: int, error: Exception, skip: bool):
    if not skip:
        raise UnreadableFileError(
            f"{path}: unreadable after {lines_read} lines ({type(error).__name__}: {error}); "
            "fix or remove the file, or pass --skip-unreadable-files to count it and go on") from error
    log.warning("%s: unreadable after %d lines (%s); skipped the rest", path, lines_read, error)
    yield tallied("unreadable_files")
    yield beam.pvalue.TaggedOutput("unreadable", {"file": path, "lines_read": lines_read, "error": str(error)})


class _Measurer(beam.DoFn):
    """Counts tokens of batches of parsed documents: kept-document keys (main), rejects, tallies.

    With `stash_tmp` (the --target-docs path, where the measured documents are a small share of each
    file) the fields of every document that passes the length filter are also written under
    `stash_tmp` (RunLayout.prepare_stash, by input file, at most PART_CHARS of text per write), so that
    WriteParts reads them there instead of decompressing and parsing the whole input file again.
    With --near-dedup each kept document's MinHash sketch is computed here, where its text is, and
    travels in the Doc (224 bytes) instead of the text."""

    def __init__(self, cfg: PrepareConfig, files: list[str], stash_tmp: str | None = None,
                 proof: TokenizerProof | None = None):
        self.cfg, self.files, self.stash_tmp, self.proof = cfg, files, stash_tmp, proof

    def setup(self):
        configure_process()
        # loaded once per process, proved once by the driver (`proof`, checked against the file); the
        # counter is the running thread's, asked for at each batch (`_measure`): a DoFn set up in one
        # thread may run its later bundles in another
        self.tokenizer = shared_tokenizer(self.cfg.tokenizer, self.proof)
        self._file_index = {f: i for i, f in enumerate(self.files)}
        self._by_tokens = self.cfg.balanced_by(self.tokenizer.proof.shape) == TOKENS
        self._minhash = self.cfg.minhash_params() if self.cfg.near_dedup else None
        self._stash: list[dict] = []
        self._stashed_chars = 0

    def _keep(self, path: str, line_no: int, doc) -> None:
        if self.stash_tmp is None:
            return
        self._stash.append({"line": line_no, "id": doc.id, "text": doc.text, "source": doc.source, "url": doc.url,
                            "crawl_date": doc.crawl_date})
        self._stashed_chars += len(doc.text)
        if self._stashed_chars > records.PART_CHARS:
            self._write_stash(path)

    def _write_stash(self, path: str) -> None:
        """Writes the stashed documents of input file `path` (called at the end of each file)."""
        if self._stash:
            target = storage.join(self.cfg.layout.prepare_stash(self.stash_tmp, path),
                                  f"{uuid.uuid4().hex}.parquet")
            storage.write_parquet(pa.Table.from_pylist(self._stash, schema=_STASH), target, "lz4")
        self._stash, self._stashed_chars = [], 0

    def _measure(self, path, batch, tallies):
        if not batch:
            return
        cfg, counter, file_index = self.cfg, self.tokenizer.counter(), self._file_index[path]
        # the counter is this thread's, shared by the steps the thread runs (SharedTokenizer.counter):
        # its totals are read around this one call, which no other step interleaves with
        before = counter.totals()
        judged = judge(counter, [doc.text for _, doc in batch], cfg.min_tokens, cfg.max_tokens, cfg.exact_counts)
        after = counter.totals()
        for name in COUNTING_PATHS:
            tallies[f"length/{name}"] += after[name] - before[name]
        tallies["length/measured"] += len(batch)
        # What is written never depends on the way a text was decided (by a bound, the caches, a share,
        # a prefix or a count: chosen by the caches' state and measured time, so by the bundles a worker
        # ran before): a reason says the limit it failed, and a kept text has its count only where every
        # kept text is counted (balanced by tokens), so that a rerun writes the same bytes.
        for (line_no, doc), (n, verdict, _) in zip(batch, judged):
            if verdict:
                tallies[dropped(verdict)] += 1
                yield reject(path, line_no, verdict, limit_detail(verdict, cfg.min_tokens, cfg.max_tokens), doc.id)
            else:
                self._keep(path, line_no, doc)
                n = n if self._by_tokens else None
                yield Doc(doc.id, text_hash(doc.text), n, len(doc.text), file_index, line_no,
                          n if self._by_tokens else utf8_bytes(doc.text),
                          minhash=sketch(doc.text, self._minhash) if self._minhash else None)

    def _counted(self, path, tallies):
        self._write_stash(path)
        yield from tallies.emit()


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
                 stash_tmp: str | None = None, proof: TokenizerProof | None = None):
        super().__init__(cfg, files, stash_tmp, proof)
        self.key_limit = key_limit
        self.where = [dolma.parse_where(w) for w in cfg.select_where]

    def process(self, path: str):
        tallies = Tallies()
        batch: list[tuple[int, dolma.Document]] = []
        line_no = selected = 0
        limit, seed = self.key_limit, self.cfg.seed
        keys, lines = array.array("Q"), array.array("Q")  # the unmeasured documents: 16 bytes each
        try:
            for line_no, raw in enumerate(storage.open_lines(path), start=1):
                tallies[INPUT] += 1
                item = dolma.parse_line(raw, self.cfg.max_line_bytes)
                if isinstance(item, dolma.Reject):
                    tallies[dropped(item.reason)] += 1
                    yield reject(path, line_no, item.reason, item.detail, item.id, item.raw)
                    continue
                if not dolma.selected(item.record, self.where):
                    tallies[dropped("not_selected")] += 1
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
        except READ_ERRORS as e:
            yield from unreadable(path, line_no, e, self.cfg.skip_unreadable_files)
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
        tallies = Tallies()
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
