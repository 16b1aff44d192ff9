"""What changed since the parent release, and the alerts a data team wants before training on a release.

The parent is the release sft/LATEST named when this one was built. A release records it in stats.json
(`parent`), with `changes` (examples added / removed / kept by origin, by id; the kept share, the
error share and each stage's pass rate, parent -> now) and `alerts`. The report shows both at its head,
and `bft rebuild`'s night summary prints the alerts.

Alerts (defaults; the thresholds are module constants, not part of a release's config). Critical
(`critical`: a night that is broken, not noisy; assemble publishes the release without moving LATEST
and exits 1 unless --allow-empty):
- no web example in the release (candidates were there: seed pairs alone are not a corpus);
- the gate passed nothing: scores were made, none at or over the threshold.
The others are warnings (with --fail-on-alert, any of them holds LATEST and fails the night too):
- every gate score in one 0.1-wide bin (a degenerate score distribution: the scorer answers one value);
- in --score-mode logprob, the digits' mean probability mass under DIGIT_MASS_FLOOR (the model does not
  answer the rubric with a digit: its expected scores are noise);
- the kept share (web examples / candidates) moved more than MAX_KEPT_SHARE_RATIO times from the parent's;
- the validation split holds fewer than VALIDATION_FLOOR examples while --validation-fraction > 0
  (evaluation on a handful of examples is noise; the demo's 1-example split fires it);
- transient failures and refusals over MAX_ERROR_SHARE of the requests sent;
- a stage's pass rate moved more than MAX_PASS_RATE_MOVE points from the parent's;
- decontamination (--decontaminate) dropped more than MAX_DECONTAMINATED_SHARE of the pairs that reached
  it (those the recipe kept): an evaluation prompt of common words drops the corpus, not a benchmark.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

import storage
from lifecycle import release
from schemas.layout import SUCCESS, ReleaseLayout, RunLayout
from schemas.options import option
from schemas.release_stats import ReleaseStats

VERDICTS = "verdicts"        # assemble's parts: every candidate's (id, url, first reason), per shard
LATE_DROPS = "late-drops"    # and the (id, reason) dropped after the recipe (duplicates, the cap)
TOP_DOMAINS = 20
VALIDATION_FLOOR = 100
MAX_ERROR_SHARE = 0.05
MAX_PASS_RATE_MOVE = 10.0  # percentage points
DIGIT_MASS_FLOOR = 0.5
MAX_KEPT_SHARE_RATIO = 2.0   # now / parent, either way
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


def web_domain(url: str | None) -> str | None:
    """The host of a web example's url, lower case, without "www." (None without a url)."""
    try:
        host = urlsplit(url).hostname if url else None
    except ValueError:
        return None
    return host.removeprefix("www.") if host else None


