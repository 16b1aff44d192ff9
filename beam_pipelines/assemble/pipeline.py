"""Beam pass 2: candidates + generation shards -> the SFT corpus, its statistics, a versioned release.

    ShardPlan ─ JoinShard ─┬─ web parts (tmp) ─────────────────────────────┐
     (per candidates shard │  recipe + curation + decontamination)         │
                           └─ (instruction key, id) ─ GroupByInstruction ─ KeepSmallestId ─┬─ losers ─┤
                    winner's MinHash bands ─ GroupByBand ─ NearDuplicates ─ min per id ────┼─ near ───┤
                                  winners not near-dominated ─ CapToMaxExamples ─ cutoff ──┼─(side)──┤
    SeedData ─ ReadSeed ─ seed parts (tmp) ────────────────────────────────────────────────┘          │
    winners within the cap (+ seed ids) ─ validation keys ─(side)─┐                                     │
                                  CoGroupByKey(shard) ─ FinalizeShard ─ data/split={train,validation}/part-SSSSS-of-NNNNN
    every step's partial statistics ─ MergePartials ─ summary (tmp)
    driver: stats.json, report.html + plots, README.md (card), manifest.json, _SUCCESS, validate, LATEST

Output shard k holds the web examples of candidates shard k (plus the seed examples hashed to k), so
shard sizes follow the token-balanced candidate shards. As in prepare, only keys travel through the
shuffle; examples go from JoinShard to FinalizeShard through per-shard Parquet parts.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

import schemas
from schemas.options import option, required
from schemas.errors import UserError
from schemas.keys import (instruction_key, sample_key, seed_row_shard, validation_key, validation_mask,
                          validation_size)
from schemas.layout import DATA, Rooted, RunLayout, release_data_file
from schemas.recipes import DEFAULT_RECIPE, gate_threshold, recorded_score_mode
from beam_pipelines.report import changes
from beam_pipelines.assemble import corpus_stats
from beam_pipelines.assemble import decontaminate, recipes
from beam_pipelines.tokens import paper_tokens
from beam_pipelines.runtime import progress
from lifecycle import provenance, release
from lifecycle.state import prepare_stats
import storage
from beam_pipelines.runtime.options import configure_process, pipeline_options
from beam_pipelines.tokens.length import prove, tokenizer_fingerprint
from storage.claims import claim_folder, clear_dead_folders

log = logging.getLogger("bft.assemble")


class AssembleError(UserError):
    """The inputs of assemble are missing or inconsistent."""


@dataclass
class AssembleConfig(Rooted):
    """The options of `bft assemble` (flags and the `assemble:` section of a run file)."""

    root: str = required("run root (local or gs://) with candidates/ and generations/")
    recipe: str = option(DEFAULT_RECIPE, "the paper's corpus variant", choices=sorted(recipes.RECIPES))
    min_score: float | None = option(None, "gate threshold (default: 5 for the score stage, 4.5 for rate, 4.5 for "
                                   "scores made in --score-mode logprob, read from their shards; may be fractional)")
    seed_data: str | None = option(None, "seed pairs to mix in: Parquet or JSON lines with instruction/response "
                                 "(e.g. the output of bft seed)")
    max_examples: int | None = option(None, "deterministic cap on the train split's web examples (the paper: "
                                      "12800, 25600, 51200); the validation split is taken beside it")
    validation_fraction: float = option(0.02, "share of the web examples in the validation split (when > 0, at "
                                        "least one example); with --max-examples, taken beside the cap, so the "
                                        "train split keeps the cap's count")
    seed_in_validation: bool = option(False, "let seed pairs go to the validation split too (default: every seed "
                                      "pair trains, as in the paper)")
    version: str | None = option(None, "release name (default: UTC date + config hash)")
    min_instruction_chars: int = option(10, "shorter instructions are dropped")
    max_instruction_chars: int = option(4000, "longer instructions are dropped (the paper's longest "
                                        "instructions, ~514 tokens, are ~2,100 characters)")
    seed_tag: str | None = option(None, "tag (system prompt) of seed examples (default: PROMPTS.md section 6); "
                                "'' for none")
    web_tag: str | None = option(None, "tag (system prompt) of web examples (default: PROMPTS.md section 6); "
                               "'' for none")
    no_tags: bool = option(False, "no data-source tags at all")
    tokenizer: str | None = option(None, "for token counts (default: the one prepare used)")
    allow_partial: bool = option(False, "publish without candidate shards whose generation output is missing "
                               "(reported)")
    seed: int = option(0, "seed of the cap sample and the validation split")
    same_ids_as: str | None = option(None, "keep only pairs that this other recipe keeps too (before dedup and "
                                     "--max-examples), e.g. filter+distill beside filter+rewrite: both releases "
                                     "then hold the same ids, as the paper compares them",
                                     choices=sorted(recipes.RECIPES))
    decontaminate: list[str] = option([], "evaluation prompts to keep out of the corpus (repeatable): a JSON list "
                                      "or JSON lines of objects (AlpacaEval's JSON, MT-Bench's question.jsonl); a "
                                      "pair whose instruction or response shares a word n-gram with one of them is "
                                      "dropped as contaminated:<file stem>")
    decontaminate_field: str | None = option(None, "the field of each object that holds its prompt (default: the "
                                             "first of instruction, turns, text, prompt; a list is one prompt per "
                                             "string)")
    decontaminate_ngram: int = option(13, "the shared n-gram's length in normalized words (GPT-3's and Llama 2's "
                                      "contamination analyses); a prompt of fewer words is one n-gram")
    allow_empty: bool = option(False, "point LATEST at the release even when a critical alert fires (no web "
                               "example, the gate passed nothing); without it such a release is published "
                               "without moving LATEST and assemble exits 1")
    fail_on_alert: bool = option(False, "any alert (not only the critical ones) leaves LATEST where it was and "
                                 "exits 1: for schedulers that fail the night on every alert")
    near_dup_instruction_threshold: float = option(0.8, "pairs whose instructions are near-duplicates (Jaccard of "
                                                   "their word 3-grams >= this, found by MinHash LSH) keep one: the "
                                                   "highest score, then the smallest id; 0 = off")

    def check(self) -> None:
        if self.recipe not in recipes.RECIPES:
            raise UserError(f"unknown recipe {self.recipe!r}; expected one of {sorted(recipes.RECIPES)}")
        if self.same_ids_as is not None and self.same_ids_as not in recipes.RECIPES:
            raise UserError(f"--same-ids-as: unknown recipe {self.same_ids_as!r}; expected one of "
                            f"{sorted(recipes.RECIPES)}")
        if not 0 <= self.validation_fraction < 1:
            raise UserError("--validation-fraction must be in [0, 1)")
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError("--max-examples must be >= 1")
        if self.min_instruction_chars > self.max_instruction_chars:
            raise UserError("--min-instruction-chars is larger than --max-instruction-chars")
        if self.decontaminate_ngram < 1:
            raise UserError("--decontaminate-ngram must be >= 1")
        if not 0 <= self.near_dup_instruction_threshold <= 1:
            raise UserError("--near-dup-instruction-threshold must be in [0, 1] (0 = off)")
        self.check_root()

    @property
    def threshold(self) -> float | None:
        return self.min_score if self.min_score is not None else recipes.RECIPES[self.recipe].threshold

    @property
    def stages(self) -> list[str]:
        """The generation stages to read: the recipe's, and --same-ids-as's."""
        names = recipes.RECIPES[self.recipe].stages + (recipes.RECIPES[self.same_ids_as].stages
                                                       if self.same_ids_as else [])
        return list(dict.fromkeys(names))

    def other_threshold(self) -> float | None:
        """--same-ids-as's gate threshold: --min-score when both recipes gate on the same stage."""
        other = recipes.RECIPES[self.same_ids_as]
        return self.threshold if other.gate == recipes.RECIPES[self.recipe].gate else other.threshold

    @property
    def tags(self) -> tuple[str | None, str | None]:
        return recipes.default_tags(self.no_tags, self.seed_tag, self.web_tag)

    def curation(self) -> recipes.Curation:
        return recipes.Curation(self.min_instruction_chars, self.max_instruction_chars)


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


