"""Corpus statistics as mergeable partials: each shard computes its partial with Arrow/numpy, a Beam
combiner merges them (`merge`: the one rule of schemas.release_stats), and `summarize` turns the
result into plain JSON; `release_stats` makes a release's stats.json from it (a
schemas.release_stats.ReleaseStats).

A partial is a nested dict whose leaves are numbers (summed), lists of numbers (histogram counts,
summed element-wise), `Uniques` (sets of 64-bit trigram hashes, united) or `Smallest` (the k rows
with the smallest keys: example rows for the report, and the fixed-size trigram sample; bounded, so
partials stay small whatever the corpus size, and deterministic: the same rows whatever the
sharding). Unique trigrams follow the paper's Figure 3 (beam_pipelines.assemble.trigrams).
"""
from __future__ import annotations

import heapq
import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

import schemas
from schemas import drops
from schemas.outcomes import SCORE_EDGES, categories, histogram, shard_summary, value_counts  # noqa: F401 (re-exported)
from schemas.recipes import GATE_STAGES, RECIPES
from lifecycle.release import code_revision
# the partials merge by the one rule of the statistics (`merge`, used by assemble's combiners)
from schemas.release_stats import Funnel, GateStats, OriginStats, ReleaseStats, StageStats, merge  # noqa: F401
from beam_pipelines.assemble.decontaminate import BAND_ROWS, SHINGLE_WORDS, SIGNATURE_BANDS
from beam_pipelines.assemble.trigrams import sorted_unique, trigram_hashes, trigrams_per_text

# Token-length histogram bins (upper edges, tokens); the last bin is open.
LENGTH_EDGES = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
# Score distributions per scoring stage, in 0.1-wide bins (bin i holds [i/10, (i+1)/10)): integer
# scores (generate mode) fall on bins 0, 10, ..., 50; logprob scores and ratings anywhere.
FINE_SCORE_EDGES = [i / 10 for i in range(1, 56)]
# Example rows carried to the report: kept pairs, and per drop reason; texts cut to TEXT_CHARS.
KEPT_EXAMPLES = 5
EXAMPLES_PER_REASON = 1
TEXT_CHARS = 600
# Unique trigrams are counted on a fixed-size sample (the examples with the smallest id hashes) so
# that corpora and origins of different sizes compare: the number grows sublinearly with size.
TRIGRAM_SAMPLE = 1000
# The report's browsable sample: BROWSE_SAMPLE examples, an equal share from each stratum (origin and
# score bucket) as far as it has examples, each stratum's drawn by sample key (deterministic: the same
# rows whatever the sharding or the runner).
BROWSE_SAMPLE = 200


class Uniques:
    """A set of uint64 hashes. Merging only collects the parts; they are united (one concatenate +
    np.unique) when counted or pickled, so merging k partials costs one sort, not k."""

    __slots__ = ("parts",)

    def __init__(self, values: np.ndarray | None = None):
        self.parts = [sorted_unique(values)] if values is not None and len(values) else []

    def merge(self, other: "Uniques") -> "Uniques":
        out = Uniques()
        out.parts = self.parts + other.parts
        return out

    def values(self) -> np.ndarray:
        if len(self.parts) > 1:
            self.parts = [sorted_unique(np.concatenate(self.parts))]
        return self.parts[0] if self.parts else np.empty(0, np.uint64)

    def __getstate__(self):
        return {"parts": [self.values()]}

    def __setstate__(self, state):
        self.parts = state["parts"]

    def __len__(self) -> int:
        return len(self.values())


class Smallest:
    """The `k` rows with the smallest keys, as (key, payload) pairs; merging keeps the k smallest of
    both. Keys must be unique across partials (ids, or hashes of ids), so the result does not
    depend on the order of merges."""

    __slots__ = ("k", "rows")

    def __init__(self, k: int, rows=()):
        self.k = k
        self.rows = heapq.nsmallest(k, rows, key=lambda r: r[0])

    def merge(self, other: "Smallest") -> "Smallest":
        return type(self)(self.k, self.rows + other.rows)

    def summary(self):
        return [payload for _, payload in self.rows]


class Every(Smallest):
    """Every row, ordered by key (unbounded): a list the report gives whole, such as the pairs dropped
    as contaminated (few by nature; each must be shown)."""

    def __init__(self, k=None, rows=()):
        self.k, self.rows = None, sorted(rows, key=lambda r: r[0])


