"""What a data team reads before training: report.html with PNG plots, and the dataset card
(README.md with the Hugging Face YAML header), both written from the release's stats.json alone.

The report, top to bottom: provenance (config, models, code revision, links to the card, manifest
and stats), the whole funnel from Dolma records to train/validation in one table and one plot,
per-stage request statistics, score distributions per scoring stage (kept vs dropped), lengths and
diversity comparable across origins (normalized histograms, unique trigrams on a fixed-size sample),
decontamination (each evaluation set, and every pair dropped with the n-gram it shares), example
rows (kept pairs and one dropped row per drop reason), and a sample to browse (stratified by origin and
score bucket) with a filter box, the page's one script (allowed by its hash in the CSP).
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import os
import re

from beam_pipelines.report.changes import pct
from beam_pipelines.assemble.corpus_stats import LENGTH_EDGES
from beam_pipelines.assemble.decontaminate import CONTAMINATED, MIN_PROMPT_WORDS, NEAR_DUPLICATE
from schemas.keys import validation_size
from schemas.recipes import CURATION_DROPS, RECIPES
import storage

PLOTS = ("funnel", "scores", "lengths", "trigrams")

# The paper's own figures for comparison (Nguyen et al. 2024, as ../shared/PAPER.md copies them): Table 6
# average lengths in Llama-2 tokens (instruction, response) per data variant, the score validity and the
# score-5 share of the scored pool, and the share of the Common Crawl subset removed as too long.
# Figure 3 (trigrams) is published as a plot only: no number to put beside ours.
PAPER = "https://arxiv.org/abs/2408.04614"
PAPER_TABLE6 = {"filter": ("Dolma + filtering", 69, 499), "rewrite": ("Dolma + rewriting", 58, 449),
                "filter+rewrite": ("Dolma + filtering + rewriting", 69, 468),
                "filter+distill": ("Dolma + filtering + distilling", 69, 567)}
PAPER_SCORE_VALID = 0.88     # the regex-extracted score is valid (1..5) 88% of the time
PAPER_SCORE5_SHARE = 0.136   # score 5 makes up 13.6% of the pool
PAPER_TOO_LONG_SHARE = 0.25  # about 25% of the Common Crawl subset removed as too long



def _bin_labels(edges: list[float]) -> list[str]:
    labels = [f"<{edges[0]:g}"]
    labels += [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]
    return labels + [f">={edges[-1]:g}"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


# ---- the numbers the report shows (pure functions of stats; tested without a browser) -------------

def _step_of(reason: str, stages: list[str], gate: str | None) -> str:
    """The funnel step at which an assemble drop reason removed a row."""
    if reason == "missing_generation_shard":
        return "missing generation shards"
    if gate and reason in (f"{gate}_below_threshold", f"{gate}:no_score"):
        return f"gate: {gate} below threshold"
    for stage in stages:
        if reason.startswith(f"{stage}:"):
            return f"{stage}: failed or missing"
    if reason in CURATION_DROPS:
        return "curation: length or empty"
    if reason.startswith(CONTAMINATED):
        return "decontamination (--decontaminate)"
    if reason == "duplicate_instruction":
        return "curation: duplicate instructions"
    if reason == NEAR_DUPLICATE:
        return "curation: near-duplicate instructions"
    if reason == "over_cap":
        return "cap (--max-examples)"
    return "other"


def funnel_rows(stats: dict) -> list[dict]:
    """The whole funnel in pipeline order, one dict per step: `step`, `rows` (left after it), `dropped`
    (at it), `reasons` ({reason: rows}), `pct_input` (rows as % of Dolma records, None when unknown)
    and `pct_candidates`."""
    f = stats["funnel"]
    recipe = RECIPES[stats["recipe"]]
    dolma = f.get("dolma") or {}
    steps: list[dict] = []
    total_in = dolma.get("input_records")
    if total_in:
        steps.append({"step": "Dolma records read", "rows": total_in, "dropped": 0, "reasons": {}})
        prep = {k: v for k, v in (dolma.get("dropped") or {}).items() if v}
        steps.append({"step": "candidates (prepare: length filter, dedup)", "rows": f["candidates"],
                      "dropped": sum(prep.values()), "reasons": prep})
    else:
        steps.append({"step": "candidates", "rows": f["candidates"], "dropped": 0, "reasons": {}})
    # the order of recipes.verdicts: backtranslate, the gate stage's row, the gate, the answering stage
    judged = [s for s in recipe.stages if s != recipe.answer]
    order = (["missing generation shards"] + [f"{s}: failed or missing" for s in judged]
             + [f"gate: {recipe.gate} below threshold"]
             + ([f"{recipe.answer}: failed or missing"] if recipe.answer else [])
             + ["curation: length or empty", "decontamination (--decontaminate)",
                "curation: duplicate instructions", "curation: near-duplicate instructions",
                "cap (--max-examples)", "other"])
    grouped: dict[str, dict] = {}
    for reason, n in f["dropped"].items():
        grouped.setdefault(_step_of(reason, recipe.stages, recipe.gate), {})[reason] = n
    left = f["candidates"]
    for step in order:
        if step in grouped:
            left -= sum(grouped[step].values())
            steps.append({"step": step, "rows": left, "dropped": sum(grouped[step].values()), "reasons": grouped[step]})
    steps.append({"step": "web examples", "rows": f["web_examples"], "dropped": 0, "reasons": {}})
    seed = f.get("seed") or {}
    if seed.get("input"):
        steps.append({"step": "+ seed examples", "rows": f["web_examples"] + seed["kept"], "dropped": 0,
                      "reasons": {f"seed: {k}": v for k, v in (seed.get("dropped") or {}).items()}})
    for split in ("train", "validation"):
        steps.append({"step": f"split: {split}", "rows": f["final"][split], "dropped": 0, "reasons": {}})
    for i, s in enumerate(steps):
        s["pct_input"] = round(100 * s["rows"] / total_in, 2) if total_in else None
        before_candidates = total_in and i == 0
        s["pct_candidates"] = round(100 * s["rows"] / f["candidates"], 2) \
            if f["candidates"] and not before_candidates else None
    return steps


def stage_rows(stats: dict) -> list[dict]:
    """Per generation stage, in pipeline order: model, rows, requests sent, rows not sent (by
    reason), parse failures among sent rows (by category), pass rate of the rows sent, truncated
    inputs, finish reasons, prompt and output tokens."""
    recipe = RECIPES[stats["recipe"]]
    names = [s for s in recipe.stages if s in stats["stages"]] + sorted(set(stats["stages"]) - set(recipe.stages))
    rows = []
    for name in names:
        v = stats["stages"][name]
        rows.append({"stage": name, "model": model_names(v.get("model")), "rows": v["rows"],
                     "sent": v.get("sent", v["rows"]), "not_sent": v.get("not_sent") or {},
                     "sent_failures": v.get("sent_failures", v.get("parse_failures")) or {},
                     "pass_rate_of_sent": round(v["ok"] / v["sent"], 4) if v.get("sent") else v["pass_rate"],
                     "input_truncated": v["input_truncated"], "finish_reasons": v["finish_reasons"],
                     "prompt_tokens": v["prompt_tokens"], "output_tokens": v["output_tokens"]})
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
    return _bin_labels(dist["edges"]), kept, dropped


def threshold_x(threshold: float, integer_bars: bool) -> float:
    """Where the score plot draws the gate's threshold: bar i is centred on x = i. Integer bars (one
    per score 0..5): between the last score below the threshold and the first at or over it (4.5 and
    5 both fall between bars 4 and 5, 3.2 between 3 and 4). 0.1-wide bins (bin i holds [i/10, (i+1)/10)):
    the threshold's own place, 10 * t - 0.5 (4.5 at the start of bin 45)."""
    if integer_bars:
        return math.ceil(threshold) - 0.5
    return 10 * threshold - 0.5


