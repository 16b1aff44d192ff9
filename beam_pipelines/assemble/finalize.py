"""The release's rows: the cap (a deterministic bottom-k of sample keys), the validation split, and
FinalizeShard, which writes output shard k (its web part minus duplicate, near-duplicate and over-cap
rows, plus the seed rows hashed to k) as data/split={train,validation}/part-SSSSS-of-NNNNN; then every
step's partial statistics merged into the pass's summary.

The validation split. Without --max-examples, an example is in validation by its hash (a share of the
release, at least the example with the smallest key). With it, the cap selects max_examples +
validation_size web examples and the validation_size of them with the smallest validation keys are the
validation split, so the train split keeps the paper's counts (12.8K/25.6K/51.2K). Seed pairs train
unless asked otherwise."""
from __future__ import annotations

import heapq
import json
import time

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

import schemas
import storage
from beam_pipelines.assemble import corpus_stats
from beam_pipelines.assemble.config import Split
from beam_pipelines.report import changes
from beam_pipelines.runtime.options import configure_process
from schemas.keys import sample_key, validation_key, validation_mask, validation_size
from schemas import drops
from schemas.layout import RunLayout, release_data_file


class FinalizeShard(beam.DoFn):
    """Output shard k: web part minus duplicate-instruction losers and rows over the cap, plus seed
    rows, split by hash into data/split={train,validation}/part-<shard k>-of-<shards>.parquet (numbered per split by
    the driver afterwards: lifecycle.release.number_splits). Yields a partial."""

    def __init__(self, split: Split, folder: str, num_shards: int, tmp: str):
        self.split, self.folder, self.num_shards, self.tmp = split, folder, num_shards, tmp

    def setup(self):
        configure_process()

    def process(self, element, cutoff, validation):
        k, grouped = element
        t0 = time.perf_counter()
        web_parts = list(grouped["web"])
        web = (schemas.validate(storage.read_parquet(web_parts[0]), schemas.SFT, web_parts[0])
               if web_parts else schemas.SFT.empty_table())
        losers = pa.array(list(grouped["losers"]), pa.string())
        dup = pc.is_in(web["id"], value_set=losers)
        n_dup = int(pc.sum(dup.cast(pa.int64())).as_py() or 0)
        examples = {drops.DUPLICATE_INSTRUCTION: _drop_examples(web.filter(dup), drops.DUPLICATE_INSTRUCTION)}
        web = web.filter(pc.invert(dup))
        near = dict(grouped["near"])   # id -> the id of the near-duplicate that dominates it
        is_near = pc.is_in(web["id"], value_set=pa.array(list(near), pa.string()))
        n_near = int(pc.sum(is_near.cast(pa.int64())).as_py() or 0)
        examples[drops.NEAR_DUPLICATE] = _drop_examples(web.filter(is_near), drops.NEAR_DUPLICATE,
                                                               {i: f"near duplicate of {d}" for i, d in near.items()})
        web = web.filter(pc.invert(is_near))
        n_over, over_ids = 0, []
        if cutoff is not None:
            keys = [(sample_key(i, self.split.seed), i) for i in web["id"].to_pylist()]
            within = pa.array([key <= cutoff for key in keys], pa.bool_())
            n_over = web.num_rows - int(pc.sum(within.cast(pa.int64())).as_py() or 0)
            examples[drops.OVER_CAP] = _drop_examples(web.filter(pc.invert(within)), drops.OVER_CAP)
            over_ids = web["id"].filter(pc.invert(within)).to_pylist()
            web = web.filter(within)
        seed_parts = list(grouped["seed"])
        seeds = [schemas.validate(storage.read_parquet(p), schemas.SFT, p) for p in seed_parts]
        table = pa.concat_tables([web] + seeds).sort_by("id")
        in_val = _in_validation(table["id"], pc.is_in(table["id"], value_set=web["id"]), validation, self.split)
        partial = {"funnel": {"dropped": {drops.DUPLICATE_INSTRUCTION: n_dup, drops.NEAR_DUPLICATE: n_near,
                                          drops.OVER_CAP: n_over}}, "final": {},
                   "examples": {"dropped": examples}}
        late = [(i, drops.DUPLICATE_INSTRUCTION) for i in losers.to_pylist()] + [(i, drops.NEAR_DUPLICATE)
                                                                            for i in near]
        late += [(i, drops.OVER_CAP) for i in over_ids]
        storage.write_parquet(pa.table({"id": pa.array([i for i, _ in late], pa.string()),
                                        "reason": pa.array([r for _, r in late], pa.string())}),
                              RunLayout.assemble_part(self.tmp, changes.LATE_DROPS, k))
        t_stats = 0.0
        for split, mask in (("train", pc.invert(in_val)), ("validation", in_val)):
            rows = table.filter(mask)
            if rows.num_rows:  # no empty files: `datasets` cannot read a Parquet file without rows
                path = storage.join(self.folder, release_data_file(split, k, self.num_shards))
                storage.write_parquet(schemas.validate(rows, schemas.SFT, path), path)
            t = time.perf_counter()
            partial["final"] = corpus_stats.merge(partial["final"], corpus_stats.final_partial(rows, split))
            partial["browse"] = corpus_stats.merge(partial.get("browse"),
                                                   corpus_stats.browse_partial(rows, split, self.split.seed))
            t_stats += time.perf_counter() - t
        partial["timing"] = {"stats_s": t_stats, "work_s": time.perf_counter() - t0}
        yield partial