class TrigramSample(Smallest):
    """Per example (key = hash of its id): its instruction and response trigram hashes. Summary:
    the number of examples and the unique trigrams over them (at most TRIGRAM_SAMPLE examples)."""

    def summary(self) -> dict:
        out = {"examples": len(self.rows)}
        for i, field in enumerate(("instruction", "response")):
            parts = [p[i] for _, p in self.rows]
            out[f"unique_trigrams_{field}"] = len(sorted_unique(np.concatenate(parts))) if parts else 0
        return out


def summarize(partial):
    """Uniques -> their counts, Smallest -> their summaries; everything else as it is (JSON-ready)."""
    if isinstance(partial, dict):
        return {k: summarize(v) for k, v in sorted(partial.items())}
    if isinstance(partial, Uniques):
        return len(partial)
    if isinstance(partial, Smallest):
        return partial.summary()
    return partial


def shard_partial(stages: dict[str, pa.Table], joined: pa.Table, reason: pa.Array, recipe,
                  threshold: float | None = None) -> dict:
    """A joined shard's statistics, in one call after its rows are decided (assemble's JoinShard):
    every stage read (the recipe's and any other run), the funnel's drops, the scores (with the rows
    scored at or over the gate's `threshold`), the examples."""
    from beam_pipelines.assemble import recipes

    return {"stages": {stage: stage_partial(stage, table) for stage, table in stages.items()},
            "funnel": {"dropped": value_counts(pc.drop_null(reason))},
            "scores": score_partial(joined, reason, recipe.stages, recipe.gate, threshold),
            "examples": example_partial(joined, reason, joined["backtranslate.instruction"],
                                        recipes.response_column(joined, recipe), recipe.gate, recipe.stages)}


def stage_partial(stage: str, table: pa.Table) -> dict:
    """A generation stage shard's statistics (the runner's metrics compute the same), plus what the
    report needs about requests: rows sent to the model (`sent`: a finish reason is set), rows not
    sent by their parse_error (`not_sent`: e.g. `not_sent: below_gate`, `upstream_failed:echo`), and
    parse failures among the rows sent (`sent_failures`, by category)."""
    out = shard_summary(table, scored=stage in GATE_STAGES)
    sent = pc.is_valid(table["finish_reason"])
    errors = table["parse_error"]
    out["sent"] = int(pc.sum(sent.cast(pa.int64())).as_py() or 0)
    out["not_sent"] = value_counts(pc.filter(errors, pc.invert(sent)), null="unknown")
    out["sent_failures"] = value_counts(pc.drop_null(categories(pc.filter(errors, sent))))
    if stage in GATE_STAGES and "reasoning" in table.column_names:
        from schemas.outcomes import digit_mass

        mass = [m for m in map(digit_mass, table["reasoning"].to_pylist()) if m is not None]
        if mass:   # logprob scores: how much probability the digits had (a mean over rows, when merged)
            out["digit_mass"] = {"rows": len(mass), "sum": float(sum(mass))}
    return out


def score_partial(joined: pa.Table, reason: pa.Array, stages, gate: str | None = None,
                  threshold: float | None = None) -> dict:
    """Per scoring stage among `stages`: 0.1-wide score histograms of the rows the release keeps
    and of those it drops (for any reason), how many scores are not integers, and for the `gate`
    stage the rows with a score (`scored`) and those at or over `threshold` (`passed`)."""
    out = {}
    kept = pc.is_null(reason)
    for stage in stages:
        if stage not in GATE_STAGES:
            continue
        score = joined[f"{stage}.score"]
        valid = pc.drop_null(score)
        out[stage] = {"kept": histogram(pc.filter(score, kept), FINE_SCORE_EDGES),
                      "dropped": histogram(pc.filter(score, pc.invert(kept)), FINE_SCORE_EDGES),
                      "non_integer": int(pc.sum(pc.not_equal(valid, pc.floor(valid)).cast(pa.int64())).as_py() or 0)}
        if stage == gate and threshold is not None:
            out[stage]["scored"] = len(valid)
            out[stage]["passed"] = int(pc.sum(pc.greater_equal(valid, threshold).cast(pa.int64())).as_py() or 0)
    return out


