"""The join, per candidates shard: candidates shard k and its generation shards read (each file once,
checked against the sha256 its marker records), joined by id, and every row decided by the recipe,
curation and decontamination (Rules). Kept rows go to a web part in the run's tmp folder; only
their instruction keys (with near-duplicate detection on: their MinHash bands) travel on."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

import schemas
import storage
from beam_pipelines.assemble import corpus_stats, decontaminate, recipes
from beam_pipelines.assemble.config import AssembleError, Rules
from beam_pipelines.report import changes
from beam_pipelines.runtime.options import configure_process
from schemas.keys import instruction_key
from schemas import drops
from schemas.layout import RunLayout

log = logging.getLogger("bft.assemble")


@dataclass(frozen=True)
class ShardInput:
    shard: int
    num_shards: int
    candidates: str
    stages: tuple[tuple[str, str], ...]     # (stage, path): the recipe's stages, and any other stage run
    # (file, sha256, error, stage): what the generation markers record of the files this shard reads
    # (each stage file's own bytes, and the candidates it was made from), checked while they are read
    # (provenance.problem's `deferred`): the driver reads none of them
    checks: tuple[tuple[str, str, str, str], ...] = ()
    made_by: tuple[str, ...] = ()   # the maker keys of the recipe's stages' shards k (the rows' made_by)


def token_counter(tokenizer_path: str, proof=None):
    """Exact token counts with prepare's loader: the process's tokenizer, loaded in setup on the
    driver's `proof` (a changed file fails there, not on the first shard), counted by the running
    thread's TokenCounter (tokens.load.SharedTokenizer.counter: its cache warm across shards)."""
    from beam_pipelines.tokens.load import shared_tokenizer

    shared = shared_tokenizer(tokenizer_path, proof)
    return lambda texts: shared.counter().count(texts) if texts else []


class JoinShard(beam.DoFn):
    """Candidates shard k joined with its generation shards; `rules` (the recipe, curation) and
    decontamination (`eval_sets`, built by the driver: small, so they travel inside the DoFn) decide
    each row. Main output: (instruction key, (id, k)) of kept rows, or with near-duplicate instructions
    on (id, k, score, band keys, 3-gram hashes); tagged: ("parts", (k, path)), ("partials", dict)."""

    def __init__(self, rules: Rules, tokenizer: str, proof, tmp: str, eval_sets: list[decontaminate.EvalSet] = ()):
        self.rules, self.tokenizer, self.proof, self.tmp, self.eval_sets = rules, tokenizer, proof, tmp, list(eval_sets)

    def setup(self):
        configure_process()
        self.count_tokens = token_counter(self.tokenizer, self.proof)

    def _read(self, path: str, shard: ShardInput, left_out: set) -> pa.Table | None:
        """The Parquet file at `path`, read once and checked against every sha256 the generation markers
        record of it: a mismatch of a stage the recipe needs is an error naming that stage's shard; of
        a stage read for the statistics only, that stage is left out (None when it is this file's)."""
        blob = storage.read_bytes(path)
        actual = hashlib.sha256(blob).hexdigest()
        for file, digest, error, stage in shard.checks:
            if file != path or digest == actual or stage in left_out:
                continue
            if stage in self.rules.stages:
                raise AssembleError(f"{error}; rerun bft generate {stage}")
            log.warning("%s; left out of the statistics", error)
            left_out.add(stage)
        return storage.parquet_from_bytes(blob)

    def process(self, shard: ShardInput):
        t0 = time.perf_counter()
        rules, recipe = self.rules, self.rules.recipe
        needed = rules.stages
        left_out: set[str] = set()
        cands = schemas.validate(self._read(shard.candidates, shard, left_out), schemas.CANDIDATE, shard.candidates)
        stages, partial = {}, {"stages": {}}
        for stage, path in shard.stages:
            if stage in left_out:
                continue
            table = self._read(path, shard, left_out)
            if stage in left_out:
                continue
            table = schemas.validate(table, schemas.GENERATION, path)
            wrong = pc.unique(pc.filter(table["stage"], pc.not_equal(table["stage"], stage))).to_pylist()
            if wrong:
                raise AssembleError(f"{path}: holds rows of stage {wrong}, expected {stage}")
            check_shard_ids(path, table, cands)
            stages[stage] = table
        # every stage run is in the statistics; the recipe's (and --same-ids-as's) stages decide the rows
        joined = recipes.join_stages(cands, {st: t for st, t in stages.items() if st in needed})
        check_carried_instructions(joined, {st: p for st, p in shard.stages if st in needed})
        reason = recipes.verdicts(joined, recipe, rules.curation, rules.gate)
        if rules.other:
            other = recipes.verdicts(joined, rules.other, rules.curation, rules.other_gate)
            reason = recipes.restrict(reason, other, rules.other.name)
        keep = pc.is_null(reason)
        web = recipes.web_examples(joined, keep, recipe, rules.web_tag, self.count_tokens, list(shard.made_by))
        if self.eval_sets:
            matches = decontaminate.contamination(web["instruction"], web["response"], self.eval_sets)
            ids = web["id"].to_pylist()
            partial["decontamination"] = {"pairs": corpus_stats.Every(rows=[
                (ids[m.row], {"id": ids[m.row], "set": m.set, "field": m.field, "ngram": m.ngram, "prompt": m.prompt})
                for m in matches])}
            reason, web = drop_contaminated(reason, keep, web, matches)
        path = RunLayout.assemble_part(self.tmp, "web", shard.shard)
        storage.write_parquet(web, path)
        # every candidate's url and first reason (null: kept so far), for the release's changes/ files
        storage.write_parquet(pa.table({"id": joined["id"], "url": joined["url"], "reason": reason}),
                              RunLayout.assemble_part(self.tmp, changes.VERDICTS, shard.shard))
        t = time.perf_counter()
        threshold = rules.gate.threshold if rules.gate else None
        partial.update(corpus_stats.shard_partial(stages, joined, reason, recipe, threshold))  # statistics: one call, last
        partial["timing"] = {"stats_s": time.perf_counter() - t, "work_s": time.perf_counter() - t0}
        Metrics.counter("bft.assemble", "candidates").inc(cands.num_rows)
        Metrics.counter("bft.assemble", "kept_by_recipe").inc(web.num_rows)
        yield beam.pvalue.TaggedOutput("parts", (shard.shard, path))
        yield beam.pvalue.TaggedOutput("partials", partial)
        ids, instructions = web["id"].to_pylist(), web["instruction"].to_pylist()
        if not rules.near_dup_threshold:
            for doc_id, instruction in zip(ids, instructions):
                yield instruction_key(instruction), (doc_id, shard.shard)
            return
        shingles = decontaminate.ngram_sets(web["instruction"], decontaminate.SHINGLE_WORDS)
        bands = decontaminate.band_keys(shingles)
        for doc_id, instruction, score, s, b in zip(ids, instructions, web["score"].to_pylist(), shingles, bands):
            yield instruction_key(instruction), (doc_id, shard.shard, score, b.tobytes(), s.tobytes())