def diversity_rows(stats: dict) -> list[dict]:
    """Per origin: examples, mean token lengths, and unique trigrams on the fixed-size sample."""
    out = []
    size = stats.get("trigram_sample_size", 1000)
    for origin, o in sorted(stats["by_origin"].items()):
        sample = o.get("trigram_sample") or {}
        n = sample.get("examples", 0)
        out.append({"origin": origin, "examples": o["rows"]["total"],
                    "avg_tokens_instruction": o["avg_tokens_instruction"],
                    "avg_tokens_response": o["avg_tokens_response"],
                    "sample": n, "sample_complete": n >= size,
                    "trigrams_instruction": sample.get("unique_trigrams_instruction", 0),
                    "trigrams_response": sample.get("unique_trigrams_response", 0)})
    return out


def paper_rows(stats: dict) -> list[list]:
    """[measure, ours, the paper's, source] wherever we measure what the paper reports."""
    rows = []
    web = (stats.get("by_origin") or {}).get("web")
    row6 = PAPER_TABLE6.get(stats.get("recipe"))
    if web and row6:
        rows.append(["web instruction length (mean tokens)", web["avg_tokens_instruction"], row6[1], f"Table 6, {row6[0]}"])
        rows.append(["web response length (mean tokens)", web["avg_tokens_response"], row6[2], f"Table 6, {row6[0]}"])
        lengths = stats.get("paper_lengths")
        if lengths:  # recounted in the paper's unit (beam_pipelines/tokens/paper_tokens.py)
            rows.append([f"web instruction length (mean {lengths['tokenizer']} tokens)", lengths["instruction"],
                         row6[1], f"Table 6, {row6[0]}"])
            rows.append([f"web response length (mean {lengths['tokenizer']} tokens)", lengths["response"],
                         row6[2], f"Table 6, {row6[0]}"])
    score = (stats.get("stages") or {}).get("score")
    if score and score.get("sent"):
        failures = sum((score.get("sent_failures") or {}).values())
        rows.append(["score valid (1..5) among pairs scored", _pct((score["sent"] - failures) / score["sent"] * 100),
                     _pct(PAPER_SCORE_VALID * 100), "Sec. 3 (88%)"])
        hist = score.get("score_histogram") or []
        if sum(hist):
            rows.append(["score 5 among valid scores", _pct(round(100 * sum(hist[10:]) / sum(hist), 1)),
                         _pct(PAPER_SCORE5_SHARE * 100), "Sec. 3 (13.6%)"])
    dolma = (stats.get("funnel") or {}).get("dolma") or {}
    dropped = dolma.get("dropped") or {}
    head = dolma.get("input_records", 0) - dropped.get("other_split", 0)
    if head:   # every length drop: prepare's limit, and the pairs of a document cut in a stage's prompt
        cut = sum(n for reason, n in ((stats.get("funnel") or {}).get("dropped") or {}).items()
                  if reason.endswith(":input_truncated"))
        rows.append(["head-split records removed as too long", _pct(round(100 * (dropped.get("too_long", 0) + cut) / head, 1)),
                     f"~{_pct(PAPER_TOO_LONG_SHARE * 100)}", "Sec. 3 (about 25%)"])
    return rows


