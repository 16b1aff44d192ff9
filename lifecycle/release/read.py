"""A release as its readers take it: the folder sft/LATEST names (followed only to a version beside
it), validated against its manifest, its data files listed and loaded (each read once), and the
options of `bft validate` and `bft latest`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa

import schemas
import storage
from lifecycle.release.manifest import (MANIFEST, SPLITS, SUCCESS, _VERSION, ReleaseError, manifest_problems, read_manifest,
                                   sha256_of)
from lifecycle.state import Damaged, parse_json
from schemas.layout import DATA, LATEST, SFT, TMP, RunLayout
from schemas.options import option


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
    loaders (`pd.read_parquet("$(bft latest ROOT)")`; in Python `lifecycle.release.latest_data(ROOT)`)."""

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


def data_files(folder: str) -> list[str]:
    """The data files a published release's manifest lists (its entries with a split), in manifest
    order, as paths: what a reader of the release reads, whatever its layout (data/, or beside the
    card in older releases). A manifest that cannot be read or is malformed is a ReleaseError."""
    manifest = read_manifest(folder)
    return [storage.join(folder, e["path"]) for e in manifest["files"] if e.get("split") in SPLITS]


def latest_name(base: str, check: bool = True) -> str | None:
    """The one reader of LATEST: the version `base`/LATEST names (base: a ROOT/sft folder), or None
    when there is none. With `check` (before it is followed), a LATEST that is not a plain file, or
    that names anything but a release folder beside it, is a ReleaseError."""
    latest = storage.join(base, LATEST)
    if not storage.exists(latest):
        return None
    if not check:
        return storage.read_text(latest).strip()
    kind = storage.not_regular(latest)
    if kind:
        raise ReleaseError(f"{latest} is {kind}, not a plain file naming a release; never followed")
    name = storage.read_bytes(latest)[:300].decode("utf-8", "replace").strip()
    if not _VERSION.match(name) or name in (LATEST, TMP):  # "../other/sft/v1", "/abs": never followed
        raise ReleaseError(f"{latest} names {name[:200]!r}, not a version inside {base}: LATEST holds the "
                           "name of one release folder beside it")
    return name


def latest_version(layout: RunLayout) -> str | None:
    """The version ROOT/sft/LATEST names (as written; `resolve` checks it before following it), or
    None when there is no LATEST."""
    return latest_name(layout.sft, check=False)


def parent_of(layout: RunLayout, version: str) -> str | None:
    """The parent of a release `version` being built: the version LATEST names now (another than
    `version`, a name a release folder may have), else None. Its changes and alerts are measured
    against it when it is published (`is_published`)."""
    parent = latest_name(layout.sft, check=False)
    return parent if parent and parent != version and _VERSION.match(parent) else None


def is_published(folder: str) -> bool:
    """Whether a release folder is whole: its _SUCCESS written last by publish."""
    return storage.exists(storage.join(folder, SUCCESS))


def resolve(path: str) -> str:
    """A release folder from PATH: the folder itself, or ROOT/sft (or ROOT) whose LATEST names one."""
    path = path.rstrip("/")
    if storage.exists(storage.join(path, MANIFEST)):   # a release folder itself
        return path
    for base in (path, storage.join(path, SFT)):
        name = latest_name(base)
        if name is not None:
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