def _token_counter(tokenizer_path: str, proof=None):
    """Exact token counts with prepare's loader: the process's tokenizer, loaded in setup on the
    driver's `proof` (a changed file fails there, not on the first shard), counted by the running
    thread's TokenCounter (length.SharedTokenizer.counter: its cache warm across shards)."""
    from beam_pipelines.tokens.length import shared_tokenizer

    shared = shared_tokenizer(tokenizer_path, proof)
    return lambda texts: shared.counter().count(texts) if texts else []


class JoinShard(beam.DoFn):
    """Candidates shard k joined with its generation shards; the recipe, curation and decontamination
    (`eval_sets`, built by the driver: small, so they travel inside the DoFn) decide each row.
    Main output: (instruction key, (id, k)) of kept rows, or with near-duplicate instructions on
    (id, k, score, band keys, 3-gram hashes); tagged: ("parts", (k, path)), ("partials", dict)."""

    def __init__(self, cfg: AssembleConfig, tmp: str, eval_sets: list[decontaminate.EvalSet] = (), proof=None):
        self.cfg, self.tmp, self.eval_sets, self.proof = cfg, tmp, list(eval_sets), proof

    def setup(self):
        configure_process()
        self.count_tokens = _token_counter(self.cfg.tokenizer, self.proof)

    def _read(self, path: str, shard: ShardInput, left_out: set) -> pa.Table | None:
        """The Parquet file at `path`, read once and checked against every sha256 the generation markers
        record of it: a mismatch of a stage the recipe needs is an error naming that stage's shard; of
        a stage read for the statistics only, that stage is left out (None when it is this file's)."""
        blob = storage.read_bytes(path)
        actual = hashlib.sha256(blob).hexdigest()
        for file, digest, error, stage in shard.checks:
            if file != path or digest == actual or stage in left_out:
                continue
            if stage in self.cfg.stages:
                raise AssembleError(f"{error}; rerun bft generate {stage}")
            log.warning("%s; left out of the statistics", error)
            left_out.add(stage)
        return storage.parquet_from_bytes(blob)

    def process(self, shard: ShardInput):
        t0 = time.perf_counter()
        cfg, recipe = self.cfg, recipes.RECIPES[self.cfg.recipe]
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
        joined = recipes.join_stages(cands, {st: t for st, t in stages.items() if st in cfg.stages})
        check_carried_instructions(joined, {st: p for st, p in shard.stages if st in cfg.stages})
        reason = recipes.verdicts(joined, recipe, cfg.curation(), cfg.threshold)
        if cfg.same_ids_as:
            other = recipes.verdicts(joined, recipes.RECIPES[cfg.same_ids_as], cfg.curation(), cfg.other_threshold())
            reason = recipes.restrict(reason, other, cfg.same_ids_as)
        keep = pc.is_null(reason)
        web = recipes.web_examples(joined, keep, recipe, cfg.tags[1], self.count_tokens, list(shard.made_by))
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
        partial.update(corpus_stats.shard_partial(stages, joined, reason, recipe, cfg.threshold))  # statistics: one call, last
        partial["timing"] = {"stats_s": time.perf_counter() - t, "work_s": time.perf_counter() - t0}
        Metrics.counter("bft.assemble", "candidates").inc(cands.num_rows)
        Metrics.counter("bft.assemble", "kept_by_recipe").inc(web.num_rows)
        yield beam.pvalue.TaggedOutput("parts", (shard.shard, path))
        yield beam.pvalue.TaggedOutput("partials", partial)
        ids, instructions = web["id"].to_pylist(), web["instruction"].to_pylist()
        if not cfg.near_dup_instruction_threshold:
            for doc_id, instruction in zip(ids, instructions):
                yield instruction_key(instruction), (doc_id, shard.shard)
            return
        shingles = decontaminate.ngram_sets(web["instruction"], decontaminate.SHINGLE_WORDS)
        bands = decontaminate.band_keys(shingles)
        for doc_id, instruction, score, s, b in zip(ids, instructions, web["score"].to_pylist(), shingles, bands):
            yield instruction_key(instruction), (doc_id, shard.shard, score, b.tobytes(), s.tobytes())