def normalized(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


# ---- plots -------------------------------------------------------------------------------------------

def plots(stats: dict) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    steps = funnel_rows(stats)
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(steps) + 1))
    labels = [s["step"] for s in steps][::-1]
    values = [s["rows"] for s in steps][::-1]
    colors = ["#7a7" if s["step"].startswith("split") else "#48a" for s in steps][::-1]
    ax.barh(labels, values, color=colors)
    # a linear scale: bar lengths compare as the counts do (a log scale made 169 and 120 look equal);
    # every bar carries its count and share
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#48a", label="rows left after the step"),
                       Patch(color="#7a7", label="rows in a released split")], fontsize=8, loc="lower right")
    for y, s in enumerate(steps[::-1]):
        pct = s["pct_input"] if s["pct_input"] is not None else s["pct_candidates"]
        ax.text(max(s["rows"], 1), y, f" {s['rows']:,}" + (f" ({pct:g}%)" if pct is not None else ""),
                va="center", fontsize=8)
    base = "Dolma records" if steps[0]["pct_input"] is not None else "candidates"
    ax.set_title(f"Rows left after each step (% of {base})")
    ax.set_xlabel("rows")
    out["funnel"] = _png(fig)

    dists = stats.get("score_distributions") or {}
    fig, axes = plt.subplots(1, max(len(dists), 1), figsize=(6.5 * max(len(dists), 1), 3), squeeze=False)
    if not dists:
        axes[0][0].text(0.5, 0.5, "no scoring stage in this recipe", ha="center")
        axes[0][0].set_axis_off()
    gate = (stats.get("score_histogram") or {})
    for ax, (stage, dist) in zip(axes[0], sorted(dists.items())):
        labels, kept, dropped = score_bars(dist)
        x = range(len(labels))
        ax.bar(x, kept, color="#48a", label="kept in the release")
        ax.bar(x, dropped, bottom=kept, color="#c44",
               label="dropped: below the gate, or later (curation, a failed answer)")
        if dist["non_integer"] == 0:
            ax.set_xticks(list(x), labels)
        else:  # 0.1-wide bins: bin 10*v starts at score v
            ax.set_xticks([10 * v for v in range(6)], [str(v) for v in range(6)])
        mode = "integer scores" if dist["non_integer"] == 0 else "continuous scores"
        ax.set_title(f"{stage} stage: {mode}, kept vs dropped")
        ax.set_xlabel("score")
        ax.set_ylabel("rows")
        if gate.get("stage") == stage and gate.get("threshold") is not None:
            ax.axvline(threshold_x(gate["threshold"], dist["non_integer"] == 0), color="#333", linestyle="--",
                       label=f"threshold {gate['threshold']:g}")
        ax.legend(fontsize=8)
    out["scores"] = _png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    labels = _bin_labels(LENGTH_EDGES)
    for ax, field in zip(axes, ("instruction", "response")):
        for origin, o in sorted(stats["by_origin"].items()):
            ax.plot(labels, normalized(o[f"length_histogram_{field}"]), marker="o",
                    label=f"{origin} (n={o['rows']['total']:,})")
        ax.set_title(f"{field} length (tokens), share of examples")
        ax.set_ylabel("share")
        ax.tick_params(axis="x", rotation=45)
        if stats["by_origin"]:
            ax.legend()
    out["lengths"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    rows = diversity_rows(stats)
    width = 0.38
    for i, field in enumerate(("instruction", "response")):
        ax.bar([j + i * width for j in range(len(rows))], [r[f"trigrams_{field}"] for r in rows], width, label=field)
    ax.set_xticks([j + width / 2 for j in range(len(rows))],
                  [f"{r['origin']}\n({r['sample']:,} examples)" for r in rows])
    ax.set_title(f"unique word trigrams per {stats.get('trigram_sample_size', 1000):,} examples")
    if rows:
        ax.legend()
    out["trigrams"] = _png(fig)

    points = stats.get("trend") or []
    if len(points) >= 2:  # this release and its ancestors (beam_pipelines.report.changes.trend)
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
        x = [p["version"] for p in points]
        axes[0].plot(x, [p["examples"] for p in points], marker="o", label="examples")
        axes[0].plot(x, [p["web_examples"] for p in points], marker="o", label="web examples")
        axes[0].set_title("examples per release")
        for stage in sorted({s for p in points for s in p["pass_rates"]}):
            axes[1].plot(x, [p["pass_rates"].get(stage) for p in points], marker="o", label=f"{stage} pass rate")
        axes[1].set_title("pass rate of each stage, per release")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30)
            ax.legend(fontsize=8)
        out["trend"] = _png(fig)
    return out


