"""Publishing: the one way a release is made (lifecycle.release says the protocol's steps), and LATEST
moved to it."""
from __future__ import annotations

import time
from typing import Callable

import storage
from lifecycle.release.manifest import (MANIFEST, SPLITS, SUCCESS, ReleaseError, check_version_name, config_hash,
                                   default_version, recorded_hash, success_line, write_manifest)
from lifecycle.release.read import latest_version, validate
from schemas.layout import DATA, RunLayout, parse_shard_name, release_data_file, release_split_of


class HeldRelease(ReleaseError):
    """A release published (valid, _SUCCESS) that LATEST was not moved to: its alerts say why."""

    def __init__(self, folder: str, alerts: list[str], how: str):
        self.folder, self.alerts = folder, list(alerts)
        super().__init__(f"{folder}: published, but LATEST not moved to it: ALERT {'; ALERT '.join(alerts)}; {how}")


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
    recorded = recorded_hash(storage.join(folder, MANIFEST))
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


def _latest_of_hash(layout: RunLayout, chash: str) -> str | None:
    """The folder LATEST names when that release is published and was made from `chash`, else None."""
    latest = latest_version(layout)
    if latest is None:
        return None
    folder = layout.release(latest)
    if recorded_hash(storage.join(folder, MANIFEST)) != chash or not storage.exists(storage.join(folder, SUCCESS)):
        return None
    validate(folder)
    return folder


def _validates(folder: str) -> bool:
    try:
        validate(folder, published=False)
        return True
    except ReleaseError:
        return False