def _drop_examples(web: pa.Table, reason: str, detail: dict[str, str] | None = None) -> corpus_stats.Smallest:
    """The smallest-id SFT rows dropped for `reason` after the recipe, as report examples (`detail`:
    by id)."""
    rows = web.sort_by("id").slice(0, corpus_stats.EXAMPLES_PER_REASON)
    details = pa.array([(detail or {}).get(i) for i in rows["id"].to_pylist()], pa.string())
    return corpus_stats.Smallest(corpus_stats.EXAMPLES_PER_REASON, corpus_stats.example_rows(
        rows, rows["instruction"], rows["response"], pa.array([reason] * rows.num_rows, pa.string()), details))


class FinalizeShards(beam.PTransform):
    """{"web", "losers", "near", "seed"}, each keyed by output shard -> FinalizeShard's partial per shard
    (every shard, a shard without any row included); `cutoff` and `validation`: singleton PCollections
    (CapToMaxExamples, ValidationRule)."""

    def __init__(self, split: Split, folder: str, num_shards: int, tmp: str, cutoff, validation):
        super().__init__()
        self.finalize = FinalizeShard(split, folder, num_shards, tmp)
        self.num_shards, self.cutoff, self.validation = num_shards, cutoff, validation

    def expand(self, parts: dict):
        p = next(iter(parts.values())).pipeline
        every_shard = p | "OutputShards" >> beam.Create([(k, None) for k in range(self.num_shards)], reshuffle=False)
        return ({**parts, "shard": every_shard}
                | "GroupByShard" >> beam.CoGroupByKey()
                | "FinalizeShard" >> beam.ParDo(self.finalize, cutoff=beam.pvalue.AsSingleton(self.cutoff),
                                                validation=beam.pvalue.AsSingleton(self.validation)))


class MergePartials(beam.CombineFn):
    def create_accumulator(self):
        return None

    def add_input(self, acc, partial):
        return corpus_stats.merge(acc, partial)

    def merge_accumulators(self, accs):
        out = None
        for a in accs:
            out = corpus_stats.merge(out, a)
        return out

    def extract_output(self, acc):
        return acc


