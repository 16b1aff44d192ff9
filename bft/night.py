"""The record of a night of `bft rebuild` and its summary.

The night: what every invocation did until a release is published (or found current) is one record,
kept in ROOT/_night.json between invocations (an exit 75, a stage over its error budget, a failure or
an interrupt: each invocation's status is its one-line error), written into the release's manifest
(`run`), kept in ROOT/_last_night.json once the night ended (`bft status`), and printed at the end
however the night ends, with the difference from the release LATEST named before when one was
published (text, or --format json: one JSON document on stdout, the error and exit status in it).
Every request the generation stages were answered is counted, also those of an invocation that failed,
was interrupted or was killed (Night.live).
"""
from __future__ import annotations

import json
import os
import socket
import time

import storage
from bft.run_file import StagePlan
from lifecycle import state as stored
from schemas.outcomes import refused_text


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


WORK = ("requests_sent", "rows_reused", "transient_errors", "refusals", "generated_shards", "seconds")
LIVE_SAVE_S = 5.0   # a stage's running count of paid requests is saved at most this often (Night.live)
UNCLOSED = "ended without closing its record (killed?)"


class Night:
    """The record of one night: every invocation until a release is published or found current
    (module docstring). `stages` sums what each stage did over the invocations."""

    def __init__(self, layout, config_file: str):
        self.path, self.last_path = layout.night_record, layout.last_night_record
        names = {layout.relative(self.path), layout.relative(self.last_path)}
        storage.clear_debris(layout.root, time.time(), names.__contains__)   # of a write killed midway
        record = read_record(layout, self.path)
        if record is None or record.get("ended_at"):   # none, unreadable, or one that ended (killed as it closed)
            record = {"config_file": config_file, "started_at": _now(), "invocations": [], "stages": {}}
        for invocation in record["invocations"]:
            # one that never closed its record (kill -9, a lost machine; this run holds the root's lock, so
            # it is not running): what its stages had paid, saved as it went (live), is the night's too
            if invocation.get("status") == "running":
                invocation["status"] = UNCLOSED
            for stage, values in invocation.pop("live", {}).items():
                self._sum(record, stage, values)
        record["invocations"].append({"started_at": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                                      "status": "running"})
        self.record = record
        self.closed = False     # saved or finished: this invocation's status is written
        self._saved_at = 0.0

    def add(self, stage: str, values: dict) -> dict:
        """Adds what `stage` did in this invocation: the work (WORK: requests, rows reused, failures,
        refusals by reason, shards generated, seconds) is summed over the invocations; the rest is a
        state (candidates, shards reused, model) and the last invocation's value stands. The stage's
        running count (`live`) is replaced by these values."""
        self.record["invocations"][-1].get("live", {}).pop(stage, None)
        return self._sum(self.record, stage, values)

    @staticmethod
    def _sum(record: dict, stage: str, values: dict) -> dict:
        into = record["stages"].setdefault(stage, {})
        for key, value in values.items():
            if key not in WORK:
                into[key] = value
            elif isinstance(value, dict):
                sub = into.setdefault(key, {})
                for k, v in value.items():
                    sub[k] = sub.get(k, 0) + v
            else:
                into[key] = round(into.get(key, 0) + value, 3)
        return into

    def live(self, stage: str, paid: dict) -> None:
        """What `stage` has paid for so far in this invocation (StageRunner.paid: requests answered,
        transient failures, refusals), saved in the record at most every LIVE_SAVE_S: a run killed
        without a word (kill -9) leaves it, and the next invocation counts it (__init__). A stage that
        ends, fails or is interrupted replaces it with its values (add)."""
        self.record["invocations"][-1].setdefault("live", {})[stage] = json.loads(json.dumps(paid))
        if time.monotonic() - self._saved_at >= LIVE_SAVE_S:
            self._write(self.path)

    def _write(self, path: str) -> None:
        self._saved_at = time.monotonic()
        storage.write_text(path, json.dumps(self.record, indent=2) + "\n")

    def ending(self) -> dict:
        """The record as the release's manifest keeps it (assemble runs next): the night ended, this
        invocation done, assemble's entry there."""
        self.record["stages"]["assemble"] = {}
        self.record["ended_at"] = _now()
        self.record["invocations"][-1].update(status="done", ended_at=_now())
        return self.record

    def save(self, status: str) -> None:
        self.closed = True
        self.record["invocations"][-1].update(status=status, ended_at=_now())
        self._write(self.path)

    def finish(self, outcome: str) -> None:
        """The night ended (`outcome`: published, current, nothing new): its record becomes the last
        night's (ROOT/_last_night.json, `bft status`), and the next invocation starts a new night."""
        self.closed = True
        self.record["invocations"][-1].update(status="done", ended_at=_now())
        self.record.update(ended_at=_now(), outcome=outcome)
        self._write(self.last_path)
        storage.delete(self.path)


