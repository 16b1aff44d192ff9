"""The numbers the report shows, as pure functions of a release's statistics (a
schemas.release_stats.ReleaseStats, or its stats.json as a dict): the funnel in pipeline order, the
generation stages, score bars, lengths and diversity by origin, the paper's figures beside ours, the
decontamination tables. Tested without a browser; the plots and the page draw from them."""
from __future__ import annotations

import math
import os

from beam_pipelines.report.paper import PAPER_SCORE5_SHARE, PAPER_SCORE_VALID, PAPER_TABLE6, PAPER_TOO_LONG_SHARE
from schemas.drops import INPUT_TRUNCATED, Step
from schemas.recipes import RECIPES
from schemas.release_stats import ReleaseStats


def bin_labels(edges: list[float]) -> list[str]:
    labels = [f"<{edges[0]:g}"]
    labels += [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]
    return labels + [f">={edges[-1]:g}"]


def funnel_order(recipe) -> list[str]:
    """The labels of the funnel's steps in the order of recipes.verdicts: backtranslate, the gate
    stage's row, the gate, the answering stage, then curation and the drops after it."""
    judged = [s for s in recipe.stages if s != recipe.answer]
    return ([Step.MISSING_SHARDS.label()] + [Step.STAGE.label(s) for s in judged] + [Step.GATE.label(recipe.gate)]
            + ([Step.STAGE.label(recipe.answer)] if recipe.answer else [])
            + [s.label() for s in (Step.CURATION, Step.DECONTAMINATION, Step.DUPLICATES, Step.NEAR_DUPLICATES,
                                   Step.CAP, Step.OTHER)])


def funnel_rows(stats) -> list[dict]:
    """The whole funnel in pipeline order, one dict per step: `step`, `rows` (left after it), `dropped`
    (at it), `reasons` ({reason: rows}), `pct_input` (rows as % of Dolma records, None when unknown)
    and `pct_candidates`. A reason is grouped by its declared step (schemas.drops); one of a stage or
    gate this recipe does not have counts as "other"."""
    stats = ReleaseStats.of(stats)
    f = stats.funnel
    dolma = f.dolma or {}
    steps: list[dict] = []
    total_in = dolma.get("input_records")
    if total_in:
        steps.append({"step": "Dolma records read", "rows": total_in, "dropped": 0, "reasons": {}})
        prep = {k: v for k, v in (dolma.get("dropped") or {}).items() if v}
        steps.append({"step": "candidates (prepare: length filter, dedup)", "rows": f.candidates,
                      "dropped": sum(prep.values()), "reasons": prep})
    else:
        steps.append({"step": "candidates", "rows": f.candidates, "dropped": 0, "reasons": {}})
    order = funnel_order(RECIPES[stats.recipe])
    grouped: dict[str, dict] = {}
    for reason, n in f.dropped.items():
        step = reason.label() if reason.label() in order else Step.OTHER.label()
        grouped.setdefault(step, {})[str(reason)] = n
    left = f.candidates
    for step in order:
        if step in grouped:
            left -= sum(grouped[step].values())
            steps.append({"step": step, "rows": left, "dropped": sum(grouped[step].values()), "reasons": grouped[step]})
    steps.append({"step": "web examples", "rows": f.web_examples, "dropped": 0, "reasons": {}})
    seed = f.seed
    if seed.get("input"):
        steps.append({"step": "+ seed examples", "rows": f.web_examples + seed["kept"], "dropped": 0,
                      "reasons": {f"seed: {k}": v for k, v in (seed.get("dropped") or {}).items()}})
    for split in ("train", "validation"):
        steps.append({"step": f"split: {split}", "rows": getattr(f, split), "dropped": 0, "reasons": {}})
    for i, s in enumerate(steps):
        s["pct_input"] = round(100 * s["rows"] / total_in, 2) if total_in else None
        before_candidates = total_in and i == 0
        s["pct_candidates"] = round(100 * s["rows"] / f.candidates, 2) \
            if f.candidates and not before_candidates else None
    return steps


def stage_rows(stats) -> list[dict]:
    """Per generation stage, in pipeline order: model, rows, requests sent, rows not sent (by
    reason), parse failures among sent rows (by category), pass rate of the rows sent, truncated
    inputs, finish reasons, prompt and output tokens."""
    stats = ReleaseStats.of(stats)
    recipe = RECIPES[stats.recipe]
    names = [s for s in recipe.stages if s in stats.stages] + sorted(set(stats.stages) - set(recipe.stages))
    rows = []
    for name in names:
        v = stats.stages[name]
        rows.append({"stage": name, "model": model_names(v.model), "rows": v.rows, "sent": v.sent,
                     "not_sent": v.not_sent, "sent_failures": v.sent_failures,
                     "pass_rate_of_sent": v.pass_rate_of_sent, "input_truncated": v.count("input_truncated"),
                     "finish_reasons": v.count("finish_reasons", {}), "prompt_tokens": v.count("prompt_tokens"),
                     "output_tokens": v.count("output_tokens")})
    return rows


def model_name(model: str) -> str:
    """A model as a reader can look it up: a hub id (org/name) or served name as given; for a local
    or gs:// folder, its last path component, and the base model it was fine-tuned from when the
    folder holds bft train's record."""
    model = model.strip()
    is_path = model.startswith(("/", ".", "~", "gs://")) or model.count("/") > 1
    if not is_path:
        return model
    name = model.rstrip("/").rsplit("/", 1)[-1]
    marker = os.path.join(os.path.expanduser(model), "bft_train.json")
    if not model.startswith("gs://") and os.path.exists(marker):
        import json

        with open(marker) as f:
            base = (json.load(f).get("config") or {}).get("base_model")
        if base:
            return f"{name} (fine-tuned from {model_name(base)})"
    return name