class WriteSummary(beam.PTransform):
    """Every step's partial statistics (a tuple of PCollections) merged, summarized and written to
    `path` (the run's tmp folder: the driver reads it after the pass)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, partials):
        path = self.path
        return (partials
                | "AllPartials" >> beam.Flatten()
                | "MergePartials" >> beam.CombineGlobally(MergePartials())
                | "Write" >> beam.Map(lambda s: storage.write_text(path, json.dumps(corpus_stats.summarize(s)))))


class CapToMaxExamples(beam.PTransform):
    """Exact-dedup winners (sample key, id) -> (the cutoff, the ids of the winners within it): the
    cutoff is the largest (sample key, id) the cap keeps, one element (None: no cap, or not more
    winners than it selects)."""

    def __init__(self, split: Split):
        super().__init__()
        self.split = split

    def expand(self, winners):
        if self.split.max_examples:
            selected = self.split.max_examples + validation_size(self.split.max_examples,
                                                                 self.split.validation_fraction)
            cutoff = (winners
                      | "Smallest" >> beam.combiners.Top.Smallest(selected)
                      | "Cutoff" >> beam.Map(_cutoff, selected))
        else:
            cutoff = winners.pipeline | "NoCap" >> beam.Create([None])
        web_ids = (winners
                   | "WithinCap" >> beam.Filter(lambda kv, c: c is None or kv <= c, c=beam.pvalue.AsSingleton(cutoff))
                   | "WebIds" >> beam.Map(lambda kv: kv[1]))
        return cutoff, web_ids


def _cutoff(top: list, n: int):
    """The largest (sample key, id) kept by the cap; None when there are not more than n examples."""
    return max(top) if len(top) >= n else None


class ValidationRule(beam.PTransform):
    """(web ids within the cap, seed ids) -> the rule FinalizeShard splits by, one element (see the
    module docstring): ("hash", the released id always in validation) or, with --max-examples,
    ("capped", the largest (validation key, id) in validation)."""

    def __init__(self, split: Split):
        super().__init__()
        self.split = split

    def expand(self, ids):
        web_ids, seed_ids = ids
        s = self.split
        if s.max_examples:
            return (web_ids
                    | "ValidationKey" >> beam.Map(lambda i, seed: (validation_key(i, seed), i), s.seed)
                    | "SmallestKeys" >> beam.CombineGlobally(
                        SmallestKeys(max(1, validation_size(s.max_examples, s.validation_fraction))))
                    | "CappedValidation" >> beam.Map(_capped_validation, s.max_examples, s.validation_fraction))
        # the released id with the smallest validation key: always in validation (a small release has one)
        released = (web_ids, seed_ids) | "ReleasedIds" >> beam.Flatten() if s.seed_in_validation else web_ids
        return (released
                | "ValidationKey" >> beam.Map(lambda i, seed: (validation_key(i, seed), i), s.seed)
                | "SmallestKey" >> beam.combiners.Top.Smallest(1)
                | "FirstValidation" >> beam.Map(lambda top: ("hash", top[0][1] if top else None)))


class SmallestKeys(beam.CombineFn):
    """(count of inputs, the n smallest inputs, sorted)."""

    def __init__(self, n: int):
        self.n = n

    def create_accumulator(self):
        return 0, []

    def add_input(self, acc, key):
        return self.merge_accumulators([acc, (1, [key])])

    def merge_accumulators(self, accs):
        accs = list(accs)
        return sum(c for c, _ in accs), heapq.nsmallest(self.n, (k for _, keys in accs for k in keys))

    def extract_output(self, acc):
        return acc


def _capped_validation(acc, max_examples: int, fraction: float):
    """The largest (validation key, id) in validation among the web examples within the cap (None: none
    is): validation_size of them when the cap is full, else the fraction's share (at least one)."""
    count, keys = acc
    size = validation_size(max_examples, fraction)
    n = size if count >= max_examples + size else max(1, round(count * fraction))
    return ("capped", keys[min(n, len(keys)) - 1]) if size and keys else ("capped", None)


def _in_validation(ids: pa.ChunkedArray, is_web: pa.Array, rule: tuple, split: Split) -> pa.Array:
    """Which of a shard's ids are in validation under `rule` (("hash", first id) or ("capped", cutoff))."""
    kind, arg = rule
    by_hash = validation_mask(ids, split.validation_fraction, split.seed, arg if kind == "hash" else None)
    if kind == "capped":
        web = pa.array([arg is not None and (validation_key(i, split.seed), i) <= arg for i in ids.to_pylist()],
                       pa.bool_())
        return pc.if_else(is_web, web, pc.and_(by_hash, pa.scalar(split.seed_in_validation)))
    return pc.and_(by_hash, pc.or_(is_web, pa.scalar(split.seed_in_validation)))