def drop_contaminated(reason, keep, web: pa.Table, matches: list[decontaminate.Match]) -> tuple[pa.Array, pa.Table]:
    """`reason` with contaminated:<set> on the joined rows of the matched web rows, and the web rows
    without them (`keep`: which joined rows the web rows are, in order)."""
    rows = [m.row for m in matches]
    labels = np.full(len(reason), None, object)
    labels[pc.indices_nonzero(keep).to_numpy()[rows]] = [decontaminate.CONTAMINATED + m.set for m in matches]
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


class ReadSeed(beam.DoFn):
    """Seed pairs (Parquet or JSON lines with instruction/response, optional id) -> seed parts by
    output shard. Main output: the ids kept; tagged: ("parts", (k, path)), ("partials", dict)."""

    def __init__(self, cfg: AssembleConfig, tmp: str, num_shards: int, proof=None):
        self.cfg, self.tmp, self.num_shards, self.proof = cfg, tmp, num_shards, proof

    def setup(self):
        configure_process()
        self.count_tokens = _token_counter(self.cfg.tokenizer, self.proof)

    def process(self, path: str):
        table = read_seed_table(path)
        instr = pc.utf8_trim_whitespace(pc.fill_null(table["instruction"], "")).combine_chunks()
        resp = pc.utf8_trim_whitespace(pc.fill_null(table["response"], "")).combine_chunks()
        ok = pc.and_(pc.greater(pc.utf8_length(instr), 0), pc.greater(pc.utf8_length(resp), 0))
        n_empty = table.num_rows - pc.sum(ok.cast(pa.int64())).as_py()
        ids, instr, resp = table["id"].combine_chunks().filter(ok), instr.filter(ok), resp.filter(ok)
        seed_tag = self.cfg.tags[0]
        rows = recipes.examples(instr, resp, ids=ids, origin="seed", recipe=None, tag=seed_tag, scores=None,
                                n_tokens_instruction=self.count_tokens(instr.to_pylist()),
                                n_tokens_response=self.count_tokens(resp.to_pylist()))
        shard = np.array([seed_row_shard(i, self.num_shards) for i in ids.to_pylist()], np.int64)
        for k in np.unique(shard):
            out = RunLayout.assemble_part(self.tmp, "seed", int(k))
            storage.write_parquet(rows.filter(pa.array(shard == k)), out)
            yield beam.pvalue.TaggedOutput("parts", (int(k), out))
        yield beam.pvalue.TaggedOutput("partials", {"seed": {"input": table.num_rows, "kept": rows.num_rows,
                                                             "dropped": {"empty": n_empty} if n_empty else {}}})
        yield from rows["id"].to_pylist()


