"""The manifest of a release: what it lists (every file's size, sha256 and rows; the config and input
lineage; the code revision), its form checked as read, and the _SUCCESS line that seals it
(lifecycle.release says how a release is laid out and published)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time

import pyarrow.parquet as pq

import schemas
import storage
from lifecycle.state import Damaged, parse_json
from schemas.errors import UserError
from schemas.layout import LATEST, MANIFEST, SUCCESS, TMP, release_split_of  # noqa: F401 (MANIFEST, SUCCESS: re-exported)

SPLITS = ("train", "validation")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ReleaseError(UserError):
    """A release is missing, incomplete or does not match its manifest."""


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


def recorded_hash(manifest_path: str) -> str | None:
    """The config hash a (possibly unfinished or damaged) manifest records, or None."""
    if not storage.exists(manifest_path):
        return None
    try:
        manifest = parse_json(storage.read_bytes(manifest_path))
    except Damaged:
        return None
    return manifest.get("config_hash") if isinstance(manifest, dict) else None


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
