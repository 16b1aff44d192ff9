"""What a data team reads before training: report.html with PNG plots, and the dataset card
(README.md with the Hugging Face YAML header), both written from the release's stats.json."""
from __future__ import annotations

import bisect
import html
import io

from beam_pipelines.corpus_stats import LENGTH_EDGES, SCORE_EDGES
import storage

PLOTS = ("funnel", "scores", "lengths", "trigrams")


def _bin_labels(edges: list[float]) -> list[str]:
    labels = [f"<{edges[0]:g}"]
    labels += [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]
    return labels + [f">={edges[-1]:g}"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plots(stats: dict) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    f = stats["funnel"]
    steps = [("candidates", f["candidates"])] + sorted(f["dropped"].items(), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(steps) + 1))
    ax.barh([s for s, _ in steps][::-1], [n for _, n in steps][::-1], color=["#c44"] * (len(steps) - 1) + ["#48a"])
    ax.set_xlabel("candidate rows")
    ax.set_title(f"Candidates and where they were dropped; kept {f['web_examples']:,}")
    out["funnel"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    hist = stats.get("score_histogram")
    if hist:
        ax.bar(_bin_labels(SCORE_EDGES), hist["counts"], color="#48a")
        # bin i holds [edges[i-1], edges[i]); the line is drawn at the left edge of the threshold's bin
        ax.axvline(bisect.bisect_right(SCORE_EDGES, hist["threshold"]) - 0.5, color="#c44", linestyle="--",
                   label=f"threshold {hist['threshold']:g}")
        ax.legend()
        ax.set_title(f"{hist['stage']} scores of parsed rows")
        ax.tick_params(axis="x", rotation=45)
    else:
        ax.text(0.5, 0.5, "no scoring stage in this recipe", ha="center")
    out["scores"] = _png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    labels = _bin_labels(LENGTH_EDGES)
    for ax, field in zip(axes, ("instruction", "response")):
        for origin, o in sorted(stats["by_origin"].items()):
            ax.plot(labels, o[f"length_histogram_{field}"], marker="o", label=origin)
            ax.set_title(f"{field} length (tokens)")
        ax.tick_params(axis="x", rotation=45)
        if stats["by_origin"]:
            ax.legend()
    out["lengths"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    origins = sorted(stats["by_origin"])
    width = 0.38
    for i, field in enumerate(("instruction", "response")):
        ax.bar([j + i * width for j in range(len(origins))],
               [stats["by_origin"][o][f"unique_trigrams_{field}"] for o in origins], width, label=field)
    ax.set_xticks([j + width / 2 for j in range(len(origins))], origins)
    ax.set_title("unique word trigrams (the paper's Figure 3)")
    if origins:
        ax.legend()
    out["trigrams"] = _png(fig)
    return out


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def origin_rows(stats: dict) -> list[list]:
    """The paper's Table 6: examples and mean token lengths per origin."""
    rows = []
    for origin, o in sorted(stats["by_origin"].items()):
        rows.append([origin, o["rows"]["total"], o["avg_tokens_instruction"], o["avg_tokens_response"],
                     o["unique_trigrams_instruction"], o["unique_trigrams_response"]])
    return rows


ORIGIN_HEADERS = ["origin", "examples", "avg instruction tokens", "avg response tokens",
                  "unique instruction trigrams", "unique response trigrams"]


def write_report(folder: str, stats: dict) -> list[str]:
    """report.html and plots/*.png in the release folder; returns the paths written."""
    written = []
    for name, data in plots(stats).items():
        path = storage.join(folder, "plots", f"{name}.png")
        storage.write_bytes(path, data)
        written.append(path)
    f = stats["funnel"]
    dolma = f.get("dolma") or {}
    funnel_rows = [["Dolma input records", dolma.get("input_records", "?")]]
    funnel_rows += [[f"  prepare dropped: {r}", n] for r, n in sorted((dolma.get("dropped") or {}).items())]
    funnel_rows += [["candidates", f["candidates"]]]
    funnel_rows += [[f"  assemble dropped: {r}", n] for r, n in sorted(f["dropped"].items(), key=lambda kv: -kv[1])]
    funnel_rows += [["web examples", f["web_examples"]], ["seed examples", f["seed"]["kept"]],
                    ["final: train", f["final"]["train"]], ["final: validation", f["final"]["validation"]]]
    stage_rows = [[s, v["rows"], v["ok"], v["pass_rate"], v["input_truncated"], _kv(v["finish_reasons"]),
                   _kv(v["parse_failures"])] for s, v in stats["stages"].items()]
    partial = ""
    if stats.get("missing_shards"):
        partial = (f"<p class=warn>Partial release (--allow-partial): candidate shards "
                   f"{stats['missing_shards']} had no complete generation output and are not in it.</p>")
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>bft release {html.escape(stats['version'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}.warn{{color:#b00}}</style></head><body>
<h1>SFT corpus release {html.escape(stats['version'])}</h1>
<p>Recipe <b>{html.escape(stats['recipe'])}</b>; {f['final']['total']:,} examples
({f['final']['train']:,} train, {f['final']['validation']:,} validation).</p>{partial}
<h2>Funnel</h2>{_table(['step', 'rows'], funnel_rows)}<img src="plots/funnel.png">
<h2>Generation stages</h2>{_table(['stage', 'rows', 'parsed', 'pass rate', 'input truncated', 'finish reasons', 'parse failures'], stage_rows)}
<h2>Scores</h2><img src="plots/scores.png">
<h2>Examples by origin (the paper's Table 6)</h2>{_table(ORIGIN_HEADERS, origin_rows(stats))}
<img src="plots/lengths.png"><img src="plots/trigrams.png">
</body></html>
"""
    path = storage.join(folder, "report.html")
    storage.write_text(path, doc)
    return written + [path]


def _kv(d: dict) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def write_card(folder: str, stats: dict, config: dict) -> str:
    """README.md: the dataset card, with the Hugging Face YAML header (splits, size, license)."""
    f = stats["funnel"]
    models = ", ".join(f"{s}: `{v['model']}`" for s, v in stats["stages"].items() if v.get("model")) or "-"
    origin_lines = "\n".join("| " + " | ".join(_fmt(c) for c in r) + " |" for r in origin_rows(stats))
    partial = ""
    if stats.get("missing_shards"):
        partial = (f"\n**Partial release** (`--allow-partial`): candidate shards {stats['missing_shards']} had no "
                   "complete generation output; their documents are not in this release.\n")
    tags = stats["tags"]
    # only splits with rows: a split pattern that matches no file is an error for `datasets`
    splits_yaml = "\n".join(f"  - split: {s}\n    path: {s}-*.parquet" for s in ("train", "validation")
                            if f["final"][s]) or "  []"
    card = f"""---
license: odc-by
language:
- en
task_categories:
- text-generation
size_categories:
- {_size_category(f['final']['total'])}
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

| origin | examples | avg instruction tokens | avg response tokens | unique instruction trigrams | unique response trigrams |
|---|---|---|---|---|---|
{origin_lines}

Each row: `id`, `origin` (web or seed), `recipe`, `instruction`, `response`, `messages` (chat list:
an optional system message carrying the data-source tag, the user instruction, the assistant response),
`tag`, `score`, `n_tokens_instruction`, `n_tokens_response`. Tags: seed = {tags['seed']!r}, web = {tags['web']!r}.

## How it was made

- Candidates: {f['candidates']:,} documents (length-filtered and deduplicated from
  {(f.get('dolma') or {}).get('input_records', '?')} Dolma records).
- Models: {models}.
- Recipe `{stats['recipe']}`, then curation: instruction {config['min_instruction_chars']}..{config['max_instruction_chars']}
  characters, no empty or truncated response, one example per normalized instruction
  {f"(capped to {config['max_examples']:,})" if config.get('max_examples') else ""}.
- Dropped candidates by reason: {_kv(f['dropped'])}.
- Validation split: a deterministic {config['validation_fraction']:.1%} by hash of the id.

See `report.html` for the funnel, pass rates, score and length histograms, and `manifest.json` for
every file's checksum, the full config, the code revision and the input shards.

## License notes

Web text comes from Dolma (ODC-By 1.0; the documents keep their original authors' rights, see the Dolma
datasheet). Seed examples come from OpenAssistant oasst1 (Apache-2.0). Instructions, scores and rewrites
were generated by the models above; their outputs may be subject to those models' licenses (e.g. the
Llama 2 Community License for Llama-2 models). Check these terms before use and redistribution.
"""
    path = storage.join(folder, "README.md")
    storage.write_text(path, card)
    return path