SEED_DATA_LIMIT = 1 << 30   # bytes of a --seed-data file as stored (the paper's 3,200 pairs: a few MB)


def read_seed_table(path: str) -> pa.Table:
    """(id, instruction, response) from a Parquet or JSON-lines seed file (a regular file of at most
    SEED_DATA_LIMIT bytes as stored); ids made unique per file."""
    try:
        storage.check_input(path, SEED_DATA_LIMIT, "--seed-data")
        table = storage.read_records(path)
    except ValueError as e:
        raise AssembleError(str(e)) from e
    missing = [c for c in ("instruction", "response") if c not in table.column_names]
    if missing:
        raise AssembleError(f"{path}: seed data needs columns instruction and response; missing {missing}")
    if "id" not in table.column_names:
        name = path.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
        table = table.append_column("id", pa.array([f"seed:{name}:{i:06d}" for i in range(table.num_rows)]))
    table = table.select(["id", "instruction", "response"])
    try:
        table = table.cast(pa.schema([("id", pa.string()), ("instruction", pa.string()), ("response", pa.string())]))
    except pa.ArrowException as e:
        raise AssembleError(f"{path}: id, instruction and response must be strings ({e})") from e
    if table["id"].null_count or len(pc.unique(table["id"])) != table.num_rows:
        raise AssembleError(f"{path}: seed ids must be present and unique")
    return table


class FinalizeShard(beam.DoFn):
    """Output shard k: web part minus duplicate-instruction losers and rows over the cap, plus seed
    rows, split by hash into data/split={train,validation}/part-<shard k>-of-<shards>.parquet (numbered per split by
    the driver afterwards: lifecycle.release.number_splits). Yields a partial."""

    def __init__(self, cfg: AssembleConfig, folder: str, num_shards: int, tmp: str):
        self.cfg, self.folder, self.num_shards, self.tmp = cfg, folder, num_shards, tmp

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
        examples = {"duplicate_instruction": _drop_examples(web.filter(dup), "duplicate_instruction")}
        web = web.filter(pc.invert(dup))
        near = dict(grouped["near"])   # id -> the id of the near-duplicate that dominates it
        is_near = pc.is_in(web["id"], value_set=pa.array(list(near), pa.string()))
        n_near = int(pc.sum(is_near.cast(pa.int64())).as_py() or 0)
        examples[decontaminate.NEAR_DUPLICATE] = _drop_examples(web.filter(is_near), decontaminate.NEAR_DUPLICATE,
                                                               {i: f"near duplicate of {d}" for i, d in near.items()})
        web = web.filter(pc.invert(is_near))
        n_over, over_ids = 0, []
        if cutoff is not None:
            keys = [(sample_key(i, self.cfg.seed), i) for i in web["id"].to_pylist()]
            within = pa.array([key <= cutoff for key in keys], pa.bool_())
            n_over = web.num_rows - int(pc.sum(within.cast(pa.int64())).as_py() or 0)
            examples["over_cap"] = _drop_examples(web.filter(pc.invert(within)), "over_cap")
            over_ids = web["id"].filter(pc.invert(within)).to_pylist()
            web = web.filter(within)
        seed_parts = list(grouped["seed"])
        seeds = [schemas.validate(storage.read_parquet(p), schemas.SFT, p) for p in seed_parts]
        table = pa.concat_tables([web] + seeds).sort_by("id")
        in_val = _in_validation(table["id"], pc.is_in(table["id"], value_set=web["id"]), validation, self.cfg)
        partial = {"funnel": {"dropped": {"duplicate_instruction": n_dup, decontaminate.NEAR_DUPLICATE: n_near,
                                          "over_cap": n_over}}, "final": {},
                   "examples": {"dropped": examples}}
        late = [(i, "duplicate_instruction") for i in losers.to_pylist()] + [(i, decontaminate.NEAR_DUPLICATE)
                                                                            for i in near]
        late += [(i, "over_cap") for i in over_ids]
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
                                                   corpus_stats.browse_partial(rows, split, self.cfg.seed))
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


