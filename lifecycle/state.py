"""The files a run reads back (its own state), checked on read and set aside when damaged.

A batch record (`_batches/`), a checkpoint part, prepare's `candidates/stats.json` and the night's
record (`_night.json`) are written whole by this code, yet a copy, a full disk on a store without
atomic renames, an edit by hand or a bug can leave one cut short, empty, `[]` or with fields of the
wrong type. A reader takes such a file through `read_json` / `read_table`, which check its form:

- a whole, well-formed file is returned as read;
- a damaged one is named in one warning line and set aside: moved to
  `ROOT/_damaged/<its path under the root>.<UTC time>` with a `.reason` file beside it (nothing a person
  may want to look at is deleted), and read as missing, so the rerun redoes only the part it held;
- a file that cannot be read at all (a bucket's error, no permission) is not "damaged": its OSError
  goes up as before.

Only a writer of the root (one that holds its lock: lifecycle.lock) sets a file aside; a reader that
holds no lock (`bft status`) passes `set_aside=False` and gets the file read as missing, with the
warning. Shapes are declared with plain values: a type (or tuple of types), `[spec]` (a list of
spec), `{key: spec}` (an object with at least these keys), `MapOf(spec)` (an object of any keys whose
values are spec) and `Maybe(spec)` (spec, null, or a missing key).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

import schemas
import storage
from schemas.layout import RunLayout

log = logging.getLogger("bft.state")
NUMBER = (int, float)


@dataclass(frozen=True)
class MapOf:
    """An object whose keys are any strings and whose values follow `spec`."""
    spec: Any


@dataclass(frozen=True)
class Maybe:
    """`spec`, or null, or (as an object's key) missing."""
    spec: Any


_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a whole number", float: "a number",
          bool: "true or false", type(None): "null"}


def _kind(value) -> str:
    return _NAMES.get(type(value), type(value).__name__)


def shape_problem(value, spec, where: str = "") -> str | None:
    """Where and how `value` (parsed JSON) differs from `spec` (module docstring), or None."""
    at = where or "the document"
    if isinstance(spec, Maybe):
        return None if value is None else shape_problem(value, spec.spec, where)
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            return f"{at} is {_kind(value)}, expected an object"
        for key, item in value.items():
            problem = shape_problem(item, spec.spec, f"{where}.{key}" if where else key)
            if problem:
                return problem
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{at} is {_kind(value)}, expected an array"
        for i, item in enumerate(value):
            problem = shape_problem(item, spec[0], f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{at} is {_kind(value)}, expected an object"
        for key, sub in spec.items():
            if key not in value and not isinstance(sub, Maybe):
                return f"{where + '.' if where else ''}{key} is missing"
            problem = shape_problem(value.get(key), sub, f"{where}.{key}" if where else key)
            if problem:
                return problem
        return None
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in types:   # JSON's true is no number
        return f"{at} is true or false, expected {_NAMES.get(types[0], types[0].__name__)}"
    if not isinstance(value, types):
        return f"{at} is {_kind(value)}, expected {_NAMES.get(types[0], types[0].__name__)}"
    return None


class Damaged(ValueError):
    """A state file's bytes do not hold what its reader expects; the message says how."""


def parse_json(data: bytes, spec=None) -> Any:
    """The JSON document in `data`, checked against `spec` (None: any document); Damaged when it is
    empty, not UTF-8, not JSON (cut short), nested past what the parser can follow, or of another
    shape."""
    if not data.strip():
        raise Damaged("empty")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise Damaged(f"not UTF-8 ({e.reason} at byte {e.start})") from e
    except RecursionError as e:
        raise Damaged("nested too deeply to be a record of this code") from e
    except ValueError as e:
        raise Damaged(f"not JSON, or cut short ({e})") from e
    problem = shape_problem(doc, spec) if spec is not None else None
    if problem:
        raise Damaged(problem)
    return doc


def set_aside(layout: RunLayout, path: str, reason: str) -> str:
    """Moves the damaged file `path` to ROOT/_damaged/ (module docstring) with its reason beside it;
    returns where it went. One warning line names the file, the reason and the new place."""
    rel = layout.relative(path)
    if rel == path:   # outside the root: kept by its name
        rel = path.rstrip("/").rsplit("/", 1)[-1]
    target = storage.join(layout.damaged, f"{rel}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    storage.rename(path, target)
    storage.write_text(target + ".reason", f"{path}: {reason}\n")
    log.warning("%s is damaged (%s): set aside as %s; the run redoes what it held", path, reason, target)
    return target


def _damaged(layout: RunLayout, path: str, reason: str, move: bool) -> None:
    if move:
        set_aside(layout, path, reason)
    else:
        log.warning("%s is damaged (%s): read as missing; the next run that writes this root sets it aside",
                    path, reason)


def read_json(layout: RunLayout, path: str, spec=None, set_aside: bool = True) -> Any | None:
    """The JSON document at `path` checked against `spec`; None when there is none, or when it is
    damaged (then set aside, unless `set_aside` is False: module docstring)."""
    if not storage.exists(path):
        return None
    try:
        return parse_json(storage.read_bytes(path), spec)
    except Damaged as e:
        _damaged(layout, path, str(e), set_aside)
        return None


def read_table(layout: RunLayout, path: str, schema: pa.Schema, set_aside: bool = True) -> pa.Table | None:
    """The Parquet file at `path` validated against `schema`; None when it is damaged (garbage, cut
    short, empty, of another record kind: then set aside, unless `set_aside` is False)."""
    try:
        return schemas.validate(storage.read_parquet(path), schema, path)
    except storage.StorageError:
        raise   # a bucket that cannot be read is no damaged file
    except (pa.ArrowException, schemas.SchemaError, ValueError, OSError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        _damaged(layout, path, f"not a readable {schemas.kind_of(schema)} Parquet file ({reason})", set_aside)
        return None


# ---- the shapes of the state files (one place, beside the helpers that check them) --------------

PREPARE_STATS = {"config": dict, "inputs": Maybe([dict]), "kept": int, "input_records": int, "dropped": MapOf(int)}


def prepare_stats(layout: RunLayout, set_aside: bool = True) -> dict | None:
    """ROOT/candidates/stats.json, prepare's completion marker; None when prepare is not complete (no
    marker, or a damaged one: then set aside, so that prepare runs again)."""
    return read_json(layout, layout.prepare_stats, PREPARE_STATS, set_aside)
