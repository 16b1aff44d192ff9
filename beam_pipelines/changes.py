"""What changed since the parent release, and the alerts a data team wants before training on a release.

The parent is the release sft/LATEST named when this one was built. A release records it in stats.json
(`parent`), with `changes` (examples added / removed / kept by origin, by id; the kept share, the
error share and each stage's pass rate, parent -> now) and `alerts`. The report shows both at its head,
and `bft rebuild`'s night summary prints the alerts.

Alerts (defaults; the thresholds are module constants, not part of a release's config):
- the validation split holds fewer than VALIDATION_FLOOR examples while --validation-fraction > 0
  (evaluation on a handful of examples is noise; the demo's 1-example split fires it);
- transient failures and refusals over MAX_ERROR_SHARE of the requests sent;
- a stage's pass rate moved more than MAX_PASS_RATE_MOVE points from the parent's;
- decontamination (--decontaminate) dropped more than MAX_DECONTAMINATED_SHARE of the pairs that reached
  it (those the recipe kept): an evaluation prompt of common words drops the corpus, not a benchmark.
"""
from __future__ import annotations

import json

import storage
from schemas import release
from beam_pipelines.corpus_stats import RELEASE_STATS as STATS
from beam_pipelines.decontaminate import CONTAMINATED, NEAR_DUPLICATE
from schemas.outcomes import ENGINE_ERROR, REFUSALS

VALIDATION_FLOOR = 100
MAX_ERROR_SHARE = 0.05
MAX_PASS_RATE_MOVE = 10.0  # percentage points
MAX_DECONTAMINATED_SHARE = 0.20


def pct(share: float | None) -> str:
    """A share as the report and the night's summary print it: "12.3%", "-" when there is none."""
    return "-" if share is None else f"{100 * share:.1f}%"


def add_ids(ids: dict[str, set[str]], table) -> dict[str, set[str]]:
    """Adds the ids of an SFT table (a release data file's "id" and "origin" columns) to {origin: ids}."""
    for i, origin in zip(table["id"].to_pylist(), table["origin"].to_pylist()):
        ids.setdefault(origin, set()).add(i)
    return ids


def release_ids(folder: str) -> dict[str, set[str]]:
    """{origin: ids} of a published release: the data files its manifest lists."""
    ids: dict[str, set[str]] = {}
    for path in release.data_files(folder):
        add_ids(ids, storage.read_parquet(path, ["id", "origin"]))
    return ids


def shares(stats: dict) -> dict:
    """The kept share (web examples / candidates), the error share (transient failures and refusals /
    requests sent, over the stages) and each stage's pass rate, of a release's stats."""
    funnel, sent, failed = stats.get("funnel") or {}, 0, 0
    for stage in (stats.get("stages") or {}).values():
        sent += stage.get("sent", 0)
        failed += sum((stage.get("sent_failures") or {}).get(k, 0) for k in (ENGINE_ERROR, *REFUSALS))
    return {"kept_share": funnel.get("web_examples", 0) / funnel["candidates"] if funnel.get("candidates") else None,
            "error_share": failed / sent if sent else None,
            "pass_rates": {s: v.get("pass_rate") for s, v in (stats.get("stages") or {}).items()}}


def changes(parent_folder: str | None, parent: str | None, new_ids: dict[str, set[str]], stats: dict) -> dict:
    """How a release (its ids by origin, `add_ids`, and its `stats`) differs from its parent's folder."""
    if not parent or not parent_folder:
        return {"parent": None}
    try:
        old_stats = json.loads(storage.read_text(storage.join(parent_folder, STATS)))
        old_ids = release_ids(parent_folder)
    except (OSError, ValueError, KeyError, release.ReleaseError) as e:
        return {"parent": parent, "error": f"the parent release cannot be read: {e}"}
    by_origin = {}
    for origin in sorted(set(old_ids) | set(new_ids)):
        a, b = old_ids.get(origin, set()), new_ids.get(origin, set())
        by_origin[origin] = {"added": len(b - a), "removed": len(a - b), "kept": len(a & b)}
    old, new = shares(old_stats), shares(stats)
    lengths = {}
    for origin in sorted(set(old_stats.get("by_origin") or {}) | set(stats.get("by_origin") or {})):
        a, b = (old_stats.get("by_origin") or {}).get(origin, {}), (stats.get("by_origin") or {}).get(origin, {})
        lengths[origin] = {f: {"parent": a.get(f"avg_tokens_{f}"), "now": b.get(f"avg_tokens_{f}")}
                           for f in ("instruction", "response")}
    return {"parent": parent, "examples": by_origin, "lengths": lengths,
            "scores": {"parent": _score_summary(old_stats), "now": _score_summary(stats)},
            "kept_share": {"parent": old["kept_share"], "now": new["kept_share"]},
            "error_share": {"parent": old["error_share"], "now": new["error_share"]},
            "pass_rates": {s: {"parent": old["pass_rates"].get(s), "now": r} for s, r in new["pass_rates"].items()}}