def write_changes(folder: str, tmp: str, old_ids: dict[str, set[str]], new_ids: dict[str, set[str]]) -> dict:
    """Writes <folder>/changes/added.parquet (id, origin, url, domain) and removed.parquet (the same and
    `reason`: the first reason this build dropped it for, or why it was not there to keep) from the
    verdicts assemble left in `tmp`; returns {domain: {"added", "removed"}} of the TOP_DOMAINS domains
    with the most changes (web examples; "-" for no url)."""
    added = sorted((i, o) for o, ids in new_ids.items() for i in ids - old_ids.get(o, set()))
    removed = sorted((i, o) for o, ids in old_ids.items() for i in ids - new_ids.get(o, set()))
    wanted = pa.array([i for i, _ in added + removed], pa.string())
    url, first, late = {}, {}, {}
    for path in storage.list_files(tmp):
        kind = path.rsplit("/", 1)[-1].rsplit("-", 1)[0]
        if kind not in (VERDICTS, LATE_DROPS):
            continue
        table = storage.read_parquet(path)
        table = table.filter(pc.is_in(table["id"], value_set=wanted))
        if kind == VERDICTS:
            for i, u, r in zip(table["id"].to_pylist(), table["url"].to_pylist(), table["reason"].to_pylist()):
                url[i], first[i] = u, r
        else:
            late.update(zip(table["id"].to_pylist(), table["reason"].to_pylist()))

    def why(i: str, origin: str) -> str:
        if origin == "seed":
            return "not in the seed data"
        if i not in first:
            return "not a candidate (input file or prepare changed)"
        return first[i] or late.get(i) or "unknown"

    rows = {"added": [(i, o, url.get(i), web_domain(url.get(i))) for i, o in added],
            "removed": [(i, o, url.get(i), web_domain(url.get(i)), why(i, o)) for i, o in removed]}
    names = ["id", "origin", "url", "domain", "reason"]
    by_domain: dict[str, dict[str, int]] = {}
    for kind, items in rows.items():
        fields = names if kind == "removed" else names[:4]
        storage.write_parquet(pa.table({n: pa.array([item[j] for item in items], pa.string())
                                        for j, n in enumerate(fields)}),
                              ReleaseLayout(folder).changes(kind))
        for item in items:
            if item[1] == "web":
                counts = by_domain.setdefault(item[3] or "-", {"added": 0, "removed": 0})
                counts[kind] += 1
    top = sorted(by_domain.items(), key=lambda kv: (-kv[1]["added"] - kv[1]["removed"], kv[0]))[:TOP_DOMAINS]
    return dict(top)


def read_stats(folder: str) -> ReleaseStats:
    """The stats.json of the release at `folder`."""
    return ReleaseStats.from_dict(json.loads(storage.read_text(ReleaseLayout(folder).stats)))


def changes(parent_folder: str | None, parent: str | None, new_ids: dict[str, set[str]], stats,
            write_to: tuple[str, str] | None = None) -> dict:
    """How a release (its ids by origin, `add_ids`, and its `stats`) differs from its parent's folder;
    with `write_to` ((the release folder, assemble's tmp)), its changes/ files too (`write_changes`)."""
    if not parent or not parent_folder:
        return {"parent": None}
    stats = ReleaseStats.of(stats)
    try:
        old_stats = read_stats(parent_folder)
        old_ids = release_ids(parent_folder)
    except (OSError, ValueError, KeyError, TypeError, release.ReleaseError) as e:
        return {"parent": parent, "error": f"the parent release cannot be read: {e}"}
    by_domain = write_changes(*write_to, old_ids, new_ids) if write_to else None
    by_origin = {}
    for origin in sorted(set(old_ids) | set(new_ids)):
        a, b = old_ids.get(origin, set()), new_ids.get(origin, set())
        by_origin[origin] = {"added": len(b - a), "removed": len(a - b), "kept": len(a & b)}
    old, new = old_stats.shares, stats.shares
    lengths = {}
    for origin in sorted(set(old_stats.by_origin) | set(stats.by_origin)):
        a, b = old_stats.by_origin.get(origin), stats.by_origin.get(origin)
        lengths[origin] = {f: {"parent": a.avg_tokens(f) if a else None, "now": b.avg_tokens(f) if b else None}
                           for f in ("instruction", "response")}
    return {"parent": parent, "examples": by_origin, "by_domain": by_domain, "lengths": lengths,
            "scores": {"parent": _score_summary(old_stats), "now": _score_summary(stats)},
            "kept_share": {"parent": old["kept_share"], "now": new["kept_share"]},
            "error_share": {"parent": old["error_share"], "now": new["error_share"]},
            "pass_rates": {s: {"parent": old["pass_rates"].get(s), "now": r} for s, r in new["pass_rates"].items()}}


