"""The handoff to training teams: a versioned release folder, its manifest, and its validation.

    ROOT/sft/<version>/data/split=train/part-SSSSS-of-NNNNN.parquet, data/split=validation/part-...
                      (Hive-style: readers of data/ add a `split` column; each split numbered on its
                      own: `number_splits`; older releases hold `[data/]<split>-SSSSS-of-NNNNN.parquet`
                      and validate and load the same way: the manifest lists paths and splits)
                      stats.json, report.html, plots/*.png, README.md (dataset card)
                      manifest.json   every other file: size, sha256, rows; schema version; config;
                                      code revision; input lineage
                      _SUCCESS        written last, after the release validated: the sha256 of
                                      manifest.json (`sha256sum -c _SUCCESS` checks it), so that an
                                      edit of the manifest's config or version fails validate
    ROOT/sft/LATEST                   the release published last (its version name)

`publish` is the protocol, the one way a release is made: name the version; refuse a published
version of another config (releases are never overwritten); clear the debris of a failed run; let the
caller write the data files, stats and report; list them in the manifest; validate; write _SUCCESS;
point LATEST at it. A rerun of the same config finishes what an interrupted publish left: a folder
with a manifest that validates gets its _SUCCESS, a published one is validated again, and LATEST is
written in both cases, so a kill between any two steps never leaves LATEST stale.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
import storage
from schemas.errors import UserError
from schemas.options import option
from schemas.layout import (DATA, LATEST, MANIFEST, SFT, SUCCESS, TMP, RunLayout, parse_shard_name,
                            release_data_file, release_split_of)
from schemas.state import Damaged, parse_json

SPLITS = ("train", "validation")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ReleaseError(UserError):
    """A release is missing, incomplete or does not match its manifest."""


class HeldRelease(ReleaseError):
    """A release published (valid, _SUCCESS) that LATEST was not moved to: its alerts say why."""

    def __init__(self, folder: str, alerts: list[str], how: str):
        self.folder, self.alerts = folder, list(alerts)
        super().__init__(f"{folder}: published, but LATEST not moved to it: ALERT {'; ALERT '.join(alerts)}; {how}")


@dataclass
class ValidateConfig:
    """The options of `bft validate`: what a training team runs before it trains."""

    path: str | None = option(None, "a release folder, or a run root / ROOT/sft whose LATEST names one")
    root: str | None = option(None, "run root whose sft/LATEST names the release (instead of PATH)")

    @property
    def target(self) -> str:
        return self.path or self.root

    def check(self) -> None:
        if not self.target:
            raise ReleaseError("give a release folder or --root")


@dataclass
class LatestConfig:
    """The options of `bft latest`: the data folder of the release a run root's sft/LATEST names, for
    loaders (`pd.read_parquet("$(bft latest ROOT)")`; in Python `schemas.release.latest_data(ROOT)`)."""

    path: str | None = option(None, "a run root (or ROOT/sft, or a release folder)")
    root: str | None = option(None, "run root whose sft/LATEST names the release (instead of PATH; a run file's "
                              "`root:` with --config)")
    verify: bool = option(False, "validate the release first (sizes, checksums, schemas): exit 1 if it is not valid")

    @property
    def target(self) -> str:
        return self.path or self.root

    def check(self) -> None:
        if not self.target:
            raise ReleaseError("give a run root: bft latest ROOT, --root ROOT or --config FILE (its `root:`)")


def latest_data(path: str, check: bool = False) -> str:
    """The folder a loader reads: `<release>/data` of the release PATH names (through sft/LATEST), or the
    release folder itself for a release of the older layout (data files beside the card). It must be
    published (`_SUCCESS`); with `check` it is validated in full."""
    folder = resolve(path)
    if not storage.exists(storage.join(folder, MANIFEST)):
        raise ReleaseError(f"{path}: no published release (no sft/LATEST naming one, and not a release folder)")
    if check:
        validate(folder)
    elif not storage.exists(storage.join(folder, SUCCESS)):
        raise ReleaseError(f"{folder}: {SUCCESS} missing: the release is incomplete")
    data = storage.join(folder, DATA)
    manifest = read_manifest(folder)
    in_data = any(f["path"].startswith(DATA + "/") for f in manifest["files"])
    return data if in_data else folder


def read_manifest(folder: str) -> dict:
    """The release's manifest, of the form `manifest_problems` checks; a ReleaseError of one line when
    it cannot be read, is cut short, is no JSON or has another form (fields of the wrong type)."""
    path = storage.join(folder, MANIFEST)
    try:
        manifest = parse_json(storage.read_bytes(path))
    except OSError as e:
        raise ReleaseError(f"{path} cannot be read ({e}); bft validate {folder} lists what is wrong") from e
    except Damaged as e:
        raise ReleaseError(f"{path} is damaged ({e}); bft validate {folder} lists what is wrong") from e
    problems = manifest_problems(manifest)
    if problems:
        raise ReleaseError(f"{path} is malformed: {'; '.join(problems[:3])}"
                           + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
                           + f"; bft validate {folder} lists what is wrong")
    return manifest


def config_hash(config: dict, lineage: dict) -> str:
    """Short hash of what determines the release's content: the config and the input files."""
    blob = json.dumps({"config": config, "inputs": lineage}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def default_version(chash: str, now: float | None = None) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now)) + "-" + chash


