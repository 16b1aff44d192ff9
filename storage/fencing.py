"""Fencing: a holder that lost its lock writes nothing more below the folder the lock guards.

A lock this process holds over a folder (storage.lock, a run root's RootLock) is registered with
`fence`; every write, rename and delete below that folder first asks it (`check`, which calls the
lock's `verify`), so a holder that lost its lock (taken over, its file removed) writes nothing more
there. On gs:// a write is also conditioned on the object's generation as read BEFORE the lock was
verified (storage.gcs's fenced upload: `if_generation_match`): a new holder takes the lock before it
writes, so an object it wrote after our check fails our write (412) instead of being overwritten, and
one it writes later overwrites ours: the old holder never replaces what the new one wrote. Locally
the lock file's inode is checked just before the rename that publishes a file.

Paths here are as each backend makes them absolute (`absolute`: a local path through os.path.abspath,
a gs:// path as it is), so that a folder and the paths below it compare as strings.
"""
from __future__ import annotations

from storage.errors import mapped

_FENCES: list[tuple[str, object]] = []   # (folder, lock) of the locks this process holds


def fence(folder: str, lock) -> None:
    """Fences the writes below the absolute `folder` with `lock` (its `verify(max_age_s)` raises once
    it is lost)."""
    _FENCES.append((folder, lock))


def unfence(lock) -> None:
    _FENCES[:] = [(folder, held) for folder, held in _FENCES if held is not lock]


def _below(where: str, folder: str) -> bool:
    return where == folder or where.startswith(folder.rstrip("/") + "/")


def covers(where: str) -> bool:
    """Whether a lock this process holds fences the absolute path `where`."""
    return any(_below(where, folder) for folder, _ in _FENCES)


def check(where: str, max_age_s: float = 0.0) -> None:
    """Raises the lost-lock error of a lock this process holds over the absolute path `where` once it
    is not ours. `max_age_s`: a lock verified (on gs://, one metadata read) that recently is taken as
    still ours unless it is known lost (for checks between requests, too frequent for a read each)."""
    if not _FENCES:
        return
    for folder, lock in list(_FENCES):
        if _below(where, folder):
            try:
                lock.verify(max_age_s)
            except Exception as e:   # the lock object could not be read: an OSError naming it
                error = mapped(e, lock.path)
                if error is None:
                    raise
                raise error from e
