"""What a generation shard was made from, and the one check that it is whole and current, used by
`bft generate` (skip, redo or retry a shard) and `bft assemble` (refuse a shard).

The marker of `generations/<stage>/<stage>-k-of-n.parquet` is the `.metrics.json` beside it, written
after the data; its `provenance` record is

    {"sha256": ..., "bytes": ...,                         the data file as written (sha256 as in a
                                                          release manifest)
     "inputs": {"candidates": {"path", "sha256"},          every file it was made from: candidates
                "<stage>": {"path", "sha256"}, ...},       shard k and the upstream/gate stages' shard k
                                                          (paths relative to the run root)
     "config": {...}}                                     the stage config and model that shape its rows

A shard is complete and current only when `problem(...)` finds nothing: the marker exists and parses,
the data file has the recorded size and sha256 (a flipped byte is a mismatch, never an Arrow or
Unicode error), every input still has its recorded sha256 (else the shard is stale: its upstream was
redone), and, when the caller knows what the shard should be made from now, inputs and config equal it.
"""
from __future__ import annotations

import hashlib
import json

import storage
from lifecycle import state as stored
from lifecycle.release.manifest import sha256_of
from schemas.layout import RunLayout

KEY = "provenance"
MISSING = "missing"     # `problem` of a shard whose data file does not exist (yet)
STALE = "made from other inputs"   # `problem` of an intact shard whose recorded inputs differ
OTHER_CONFIG = "made with another config"   # `problem` of an intact shard whose recorded config differs


def made_from(layout: RunLayout, inputs: dict[str, str], config: dict) -> dict:
    """The inputs ({name: path}, checksummed now) and config a shard is (to be) made from."""
    return {"inputs": {name: {"path": layout.relative(path), "sha256": sha256_of(path)}
                       for name, path in sorted(inputs.items())},
            "config": json.loads(json.dumps(config, sort_keys=True))}


def maker_key(stage: str, config: dict) -> str:
    """A short key of the stage config (model included) a shard was made with, as a release's rows
    carry it (`made_by`) and its manifest maps it (inputs.made_by: stage, model, config)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return f"{stage}-{hashlib.sha256(blob).hexdigest()[:8]}"


def seal(path: str, made: dict) -> dict:
    """The record of a data file just written from `made`."""
    return {"sha256": sha256_of(path), "bytes": storage.size(path), **made}


# a marker as read back: a damaged one (cut, emptied, fields of another type) is no marker, and its
# shard is redone (the rewrite replaces the marker)
MARKER = {KEY: {"sha256": str, "bytes": int, "inputs": stored.MapOf({"path": str, "sha256": str}), "config": dict}}


def read_record(marker: str) -> dict | None:
    """The provenance record in a marker; None when the marker is missing, damaged or has none."""
    if not storage.exists(marker):
        return None
    try:
        return stored.parse_json(storage.read_bytes(marker), MARKER)[KEY]
    except stored.Damaged:
        return None


def _differences(recorded: dict, expected: dict) -> list[str]:
    keys = sorted(set(recorded) | set(expected))
    return [k for k in keys if recorded.get(k) != expected.get(k)]


BYTES_DIFFER = "its bytes differ from the sha256 recorded when it was written (damaged or edited)"


def problem(layout: RunLayout, path: str, marker: str, expected: dict | None = None,
            checksums: dict[str, str] | None = None, deferred: list | None = None) -> str | None:
    """Why the shard at `path` is not complete and current, or None when it is.

    expected: `made_from(...)` of what the shard should be made from now (the runner); without it the
    recorded inputs are checked against the files as they are now (assemble). checksums: a cache
    {path: sha256} shared between calls, so that each input file is read once.

    deferred: a list that receives (file, sha256, why) for every comparison that would read a file
    (the shard's own bytes, and an input not in `checksums`) instead of making it: the caller reads
    those files anyway and checks each sha256 while reading (assemble's JoinShard), so each file is
    read once. The shard's recorded sha256 goes into `checksums` (to be verified): a later shard made
    from it is compared with the record, which the read will prove."""
    if not storage.exists(path):
        return MISSING
    record = read_record(marker)
    if record is None:
        return f"no valid completion marker {marker} (the run stopped before finishing this shard)"
    if storage.size(path) != record["bytes"]:
        return BYTES_DIFFER
    if deferred is not None:
        digest = record["sha256"]
        deferred.append((path, digest, BYTES_DIFFER))
    elif (digest := sha256_of(path)) != record["sha256"]:
        return BYTES_DIFFER
    if checksums is not None:
        checksums[path] = digest
    if expected is not None:
        changed = _differences(record["inputs"], expected["inputs"])
        if changed:
            return f"{STALE} ({', '.join(changed)} changed since; stale)"
        changed = _differences(record["config"], expected["config"])
        if changed:
            return f"{OTHER_CONFIG} ({', '.join(changed)} differ)"
        return None
    cache = {} if checksums is None else checksums
    for name, entry in sorted(record["inputs"].items()):
        source = storage.join(layout.root, entry["path"])
        why = f"made from {entry['path']} ({name}), which changed since (stale)"
        if source not in cache and deferred is not None and storage.exists(source):
            deferred.append((source, entry["sha256"], why))
            continue
        if source not in cache:
            cache[source] = sha256_of(source) if storage.exists(source) else MISSING
        if cache[source] != entry["sha256"]:
            return why
    return None


def reusable(why: str | None, marker: str, expected: dict, row_level: tuple[str, ...] = ()) -> bool:
    """Whether the rows of a shard that `problem(..., expected)` found not current (`why`) may be
    reused row by row (by input_hash): its marker is valid and its bytes are the recorded ones, and
    only its inputs (documents joined or left the candidates shard) and/or the config keys in
    `row_level` differ: keys whose effect on a row is wholly in that row's input_hash (the gate: a row
    that now passes it has other prompt values than the `not_sent: below_gate` row it was)."""
    if why is None or not (why.startswith(STALE) or why.startswith(OTHER_CONFIG)):
        return False
    record = read_record(marker)
    return record is not None and set(_differences(record["config"], expected["config"])) <= set(row_level)