# ---- HTML -----------------------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{f' class={cls}' if cls else ''}><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _kv(d: dict) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"


def _pct(v) -> str:
    return "-" if v is None else f"{v:g}%"


def _link(url: str | None) -> str:
    """A document's URL: a link only when it is http(s); any other scheme (`javascript:`, `data:`,
    `file:`) from a web crawl's metadata is shown as text, never made clickable."""
    if not url:
        return "-"
    if not _WEB_URL.match(url):
        return f"<span class=note>{html.escape(url[:500])}</span>"
    return f'<a href="{html.escape(url, quote=True)}" rel="noopener noreferrer nofollow">{html.escape(url[:500])}</a>'


_WEB_URL = re.compile(r"https?://[^\s\x00-\x1f]+\Z", re.IGNORECASE)

# The browse section's filter: the report's one script, static (the rows it filters are in the table,
# escaped), allowed by its sha256 in the page's CSP and nothing else. `bftMatches` is pure (every word
# of the query, in any case, is in the row's text), so it runs under node too (tests/test_report.py).
# A link can carry a filter: report.html#q=words.
BROWSE_SCRIPT = """
function bftMatches(text, query) {
  var words = query.toLowerCase().split(/\\s+/).filter(function (w) { return w.length > 0; });
  var lower = text.toLowerCase();
  return words.every(function (w) { return lower.indexOf(w) >= 0; });
}
if (typeof document !== "undefined") {
  var box = document.getElementById("q");
  var rows = document.querySelectorAll("#sample tr.row");
  var shown = document.getElementById("shown");
  var bftFilter = function () {
    var n = 0;
    rows.forEach(function (r) { r.hidden = !bftMatches(r.textContent, box.value); if (!r.hidden) { n++; } });
    shown.textContent = n + " of " + rows.length + " shown";
  };
  var asked = /^#q=(.*)$/.exec(location.hash);
  if (asked) { box.value = decodeURIComponent(asked[1]); }
  box.addEventListener("input", bftFilter);
  bftFilter();
}
"""
SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(BROWSE_SCRIPT.encode()).digest()).decode()

# The report loads nothing from elsewhere and runs no script but the one above, and says so to the
# browser: even a text that slipped past escaping could not run a script or fetch a resource.
CSP = (f"default-src 'none'; script-src '{SCRIPT_HASH}'; img-src 'self'; style-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")


def _changes_html(stats: dict) -> str:
    """The alerts and what changed since the parent release (beam_pipelines/report/changes.py), at the head."""
    out = []
    alerts = stats.get("alerts") or []
    if alerts:
        out.append("<h2 class=warn>Alerts</h2><ul class=warn>" + "".join(f"<li>{html.escape(a)}</li>" for a in alerts)
                   + "</ul>")
    diff = stats.get("changes") or {}
    if not diff.get("parent"):
        out.append("<p class=note>No parent release (the first release of this root).</p>")
    elif diff.get("error"):
        out.append(f"<p class=note>Parent {html.escape(diff['parent'])}: {html.escape(diff['error'])}</p>")
    else:
        rows = [[o, v["added"], v["removed"], v["kept"]] for o, v in diff["examples"].items()]
        shares = [["kept share (web examples / candidates)", pct(diff["kept_share"]["parent"]),
                   pct(diff["kept_share"]["now"])],
                  ["transient failures and refusals / requests", pct(diff["error_share"]["parent"]),
                   pct(diff["error_share"]["now"])]]
        shares += [[f"{s}: rows parsed / all its rows", pct(r["parent"]), pct(r["now"])]
                   for s, r in diff["pass_rates"].items()]
        for origin, fields in (diff.get("lengths") or {}).items():
            shares += [[f"{origin} {f} length (mean tokens)", _fmt(v["parent"]), _fmt(v["now"])] for f, v in fields.items()]
        sc = diff.get("scores") or {}
        if sc.get("parent") or sc.get("now"):
            p, n = sc.get("parent") or {}, sc.get("now") or {}
            shares += [[f"{(n or p).get('stage')} stage: mean score", _fmt(p.get("mean")), _fmt(n.get("mean"))],
                       [f"{(n or p).get('stage')} stage: share of scores >= 5", pct(p.get("share_5")),
                        pct(n.get("share_5"))]]
        domains = [[d, v["added"], v["removed"]] for d, v in (diff.get("by_domain") or {}).items()]
        out.append(f"<h2>What changed since {html.escape(diff['parent'])}</h2>"
                   + _table(["origin", "examples added", "removed", "kept"], rows)
                   + ("<p class=note>Which ones, and why removed: <code>changes/added.parquet</code>, "
                      "<code>changes/removed.parquet</code>; web examples by domain (the most changed):</p>"
                      + _table(["web domain", "added", "removed"], domains) if domains else "")
                   + _table(["measure", html.escape(diff["parent"]), "now"], shares))
    return "\n".join(out)