def report_extras(summary: dict, config: dict) -> dict:
    """What a release's stats.json carries for the report beside the counts, from the merged
    partials (`summarize`d): example rows, score distributions per scoring stage, the trigram
    sample size, the assemble config and the code revision."""
    examples = summary.get("examples") or {}
    return {"examples": {"kept": examples.get("kept") or [],
                         "dropped": {r: e for r, e in sorted((examples.get("dropped") or {}).items()) if e}},
            "browse": browse_sample(summary.get("browse")),
            "score_distributions": {stage: {**d, "edges": FINE_SCORE_EDGES}
                                    for stage, d in (summary.get("scores") or {}).items()},
            "trigram_sample_size": TRIGRAM_SAMPLE,
            "config": config,
            "code_revision": code_revision()}


def _cut(values: list) -> list:
    return [v if v is None or len(v) <= TEXT_CHARS else v[:TEXT_CHARS] + " [...]" for v in values]


def example_rows(table: pa.Table, instruction, response, reason=None, detail=None, source=None,
                 raw=None) -> list[tuple[str, dict]]:
    """(id, example) pairs for the report: id, instruction, response (cut), score, url, reason and
    the failing stage's parse error, the source document's excerpt and (a dropped row) what the failing
    stage's model wrote. Columns may be arrays of `table`'s length or None."""
    n = table.num_rows
    cols = {"id": table["id"].to_pylist(),
            "source": _cut(source.to_pylist()) if source is not None else [None] * n,
            "raw_output": _cut(raw.to_pylist()) if raw is not None else [None] * n,
            "instruction": _cut(instruction.to_pylist()), "response": _cut(response.to_pylist()),
            "score": table["score"].to_pylist() if "score" in table.column_names else [None] * table.num_rows,
            "url": table["url"].to_pylist() if "url" in table.column_names else [None] * table.num_rows,
            "reason": reason.to_pylist() if reason is not None else [None] * table.num_rows,
            "detail": detail.to_pylist() if detail is not None else [None] * table.num_rows}
    return [(row_id, {k: cols[k][i] for k in cols}) for i, row_id in enumerate(cols["id"])]


def example_partial(joined: pa.Table, reason: pa.Array, instruction, response, gate: str | None,
                    stages) -> dict:
    """The smallest-id kept pairs and, per drop reason, the smallest-id dropped rows, as `Smallest`
    partials. `joined` is recipes.join_stages' table (sorted by id; with `url` from the candidates)."""
    if joined.num_rows == 0:   # an empty shard (pyarrow's indices_nonzero crashes on its empty mask)
        return {"kept": Smallest(KEPT_EXAMPLES), "dropped": {}}
    table = joined.select(["id", "url"])
    if gate:
        table = table.append_column("score", joined[f"{gate}.score"])
    # the first stage error in pipeline order: what made a `<stage>:<category>` drop, and what that
    # stage's model wrote (its raw output)
    detail = pa.nulls(joined.num_rows, pa.string())
    raw = pa.nulls(joined.num_rows, pa.string())
    for stage in stages:
        failed_here = pc.and_(pc.is_null(detail), pc.is_valid(joined[f"{stage}.parse_error"]))
        if f"{stage}.raw_output" in joined.column_names:
            raw = pc.if_else(failed_here, joined[f"{stage}.raw_output"], raw)
        detail = pc.coalesce(detail, joined[f"{stage}.parse_error"])
    source = joined["text"] if "text" in joined.column_names else None

    def first(mask, k: int, with_reason: bool) -> Smallest:
        # joined is sorted by id: the first k rows of a mask are its k smallest ids
        idx = pc.indices_nonzero(pc.fill_null(mask, False)).slice(0, k)
        return Smallest(k, example_rows(table.take(idx), instruction.take(idx), response.take(idx),
                                        reason.take(idx) if with_reason else None,
                                        detail.take(idx) if with_reason else None,
                                        source.take(idx) if source is not None else None,
                                        raw.take(idx) if with_reason else None))

    return {"kept": first(pc.is_null(reason), KEPT_EXAMPLES, False),
            "dropped": {r: first(pc.equal(reason, r), EXAMPLES_PER_REASON, True)
                        for r in pc.unique(pc.drop_null(reason)).to_pylist()}}