# what Night sums and reads of a record: a stage's work, per stage and in an invocation's live counts
_WORK = {key: stored.Maybe(stored.MapOf(stored.NUMBER) if key == "refusals" else stored.NUMBER) for key in WORK}
RECORD = {"stages": stored.MapOf(_WORK), "ended_at": stored.Maybe(str),
          "invocations": [{"status": stored.Maybe(str), "live": stored.Maybe(stored.MapOf(_WORK))}]}


def read_record(layout, path: str, set_aside: bool = True) -> dict | None:
    """A night's record (Night), or None when there is none or it is damaged (lifecycle.state: set
    aside, unless `set_aside` is False, so that the night starts a new record and never writes the
    damaged one back)."""
    return stored.read_json(layout, path, RECORD, set_aside)


def stage_values(sp: StagePlan, summary: dict, seconds: float, paid: dict | None) -> dict:
    """A stage's values for the night: its shards from `summary` (StageRunner.summary, also a partial
    one), its requests, failures and refusals from `paid` (StageRunner.paid: every answer, those of
    shards not written yet included; None for an external stage, whose workers count their own), and
    the output tokens per row and shared-prefix share over the stage's shards (budget.token_figures)."""
    from generation.budget import token_figures

    paid = paid or {"requests_sent": 0, "transient_errors": 0, "refusals": {}}
    done = summary.get("shards_done") or []
    return {**token_figures(sp.cfg.layout, sp.stage),
            "generated": done or "none", "reused_shards": len(summary.get("shards_skipped") or []),
            "generated_shards": len(done), "requests_sent": paid["requests_sent"],
            "rows_reused": summary.get("reused", 0), "transient_errors": paid["transient_errors"],
            "refusals": dict(paid["refusals"]), "external": sp.external, "model": sp.cfg.model,
            "seconds": round(seconds, 3)}


def release_changes(layout, previous: str | None, stats: dict) -> dict:
    """How the release of `stats` (assemble.run's) differs from `previous` (LATEST before this night):
    examples added, removed and kept by origin, the kept share, the error share and the stages' pass
    rates (beam_pipelines.report.changes, the same comparison the release's own report shows against its
    parent: taken from its stats when the parent is `previous`)."""
    from beam_pipelines.report import changes
    from lifecycle import release

    version = stats["version"]
    if previous is None or previous == version:
        return {"previous": previous, "same_release": previous == version}
    diff = stats.get("changes") if stats.get("parent") == previous else None
    if not diff:
        try:
            new_ids = changes.release_ids(stats["folder"])
        except (OSError, ValueError, release.ReleaseError) as e:
            return {"previous": previous, "error": f"the new release cannot be read: {e}"}
        diff = changes.changes(layout.release(previous), previous, new_ids, stats)
    if diff.get("error"):
        return {"previous": previous, "error": diff["error"]}
    return {"previous": previous, "same_release": False, **{k: v for k, v in diff.items() if k != "parent"}}