def decontamination_rows(stats: dict) -> tuple[list[list], list[list]]:
    """([set, file, sha256, prompts, n-grams, prompts shorter than n, prompts ignored (too few words, with
    examples), pairs dropped] per evaluation set, [id, set, field, shared n-gram, evaluation prompt] per
    dropped pair)."""
    d = stats.get("decontamination") or {}
    sets = [[s["name"], s["path"], s["sha256"][:12], s["prompts"], s["ngrams"], s["short_prompts"],
             _ignored(s), (d.get("dropped") or {}).get(s["name"], 0)] for s in d.get("sets") or []]
    pairs = [[p["id"], p["set"], p["field"], p["ngram"], p["prompt"]] for p in d.get("pairs") or []]
    return sets, pairs


def _ignored(s: dict) -> str:
    """An evaluation set's prompts ignored for their few words: their count and the first few, quoted."""
    n = s.get("ignored_prompts") or 0
    return f"{n:,}" + (": " + "; ".join(repr(p) for p in s.get("ignored_examples") or []) if n else "")


def _decontamination_html(stats: dict) -> str:
    d = stats.get("decontamination") or {}
    sets, pairs = decontamination_rows(stats)
    if not sets:
        return ("<h2>Decontamination</h2><p>None: no evaluation prompts were given (<code>--decontaminate</code>), "
                "so this release was not checked against any benchmark.</p>")
    n = d.get("ngram")
    return (f"<h2>Decontamination</h2><p class=note>A pair whose instruction or response shares a {n}-word "
            f"n-gram (lower case, punctuation ignored) with an evaluation prompt is dropped as "
            f"<code>contaminated:&lt;set&gt;</code>; a prompt shorter than {n} words counts as one n-gram, its "
            f"whole word sequence; a prompt of fewer than {MIN_PROMPT_WORDS} words is ignored (it would drop "
            f"nearly every pair). {len(pairs):,} pair(s) dropped.</p>"
            + _table(["set", "file", "sha256", "prompts", f"{n}-grams", f"prompts under {n} words",
                      f"prompts ignored (under {MIN_PROMPT_WORDS} words)", "pairs dropped"], sets)
            + (_table(["id", "set", "field", "shared n-gram", "evaluation prompt"], pairs) if pairs else ""))


def _browse_html(stats: dict) -> str:
    """The browsable sample (corpus_stats.browse_sample) with its filter box; BROWSE_SCRIPT filters it."""
    browse = stats.get("browse") or {"rows": [], "strata": {}}
    rows = "".join(f"<tr class=row><td>{_fmt(e['id'])}</td><td>{_fmt(e['stratum'])}</td><td>{_fmt(e['split'])}</td>"
                   f"<td>{_fmt(e['score'])}</td><td class=t>{_fmt(e['instruction'])}</td>"
                   f"<td class=t>{_fmt(e['response'])}</td><td>{_link(e['url'])}</td></tr>"
                   for e in browse["rows"])
    strata = ", ".join(f"{html.escape(s)}: {n:,}" for s, n in browse["strata"].items()) or "none"
    return (f"<h2>Browse a sample</h2><p class=note>{len(browse['rows']):,} examples drawn by sample key, an equal "
            f"share from each stratum (origin and score bucket, the score's integer part) as far as it has "
            f"examples; examples per stratum in the release: {strata}. Every word typed must appear in a row "
            f"(its id, stratum, instruction, response or url); a link can carry a filter: "
            f"<code>report.html#q=words</code>.</p>"
            f'<p><input id=q type=search placeholder="filter the sample" aria-label="filter the sample"> '
            f"<span id=shown>{len(browse['rows']):,} of {len(browse['rows']):,} shown</span></p>"
            f"<table class=ex id=sample><tr><th>id</th><th>stratum</th><th>split</th><th>score</th>"
            f"<th>instruction</th><th>response</th><th>source</th></tr>{rows}</table>")


