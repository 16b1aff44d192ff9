"""The handoff to training teams: a versioned release folder, its manifest, and its validation.

    ROOT/sft/<version>/train-SSSSS-of-NNNNN.parquet, validation-SSSSS-of-NNNNN.parquet
                      stats.json, report.html, plots/*.png, README.md (dataset card)
                      manifest.json   every other file: size, sha256, rows; schema version; config;
                                      code revision; input lineage
                      _SUCCESS        written last: the release is complete
    ROOT/sft/LATEST                   the newest release that validated (its version name)

A release is never overwritten: publishing a version that exists is a no-op when its config hash
matches (a rerun) and an error otherwise. A folder without _SUCCESS is the debris of a failed run
and is cleared before the version is built again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
import storage
from schemas.errors import UserError
from schemas.options import option
from schemas.layout import LATEST, SFT, TMP, RunLayout, parse_shard_name

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
SPLITS = ("train", "validation")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ReleaseError(UserError):
    """A release is missing, incomplete or does not match its manifest."""


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


def release_dir(root: str, version: str) -> str:
    return RunLayout(root).release(version)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parquet_rows(path: str) -> int:
    with storage.open_read(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def describe_file(folder: str, path: str) -> dict:
    rel = path[len(folder.rstrip("/")) + 1:]
    entry = {"path": rel, "bytes": storage.size(path), "sha256": sha256_of(path)}
    parsed = parse_shard_name(rel)
    if parsed and parsed[0] in SPLITS:
        entry.update(split=parsed[0], rows=parquet_rows(path))
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
        import bft

        return os.environ.get("BFT_CODE_REVISION") or f"bft {bft.__version__}"


def write_manifest(folder: str, *, version: str, chash: str, config: dict, lineage: dict, counts: dict) -> dict:
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
    storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    return manifest


def mark_complete(folder: str) -> None:
    storage.write_text(storage.join(folder, SUCCESS), "")


def resolve(path: str) -> str:
    """A release folder from PATH: the folder itself, or ROOT/sft (or ROOT) whose LATEST names one."""
    path = path.rstrip("/")
    for base in (path, storage.join(path, SFT)):
        latest = storage.join(base, LATEST)
        if storage.exists(latest) and not storage.exists(storage.join(path, MANIFEST)):
            return storage.join(base, storage.read_text(latest).strip())
    return path


def validate(path: str, tables: dict[str, list[pa.Table]] | None = None) -> dict:
    """Re-checks a release against its manifest; returns the manifest or raises ReleaseError listing
    every problem: completeness, unlisted or missing files, sizes, checksums, schemas, row counts,
    unique ids. With `tables` ({} to fill), the data files parsed while checking are kept there by
    split (in manifest order), so a reader gets the validated bytes without reading them again."""
    folder = resolve(path)
    if not storage.exists(storage.join(folder, MANIFEST)):
        raise ReleaseError(f"{folder}: no {MANIFEST}; not a release folder (or the run did not finish)")
    problems = []
    if not storage.exists(storage.join(folder, SUCCESS)):
        problems.append(f"{folder}: {SUCCESS} missing: the release is incomplete")
    try:
        manifest = json.loads(storage.read_text(storage.join(folder, MANIFEST)))
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{folder}/{MANIFEST}: not valid JSON ({e})") from e
    if manifest.get("schema_version") != schemas.SCHEMA_VERSION:
        problems.append(f"{MANIFEST}: schema version {manifest.get('schema_version')}, this code reads "
                        f"{schemas.SCHEMA_VERSION}")
    listed = {f["path"]: f for f in manifest.get("files", [])}
    present = {p[len(folder) + 1:] for p in storage.list_files(folder)} - {MANIFEST, SUCCESS}
    for rel in sorted(present - set(listed)):
        problems.append(f"{rel}: present in the release but not listed in {MANIFEST}")
    rows = {"train": 0, "validation": 0}
    ids: list[pa.Array] = []
    for rel, entry in sorted(listed.items()):
        full = storage.join(folder, rel)
        if rel not in present:
            problems.append(f"{rel}: listed in {MANIFEST} but missing")
            continue
        size = storage.size(full)
        if size != entry["bytes"]:
            problems.append(f"{rel}: {size} bytes, manifest says {entry['bytes']}")
            continue
        # a data file is read once: the same bytes are checksummed and then parsed
        data = storage.read_bytes(full) if "split" in entry else None
        digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_of(full)
        if digest != entry["sha256"]:
            problems.append(f"{rel}: sha256 {digest[:12]}..., manifest says {entry['sha256'][:12]}...")
            continue
        if data is not None:
            try:
                table = schemas.validate(pq.read_table(pa.BufferReader(data)), schemas.SFT, rel)
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
        expected = manifest.get("counts", {}).get(split)
        if expected is not None and expected != n:
            problems.append(f"{split}: {n} rows in the files, manifest counts {expected}")
    if ids:
        all_ids = pa.chunked_array(ids, pa.string())
        if len(pa.compute.unique(all_ids)) != len(all_ids):
            problems.append(f"ids are not unique across the release ({len(all_ids)} rows)")
    if problems:
        raise ReleaseError(f"{folder}: release is not valid:\n  " + "\n  ".join(problems))
    return manifest


def load(path: str) -> tuple[dict, dict[str, pa.Table]]:
    """A release (folder, ROOT/sft or run root) validated once and read: (manifest, {split: table});
    every data file is read a single time (the bytes checksummed are the bytes parsed)."""
    tables: dict[str, list[pa.Table]] = {}
    manifest = validate(path, tables)
    return manifest, {split: pa.concat_tables(tables[split]) if tables.get(split) else schemas.SFT.empty_table()
                      for split in SPLITS}


def is_release(path: str) -> bool:
    """Whether `path` is (or names, through LATEST) a release folder."""
    return storage.exists(storage.join(resolve(path), MANIFEST))


def publish_latest(root: str, version: str) -> None:
    """Points ROOT/sft/LATEST at `version`, after validating it."""
    validate(release_dir(root, version))
    storage.write_text(RunLayout(root).latest, version + "\n")
