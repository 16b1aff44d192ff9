"""The write step: kept documents -> token-balanced candidate shards, rejects -> reject shards, and
the stats (the funnel, checked to add up) written last as the completion marker.

Only keys are shuffled: each document is routed to a shard (bucket by bucket, beam_pipelines/prepare/shards.py),
its text read again from its input file (or the sample's stash) into per-file parts, and each shard
merged from its parts by one worker, sorted by (n_tokens, id) (uncounted documents first, by id),
written whole or not at all.

Balancing adds up each document's `weight` (records.Doc): its exact count when every kept document is
counted (--exact-counts, or a tokenizer without an upper bound), else its UTF-8 bytes, for every
document alike. Bytes are not the upper bound of the uncounted documents mixed with the counts of the
others (a bound is ~4x a count on English text: mixing them would load the shards of the counted,
longer documents 4x too lightly). Bytes follow tokens in sum: a shard's documents are drawn at random
(by the hash of their id), so its bytes-per-token ratio nears the corpus's as it holds more of them,
and a bytes balance is a token balance to that ratio's spread across shards: on the real-text corpus
of benchmarks/real_corpus.py (technical text, 3.3 bytes a token, from man pages to code) shards
balanced to 1.0002 in bytes measured 1.062 in tokens at 112 documents a shard, 1.010-1.017 at 225-450
and 1.005 at 900 (tokens: 1.0001 at any size); prepare_bench reports it for each run.
"""
from __future__ import annotations

import collections
import json
import time
import uuid
import zlib

import apache_beam as beam
import pyarrow as pa
from apache_beam.typehints import KV

import schemas
import storage
from beam_pipelines.prepare import dolma
from beam_pipelines.runtime.options import configure_process
from beam_pipelines.prepare import records
from beam_pipelines.prepare.config import BYTES, TOKENS, PrepareConfig
from beam_pipelines.prepare.read import length_filter_stats, reread
from beam_pipelines.prepare.records import UNLISTED, Doc, funnel
from beam_pipelines.prepare.shards import assign_bucket, balance, num_buckets
from schemas.errors import UserError
from schemas.keys import balance_bucket
from schemas.layout import RunLayout, parse_shard_name


class AssignShards(beam.PTransform):
    """Kept documents -> (file, (line, id, shard, n_tokens, text_hash)), balanced bucket by bucket
    (beam_pipelines/prepare/shards.py) by their `weight`: what is global is the count of kept documents."""

    def __init__(self, num_shards: int):
        super().__init__()
        self.num_shards = num_shards

    def expand(self, docs):
        n = docs | "CountKept" >> beam.combiners.Count.Globally()
        return (docs
                | "KeyByBucket" >> beam.Map(lambda d, n: (balance_bucket(d.id, num_buckets(n)), d),
                                            n=beam.pvalue.AsSingleton(n)).with_output_types(KV[int, Doc])
                | "GroupByBucket" >> beam.GroupByKey()
                | "BalanceBucket" >> beam.FlatMap(_route_bucket, self.num_shards))


def _route_bucket(element, num_shards: int):
    bucket, docs = element
    docs = list(docs)
    prior = {d.id: d.prior for d in docs if d.prior is not None}
    shard_of = assign_bucket(((d.id, d.weight) for d in docs), num_shards, bucket, prior)
    for d in docs:
        yield d.file, (d.line, d.id, shard_of[d.id], d.n_tokens, d.text_hash)