def final_partial(table: pa.Table, split: str) -> dict:
    """Final examples of one split file, by origin: counts, token sums, length histograms, trigrams."""
    out: dict = {}
    for origin in pc.unique(table["origin"]).to_pylist():
        rows = table.filter(pc.equal(table["origin"], origin))
        out[origin] = {
            "rows": {split: rows.num_rows},
            "tokens_instruction": int(pc.sum(rows["n_tokens_instruction"]).as_py() or 0),
            "tokens_response": int(pc.sum(rows["n_tokens_response"]).as_py() or 0),
            "chars_instruction": int(pc.sum(pc.utf8_length(rows["instruction"])).as_py() or 0),
            "chars_response": int(pc.sum(pc.utf8_length(rows["response"])).as_py() or 0),
            "length_histogram_instruction": histogram(rows["n_tokens_instruction"], LENGTH_EDGES),
            "length_histogram_response": histogram(rows["n_tokens_response"], LENGTH_EDGES),
            "unique_trigrams_instruction": Uniques(trigram_hashes(rows["instruction"])),
            "unique_trigrams_response": Uniques(trigram_hashes(rows["response"])),
            "trigram_sample": trigram_sample(rows),
        }
        if rows.num_rows and rows["score"].null_count < rows.num_rows:
            out[origin]["score_histogram"] = histogram(rows["score"], SCORE_EDGES)
    return out


def stratum(origin: str, score) -> str:
    """The browse sample's stratum of an example: its origin, and for a web example its score bucket
    (the score's integer part)."""
    if origin != "web":
        return origin
    return "web, no score" if score is None else f"web, score {int(score)}"


def browse_partial(table: pa.Table, split: str, seed: int) -> dict:
    """Per stratum, the examples of one split file that rank first by (sample key, id): at most
    BROWSE_SAMPLE each (`browse_sample` picks from them), and every stratum's size."""
    from schemas.keys import sample_key

    strata: dict[str, list] = {}
    cols = {c: table[c].to_pylist() for c in ("id", "origin", "score", "instruction", "response", "url")}
    for i, doc_id in enumerate(cols["id"]):
        row = {c: cols[c][i] for c in cols}
        row.update(split=split, stratum=stratum(row["origin"], row["score"]),
                   instruction=_cut([row["instruction"]])[0], response=_cut([row["response"]])[0])
        strata.setdefault(row["stratum"], []).append(((sample_key(doc_id, seed), doc_id), row))
    return {"rows": {s: Smallest(BROWSE_SAMPLE, rows) for s, rows in strata.items()},
            "counts": {s: len(rows) for s, rows in strata.items()}}


def browse_sample(browse: dict | None, n: int = BROWSE_SAMPLE) -> dict:
    """`n` examples from the summarized browse partials: round robin over the strata (sorted), each
    stratum's in sample-key order, so that a small stratum (a rare score) is seen as well as a large
    one; with every stratum's size."""
    strata = (browse or {}).get("rows") or {}
    queues = [list(strata[s]) for s in sorted(strata)]
    rows: list[dict] = []
    while len(rows) < n and any(queues):
        for q in queues:
            if q and len(rows) < n:
                rows.append(q.pop(0))
    return {"rows": rows, "strata": dict(sorted(((browse or {}).get("counts") or {}).items()))}


def trigram_sample(table: pa.Table) -> TrigramSample:
    """The TRIGRAM_SAMPLE examples of `table` with the smallest id hashes, with their trigrams."""
    keys = np.fromiter((xxhash.xxh3_64_intdigest(i.encode("utf-8")) for i in table["id"].to_pylist()), np.uint64,
                       table.num_rows)
    idx = np.argsort(keys, kind="stable")[:TRIGRAM_SAMPLE]
    rows = table.take(pa.array(idx, pa.int64()))
    instr, resp = trigrams_per_text(rows["instruction"]), trigrams_per_text(rows["response"])
    return TrigramSample(TRIGRAM_SAMPLE, [(int(keys[i]), (a, b)) for i, a, b in zip(idx, instr, resp)])


# ---- a release's stats.json ------------------------------------------------------------------------

class AccountingError(RuntimeError):
    """The counts of a pass do not add up: a bug, never a user's mistake."""


