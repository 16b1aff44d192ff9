"""The report's figures (matplotlib, drawn off screen): the funnel, the score distributions per
scoring stage with the gate's threshold, lengths by origin as shares, unique trigrams on the fixed
sample, and the trend over the release's ancestors. Each is PNG bytes; report.html shows them from
plots/<name>.png (schemas.layout.ReleaseLayout.plot)."""
from __future__ import annotations

import io

from beam_pipelines.assemble.corpus_stats import LENGTH_EDGES
from beam_pipelines.report.numbers import (bin_labels, diversity_rows, funnel_rows, normalized, score_bars,
                                           threshold_x)
from schemas.release_stats import ReleaseStats

PLOTS = ("funnel", "scores", "lengths", "trigrams")   # every release's; `trend` too when it has a parent


def plots(stats) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by name (PLOTS, and `trend` when the release has ancestors)."""
    stats = ReleaseStats.of(stats)
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

    dists = stats.score_distributions
    fig, axes = plt.subplots(1, max(len(dists), 1), figsize=(6.5 * max(len(dists), 1), 3), squeeze=False)
    if not dists:
        axes[0][0].text(0.5, 0.5, "no scoring stage in this recipe", ha="center")
        axes[0][0].set_axis_off()
    gate = stats.score_histogram or {}
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
    labels = bin_labels(LENGTH_EDGES)
    for ax, field in zip(axes, ("instruction", "response")):
        for origin, o in sorted(stats.by_origin.items()):
            ax.plot(labels, normalized(o.length_histogram(field)), marker="o", label=f"{origin} (n={o.total:,})")
        ax.set_title(f"{field} length (tokens), share of examples")
        ax.set_ylabel("share")
        ax.tick_params(axis="x", rotation=45)
        if stats.by_origin:
            ax.legend()
    out["lengths"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    rows = diversity_rows(stats)
    width = 0.38
    for i, field in enumerate(("instruction", "response")):
        ax.bar([j + i * width for j in range(len(rows))], [r[f"trigrams_{field}"] for r in rows], width, label=field)
    ax.set_xticks([j + width / 2 for j in range(len(rows))],
                  [f"{r['origin']}\n({r['sample']:,} examples)" for r in rows])
    ax.set_title(f"unique word trigrams per {stats.trigram_sample_size:,} examples")
    if rows:
        ax.legend()
    out["trigrams"] = _png(fig)

    points = stats.trend
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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()
