"""The dedup step: ids must be unique, then normalized texts (schemas.keys.text_hash). Of documents
sharing a key, one survives by a fixed rule; the others become rejects naming the survivor.

Of documents sharing an id, the one with the smallest text hash survives (then the first input file
in sorted order, then the first line): a rule of the contents alone, so the same copy wins whatever
the runner, the worker count or the order of the input files' listing. A copy of the survivor's text
is a `duplicate_id`; a copy with another text (an edited page under the same id) is a
`conflicting_id`, counted apart in stats.json, since the survivor was chosen by a rule, not by which
text is right."""
from __future__ import annotations

from typing import Callable, Iterable

import apache_beam as beam
from apache_beam.typehints import KV

from beam_pipelines.prepare.records import Doc, dropped, reject, tallied
from schemas.keys import sample_key


DUPLICATE_ID = "duplicate_id"       # the survivor's id and text again
CONFLICTING_ID = "conflicting_id"   # the survivor's id with another text


def id_rank(doc: Doc) -> tuple:
    """Of documents sharing an id, the one of smallest id_rank is kept (Deduplicate, and the sample's
    stopping rule in SurvivorsAndMeasured)."""
    return doc.text_hash, doc.file, doc.line


def unique_ids(docs: Iterable[Doc], files: list[str]):
    """Of documents sharing an id, the first by id_rank is kept; the others become rejects:
    `duplicate_id` when their text is the survivor's, `conflicting_id` when it is another."""
    docs = sorted(docs, key=id_rank)
    kept = docs[0]
    yield kept
    for d in docs[1:]:
        where = f"id also at {files[kept.file]}:{kept.line}"
        if d.text_hash == kept.text_hash:
            yield reject(files[d.file], d.line, DUPLICATE_ID, where, d.id)
            yield tallied(dropped(DUPLICATE_ID))
        else:
            yield reject(files[d.file], d.line, CONFLICTING_ID, f"{where} with another text, kept as the text of "
                         "smallest hash", d.id)
            yield tallied(dropped(CONFLICTING_ID))


def keep_first(docs: Iterable[Doc], order: Callable[[Doc], tuple], reason: str, detail: Callable[[Doc], str],
               files: list[str]):
    """Of documents sharing a key, the first by `order` is kept; the others become rejects."""
    docs = sorted(docs, key=order)
    yield docs[0]
    for d in docs[1:]:
        yield reject(files[d.file], d.line, reason, detail(docs[0]), d.id)
        yield tallied(dropped(reason))


class Deduplicate(beam.PTransform):
    """Ids must be unique (the smallest text_hash wins: module docstring), then texts (the document that ranks first in
    the sample wins: smallest (sample_key(id, seed), id)). Ranking duplicates by the sample key makes
    the --target-docs sample decomposable: a document measured for the sample can only lose to a
    duplicate of lower key, which is measured too (see SampleByKey)."""

    def __init__(self, seed: int, files: list[str]):
        super().__init__()
        self.seed, self.files = seed, files

    def expand(self, docs):
        seed, files = self.seed, self.files
        by_id = (docs
                 | "KeyById" >> beam.Map(lambda d: (d.id, d)).with_output_types(KV[str, Doc])
                 | "GroupById" >> beam.GroupByKey()
                 | "UniqueIds" >> beam.FlatMap(lambda kv: unique_ids(kv[1], files))
                 .with_output_types(Doc).with_outputs("rejects", "tallies", main="docs"))
        by_text = (by_id.docs
                   | "KeyByHash" >> beam.Map(lambda d: (d.text_hash, d)).with_output_types(KV[str, Doc])
                   | "GroupByHash" >> beam.GroupByKey()
                   | "UniqueTexts" >> beam.FlatMap(
                       lambda kv: keep_first(kv[1], lambda d: (sample_key(d.id, seed), d.id, d.file, d.line),
                                             "duplicate", lambda w: f"same normalized text as {w.id}", files))
                   .with_output_types(Doc).with_outputs("rejects", "tallies", main="docs"))
        rejects = (by_id.rejects, by_text.rejects) | "DedupRejects" >> beam.Flatten()
        tallies = (by_id.tallies, by_text.tallies) | "DedupTallies" >> beam.Flatten()
        return by_text.docs, rejects, tallies