def _cutoff(top: list, n: int):
    """The largest (sample key, id) kept by the cap; None when there are not more than n examples."""
    return max(top) if len(top) >= n else None


# ---- the validation split ------------------------------------------------------------------------
# Without --max-examples, an example is in validation by its hash (a share of the release, at least the
# example with the smallest key). With it, the cap selects max_examples + validation_size web examples
# and the validation_size of them with the smallest validation keys are the validation split, so the
# train split keeps the paper's counts (12.8K/25.6K/51.2K). Seed pairs train unless asked otherwise.

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


def _in_validation(ids: pa.ChunkedArray, is_web: pa.Array, rule: tuple, cfg) -> pa.Array:
    """Which of a shard's ids are in validation under `rule` (("hash", first id) or ("capped", cutoff))."""
    kind, arg = rule
    by_hash = validation_mask(ids, cfg.validation_fraction, cfg.seed, arg if kind == "hash" else None)
    if kind == "capped":
        web = pa.array([arg is not None and (validation_key(i, cfg.seed), i) <= arg for i in ids.to_pylist()],
                       pa.bool_())
        return pc.if_else(is_web, web, pc.and_(by_hash, pa.scalar(cfg.seed_in_validation)))
    return pc.and_(by_hash, pc.or_(is_web, pa.scalar(cfg.seed_in_validation)))