def _score_summary(stats: dict) -> dict | None:
    """The gate stage's score distribution in brief: scored rows, mean score (bin starts), share >= 5."""
    hist = stats.get("score_histogram") or {}
    counts, edges = hist.get("counts"), hist.get("edges")
    if not counts or not edges or not sum(counts):
        return None
    starts = [0.0] + list(edges)  # bin i starts at edges[i - 1] (the first bin: below the first edge)
    n = sum(counts)
    return {"stage": hist.get("stage"), "scored": n,
            "mean": round(sum(c * s for c, s in zip(counts, starts)) / n, 3),
            "share_5": round(sum(c for c, s in zip(counts, starts) if s >= 5) / n, 4)}


def alerts(stats: dict, diff: dict, validation_fraction: float) -> list[str]:
    """The alerts of a release (module docstring), as one line each."""
    out = []
    val = (stats.get("funnel") or {}).get("final", {}).get("validation", 0)
    if validation_fraction > 0 and val < VALIDATION_FLOOR:
        total = (stats.get("funnel") or {}).get("final", {}).get("total", 0)
        out.append(f"validation split: {val} example(s), under the floor of {VALIDATION_FLOOR} (--validation-fraction "
                   f"{validation_fraction:g} of {total} examples); evaluate on a larger split")
    error = shares(stats)["error_share"]
    if error is not None and error > MAX_ERROR_SHARE:
        out.append(f"transient failures and refusals: {100 * error:.1f}% of the requests sent (over "
                   f"{100 * MAX_ERROR_SHARE:g}%)")
    lost, reached = decontaminated(stats)
    if reached and lost / reached > MAX_DECONTAMINATED_SHARE:
        out.append(f"decontamination dropped {lost:,} of the {reached:,} pairs the recipe kept ({100 * lost / reached:.1f}%, "
                   f"over {100 * MAX_DECONTAMINATED_SHARE:g}%): check the --decontaminate files' prompts (the report's "
                   "decontamination section names the pairs and the n-grams they share)")
    for stage, r in (diff.get("pass_rates") or {}).items():
        if r["parent"] is not None and r["now"] is not None and abs(r["now"] - r["parent"]) * 100 > MAX_PASS_RATE_MOVE:
            out.append(f"{stage} pass rate moved {100 * r['parent']:.1f}% -> {100 * r['now']:.1f}% since the parent "
                       f"{diff['parent']} (over {MAX_PASS_RATE_MOVE:g} points)")
    return out


def decontaminated(stats: dict) -> tuple[int, int]:
    """(pairs decontamination dropped, pairs that reached it): the recipe's pairs, which then went
    through decontamination, exact and near-duplicate instructions and the cap, or into the release."""
    funnel = stats.get("funnel") or {}
    dropped = funnel.get("dropped") or {}
    lost = sum(n for reason, n in dropped.items() if reason.startswith(CONTAMINATED))
    later = sum(dropped.get(reason, 0) for reason in ("duplicate_instruction", NEAR_DUPLICATE, "over_cap"))
    return lost, lost + later + (funnel.get("web_examples") or 0)


TREND_RELEASES = 10


def _point(stats: dict) -> dict:
    stages = stats.get("stages") or {}
    funnel = stats.get("funnel") or {}
    return {"version": stats.get("version"), "examples": (funnel.get("final") or {}).get("total", 0),
            "web_examples": funnel.get("web_examples", 0),
            "pass_rates": {s: v.get("pass_rate") for s, v in stages.items()},
            "output_tokens": sum(v.get("output_tokens", 0) or 0 for v in stages.values())}


def trend(release_folder, parent: str | None, stats: dict) -> list[dict]:
    """This release and up to TREND_RELEASES - 1 ancestors along the parent chain (each release's
    stats.json names its parent), oldest first: examples, web examples, pass rates, output tokens.
    `release_folder(version)` is the folder of a version."""
    points, seen = [_point(stats)], {stats.get("version")}
    while parent and parent not in seen and len(points) < TREND_RELEASES:
        try:
            older = json.loads(storage.read_text(storage.join(release_folder(parent), STATS)))
        except (OSError, ValueError):
            break
        points.append(_point(older))
        seen.add(parent)
        parent = older.get("parent")
    return points[::-1]
