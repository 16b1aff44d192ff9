"""A run's own temporary folder, claimed: another run cleaning up debris deletes it only once the
process that claimed it is gone (storage.holder)."""
from __future__ import annotations

import datetime
import json
import time

import storage
from storage.holder import holder_info, process_gone, same_machine

OWNER = "_owner.json"
FOREIGN_STALE_S = 24 * 3600.0


def claim_folder(folder: str) -> None:
    """Marks `folder` (a run's temporary folder, before anything is written to it) as this process's,
    so that another run cleaning up debris never deletes it while this process is alive."""
    storage.write_text(storage.join(folder, OWNER), json.dumps(holder_info()))


def clear_dead_folders(parent: str, now: float | None = None) -> list[str]:
    """Deletes the run folders under `parent` left by runs that are gone: no owner record (killed before
    it was written, or made by older code), or an owner on this machine whose process no longer exists,
    or one on another machine whose record is older than FOREIGN_STALE_S. A folder of a live run (of
    this machine, or recent on another) is kept. Returns the folders deleted."""
    prefix = parent.rstrip("/") + "/"
    folders: dict[str, list[str]] = {}
    for path in storage.list_files(parent):
        name = path[len(prefix):].split("/", 1)[0]
        folders.setdefault(name, []).append(path)
    deleted = []
    now = time.time() if now is None else now
    for name, files in sorted(folders.items()):
        folder = storage.join(parent, name)
        owner_path = storage.join(folder, OWNER)
        holder = None
        if owner_path in files:
            try:
                holder = json.loads(storage.read_text(owner_path))
            except (OSError, ValueError):
                holder = None
        if isinstance(holder, dict) and holder.get("pid"):
            if same_machine(holder):
                if not process_gone(holder):
                    continue
            else:
                started = holder.get("started")
                try:
                    age = now - datetime.datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(
                        tzinfo=datetime.timezone.utc).timestamp()
                except (TypeError, ValueError):
                    age = FOREIGN_STALE_S + 1
                if age <= FOREIGN_STALE_S:
                    continue
        storage.delete_tree(folder)
        deleted.append(folder)
    return deleted