class JoinShards(beam.PTransform):
    """The shard plan through JoinShard, one candidates shard per element (spread by a reshuffle):
    its outputs `keys`, `parts` and `partials`."""

    def __init__(self, shards: list[ShardInput], rules: Rules, tokenizer: str, proof, tmp: str,
                 eval_sets: list[decontaminate.EvalSet] = ()):
        super().__init__()
        self.shards, self.join = shards, JoinShard(rules, tokenizer, proof, tmp, eval_sets)

    def expand(self, p):
        return (p | "ShardPlan" >> beam.Create(self.shards)
                | "Reshuffle" >> beam.Reshuffle()
                | "JoinShard" >> beam.ParDo(self.join).with_outputs("parts", "partials", main="keys"))


def drop_contaminated(reason, keep, web: pa.Table, matches: list[decontaminate.Match]) -> tuple[pa.Array, pa.Table]:
    """`reason` with contaminated:<set> on the joined rows of the matched web rows, and the web rows
    without them (`keep`: which joined rows the web rows are, in order)."""
    rows = [m.row for m in matches]
    labels = np.full(len(reason), None, object)
    labels[pc.indices_nonzero(keep).to_numpy()[rows]] = [drops.contaminated(m.set) for m in matches]
    hit = np.zeros(web.num_rows, bool)
    hit[rows] = True
    return pc.coalesce(reason, pa.array(labels, pa.string())), web.filter(pa.array(~hit))


def check_shard_ids(path: str, table: pa.Table, cands: pa.Table) -> None:
    """A generation shard k holds exactly the ids of candidates shard k (else it is another shard's)."""
    if table.num_rows != cands.num_rows or sorted(table["id"].to_pylist()) != sorted(cands["id"].to_pylist()):
        raise AssembleError(f"{path}: its ids are not those of its candidates shard (a copy of another shard?); "
                            "rerun bft generate for it")


def check_carried_instructions(joined: pa.Table, paths: dict[str, str]) -> None:
    """Every stage row's carried instruction is its backtranslate row's: else the stage was made from
    another backtranslation (stale)."""
    base = joined["backtranslate.instruction"]
    for stage, path in paths.items():
        if stage == "backtranslate":
            continue
        carried = joined[f"{stage}.instruction"]
        differs = pc.fill_null(pc.and_(pc.is_valid(carried), pc.not_equal(carried, base)), False)
        if pc.any(differs).as_py():
            first = joined["id"].filter(differs)[0].as_py()
            raise AssembleError(f"{path}: row {first} carries another instruction than its backtranslate row "
                                f"(made from an older backtranslation); rerun bft generate {stage}")