def build(p: beam.Pipeline, cfg: AssembleConfig, shards: list[ShardInput], num_shards: int, folder: str, tmp: str,
          eval_sets: list[decontaminate.EvalSet] = (), proof=None):
    """`proof`: the tokenizer proved by the driver (length.prove), for the steps that count tokens."""
    proof = prove(cfg.tokenizer) if proof is None else proof
    joined = (p | "ShardPlan" >> beam.Create(shards)
              | "Reshuffle" >> beam.Reshuffle()
              | "JoinShard" >> beam.ParDo(JoinShard(cfg, tmp, eval_sets, proof)).with_outputs("parts", "partials",
                                                                                      main="keys"))
    dedup = (joined.keys
             | "GroupByInstruction" >> beam.GroupByKey()
             | "KeepSmallestId" >> beam.ParDo(KeepSmallestId(cfg.seed)).with_outputs("losers", "bands", main="winners"))
    winners = dedup.winners
    if cfg.near_dup_instruction_threshold:
        # band keys grouped in Beam: each group decides alone which of its members a better-ranked
        # near-duplicate dominates; an instruction dominated in any group is dropped
        near = (dedup.bands
                | "GroupByBand" >> beam.GroupByKey()
                | "NearDuplicates" >> beam.FlatMap(near_duplicates, cfg.near_dup_instruction_threshold)
                | "OneVerdictPerId" >> beam.CombinePerKey(min))
        winners = ({"winner": dedup.winners | "WinnerById" >> beam.Map(lambda kv: (kv[1], kv[0])), "near": near}
                   | "JoinNearDuplicates" >> beam.CoGroupByKey()
                   | "NotNearDuplicates" >> beam.FlatMap(not_near_duplicate))
        near_losers = near | "NearByShard" >> beam.Map(lambda kv: (kv[1][0], (kv[0], kv[1][1][1])))
    else:
        near_losers = p | "NoNearDuplicates" >> beam.Create([])
    if cfg.max_examples:
        selected = cfg.max_examples + validation_size(cfg.max_examples, cfg.validation_fraction)
        cutoff = (winners
                  | "CapToMaxExamples" >> beam.combiners.Top.Smallest(selected)
                  | "Cutoff" >> beam.Map(_cutoff, selected))
    else:
        cutoff = p | "NoCap" >> beam.Create([None])
    seed = (p | "SeedData" >> beam.Create([cfg.seed_data] if cfg.seed_data else [])
            | "ReadSeed" >> beam.ParDo(ReadSeed(cfg, tmp, num_shards, proof)).with_outputs("parts", "partials", main="ids"))
    web_ids = (winners
               | "WithinCap" >> beam.Filter(lambda kv, c: c is None or kv <= c, c=beam.pvalue.AsSingleton(cutoff))
               | "WebIds" >> beam.Map(lambda kv: kv[1]))
    if cfg.max_examples:
        validation = (web_ids
                      | "ValidationKey" >> beam.Map(lambda i, s: (validation_key(i, s), i), cfg.seed)
                      | "SmallestKeys" >> beam.CombineGlobally(
                          SmallestKeys(max(1, validation_size(cfg.max_examples, cfg.validation_fraction))))
                      | "CappedValidation" >> beam.Map(_capped_validation, cfg.max_examples, cfg.validation_fraction))
    else:   # the released id with the smallest validation key: always in validation (a small release has one)
        released = (web_ids, seed.ids) | "ReleasedIds" >> beam.Flatten() if cfg.seed_in_validation else web_ids
        validation = (released
                      | "ValidationKey" >> beam.Map(lambda i, s: (validation_key(i, s), i), cfg.seed)
                      | "SmallestKey" >> beam.combiners.Top.Smallest(1)
                      | "FirstValidation" >> beam.Map(lambda top: ("hash", top[0][1] if top else None)))
    every_shard = p | "OutputShards" >> beam.Create([(k, None) for k in range(num_shards)], reshuffle=False)
    finals = ({"web": joined.parts, "losers": dedup.losers, "near": near_losers, "seed": seed.parts,
               "shard": every_shard}
              | "GroupByShard" >> beam.CoGroupByKey()
              | "FinalizeShard" >> beam.ParDo(FinalizeShard(cfg, folder, num_shards, tmp),
                                               cutoff=beam.pvalue.AsSingleton(cutoff),
                                               validation=beam.pvalue.AsSingleton(validation)))
    summary_path = RunLayout.summary(tmp)
    return ((joined.partials, seed.partials, finals)
            | "AllPartials" >> beam.Flatten()
            | "MergePartials" >> beam.CombineGlobally(MergePartials())
            | "WriteSummary" >> beam.Map(
                lambda s: storage.write_text(summary_path, json.dumps(corpus_stats.summarize(s)))))


# ---- the driver: plan, run, then publish -------------------------------------------------------

def held_by(cfg: AssembleConfig, folder: str) -> list[str]:
    """The alerts (in the release's stats.json) that keep LATEST from moving to it: the critical ones
    unless --allow-empty; every one with --fail-on-alert."""
    stats = json.loads(storage.read_text(storage.join(folder, corpus_stats.RELEASE_STATS)))
    if cfg.fail_on_alert:
        return stats.get("alerts") or []
    return [] if cfg.allow_empty else changes.critical(stats)


