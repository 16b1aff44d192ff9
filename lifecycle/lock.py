"""One writer per root: `RootLock`, the exclusive lock a writer of a run root holds while it runs.

    with RootLock(cfg.root):                                   # <root>/_lock/root
        ...
    with RootLock(cfg.root, lock_name(stage, index, workers)): # <root>/_lock/generate-<stage>-<I>-of-<W>

The lock itself (flock locally, generation preconditions and a heartbeat on gs://) is storage.lock's;
this module names its path (schemas.layout.RunLayout.lock) and makes its failures UserErrors, so a
second writer is one line naming the holder and exit 1. It fences the holder's writes below the root
(storage.fencing): a holder that lost its lock writes nothing more there. The lock is taken by the
command line only (bft.cli for prepare, generate and assemble; bft.rebuild around the whole rebuild),
never by the steps themselves, so `bft rebuild` calling prepare, generate and assemble in-process
does not lock twice.
"""
from __future__ import annotations

import storage
from schemas.errors import UserError
from schemas.layout import RunLayout, lock_name
from storage import lock

__all__ = ["LockHeld", "LockLost", "RootLock", "lock_name"]


class LockHeld(UserError, lock.LockBusy):
    """Another run holds the root's lock; the message names the lock, the holder and what to do."""


class LockLost(UserError, lock.LockBroken):
    """The lock was taken over (or its file removed) while this run held it."""


class RootLock(lock.Lock):
    """The exclusive lock `name` on the run root `root` (local or gs://); see storage.lock."""

    held_error = LockHeld
    lost_error = LockLost

    def __init__(self, root: "str | RunLayout", name: str = "root", *, heartbeat_s: float = 60.0,
                 stale_s: float = 600.0):
        self.layout = root if isinstance(root, RunLayout) else RunLayout(root)
        super().__init__(self.layout.lock(name), heartbeat_s=heartbeat_s, stale_s=stale_s, fences=self.layout.root)

    def acquire(self) -> "RootLock":
        folder = storage.parent(self.path)
        if not storage.is_gcs(folder):
            try:  # a file where the root (or a folder above it) should be: say so, as the verbs' own checks do
                storage.check_writable(folder)
            except OSError as e:
                where = f" ({e.filename})" if getattr(e, "filename", None) else ""
                raise UserError(f"--root: cannot write {folder}: {e.strerror or e}{where}") from e
        try:
            return super().acquire()
        except lock.LockBusy:
            raise
        except Exception as e:  # OSError locally; google.api_core's NotFound, Forbidden and the like on gs://
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"--root: cannot take the lock {self.path} ({reason})") from e