def model_names(models: str | None) -> str:
    return ", ".join(model_name(m) for m in (models or "").split(",") if m.strip())


def score_bars(dist: dict) -> tuple[list[str], list[int], list[int]]:
    """(labels, kept, dropped) for one scoring stage: one bar per integer when every score is an
    integer (generate mode), else the 0.1-wide bins (logprob mode, ratings)."""
    kept, dropped = dist["kept"], dist["dropped"]
    if dist["non_integer"] == 0:
        # integer v falls into the 0.1-wide bin 10*v
        ints = list(range(0, 6))
        return [str(v) for v in ints], [kept[10 * v] for v in ints], [dropped[10 * v] for v in ints]
    return bin_labels(dist["edges"]), kept, dropped


def threshold_x(threshold: float, integer_bars: bool) -> float:
    """Where the score plot draws the gate's threshold: bar i is centred on x = i. Integer bars (one
    per score 0..5): between the last score below the threshold and the first at or over it (4.5 and
    5 both fall between bars 4 and 5, 3.2 between 3 and 4). 0.1-wide bins (bin i holds [i/10, (i+1)/10)):
    the threshold's own place, 10 * t - 0.5 (4.5 at the start of bin 45)."""
    if integer_bars:
        return math.ceil(threshold) - 0.5
    return 10 * threshold - 0.5


def diversity_rows(stats) -> list[dict]:
    """Per origin: examples, mean token lengths, and unique trigrams on the fixed-size sample."""
    stats = ReleaseStats.of(stats)
    out = []
    for origin, o in sorted(stats.by_origin.items()):
        sample = o.trigram_sample
        n = sample.get("examples", 0)
        out.append({"origin": origin, "examples": o.total,
                    "avg_tokens_instruction": o.avg_tokens("instruction"),
                    "avg_tokens_response": o.avg_tokens("response"),
                    "sample": n, "sample_complete": n >= stats.trigram_sample_size,
                    "trigrams_instruction": sample.get("unique_trigrams_instruction", 0),
                    "trigrams_response": sample.get("unique_trigrams_response", 0)})
    return out


def paper_rows(stats) -> list[list]:
    """[measure, ours, the paper's, source] wherever we measure what the paper reports."""
    stats = ReleaseStats.of(stats)
    rows = []
    web = stats.by_origin.get("web")
    row6 = PAPER_TABLE6.get(stats.recipe)
    if web and row6:
        rows.append(["web instruction length (mean tokens)", web.avg_tokens("instruction"), row6[1], f"Table 6, {row6[0]}"])
        rows.append(["web response length (mean tokens)", web.avg_tokens("response"), row6[2], f"Table 6, {row6[0]}"])
        lengths = stats.paper_lengths
        if lengths:  # recounted in the paper's unit (beam_pipelines/tokens/paper_tokens.py)
            rows.append([f"web instruction length (mean {lengths['tokenizer']} tokens)", lengths["instruction"],
                         row6[1], f"Table 6, {row6[0]}"])
            rows.append([f"web response length (mean {lengths['tokenizer']} tokens)", lengths["response"],
                         row6[2], f"Table 6, {row6[0]}"])
    score = stats.stages.get("score")
    if score and score.count("sent"):
        failures = sum(score.sent_failures.values())
        rows.append(["score valid (1..5) among pairs scored", pct((score.sent - failures) / score.sent * 100),
                     pct(PAPER_SCORE_VALID * 100), "Sec. 3 (88%)"])
        hist = score.score_histogram
        if sum(hist):
            rows.append(["score 5 among valid scores", pct(round(100 * sum(hist[10:]) / sum(hist), 1)),
                         pct(PAPER_SCORE5_SHARE * 100), "Sec. 3 (13.6%)"])
    dolma = stats.funnel.dolma or {}
    dropped = dolma.get("dropped") or {}
    head = dolma.get("input_records", 0) - dropped.get("other_split", 0)
    if head:   # every length drop: prepare's limit, and the pairs of a document cut in a stage's prompt
        cut = sum(n for reason, n in stats.funnel.dropped_at(Step.STAGE).items() if reason.detail == INPUT_TRUNCATED)
        rows.append(["head-split records removed as too long", pct(round(100 * (dropped.get("too_long", 0) + cut) / head, 1)),
                     f"~{pct(PAPER_TOO_LONG_SHARE * 100)}", "Sec. 3 (about 25%)"])
    return rows


def pct(v) -> str:
    """A percentage (already x100) as the report prints it: "12.5%", "-" when there is none."""
    return "-" if v is None else f"{v:g}%"


def normalized(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def decontamination_rows(stats) -> tuple[list[list], list[list]]:
    """([set, file, sha256, prompts, n-grams, prompts shorter than n, prompts ignored (too few words, with
    examples), pairs dropped] per evaluation set, [id, set, field, shared n-gram, evaluation prompt] per
    dropped pair)."""
    d = ReleaseStats.of(stats).decontamination or {}
    sets = [[s["name"], s["path"], s["sha256"][:12], s["prompts"], s["ngrams"], s["short_prompts"],
             ignored(s), (d.get("dropped") or {}).get(s["name"], 0)] for s in d.get("sets") or []]
    pairs = [[p["id"], p["set"], p["field"], p["ngram"], p["prompt"]] for p in d.get("pairs") or []]
    return sets, pairs


def ignored(s: dict) -> str:
    """An evaluation set's prompts ignored for their few words: their count and the first few, quoted."""
    n = s.get("ignored_prompts") or 0
    return f"{n:,}" + (": " + "; ".join(repr(p) for p in s.get("ignored_examples") or []) if n else "")