def _score_summary(stats) -> dict | None:
    """The gate stage's score distribution in brief: scored rows, mean score (bin starts), share >= 5."""
    hist = ReleaseStats.of(stats).score_histogram or {}
    counts, edges = hist.get("counts"), hist.get("edges")
    if not counts or not edges or not sum(counts):
        return None
    starts = [0.0] + list(edges)  # bin i starts at edges[i - 1] (the first bin: below the first edge)
    n = sum(counts)
    return {"stage": hist.get("stage"), "scored": n,
            "mean": round(sum(c * s for c, s in zip(counts, starts)) / n, 3),
            "share_5": round(sum(c for c, s in zip(counts, starts) if s >= 5) / n, 4)}


def critical(stats) -> list[str]:
    """The critical alerts of a release's stats (module docstring), as one line each."""
    stats = ReleaseStats.of(stats)
    out = []
    funnel = stats.funnel
    if not funnel.web_examples and funnel.candidates:
        out.append(f"no web example: {funnel.candidates:,} candidates gave none (the release holds "
                   f"{funnel.total:,} seed example(s) only)")
    gate = stats.gate
    if gate and gate.scored and not gate.passed:
        out.append(f"{gate.stage} gate passed nothing: 0 of {gate.scored:,} scored pairs at or over "
                   f"{gate.threshold:g}")
    return out


def alerts(stats, diff: dict, validation_fraction: float) -> list[str]:
    """The alerts of a release (module docstring), as one line each: the critical ones first."""
    stats = ReleaseStats.of(stats)
    out = critical(stats)
    gate = stats.gate
    dist = stats.score_distributions.get(gate.stage) or {} if gate else {}
    counts = [k + d for k, d in zip(dist.get("kept") or [], dist.get("dropped") or [])]
    filled = [i for i, c in enumerate(counts) if c]
    if len(filled) == 1 and counts[filled[0]] > 1:
        edges = [0.0] + list(dist["edges"])   # bin i starts at edges[i - 1]
        out.append(f"{gate.stage} scores: all {counts[filled[0]]:,} in one bin [{edges[filled[0]]:g}, "
                   f"{edges[filled[0]] + 0.1:.1f}) (a scorer that answers one value)")
    if gate and gate.digit_mass_mean is not None and gate.digit_mass_mean < DIGIT_MASS_FLOOR:
        out.append(f"{gate.stage} (logprob mode): the digits 1-5 had {100 * gate.digit_mass_mean:.1f}% of the "
                   f"next token's probability on average (under {100 * DIGIT_MASS_FLOOR:g}%): the model does not "
                   "answer the rubric with a digit, its scores are noise")
    kept = diff.get("kept_share") or {}
    if kept.get("parent") and kept.get("now") is not None and (
            not kept["now"] or max(kept["now"] / kept["parent"], kept["parent"] / kept["now"]) > MAX_KEPT_SHARE_RATIO):
        out.append(f"kept share {pct(kept['parent'])} -> {pct(kept['now'])} of the candidates since the parent "
                   f"{diff['parent']} (over {MAX_KEPT_SHARE_RATIO:g} times either way)")
    val = stats.funnel.validation
    if validation_fraction > 0 and val < VALIDATION_FLOOR:
        out.append(f"validation split: {val} example(s), under the floor of {VALIDATION_FLOOR} (--validation-fraction "
                   f"{validation_fraction:g} of {stats.funnel.total} examples); evaluate on a larger split")
    error = stats.shares["error_share"]
    if error is not None and error > MAX_ERROR_SHARE:
        out.append(f"transient failures and refusals: {100 * error:.1f}% of the requests sent (over "
                   f"{100 * MAX_ERROR_SHARE:g}%)")
    lost, reached = stats.decontaminated()
    if reached and lost / reached > MAX_DECONTAMINATED_SHARE:
        out.append(f"decontamination dropped {lost:,} of the {reached:,} pairs the recipe kept ({100 * lost / reached:.1f}%, "
                   f"over {100 * MAX_DECONTAMINATED_SHARE:g}%): check the --decontaminate files' prompts (the report's "
                   "decontamination section names the pairs and the n-grams they share)")
    for stage, r in (diff.get("pass_rates") or {}).items():
        if r["parent"] is not None and r["now"] is not None and abs(r["now"] - r["parent"]) * 100 > MAX_PASS_RATE_MOVE:
            out.append(f"{stage} pass rate moved {100 * r['parent']:.1f}% -> {100 * r['now']:.1f}% since the parent "
                       f"{diff['parent']} (over {MAX_PASS_RATE_MOVE:g} points)")
    return out