def _examples_html(stats: dict) -> str:
    ex = stats.get("examples") or {"kept": [], "dropped": {}}
    kept = "".join(f"<tr><td>{_fmt(e['id'])}</td><td class=t>{_fmt(e['instruction'])}</td>"
                   f"<td class=t>{_fmt(e.get('source'))}</td>"
                   f"<td class=t>{_fmt(e['response'])}</td><td>{_fmt(e['score'])}</td><td>{_link(e['url'])}</td></tr>"
                   for e in ex["kept"])
    # a dropped row shows what the failing stage's model wrote when it has no usable response
    dropped = "".join(f"<tr><td>{_fmt(reason)}</td><td>{_fmt(e['id'])}</td><td class=t>{_fmt(e['instruction'])}</td>"
                      f"<td class=t>{_fmt(e['response'] if e.get('response') is not None else e.get('raw_output'))}</td>"
                      f"<td>{_fmt(e['detail'])}</td><td>{_link(e['url'])}</td></tr>"
                      for reason, rows in sorted(ex["dropped"].items()) for e in rows)
    return (f"<h3>Kept pairs (the smallest ids kept by the recipe and curation)</h3>"
            f"<table class=ex><tr><th>id</th><th>instruction</th><th>source document (excerpt)</th>"
            f"<th>response</th><th>score</th><th>source</th></tr>"
            f"{kept or '<tr><td colspan=6>none</td></tr>'}</table>"
            f"<h3>Dropped rows, one per reason (the smallest id)</h3>"
            f"<table class=ex><tr><th>reason</th><th>id</th><th>instruction</th>"
            f"<th>response, or what the failing stage's model wrote</th>"
            f"<th>stage error</th><th>source</th></tr>{dropped or '<tr><td colspan=6>none</td></tr>'}</table>")


def write_report(folder: str, stats: dict) -> list[str]:
    """report.html and plots/*.png in the release folder; returns the paths written."""
    written = []
    for name, data in plots(stats).items():
        path = storage.join(folder, "plots", f"{name}.png")
        storage.write_bytes(path, data)
        written.append(path)
    storage.write_text(storage.join(folder, "report.html"), report_html(stats))
    return written + [storage.join(folder, "report.html")]


def report_html(stats: dict) -> str:
    f = stats["funnel"]
    tokenizer = html.escape(str((stats.get("config") or {}).get("tokenizer") or "prepare's"))
    compared = paper_rows(stats)
    paper = (_table(["measure", "this release", "the paper", "where"], compared) if compared
             else "<p>Nothing this recipe measures is in the paper.</p>")
    funnel = [[s["step"], s["rows"], s["dropped"] or None, _pct(s["pct_input"]), _pct(s["pct_candidates"]),
               _kv(s["reasons"]) if s["reasons"] else "-"] for s in funnel_rows(stats)]
    stages_of_run = stage_rows(stats)  # once: it may read each model's bft_train.json
    stages = [[r["stage"], r["model"] or "-", r["rows"], r["sent"], _kv(r["not_sent"]), _kv(r["sent_failures"]),
               r["pass_rate_of_sent"], r["input_truncated"], _kv(r["finish_reasons"]), r["prompt_tokens"],
               r["output_tokens"]] for r in stages_of_run]
    size = stats.get("trigram_sample_size", 1000)
    diversity = [[r["origin"], r["examples"], r["avg_tokens_instruction"], r["avg_tokens_response"],
                  r["trigrams_instruction"], r["trigrams_response"],
                  f"{r['sample']:,}" + ("" if r["sample_complete"] else f" (fewer than {size:,}: not comparable)")]
                 for r in diversity_rows(stats)]
    dists = stats.get("score_distributions") or {}
    score_rows = []
    for stage, d in sorted(dists.items()):
        labels, kept, dropped = score_bars(d)
        score_rows += [[stage, label, k, dr] for label, k, dr in zip(labels, kept, dropped) if k or dr]
    config = stats.get("config") or {}
    config_rows = [[k, "-" if v is None else str(v)] for k, v in sorted(config.items())]
    models = [[r["stage"], r["model"] or "-"] for r in stages_of_run]
    partial = ""
    if stats.get("missing_shards"):
        partial = (f"<p class=warn>Partial release (--allow-partial): candidate shards "
                   f"{stats['missing_shards']} had no complete generation output and are not in it.</p>")
    version = html.escape(stats["version"])
    return f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>bft release {version}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;font-size:14px}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}}