def check_version_name(version: str) -> str:
    if not _VERSION.match(version) or version in (LATEST, TMP):
        raise ValueError(f"--version {version!r}: use letters, digits, '.', '_' and '-' (not LATEST or _tmp)")
    return version


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def number_splits(folder: str) -> dict[str, int]:
    """The data files under `folder/data/split=<split>/`, written per output shard as
    `part-<shard>-of-<shards>`, renamed so that each split is numbered on its own
    (`split=validation/part-00000-of-00001`, not the train shard's index): in shard order, before the
    manifest lists them. Returns the files per split."""
    by_split: dict[str, list[tuple[int, str]]] = {}
    for path in storage.list_files(storage.join(folder, DATA)):
        split = release_split_of(path[len(folder.rstrip("/")) + 1:])
        parsed = parse_shard_name(path)
        if split in SPLITS and parsed:
            by_split.setdefault(split, []).append((parsed[1], path))
    for split, items in by_split.items():
        items.sort()
        for i, (_, path) in enumerate(items):
            target = storage.join(folder, release_data_file(split, i, len(items)))
            if target != path:  # names of another count never collide with the shard names
                storage.rename(path, target)
    return {split: len(items) for split, items in by_split.items()}


def data_files(folder: str) -> list[str]:
    """The data files a published release's manifest lists (its entries with a split), in manifest
    order, as paths: what a reader of the release reads, whatever its layout (data/, or beside the
    card in older releases). A manifest that cannot be read or is malformed is a ReleaseError."""
    manifest = read_manifest(folder)
    return [storage.join(folder, e["path"]) for e in manifest["files"] if e.get("split") in SPLITS]