def plan_inputs(cfg: AssembleConfig) -> tuple[list[ShardInput], dict[int, int], int, dict]:
    """Which shards to join, which are missing generation output ({shard: candidate rows}), the
    number of shards, and the input lineage."""
    layout = cfg.layout
    cands = layout.candidate_shards()
    shards, missing_files, skipped = [], [], {}
    lineage = {"candidates": [], "generations": {s: [] for s in cfg.stages}, "seed_data": None, "made_by": {}}
    checksums: dict[str, str] = {}
    makers = recipes.RECIPES[cfg.recipe].stages
    for k, n, path in cands:
        stage_paths, missing_here, checks, made_by = [], [], [], []
        # the stages the rows need must be there and current; any other stage run is read for the
        # report's statistics when it is current, and left out (with a warning) when it is not. What
        # needs the files' bytes is checked by JoinShard as it reads them (each file read once)
        for stage in recipes.ALL_STAGES:
            out = layout.generation_shard(stage, k, n)
            if storage.exists(out):
                deferred: list = []
                why = shard_problem(layout, stage, k, n, checksums, deferred)
                if why and stage in cfg.stages:
                    raise AssembleError(f"{out}: {why}; rerun bft generate {stage}")
                if why:
                    log.warning("%s: %s; left out of the statistics", out, why)
                    continue
                stage_paths.append((stage, out))
                checks += [(file, digest, f"{out}: {error}", stage) for file, digest, error in deferred]
                if stage in makers:   # the stage config that made its rows, by key (the rows' made_by)
                    made = provenance.read_record(layout.generation_metrics(stage, k, n))["config"]
                    key = provenance.maker_key(stage, made)
                    lineage["made_by"][key] = {"stage": stage, "model": made.get("model"), "config": made}
                    made_by.append(key)
                lineage["generations"].setdefault(stage, []).append(content_of(out, checksums))
            elif stage in cfg.stages:
                missing_here.append(out)
        if missing_here:
            lineage["candidates"].append(content_of(path, checksums))
            missing_files += missing_here
            skipped[k] = release.parquet_rows(path)
        else:
            # as the markers record it (JoinShard proves it, or stops before anything is published)
            claimed = next((digest for file, digest, _, stage in checks if file == path and stage in cfg.stages), None)
            lineage["candidates"].append(content_of(path, checksums, claimed))
            shards.append(ShardInput(k, n, path, tuple(stage_paths), tuple(checks), tuple(made_by)))
    if missing_files and not cfg.allow_partial:
        raise AssembleError(f"recipe {cfg.recipe} needs stages {cfg.stages}; {len(missing_files)} generation "
                            "shard(s) are missing (run bft generate for them, or pass --allow-partial):\n  "
                            + "\n  ".join(missing_files))
    if cfg.seed_data:
        if not storage.exists(cfg.seed_data):
            raise AssembleError(f"{cfg.seed_data}: seed data not found")
        lineage["seed_data"] = content_of(cfg.seed_data, checksums)
    lineage["tokenizer"] = tokenizer_fingerprint(cfg.tokenizer)  # the token counts in the stats
    return shards, skipped, cands[0][1], lineage


def content_of(path: str, checksums: dict[str, str], claimed: str | None = None) -> dict:
    """An input of the release as its lineage (and so its config hash) records it: path, bytes and
    sha256 of the content, so that an input edited in place with the same size is a change (issue 23).
    The sha256 is the one the generation markers record (`checksums`, `claimed`: JoinShard checks it
    as it reads the file, before anything is published), or read now for a file no worker reads."""
    if claimed is not None:
        return {"path": path, "bytes": storage.size(path), "sha256": claimed}
    if path not in checksums:
        checksums[path] = release.sha256_of(path)
    return {"path": path, "bytes": storage.size(path), "sha256": checksums[path]}


def shard_problem(layout: RunLayout, stage: str, k: int, n: int, checksums: dict[str, str],
                  deferred: list | None = None) -> str | None:
    """Why shard k of `stage` is not current (its marker, checksum or inputs: lifecycle.provenance), or
    None; `checksums` caches the inputs' sha256 across shards; `deferred` receives the checks that
    need a file's bytes, for the reader to make."""
    out = layout.generation_shard(stage, k, n)
    return provenance.problem(layout, out, layout.generation_metrics(stage, k, n), checksums=checksums,
                              deferred=deferred)


def _stage_models(cfg: AssembleConfig, shards: list[ShardInput]) -> dict[str, list[str]]:
    models: dict[str, set] = {}
    layout = cfg.layout
    for s in shards:
        for stage, _ in s.stages:
            metrics = layout.generation_metrics(stage, s.shard, s.num_shards)
            if storage.exists(metrics):
                models.setdefault(stage, set()).add(json.loads(storage.read_text(metrics)).get("model"))
    return {k: sorted(m for m in v if m) for k, v in models.items()}