class WriteParts(beam.DoFn):
    """Re-reads one input file and writes its kept documents into part files by shard: one per shard,
    or more when the file's kept text passes PART_CHARS (memory stays bounded whatever the file's
    size)."""

    def __init__(self, cfg: PrepareConfig, tmp_dir: str, files: list[str], stashed: bool = False):
        self.cfg, self.tmp_dir, self.files, self.stashed = cfg, tmp_dir, files, stashed
        self.layout = cfg.layout

    def setup(self):
        configure_process()

    def _stashed(self, path: str):
        """(line, document) of the input file's stash (`_Measurer`), in line order."""
        for stash in sorted(storage.list_files(self.layout.prepare_stash(self.tmp_dir, path))):
            for row in storage.read_parquet(stash).to_pylist():
                yield row["line"], dolma.Document(id=row["id"], text=row["text"], source=row["source"],
                                                  url=row["url"], record={}, crawl_date=row["crawl_date"])

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
                                "n_chars": len(doc.text), "n_tokens": n_tokens, "shard": shard, "text_hash": h,
                                "crawl_date": doc.crawl_date})
            held += len(doc.text)
            if held > records.PART_CHARS:
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
    """A shard's parts -> candidates-SSSSS-of-NNNNN.parquet, rows sorted by (n_tokens, id), the
    uncounted documents (n_tokens null) first; its exact tokens, uncounted documents and UTF-8 bytes."""

    def __init__(self, layout: RunLayout, num_shards: int):
        self.layout, self.num_shards = layout, num_shards

    def setup(self):
        configure_process()

    def process(self, element):
        shard, parts = element
        parts = sorted(p for p in parts if p is not None)
        tables = [schemas.validate(storage.read_parquet(p), schemas.CANDIDATE, p) for p in parts]
        table = pa.concat_tables(tables) if tables else schemas.CANDIDATE.empty_table()
        del tables
        # uncounted (null) first, by a key of -1: per-key null placement needs pyarrow >= 25
        order = pa.table({"k": pa.compute.fill_null(table["n_tokens"], -1), "id": table["id"]})
        table = table.take(pa.compute.sort_indices(order, sort_keys=[("k", "ascending"), ("id", "ascending")]))
        path = self.layout.candidates_shard(shard, self.num_shards)
        table = schemas.validate(table.replace_schema_metadata(schemas.CANDIDATE.metadata), schemas.CANDIDATE, path)
        size = storage.write_parquet(table, path)
        tokens = int(pa.compute.sum(table["n_tokens"]).as_py() or 0)
        text_bytes = int(pa.compute.sum(pa.compute.binary_length(table["text"])).as_py() or 0)
        yield {"shard": shard, "path": path, "rows": table.num_rows, "tokens": tokens,
               "uncounted": table["n_tokens"].null_count, BYTES: text_bytes, "bytes": size}


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


def write_stats(cfg, files, selected, totals, shards, reject_files, unreadable, fingerprint=None,
                tokenizer_file=None, balanced_by: str = TOKENS) -> dict:
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
    uncounted = sum(s["uncounted"] for s in shards)
    stats = {
        **acc,
        # total: the exact tokens of the counted documents, all of them when `uncounted` is 0
        "tokens": {"total": sum(shard_tokens), "counted_documents": acc["kept"] - uncounted,
                   "uncounted_documents": uncounted, "max_tokens": cfg.max_tokens, "min_tokens": cfg.min_tokens},
        "length_filter": {
            **length_filter_stats(totals),
            "sample_rounds": totals.get("sample/rounds", 0),
        },
        **({"near_dedup": {k: totals.get(f"near_dedup/{k}", 0) for k in ("candidate_pairs", "similar_pairs",
                                                                         "clusters")}} if cfg.near_dedup else {}),
        "shards": {"num_shards": cfg.num_shards, "balanced_by": balanced_by,
                   "balance_max_over_mean": round(balance([s[balanced_by] for s in shards]), 6),
                   "files": [{k: s[k] for k in ("path", "rows", "tokens", "uncounted", BYTES, "bytes")}
                             for s in shards]},
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
    storage.delete_tree(cfg.layout.prepare_tmp_root)
    storage.delete_tree(cfg.layout.prepare_prior)
    storage.write_text(cfg.layout.prepare_stats, json.dumps(stats, indent=2, sort_keys=False) + "\n")
    return stats


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


def read_prior(path: str):
    """(id, shard) of one prior file."""
    _, shard, _ = parse_shard_name(path)
    for doc_id in storage.read_parquet(path, columns=["id"]).column("id").to_pylist():
        yield doc_id, shard