TREND_RELEASES = 10


def _point(stats: ReleaseStats) -> dict:
    return {"version": stats.version, "examples": stats.funnel.total, "web_examples": stats.funnel.web_examples,
            "pass_rates": {s: v.pass_rate for s, v in stats.stages.items()},
            "output_tokens": sum(v.count("output_tokens") or 0 for v in stats.stages.values())}


def trend(release_folder, parent: str | None, stats) -> list[dict]:
    """This release and up to TREND_RELEASES - 1 ancestors along the parent chain (each release's
    stats.json names its parent), oldest first: examples, web examples, pass rates, output tokens.
    `release_folder(version)` is the folder of a version."""
    stats = ReleaseStats.of(stats)
    points, seen = [_point(stats)], {stats.version}
    while parent and parent not in seen and len(points) < TREND_RELEASES:
        try:
            older = read_stats(release_folder(parent))
        except (OSError, ValueError, TypeError):
            break
        points.append(_point(older))
        seen.add(parent)
        parent = older.parent
    return points[::-1]


@dataclass
class DiffConfig:
    """The options of `bft diff OLD [NEW]`: which examples one release has that another has not."""

    old: str | None = option(None, "the older release: a release folder, or a version under --root")
    new: str | None = option(None, "the newer release (default: the one --root's sft/LATEST names)")
    root: str | None = option(None, "run root whose sft/ holds the versions named")
    ids: bool = option(False, "list each id: '+ ID ORIGIN' added, '- ID ORIGIN REASON' removed")

    def check(self) -> None:
        if not self.old or not (self.new or self.root):
            raise release.ReleaseError("give two releases: bft diff OLD NEW (folders, or versions with --root ROOT)")

    def folder(self, name: str | None) -> str:
        """A release folder from a folder path or a version under --root (LATEST when None)."""
        if name is None:
            return release.resolve(self.root)
        if self.root and release._VERSION.match(name) and not storage.exists(ReleaseLayout(name).manifest):
            return RunLayout(self.root).release(name)
        return release.resolve(name)


def diff_releases(old_folder: str, new_folder: str) -> dict:
    """{"examples": {origin: added/removed/kept}, "added": [(id, origin)], "removed": [(id, origin, reason)]}
    between two published releases (their manifests' data files). A reason is known when NEW was built
    on OLD (its changes/removed.parquet, written against its parent); else None."""
    for folder in (old_folder, new_folder):
        if not storage.exists(ReleaseLayout(folder).success):
            raise release.ReleaseError(f"{folder}: not a published release (no {SUCCESS})")
    old_ids, new_ids = release_ids(old_folder), release_ids(new_folder)
    reasons = {}
    removed_file = ReleaseLayout(new_folder).changes("removed")
    try:
        parent = read_stats(new_folder).parent
    except (OSError, ValueError, TypeError):
        parent = None
    if parent and release.resolve(old_folder).rstrip("/").endswith("/" + parent) and storage.exists(removed_file):
        table = storage.read_parquet(removed_file, ["id", "reason"])
        reasons = dict(zip(table["id"].to_pylist(), table["reason"].to_pylist()))
    out = {"examples": {}, "added": [], "removed": []}
    for origin in sorted(set(old_ids) | set(new_ids)):
        a, b = old_ids.get(origin, set()), new_ids.get(origin, set())
        out["examples"][origin] = {"added": len(b - a), "removed": len(a - b), "kept": len(a & b)}
        out["added"] += [(i, origin) for i in sorted(b - a)]
        out["removed"] += [(i, origin, reasons.get(i)) for i in sorted(a - b)]
    return out