def parquet_rows(path: str) -> int:
    with storage.open_read(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def describe_file(folder: str, path: str) -> dict:
    rel = path[len(folder.rstrip("/")) + 1:]
    entry = {"path": rel, "bytes": storage.size(path), "sha256": sha256_of(path)}
    split = release_split_of(rel)
    if split in SPLITS:
        entry.update(split=split, rows=parquet_rows(path))
    return entry


def code_revision() -> str:
    """The git commit of this code (with '-dirty' for local changes), else BFT_CODE_REVISION, else
    the package version."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("BFT_CODE_REVISION") or f"bft {package_version()}"


def package_version() -> str:
    """The installed distribution's version (setup.py owns it), without importing the CLI."""
    from importlib import metadata

    try:
        return metadata.version("bft")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def write_manifest(folder: str, *, version: str, chash: str, config: dict, lineage: dict, counts: dict,
                   run: dict | None = None) -> dict:
    """Lists every file of the release folder (checksums read back from storage) in manifest.json."""
    files = sorted(p for p in storage.list_files(folder)
                   if not p.endswith("/" + MANIFEST) and not p.endswith("/" + SUCCESS))
    manifest = {
        "version": version,
        "config_hash": chash,
        "schema_version": schemas.SCHEMA_VERSION,
        "kind": "sft",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_revision": code_revision(),
        "counts": counts,
        "files": [describe_file(folder, p) for p in files],
        "config": config,
        "inputs": lineage,
    }
    if run:
        manifest["run"] = run  # what the rebuild did (reuse, timing): not part of the config hash
    storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    return manifest


def success_line(folder: str) -> str:
    """What _SUCCESS holds: the manifest's sha256 in `sha256sum` format."""
    return f"{sha256_of(storage.join(folder, MANIFEST))}  {MANIFEST}\n"


def publish(layout: RunLayout, *, version: str | None, config: dict, lineage: dict,
            build: Callable[[str, str], dict], run: dict | None = None,
            hold: Callable[[str], list[str]] | None = None, hold_how: str = "") -> tuple[str, bool]:
    """Publishes the release of (config, lineage) under ROOT/sft/<version> (`layout`: the run's; the
    version defaults to the UTC date + config hash); returns (its folder, whether it was built now).

    Without a version name, a LATEST release of the same config hash is the answer: nothing is built
    and LATEST does not move (a nightly rebuild with nothing changed publishes nothing new). `run`
    (what bft rebuild did: reuse, timing) goes into the manifest, outside the config hash.

    `build(folder, version)` writes the data files, stats.json, report and card into the empty folder
    and returns the split counts ({"train": n, "validation": n}) the manifest records. A published
    version (one with _SUCCESS) of another or an unreadable config is a ReleaseError, and so is a
    published version that no longer validates; a release that does not validate is left without
    _SUCCESS (debris that the next run clears) and raises ReleaseError. `hold(folder)` lists why a
    published release must not become LATEST (critical alerts): then LATEST stays where it was and
    HeldRelease is raised (`hold_how`: what to do about it), on this run and on any rerun.
    """
    storage.clear_debris(layout.sft, time.time())   # LATEST's temporary file of a write killed midway
    chash = config_hash(config, lineage)
    if version is None:
        current = _latest_of_hash(layout, chash)
        if current is not None:
            return current, False
    version = check_version_name(version or default_version(chash))
    folder = layout.release(version)
    success = storage.join(folder, SUCCESS)
    recorded = _recorded_hash(storage.join(folder, MANIFEST))
    built = False
    if storage.exists(success):
        if recorded != chash:
            raise ReleaseError(f"{folder}: release {version} exists with other inputs or config (hash "
                               f"{recorded or 'unreadable'} != {chash}); releases are never overwritten: pass "
                               "another --version")
        validate(folder)  # published before: check it again before LATEST names it
    elif recorded == chash and _validates(folder):
        storage.write_text(success, success_line(folder))  # killed between the manifest and _SUCCESS
    else:
        storage.delete_tree(folder)  # debris of a failed run: never a published release
        counts = build(folder, version)
        write_manifest(folder, version=version, chash=chash, config=config, lineage=lineage, counts=counts, run=run)
        validate(folder, published=False)
        storage.write_text(success, success_line(folder))
        built = True
    held = hold(folder) if hold else []
    if held:
        raise HeldRelease(folder, held, hold_how)
    storage.write_text(layout.latest, version + "\n")
    return folder, built


def latest_version(layout: RunLayout) -> str | None:
    """The version ROOT/sft/LATEST names (as written; `resolve` checks it before following it), or
    None when there is no LATEST."""
    return storage.read_text(layout.latest).strip() if storage.exists(layout.latest) else None


def _latest_of_hash(layout: RunLayout, chash: str) -> str | None:
    """The folder LATEST names when that release is published and was made from `chash`, else None."""
    latest = latest_version(layout)
    if latest is None:
        return None
    folder = layout.release(latest)
    if _recorded_hash(storage.join(folder, MANIFEST)) != chash or not storage.exists(storage.join(folder, SUCCESS)):
        return None
    validate(folder)
    return folder


def _recorded_hash(manifest_path: str) -> str | None:
    """The config hash a (possibly unfinished or damaged) manifest records, or None."""
    if not storage.exists(manifest_path):
        return None
    try:
        manifest = parse_json(storage.read_bytes(manifest_path))
    except Damaged:
        return None
    return manifest.get("config_hash") if isinstance(manifest, dict) else None


def _validates(folder: str) -> bool:
    try:
        validate(folder, published=False)
        return True
    except ReleaseError:
        return False


def resolve(path: str) -> str:
    """A release folder from PATH: the folder itself, or ROOT/sft (or ROOT) whose LATEST names one."""
    path = path.rstrip("/")
    for base in (path, storage.join(path, SFT)):
        latest = storage.join(base, LATEST)
        if storage.exists(latest) and not storage.exists(storage.join(path, MANIFEST)):
            kind = storage.not_regular(latest)
            if kind:
                raise ReleaseError(f"{latest} is {kind}, not a plain file naming a release; never followed")
            name = storage.read_bytes(latest)[:300].decode("utf-8", "replace").strip()
            if not _VERSION.match(name) or name in (LATEST, TMP):  # "../other/sft/v1", "/abs": never followed
                raise ReleaseError(f"{latest} names {name[:200]!r}, not a version inside {base}: LATEST holds the "
                                   "name of one release folder beside it")
            return storage.join(base, name)
    return path


def validate(path: str, *, published: bool = True, tables: dict[str, list[pa.Table]] | None = None) -> dict:
    """Re-checks a release against its manifest; returns the manifest or raises ReleaseError listing
    every problem: completeness (_SUCCESS and the manifest checksum it holds, when `published`), the
    manifest's own form, unlisted or missing files, sizes, checksums, schemas, row counts, unique ids.
    With `tables` ({} to fill), the data files parsed while checking are kept there by split (in
    manifest order), so a reader gets the validated bytes without reading them again."""
    folder = resolve(path)
    manifest_path = storage.join(folder, MANIFEST)
    if not storage.exists(manifest_path):
        raise ReleaseError(f"{folder}: no {MANIFEST}; not a release folder (or the run did not finish)")
    # A release is plain files in a plain folder: a link (to /dev/zero, to another release) or a device
    # is a problem, and never read, so that checking a tampered release cannot hang or vouch for
    # bytes that live elsewhere.
    special = dict((p[len(folder) + 1:], why) for p, why in storage.special_entries(folder))
    folder_kind = storage.not_regular(folder.rstrip("/"))
    if folder_kind not in (None, "a folder"):
        raise ReleaseError(f"{folder}: the release folder is {folder_kind}; a release is never followed through a link")
    problems = [f"{rel}: {why}; a release holds plain files only" for rel, why in sorted(special.items())]
    for name in (MANIFEST, SUCCESS):
        if name in special:
            raise ReleaseError(f"{folder}: release is not valid:\n  " + "\n  ".join(problems))
    if published:
        success = storage.join(folder, SUCCESS)
        if not storage.exists(success):
            problems.append(f"{folder}: {SUCCESS} missing: the release is incomplete")
        else:
            recorded = storage.read_bytes(success).decode("utf-8", "replace").split()[:1]
            if not recorded:
                problems.append(f"{SUCCESS} holds no checksum of {MANIFEST} (a release made before _SUCCESS held one, or an "
                                f"emptied file): to re-mark it, delete {SUCCESS} and rerun bft assemble with the "
                                "same config")
            elif recorded != [sha256_of(manifest_path)]:
                problems.append(f"{MANIFEST}: its sha256 is not the one {SUCCESS} records: the manifest was "
                                "changed after the release was published")
    try:
        manifest = parse_json(storage.read_bytes(manifest_path))
    except Damaged as e:
        raise ReleaseError(f"{folder}/{MANIFEST}: damaged ({e})") from e
    form = manifest_problems(manifest)
    if form:
        raise ReleaseError(f"{folder}: release is not valid:\n  " + "\n  ".join(problems + form))
    if manifest.get("schema_version") != schemas.SCHEMA_VERSION:
        problems.append(f"{MANIFEST}: schema version {manifest.get('schema_version')}, this code reads "
                        f"{schemas.SCHEMA_VERSION}")
    listed = {f["path"]: f for f in manifest["files"]}
    present = {p[len(folder) + 1:] for p in storage.list_files(folder)} - {MANIFEST, SUCCESS}
    for rel in sorted(present - set(listed) - set(special)):
        problems.append(f"{rel}: present in the release but not listed in {MANIFEST}")
    rows = {"train": 0, "validation": 0}
    ids: list[pa.Array] = []
    for rel, entry in sorted(listed.items()):
        full = storage.join(folder, rel)
        if rel in special:
            continue  # named above, never read
        if rel not in present:
            problems.append(f"{rel}: listed in {MANIFEST} but missing")
            continue
        try:
            size = storage.size(full)
            if size != entry["bytes"]:
                problems.append(f"{rel}: {size} bytes, manifest says {entry['bytes']}")
                continue
            # a data file is read once: the same bytes are checksummed and then parsed
            data = storage.read_bytes(full) if "split" in entry else None
            digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_of(full)
        except OSError as e:  # deleted after listing, access denied (storage.StorageError on gs://)
            problems.append(f"{rel}: cannot be read ({e})")
            continue
        if digest != entry["sha256"]:
            problems.append(f"{rel}: sha256 {digest[:12]}..., manifest says {entry['sha256'][:12]}...")
            continue
        if data is not None:
            try:
                table = schemas.validate(storage.parquet_from_bytes(data), schemas.SFT, rel)
            except (schemas.SchemaError, pa.ArrowInvalid) as e:
                problems.append(str(e))
                continue
            if table.num_rows != entry["rows"]:
                problems.append(f"{rel}: {table.num_rows} rows, manifest says {entry['rows']}")
            rows[entry["split"]] += table.num_rows
            ids.append(table["id"].combine_chunks())
            if tables is not None:
                tables.setdefault(entry["split"], []).append(table)
    for split, n in rows.items():
        expected = manifest["counts"].get(split)
        if expected is not None and expected != n:
            problems.append(f"{split}: {n} rows in the files, manifest counts {expected}")
    if ids:
        all_ids = pa.chunked_array(ids, pa.string())
        if len(pa.compute.unique(all_ids)) != len(all_ids):
            problems.append(f"ids are not unique across the release ({len(all_ids)} rows)")
    if problems:
        raise ReleaseError(f"{folder}: release is not valid:\n  " + "\n  ".join(problems))
    return manifest


def manifest_problems(manifest) -> list[str]:
    """What is wrong with the form of a parsed manifest (a hand-edited or damaged one): each problem
    names the field or the file entry."""
    if not isinstance(manifest, dict):
        return [f"{MANIFEST}: {_kind(manifest)}, expected an object"]
    problems = []
    for key, kind in (("version", str), ("config_hash", str), ("counts", dict),
                      ("files", list)):
        if not isinstance(manifest.get(key), kind):
            problems.append(f"{MANIFEST}: '{key}' is {_kind(manifest.get(key))}, expected {_JSON[kind]}")
    counts = manifest.get("counts")
    if isinstance(counts, dict):
        problems += [f"{MANIFEST}: counts.{split} is {_kind(counts.get(split))}, expected a whole number"
                     for split in SPLITS if not _whole(counts.get(split))]
    seen = set()
    for i, entry in enumerate(manifest.get("files") if isinstance(manifest.get("files"), list) else []):
        where = f"{MANIFEST}: files[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} is {_kind(entry)}, expected an object with path, bytes and sha256")
            continue
        path = entry.get("path")
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/") \
                or path in (MANIFEST, SUCCESS):
            problems.append(f"{where}: 'path' is {path!r}, expected a file name inside the release")
            continue
        if path in seen:
            problems.append(f"{where}: {path} is listed twice")
        seen.add(path)
        if not _whole(entry.get("bytes")):
            problems.append(f"{where} ({path}): 'bytes' is {_kind(entry.get('bytes'))}, expected a whole number")
        sha = entry.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            problems.append(f"{where} ({path}): 'sha256' is {sha!r}, expected 64 hex digits")
        if "split" in entry and (entry["split"] not in SPLITS or not _whole(entry.get("rows"))):
            problems.append(f"{where} ({path}): a data file needs 'split' in {list(SPLITS)} and whole 'rows'")
    return problems


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_JSON = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
         bool: "a boolean"}


def _kind(value) -> str:
    """How a manifest value reads in a problem: missing, or its JSON type (a string is shown)."""
    if value is None:
        return "missing"
    return repr(value) if isinstance(value, str) else _JSON.get(type(value), type(value).__name__)


def load(path: str) -> tuple[dict, dict[str, pa.Table]]:
    """A release (folder, ROOT/sft or run root) validated once and read: (manifest, {split: table});
    every data file is read a single time (the bytes checksummed are the bytes parsed)."""
    tables: dict[str, list[pa.Table]] = {}
    manifest = validate(path, tables=tables)
    return manifest, {split: pa.concat_tables(tables[split]) if tables.get(split) else schemas.SFT.empty_table()
                      for split in SPLITS}


def is_release(path: str) -> bool:
    """Whether `path` is (or names, through LATEST) a release folder."""
    return storage.exists(storage.join(resolve(path), MANIFEST))