td:first-child{{text-align:left}}td.t{{text-align:left;white-space:pre-wrap;max-width:420px}}.warn{{color:#b00}}
.note{{color:#555}}img{{max-width:100%}}</style></head><body>
<h1>SFT corpus release {version}</h1>
<p>Recipe <b>{html.escape(stats['recipe'])}</b>; {f['final']['total']:,} examples
({f['final']['train']:,} train, {f['final']['validation']:,} validation).
Dataset card: <a href="README.md">README.md</a>; files and checksums: <a href="manifest.json">manifest.json</a>;
all numbers: <a href="stats.json">stats.json</a>.</p>{partial}
{_changes_html(stats)}
{'<img src="plots/trend.png" alt="trend">' if len(stats.get("trend") or []) >= 2 else ''}
<h2>Provenance</h2>
<p>Code revision <code>{_fmt(stats.get('code_revision'))}</code>; finished {_fmt(stats.get('finished_at'))}.</p>
{_table(['stage', 'model'], models)}
<details><summary>assemble configuration</summary>{_table(['option', 'value'], config_rows)}</details>
<h2>Funnel</h2>
<p class=note>Every Dolma record read, to the released splits. Each row says how many rows are left after
the step, how many it dropped and why.</p>
{_table(['step', 'rows left', 'dropped here', '% of Dolma records', '% of candidates', 'reasons'], funnel)}
<img src="plots/funnel.png" alt="funnel">
<h2>Generation stages</h2>
<p class=note>Requests sent = rows a model was asked about; rows not sent carry their reason (an upstream
failure, or the gate of a stage that only answers pairs that passed it). The pass rate is over the rows sent.</p>
{_table(['stage', 'model', 'rows', 'requests sent', 'not sent (why)', 'parse failures of sent rows',
         'pass rate of sent', 'input truncated', 'finish reasons', 'prompt tokens', 'output tokens'], stages)}
<h2>Scores</h2>
<img src="plots/scores.png" alt="scores">
{_table(['stage', 'score', 'kept', 'dropped'], score_rows) if score_rows else '<p>No scoring stage in this recipe.</p>'}
<h2>Lengths and diversity by origin</h2>
<p class=note>Length histograms are shares of each origin's examples, so origins of different sizes compare.
Unique word trigrams (the paper's Figure 3 measure) are counted on a fixed sample of {size:,} examples per
origin (the smallest id hashes): the raw count over a whole corpus grows with its size and says nothing
across sizes.</p>
<h3>Beside the paper</h3>
<p class=note>The paper's figures (<a href="{PAPER}">Nguyen et al. 2024</a>) where we measure the same thing.
Its lengths are Llama-2 tokens; ours are counted with this run's tokenizer ({tokenizer}) and, where
mistral-common is installed, again with a Llama-2-structure tokenizer (close to Llama-2's counts, not equal). Figure 3 (trigrams) is published as a plot only.</p>
{paper}
{_table(['origin', 'examples', 'avg instruction tokens', 'avg response tokens',
         f'unique instruction trigrams per {size:,}', f'unique response trigrams per {size:,}', 'sample'], diversity)}
<img src="plots/lengths.png" alt="lengths"><img src="plots/trigrams.png" alt="trigrams">
{_decontamination_html(stats)}
<h2>Examples</h2>
{_examples_html(stats)}
{_browse_html(stats)}
<script>{BROWSE_SCRIPT}</script>
</body></html>
"""


# ---- the dataset card -------------------------------------------------------------------------------

# Hugging Face's size_categories buckets (the Hub's dataset card metadata).
SIZE_BUCKETS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T"))


def size_category(n: int) -> str:
    for limit, name in SIZE_BUCKETS:
        if n < limit:
            return name
    return "n>1T"


def _validation_text(config: dict) -> str:
    share, cap = config.get("validation_fraction", 0), config.get("max_examples")
    if not share:
        return "none."
    seed = ("seed pairs may be in it too" if config.get("seed_in_validation")
            else "seed pairs are all in train")
    if cap:
        return (f"{share:.1%} of the web examples, taken beside the cap: {cap:,} + "
                f"{validation_size(cap, share):,} web examples are selected and the "
                f"{validation_size(cap, share):,} with the smallest validation hash are held out, so train keeps "
                f"the cap's count; {seed}.")
    return (f"a deterministic {share:.1%} of the web examples by hash of the id (the example with the "
            f"smallest hash always, so a small release still has one); {seed}.")


def _near_duplicates_text(config: dict) -> str:
    t = config.get("near_dup_instruction_threshold")
    return (f"and per cluster of near-duplicate instructions (word 3-gram Jaccard >= {t:g}; the highest score "
            "kept)") if t else "(near-duplicate instructions not removed)"


def _decontamination_text(stats: dict) -> str:
    d = stats.get("decontamination") or {}
    if not d.get("sets"):
        return "Decontamination: none (not checked against any evaluation set)."
    sets = "; ".join(f"{s['name']} ({s['prompts']:,} prompts, sha256 {s['sha256'][:12]}"
                     + (f"; {s['ignored_prompts']:,} of fewer than {MIN_PROMPT_WORDS} words ignored"
                        if s.get("ignored_prompts") else "")
                     + f"): {d['dropped'].get(s['name'], 0):,} pairs dropped" for s in d["sets"])
    return (f"Decontamination: pairs sharing a {d['ngram']}-word n-gram with an evaluation prompt were dropped: "
            f"{sets}.")


def write_card(folder: str, stats: dict, config: dict) -> str:
    """README.md: the dataset card, with the Hugging Face YAML header (pretty name, sources, splits,
    size, license)."""
    f = stats["funnel"]
    models = ", ".join(f"{r['stage']}: `{r['model']}`" for r in stage_rows(stats) if r["model"]) or "-"
    origin_lines = "\n".join(f"| {r['origin']} | {r['examples']:,} | {r['avg_tokens_instruction']:,.2f} | "
                             f"{r['avg_tokens_response']:,.2f} |" for r in diversity_rows(stats))
    partial = ""
    if stats.get("missing_shards"):
        partial = (f"\n**Partial release** (`--allow-partial`): candidate shards {stats['missing_shards']} had no "
                   "complete generation output; their documents are not in this release.\n")
    tags = stats["tags"]
    # only splits with rows: a split pattern that matches no file is an error for `datasets`
    splits_yaml = "\n".join(f"  - split: {s}\n    path: data/split={s}/*.parquet" for s in ("train", "validation")
                            if f["final"][s]) or "  []"
    sources = ["allenai/dolma"] + (["OpenAssistant/oasst1"] if (f.get("seed") or {}).get("kept") else [])
    sources_yaml = "\n".join(f"- {s}" for s in sources)
    card = f"""---
pretty_name: Back-and-forth translation SFT corpus ({stats['recipe']}, {stats['version']})
license: odc-by
language:
- en
task_categories:
- text-generation
size_categories:
- {size_category(f['final']['total'])}
source_datasets:
{sources_yaml}
tags:
- instruction-tuning
- synthetic
- backtranslation
configs:
- config_name: default
  data_files:
{splits_yaml}
---

# Back-and-forth translation SFT corpus, release {stats['version']}

Instruction/response pairs built by instruction back-and-forth translation (Nguyen et al. 2024, on top
of Humpback, Li et al. 2023) from Dolma's Common Crawl head split, with recipe **{stats['recipe']}**.
{partial}
## Contents

| split | examples |
|---|---|
| train | {f['final']['train']:,} |
| validation | {f['final']['validation']:,} |

| origin | examples | avg instruction tokens | avg response tokens |
|---|---|---|---|
{origin_lines}

Each row: `id` (a web example's: its Dolma document id), `origin` (web or seed), `recipe`, `instruction`,
`response`, `messages` (chat list: an optional system message carrying the data-source tag, the user
instruction, the assistant response), `tag`, `score`, `n_tokens_instruction`, `n_tokens_response`, and
its lineage: `url` and `crawl_date` of the source document, `made_by` (per stage that made it, a key that
`manifest.json`'s `inputs.made_by` maps to the stage's model and config; null for seed pairs). Tags:
seed = {tags['seed']!r}, web = {tags['web']!r}.

## How it was made

- Candidates: {f['candidates']:,} documents (length-filtered and deduplicated from
  {(f.get('dolma') or {}).get('input_records', '?')} Dolma records).
- Models: {models}.
- Recipe `{stats['recipe']}`, then curation: instruction {config['min_instruction_chars']}..{config['max_instruction_chars']}
  characters, no empty or truncated response, one example per normalized instruction
  {_near_duplicates_text(config)}{f" (capped to {config['max_examples']:,})" if config.get('max_examples') else ""}.
- {_decontamination_text(stats)}
- Dropped candidates by reason: {_kv(f['dropped'])}.
- Validation split: {_validation_text(config)}

See `report.html` for the funnel, per-stage statistics, score and length histograms and example rows,
and `manifest.json` for every file's checksum, the full config, the code revision and the input shards.

## Loading it

The data files are under `data/`, one folder per split in the Hive style (`data/split=train/part-SSSSS-of-NNNNN.parquet`,
`data/split=validation/...`), beside this card, the manifest, stats and report: a reader of `data/` gets a
`split` column from the folder names, and `datasets` gets one split each from the card's configs:

```python
df = pd.read_parquet("<this folder>/data")                             # pandas: a split column
train = df[df.split == "train"]
pyarrow.dataset.dataset("<this folder>/data", partitioning="hive")     # pyarrow: a split column
polars.read_parquet("<this folder>/data/**/*.parquet", hive_partitioning=True)   # polars: a split column
duckdb.sql("select * from read_parquet('<this folder>/data/*/*.parquet', hive_partitioning = true) where split = 'train'")
datasets.load_dataset("<this folder>")                                 # Hugging Face: train and validation
```

Point loaders at one release, never at the run's `sft/` folder (it holds every release, and `LATEST`
names the newest: `bft latest ROOT` prints its data folder).

## Training on it

`bft train --role sft --data <this folder>` validates the release against its manifest and trains with
the loss on assistant tokens only. TRL's `SFTTrainer` with `assistant_only_loss=True` reads the
`messages` column and trains on the same tokens with the chat template `bft train` saves with the model
(it carries `{{% generation %}}` markers); note that TRL cuts examples longer than `max_length`,
where `bft train` leaves them out.

## License notes

Web text comes from Dolma (ODC-By 1.0; the documents keep their original authors' rights, see the Dolma
datasheet). Seed examples come from OpenAssistant oasst1 (Apache-2.0). Instructions, scores and rewrites
were generated by the models above; their outputs may be subject to those models' licenses (e.g. the
Llama 2 Community License for Llama-2 models). Check these terms before use and redistribution.
"""
    path = storage.join(folder, "README.md")
    storage.write_text(path, card)
    return path