def run(cfg: AssembleConfig, beam_args: list[str], run_record: dict | None = None) -> dict:
    """Plans the inputs, then publishes the release (lifecycle.release.publish) with the Beam pass,
    stats, report and card as its build step; returns its stats, with "folder": the release's. When the same config was published
    before (that version, or LATEST when no version is named) nothing is built: its stats come back
    with "reused": true. `run_record` (what bft rebuild did) goes into the manifest."""
    layout = cfg.layout
    prep_stats = prepare_stats(layout) or {}   # a damaged one is set aside: "run bft prepare first" follows
    gate = recipes.RECIPES[cfg.recipe].gate
    if cfg.min_score is None and gate and recorded_score_mode(layout, gate) == "logprob":
        cfg.min_score = gate_threshold(gate, "logprob")   # expected scores: 4.5 (AlpaGasus's threshold), not 5
    if not cfg.tokenizer:
        cfg.tokenizer = (prep_stats.get("config") or {}).get("tokenizer")
        if not cfg.tokenizer:
            raise AssembleError("no --tokenizer given and candidates/stats.json names none")
    eval_sets = decontaminate.read_eval_sets(cfg.decontaminate, cfg.decontaminate_field, cfg.decontaminate_ngram)
    shards, skipped, num_shards, lineage = plan_inputs(cfg)
    lineage["decontaminate"] = [s.content for s in eval_sets]   # another file's content: another release
    # what to do with the alerts is not what the release holds: outside the config hash
    config = {k: v for k, v in asdict(cfg).items() if k not in ("allow_empty", "fail_on_alert")}

    def build_release(folder: str, version: str) -> dict:
        """The Beam pass into `folder`, then stats.json, report and card; returns the split counts."""
        proof = prove(cfg.tokenizer)  # loaded and proved once, here (only when a release is built)
        # parts left by killed runs go; a live run's folder (another assemble on this root) is never deleted
        clear_dead_folders(layout.assemble_tmp_root)
        tmp = layout.assemble_tmp(uuid.uuid4().hex[:12])
        claim_folder(tmp)
        t0 = time.perf_counter()
        try:
            with progress.running("assemble", pipeline_options(beam_args)) as p:
                build(p, cfg, shards, num_shards, folder, tmp, eval_sets, proof)
            summary = json.loads(storage.read_text(RunLayout.summary(tmp)))
            release.number_splits(folder)  # each split numbered on its own, before the manifest lists them
            return write_stats(folder, version, summary, tmp, time.perf_counter() - t0)
        finally:
            storage.delete_tree(tmp)

    def write_stats(folder: str, version: str, summary: dict, tmp: str, pipeline_s: float) -> dict:
        """stats.json, changes/, report and card of the release the pass wrote (`tmp`: its parts)."""
        t1 = time.perf_counter()
        stats = corpus_stats.release_stats(cfg, version, summary, prep_stats, sorted(skipped),
                                           sum(skipped.values()), _stage_models(cfg, shards),
                                           [s.summary() for s in eval_sets])
        # what changed since the release LATEST names now (the parent), and the alerts (beam_pipelines/report/changes.py)
        parent = release.latest_version(layout)
        parent = parent if parent and parent != version and release._VERSION.match(parent) else None
        parent_folder = layout.release(parent) if parent else None
        if parent_folder and not storage.exists(storage.join(parent_folder, release.SUCCESS)):
            parent_folder = None
        # the new release's data files, read once: their ids (the changes) and the web examples'
        # lengths in the paper's unit (Llama-2-structure tokens, for the report)
        # (the data files listed: the manifest that will list them is written after this build)
        new_ids, lengths = {}, paper_tokens.WebLengths()
        columns = ["id", "origin"] + (["instruction", "response"] if lengths.tok is not None else [])
        for path in sorted(storage.list_files(storage.join(folder, DATA))):
            if path.endswith(".parquet"):
                table = storage.read_parquet(path, columns)
                changes.add_ids(new_ids, table)
                lengths.add(table)
        stats["parent"] = parent
        stats["changes"] = changes.changes(parent_folder, parent, new_ids, stats, write_to=(folder, tmp))
        stats["alerts"] = changes.alerts(stats, stats["changes"], cfg.validation_fraction)
        stats["trend"] = changes.trend(layout.release, parent if parent_folder else None, stats)
        stats["paper_lengths"] = lengths.result()
        stats["timing"] = {"pipeline_s": round(pipeline_s, 3),
                           "stats_in_pipeline_worker_s": round(summary.get("timing", {}).get("stats_s", 0.0), 3),
                           "pipeline_worker_s": round(summary.get("timing", {}).get("work_s", 0.0), 3)}
        from beam_pipelines import report

        report.write_report(folder, stats)
        report.write_card(folder, stats, config)
        stats["timing"]["report_s"] = round(time.perf_counter() - t1, 3)
        storage.write_text(storage.join(folder, corpus_stats.RELEASE_STATS), json.dumps(stats, indent=2) + "\n")
        return {split: stats["funnel"]["final"][split] for split in release.SPLITS}

    folder, built = release.publish(layout, version=cfg.version, config=config, lineage=lineage,
                                    build=build_release, run=run_record, hold=lambda f: held_by(cfg, f),
                                    hold_how="look at its report.html; --allow-empty publishes it as LATEST"
                                    if not cfg.fail_on_alert else "--fail-on-alert holds it on any alert")
    stats = json.loads(storage.read_text(storage.join(folder, corpus_stats.RELEASE_STATS)))
    stats["folder"] = folder  # what it wrote (or found current): the callers never work it out again
    return stats if built else {**stats, "reused": True}