def night_text(result: dict) -> str:
    """The night's summary as text (`result`: rebuild's answer, however the night ended)."""
    from beam_pipelines.report.changes import pct

    night, rel, changes = result["night"], result.get("release"), result.get("changes") or {}
    if result["outcome"] == "nothing new":
        return result["message"]
    lines = [f"== the night ({len(night['invocations'])} invocation(s) since {night['started_at']})"]
    for stage, r in night["stages"].items():
        if stage == "prepare":
            state = ("done earlier tonight" if r.get("reused") and r.get("ran_tonight") else
                     "reused" if r.get("reused") else "ran")
            lines.append(f"   prepare: {state}, {r.get('candidates', 0):,} candidates, {r.get('seconds', 0):.1f} s")
        elif stage == "assemble":
            lines.append(f"   assemble: {'reused' if r.get('reused') else 'built'}, {r.get('seconds', 0):.1f} s")
        else:
            lines.append(f"   {stage}: {r.get('requests_sent', 0):,} sent, {r.get('rows_reused', 0):,} reused, "
                         f"{refused_text(r.get('refusals'))}, {r.get('transient_errors', 0)} transient failures, "
                         f"{r.get('seconds', 0):.1f} s" + _tokens_text(r))
    if len(night["invocations"]) > 1 or result["outcome"] not in ("published", "current"):
        lines.append("   invocations: " + "; ".join(f"{i + 1}. {inv.get('started_at', '?')} {inv.get('status', '?')}"
                                                    for i, inv in enumerate(night["invocations"])))
    if result["outcome"] in ("failed", "interrupted"):
        lines.append(f"   {result['outcome'].upper()} (exit {result['exit_code']}): {result['error']}")
    elif result["outcome"] == "waiting":
        lines.append(f"   waiting (exit {result['exit_code']}): {result['message']}")
    if rel is None:
        return "\n".join(lines + [f"   ALERT: {a}" for a in result.get("alerts") or []])
    lines.append(f"   release {rel['version']}: {'published' if rel['published'] else 'current, nothing new'} "
                 f"({rel['train']:,} train, {rel['validation']:,} validation)")
    if changes.get("previous") is None:
        lines.append("   no previous release to compare with")
    elif changes.get("same_release"):
        lines.append(f"   same as the previous release {changes['previous']}")
    elif changes.get("error"):
        lines.append(f"   vs {changes['previous']}: {changes['error']}")
    else:
        parts = [f"{o}: +{v['added']} -{v['removed']} ={v['kept']}" for o, v in changes["examples"].items()]
        lines.append(f"   vs {changes['previous']}: examples {'; '.join(parts) or 'none in either'}; kept share "
                     f"{pct(changes['kept_share']['parent'])} -> {pct(changes['kept_share']['now'])}; "
                     f"error share {pct(changes['error_share']['parent'])} -> "
                     f"{pct(changes['error_share']['now'])}")
    lines += [f"   ALERT: {a}" for a in result.get("alerts") or []]
    return "\n".join(lines)


def _tokens_text(r: dict) -> str:
    """The stage's output tokens per row and the share of its prompt tokens a prefix cache reuses."""
    out, share = r.get("output_tokens_per_row"), r.get("prefix_share")
    return ((f"; {out:,.1f} output tokens per row" if out is not None else "")
            + (f", {share:.1%} of prompt tokens in the shared prefix (prefix cache)" if share is not None else ""))


def stage_line(r: dict) -> str:
    """A stage's line in rebuild's progress (`r`: stage_values)."""
    return (f"   shards generated {r['generated']}, reused {r['reused_shards']}; {r['requests_sent']:,} requests "
            f"sent, {r['transient_errors']} engine errors (transient), {refused_text(r.get('refusals'))}, "
            f"{r['rows_reused']:,} rows reused, {r['seconds']:.1f} s")

