"""What travels through pass 1: the kept-document record, reject rows, and the tallies (a
datatrove-style `stat_update`: each step counts what it decides, and every count is also a Beam metric).

Tallies travel as data, (name, n) elements summed at the end, rather than only as Beam metrics: the
data path is exactly-once on every runner, while some runners (Flink's portable one) report attempted,
not committed, metrics, and the funnel must add up to the input exactly.
"""
from __future__ import annotations

import collections
from typing import NamedTuple, Optional

from apache_beam import coders, pvalue
from apache_beam.metrics import Metrics

INPUT = "input_records"
KEPT = "kept"
PART_CHARS = 32 << 20  # document text a worker holds before it writes it to _tmp/ (~100 MB): read and write
UNLISTED = ("other_split", "not_selected", "not_sampled")  # dropped reasons counted in stats, not listed as rejects


class Doc(NamedTuple):
    """A kept document between steps: its text stays in its input file (read again to be written).
    `file` is the input file's index in the sorted list of head-split files (an int shuffles in ~2
    bytes, a path in ~100); `prior` is the document's shard in the output being replaced (None when
    it was not there, or no output is being replaced); `minhash` is its sketch for --near-dedup
    (beam_pipelines/minhash.py: 224 bytes at the default 14 bands; None without --near-dedup, and
    after NearDeduplicate). `n_tokens` is None when the upper bound kept the document uncounted
    (tokens.judge); `weight` is what shard balancing adds up for it: its n_tokens or its UTF-8 bytes,
    the same measure for every document of a run (PrepareConfig.balanced_by). Encoded by DocCoder
    (below)."""

    id: str
    text_hash: str
    n_tokens: Optional[int]
    n_chars: int
    file: int
    line: int
    weight: int
    prior: Optional[int] = None
    minhash: Optional[bytes] = None


def tally(name: str, n: int = 1) -> tuple[str, int]:
    """One count of the funnel as an element of the "tallies" output (and a Beam metric)."""
    Metrics.counter("bft.prepare", name).inc(n)
    return name, n


def tallied(name: str, n: int = 1) -> pvalue.TaggedOutput:
    return pvalue.TaggedOutput("tallies", tally(name, n))


def dropped(reason: str) -> str:
    return f"dropped/{reason}"


class Tallies(collections.Counter):
    """A step's counts, kept in the step and emitted once (per file or group) as "tallies" elements."""

    def emit(self):
        for name, n in sorted(self.items()):
            yield tallied(name, n)


def reject(file: str, line: int, reason: str, detail: str, doc_id=None, raw=None) -> pvalue.TaggedOutput:
    """A reject row on the "rejects" output."""
    return pvalue.TaggedOutput("rejects", {"file": file, "line": line, "id": doc_id, "reason": reason,
                                           "detail": detail, "raw": raw})


def funnel(totals: dict[str, int]) -> dict:
    """The accounting: every input record is kept or dropped with a reason."""
    dropped_ = {k.split("/", 1)[1]: v for k, v in sorted(totals.items()) if k.startswith("dropped/")}
    return {"input_records": totals.get(INPUT, 0), "kept": totals.get(KEPT, 0), "dropped": dropped_}


class DocCoder(coders.Coder):
    """Encodes a Doc as the plain tuple of its fields: Beam's fast coder writes a tuple in ~46 bytes
    and 1.7 us a round trip, while a NamedTuple it does not know is pickled (84 bytes, 4.4x slower).
    Used where a PCollection is declared to hold Docs (`with_output_types(Doc)`, `KV[key, Doc]`)."""

    _tuple = coders.FastPrimitivesCoder()

    def encode(self, doc: Doc) -> bytes:
        return self._tuple.encode(tuple(doc))

    def decode(self, encoded: bytes) -> Doc:
        return Doc._make(self._tuple.decode(encoded))

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return Doc


coders.registry.register_coder(Doc, DocCoder)
