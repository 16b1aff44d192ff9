"""`bft status ROOT` (or `--config FILE`): what the on-call engineer asks first, read from the run root
without taking its lock and without reading a data file, so it is quick on a bucket and safe while a
night runs.

- the night: the one in progress or unfinished (ROOT/_night.json: each invocation's one-line result,
  the requests each stage paid for so far) and the last one that ended (ROOT/_last_night.json:
  published, current, or nothing new);
- the work pending: whether prepare's output is complete, and per generation stage (the run file's
  recipe's stages, else those with a folder) the shards that are not written, or are older than the
  upstream shard they were made from (by the checksums their markers record), those with
  checkpoints (a shard in flight) and those waiting in batches. A shard whose candidates changed is
  found by `bft plan` and the rebuild, which read the files;
- the root's locks: the holder (host, pid, since, command) and whether it is stale (storage.lock.peek);
- LATEST: the release it names, its counts, whether it is published (_SUCCESS) and its alerts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import storage
from lifecycle import provenance
from schemas.errors import UserError
from schemas.layout import LayoutError, RunLayout, parse_shard_name
from schemas.options import option
from lifecycle.state import prepare_stats


@dataclass
class StatusConfig:
    """The options of `bft status`: the last night, the work pending, who holds the root's lock, and the
    release LATEST names with its alerts; read-only, no lock taken."""

    root: str | None = option(None, "run root (or the run file's `root:` with --config)")
    format: str = option("text", "text, or one JSON document on stdout", choices=["text", "json"])

    def check(self) -> None:
        if not self.root:
            raise UserError("needs a run root: bft status ROOT, or --config FILE with a `root:`")


def main_status(cfg: StatusConfig, run_file: str | None) -> int:
    stages = None
    if run_file:   # the recipe's stages, in order (and a run file that does not load is said at once)
        from bft.run_file import load_run

        stages = [sp.stage for sp in load_run(run_file, cfg.root).stages]
    if not storage.has_files(cfg.root):   # a mistyped root would otherwise read as "nothing done yet"
        raise UserError(f"{cfg.root}: no run root there (no file under it)")
    result = status(RunLayout(cfg.root), stages)
    print(json.dumps(result, indent=2) if cfg.format == "json" else status_text(result))
    return 0


def status(layout: RunLayout, stages: list[str] | None = None) -> dict:
    """The root's status (module docstring); `stages`: the generation stages to show (None: those with
    a folder under ROOT/generations)."""
    from bft.night import read_record

    rel = latest(layout)
    last = read_record(layout, layout.last_night_record, set_aside=False)
    run = (rel or {}).pop("run", None)
    if last is None and isinstance(run, dict) and run.get("invocations"):  # a root of a rebuild before _last_night.json
        last = {**run, "outcome": "published (the night LATEST's manifest records)"}
    return {"root": layout.root, "night": read_record(layout, layout.night_record, set_aside=False), "last_night": last,
            "pending": pending(layout, stages), "locks": locks(layout), "latest": rel}


def pending(layout: RunLayout, stages: list[str] | None) -> dict:
    from schemas.recipes import STAGES

    out: dict = {"prepare": {"complete": False}, "stages": {}}
    stats = prepare_stats(layout, set_aside=False)
    if stats is not None:
        out["prepare"] = {"complete": True, "candidates": stats.get("kept"), "finished_at": stats.get("finished_at")}
    if stages is None:
        found = {layout.relative(path).split("/")[1] for path in storage.list_files(layout.all_generations)}
        stages = [s for s in STAGES if s in found]
    try:
        shards = layout.candidate_shards()
    except LayoutError:
        shards = []
    for stage in stages:
        out["stages"][stage] = stage_pending(layout, stage, shards)
    return out


def stage_pending(layout: RunLayout, stage: str, shards: list[tuple[int, int, str]]) -> dict:
    """{"shards", "written", "pending": [k], "in_flight": [k] (checkpoints), "in_batches": [k]} of one
    stage, from its markers: a shard is written when its data file and marker are there and every
    upstream shard it records is the one whose marker is there now."""
    written, todo, flight = [], [], []
    for k, n, _ in shards:
        record = provenance.read_record(layout.generation_metrics(stage, k, n))
        ok = record is not None and storage.exists(layout.generation_shard(stage, k, n))
        for name, entry in (record or {}).get("inputs", {}).items():
            if ok and name != "candidates":
                upstream = provenance.read_record(layout.generation_metrics(name, k, n))
                ok = upstream is not None and upstream["sha256"] == entry.get("sha256")
        (written if ok else todo).append(k)
        if storage.list_files(layout.generation_checkpoints(stage, k, n)):
            flight.append(k)
    batches = sorted(parsed[1] for path in storage.list_files(layout.generation_batches(stage))
                     if path.endswith(".json") and (parsed := parse_shard_name(path)))
    return {"shards": len(shards), "written": len(written), "pending": todo, "in_flight": flight,
            "in_batches": batches}


def locks(layout: RunLayout) -> list[dict]:
    """Every lock of the root that is held (or stale): its name, holder, and whether it is stale."""
    from storage.lock import peek

    out = []
    for path in sorted(storage.list_files(storage.parent(layout.lock()))):
        seen = peek(path)
        if seen is not None:
            out.append({"name": path.rsplit("/", 1)[-1], **seen})
    return out


def latest(layout: RunLayout) -> dict | None:
    """The release LATEST names: version, folder, published (_SUCCESS), created_at, counts, alerts."""
    from lifecycle import release

    version = release.latest_version(layout)
    if version is None:
        return None
    folder = layout.release(version)
    out = {"version": version, "folder": folder,
           "published": storage.exists(storage.join(folder, release.SUCCESS)), "alerts": []}
    for name, keys in ((release.MANIFEST, ("created_at", "counts", "run")), ("stats.json", ("alerts",))):
        try:
            doc = json.loads(storage.read_text(storage.join(folder, name)))
        except (OSError, ValueError):
            out.setdefault("problems", []).append(f"{name} cannot be read (bft validate {folder})")
            continue
        out.update({k: doc.get(k) for k in keys if isinstance(doc, dict) and doc.get(k) is not None})
    return out


def _invocations(night: dict) -> list[str]:
    return [f"     {i + 1}. {inv.get('started_at', '?')} host {inv.get('host', '?')} pid {inv.get('pid', '?')}: "
            f"{inv.get('status', '?')}" for i, inv in enumerate(night.get("invocations") or [])]


def _requests(night: dict) -> str:
    sent = {s: r.get("requests_sent", 0) for s, r in night.get("stages", {}).items() if "requests_sent" in r}
    for inv in night.get("invocations") or []:   # a running stage's count so far
        for stage, paid in (inv.get("live") or {}).items():
            sent[stage] = sent.get(stage, 0) + paid.get("requests_sent", 0)
    return ", ".join(f"{s} {n:,}" for s, n in sent.items()) or "none"


def status_text(result: dict) -> str:
    from storage.holder import describe

    lines = [f"bft status {result['root']}"]
    last, night = result["last_night"], result["night"]
    if last:
        lines.append(f"last night: {last.get('outcome', '?')}, ended {last.get('ended_at', '?')} "
                     f"({len(last.get('invocations') or [])} invocation(s); requests paid: {_requests(last)})")
        lines += _invocations(last)
    else:
        lines.append("last night: none ended yet")
    if night:
        lines.append(f"night unfinished (started {night.get('started_at', '?')}; requests paid so far: "
                     f"{_requests(night)}); a rerun continues it:")
        lines += _invocations(night)
    p = result["pending"]
    lines.append("pending: prepare " + (f"complete ({p['prepare']['candidates']:,} candidates, "
                                        f"{p['prepare']['finished_at']})" if p["prepare"]["complete"]
                                        else "not complete (no candidates/stats.json)"))
    for stage, s in p["stages"].items():
        extra = "".join(f"; {what} {s[key]}" for key, what in (("in_flight", "checkpoints of"),
                                                              ("in_batches", "in batches:")) if s[key])
        lines.append(f"   {stage}: {s['written']} of {s['shards']} shards written"
                     + (f", pending {s['pending'][:20]}" if s["pending"] else "") + extra)
    if not result["locks"]:
        lines.append("lock: free")
    for lock in result["locks"]:
        state = (f"STALE ({lock['why']}): the next writer takes it over" if lock["stale"]
                 else "held" + (f" ({lock['why']})" if lock["why"] else "")
                 + ("" if lock["checked"] else " (its host is another machine: not checked from here)"))
        lines.append(f"lock {lock['name']}: {state}: {describe(lock['holder'])}")
    rel = result["latest"]
    if rel is None:
        lines.append("LATEST: none (no release published yet)")
    else:
        counts = rel.get("counts") or {}
        lines.append(f"LATEST: {rel['version']} ({'published' if rel['published'] else 'NOT published: no _SUCCESS'}"
                     + (f", {rel['created_at']}" if rel.get("created_at") else "")
                     + (f", {counts.get('train', 0):,} train, {counts.get('validation', 0):,} validation" if counts else "")
                     + f"): {rel['folder']}")
        lines += [f"   ALERT: {a}" for a in rel.get("alerts") or []] + [f"   PROBLEM: {x}" for x in rel.get("problems", [])]
        if not rel.get("alerts"):
            lines.append("   no alerts")
    return "\n".join(lines)