def release_stats(cfg, version: str, summary: dict, prep_stats: dict, skipped: list[int],
                  skipped_rows: int, models: dict, eval_sets: list[dict] = (), threshold: float | None = None) -> dict:
    """The release's stats.json (ReleaseStats.to_dict) from the merged partials of the assemble pass
    (`summarize`), the prepare stats and the driver's plan; checks that every candidate is accounted
    for. `cfg` is the AssembleConfig (recipe, tags, decontamination and near-duplicate
    options); `eval_sets`: the --decontaminate files' summaries (decontaminate.EvalSet.summary)."""
    dropped = {drops.parse(k): v for k, v in (summary.get("funnel", {}).get("dropped") or {}).items() if v}
    if skipped_rows:
        dropped[drops.MISSING_SHARD] = skipped_rows
    by_origin = {origin: OriginStats({k: v for k, v in o.items() if k != "rows"}, o["rows"].get("train", 0),
                                     o["rows"].get("validation", 0))
                 for origin, o in (summary.get("final") or {}).items()}
    web = by_origin["web"].total if "web" in by_origin else 0
    seed = summary.get("seed") or {"input": 0, "kept": 0, "dropped": {}}
    candidates = sum(s["rows"] for s in (prep_stats.get("shards") or {}).get("files", [])) \
        or prep_stats.get("kept", 0)
    if candidates != web + sum(dropped.values()):
        raise AccountingError(f"accounting broken: {candidates} candidates != {web} web examples + "
                              f"{sum(dropped.values())} dropped ({dropped})")
    seed_final = by_origin["seed"].total if "seed" in by_origin else 0
    if seed_final != seed["kept"]:
        raise AccountingError(f"accounting broken: {seed['kept']} seed examples read, {seed_final} written")
    stages = {stage: StageStats(s, ", ".join(models.get(stage, [])))
              for stage, s in (summary.get("stages") or {}).items()}
    funnel = Funnel(candidates, dict(sorted(dropped.items(), key=lambda kv: -kv[1])), web,
                    {k: prep_stats.get(k) for k in ("input_records", "kept", "dropped")} if prep_stats else None,
                    seed, sum(o.train for o in by_origin.values()), sum(o.validation for o in by_origin.values()))
    recipe = RECIPES[cfg.recipe]
    score_hist = gate = None
    if recipe.gate and recipe.gate in stages:
        score_hist = {"stage": recipe.gate, "threshold": threshold, "edges": SCORE_EDGES,
                      "counts": stages[recipe.gate].counts.get("score_histogram")}
        scores = (summary.get("scores") or {}).get(recipe.gate) or {}
        gate = GateStats(recipe.gate, threshold, scores.get("scored", 0), scores.get("passed", 0),
                         stages[recipe.gate].digit_mass_mean)
    seed_tag, web_tag = cfg.tags
    return ReleaseStats(
        version=version, recipe=cfg.recipe, funnel=funnel, stages=stages, score_histogram=score_hist, gate=gate,
        by_origin=by_origin, length_edges=LENGTH_EDGES, tags={"seed": seed_tag, "web": web_tag},
        decontamination=decontamination_stats(cfg, summary, dropped, eval_sets),
        near_duplicate_instructions={
            "threshold": cfg.near_dup_instruction_threshold or None, "shingle_words": SHINGLE_WORDS,
            "bands": SIGNATURE_BANDS, "rows_per_band": BAND_ROWS, "dropped": dropped.get(drops.NEAR_DUPLICATE, 0)},
        **report_extras(summary, asdict(cfg)),
        missing_shards=skipped, schema_version=schemas.SCHEMA_VERSION,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())).to_dict()


def decontamination_stats(cfg, summary: dict, dropped: dict, eval_sets: list[dict]) -> dict:
    """stats.json's decontamination: the n-gram length, each evaluation set (file, sha256, prompts,
    n-grams), the pairs dropped per set, and every dropped pair with the n-gram it shares."""
    pairs = (summary.get("decontamination") or {}).get("pairs") or []
    return {"ngram": cfg.decontaminate_ngram, "sets": list(eval_sets),
            "dropped": {s["name"]: dropped.get(drops.contaminated(s["name"]), 0) for s in eval_sets},
            "pairs": pairs}
