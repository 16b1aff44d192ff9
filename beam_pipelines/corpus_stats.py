"""Corpus statistics as mergeable partials: each shard computes its partial with Arrow/numpy, a Beam
combiner merges them (`merge`), and `summarize` turns the result into plain JSON; `release_stats`
makes a release's stats.json from it (the schema of that file).

A partial is a nested dict whose leaves are numbers (summed), lists of numbers (histogram counts,
summed element-wise) or `Uniques` (sets of 64-bit trigram hashes, united). Unique trigrams follow
the paper's Figure 3: NLTK's `wordpunct_tokenize` on lower-cased text (regex tokens, no downloaded
NLTK data), then `nltk.ngrams(tokens, 3)` within each text; `trigram_hashes` computes the same set
vectorized (a test checks it against NLTK itself), hashed to 64 bits.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

import schemas
from schemas.recipes import RECIPES
from schemas.outcomes import SCORE_EDGES, histogram, shard_summary, value_counts  # noqa: F401 (re-exported)

RELEASE_STATS = "stats.json"  # a release's statistics, beside its data files

# Token-length histogram bins (upper edges, tokens); the last bin is open.
LENGTH_EDGES = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


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


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sort + compare: several times faster than np.unique's hash path on uint64."""
    a = np.sort(values)
    if len(a) < 2:
        return a
    keep = np.empty(len(a), bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def merge(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out.get(k), v)
        return out
    if isinstance(a, Uniques):
        return a.merge(b)
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b)]
    return a + b


def summarize(partial):
    """Uniques -> their counts; everything else as it is (JSON-ready)."""
    if isinstance(partial, dict):
        return {k: summarize(v) for k, v in sorted(partial.items())}
    if isinstance(partial, Uniques):
        return len(partial)
    return partial


def stage_partial(stage: str, table: pa.Table) -> dict:
    """A generation stage shard's statistics (the runner's metrics compute the same)."""
    return shard_summary(table, scored=stage in ("score", "rate"))


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
        }
        if rows.num_rows and rows["score"].null_count < rows.num_rows:
            out[origin]["score_histogram"] = histogram(rows["score"], SCORE_EDGES)
    return out


# NLTK's WordPunctTokenizer pattern is r"\w+|[^\w\s]+"; RE2 spells Python's Unicode \w this way.
_WORD = r"([\p{L}\p{N}_]+)"
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def trigram_hashes(texts) -> np.ndarray:
    """64-bit hashes of the word trigrams of each text (lower-cased wordpunct tokens; a trigram
    never spans two texts), unique. Vectorized: Arrow splits, one Python hash per distinct token."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if len(texts) == 0:
        return np.empty(0, np.uint64)
    texts = pc.fill_null(texts.cast(pa.string()), "")
    spaced = pc.utf8_trim_whitespace(pc.replace_substring_regex(pc.utf8_lower(texts), _WORD, r" \1 "))
    tokens = pc.split_pattern_regex(spaced, r"\s+")
    # a blank text splits into one empty token; it has none
    tokens = pc.if_else(pc.equal(pc.utf8_length(spaced), 0), pa.scalar([], tokens.type), tokens)
    lengths = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(tokens)
    if len(flat) < 3:
        return np.empty(0, np.uint64)
    encoded = pc.dictionary_encode(flat)
    vocab = encoded.dictionary.to_pylist()
    token_hash = np.fromiter((xxhash.xxh3_64_intdigest(t.encode("utf-8")) for t in vocab), np.uint64, len(vocab))
    h = token_hash[encoded.indices.to_numpy(zero_copy_only=False)]
    row = np.repeat(np.arange(len(lengths)), lengths)
    same_text = row[:-2] == row[2:]
    with np.errstate(over="ignore"):
        tri = (h[:-2] * np.uint64(0x9E3779B97F4A7C15)) ^ _rotl(h[1:-1], 21) * np.uint64(0xC2B2AE3D27D4EB4F) ^ _rotl(h[2:], 42)
    return sorted_unique(tri[same_text] & _MASK)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


# ---- a release's stats.json ------------------------------------------------------------------------

class AccountingError(RuntimeError):
    """The counts of a pass do not add up: a bug, never a user's mistake."""


def release_stats(cfg, version: str, summary: dict, prep_stats: dict, skipped: list[int],
                  skipped_rows: int, models: dict) -> dict:
    """The release's stats.json from the merged partials of the assemble pass (`summarize`), the prepare
    stats and the driver's plan; checks that every candidate is accounted for. `cfg` is the
    AssembleConfig (recipe, threshold, tags)."""
    dropped = {k: v for k, v in (summary.get("funnel", {}).get("dropped") or {}).items() if v}
    if skipped_rows:
        dropped["missing_generation_shard"] = skipped_rows
    final = summary.get("final") or {}
    by_origin = {}
    for origin, o in final.items():
        rows = o["rows"]
        total = rows.get("train", 0) + rows.get("validation", 0)
        by_origin[origin] = {
            **{k: v for k, v in o.items() if k != "rows"},
            "rows": {"train": rows.get("train", 0), "validation": rows.get("validation", 0), "total": total},
            "avg_tokens_instruction": round(o["tokens_instruction"] / total, 2) if total else 0.0,
            "avg_tokens_response": round(o["tokens_response"] / total, 2) if total else 0.0,
        }
    web = by_origin.get("web", {}).get("rows", {}).get("total", 0)
    seed = summary.get("seed") or {"input": 0, "kept": 0, "dropped": {}}
    candidates = sum(s["rows"] for s in (prep_stats.get("shards") or {}).get("files", [])) \
        or prep_stats.get("kept", 0)
    if candidates != web + sum(dropped.values()):
        raise AccountingError(f"accounting broken: {candidates} candidates != {web} web examples + "
                              f"{sum(dropped.values())} dropped ({dropped})")
    seed_final = by_origin.get("seed", {}).get("rows", {}).get("total", 0)
    if seed_final != seed["kept"]:
        raise AccountingError(f"accounting broken: {seed['kept']} seed examples read, {seed_final} written")
    train = sum(o["rows"]["train"] for o in by_origin.values())
    validation = sum(o["rows"]["validation"] for o in by_origin.values())
    stages = {}
    for stage, s in (summary.get("stages") or {}).items():
        stages[stage] = {**s, "pass_rate": round(s["ok"] / s["rows"], 4) if s["rows"] else 0.0,
                         "model": ", ".join(models.get(stage, []))}
    recipe = RECIPES[cfg.recipe]
    score_hist = None
    if recipe.gate and recipe.gate in stages:
        score_hist = {"stage": recipe.gate, "threshold": cfg.threshold, "edges": SCORE_EDGES,
                      "counts": stages[recipe.gate].get("score_histogram")}
    seed_tag, web_tag = cfg.tags
    return {
        "version": version,
        "recipe": cfg.recipe,
        "funnel": {
            "dolma": {k: prep_stats.get(k) for k in ("input_records", "kept", "dropped")} if prep_stats else None,
            "candidates": candidates,
            "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
            "web_examples": web,
            "seed": seed,
            "final": {"train": train, "validation": validation, "total": train + validation},
        },
        "stages": stages,
        "score_histogram": score_hist,
        "by_origin": by_origin,
        "length_edges": LENGTH_EDGES,
        "tags": {"seed": seed_tag, "web": web_tag},
        "missing_shards": skipped,
        "schema_version": schemas.SCHEMA_VERSION,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
