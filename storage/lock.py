"""An exclusive lock on one file or gs:// object, held by one process at a time.

The mechanism only: the caller names the lock's path (schemas.layout.RunLayout.lock) and the errors
to raise (lifecycle.lock.RootLock makes them UserErrors); this module imports nothing above storage/.
The holder's record, and whether its process still lives, are storage.holder's.

Local path: `fcntl.flock(LOCK_EX | LOCK_NB)` on the lock file. The kernel releases the lock when the
holder's process ends however it ends (kill -9 included), so a dead holder's lock is simply taken by
the next run; nothing is ever stale. The holder's JSON is written into the file after the lock is
taken (truncate, write, fsync) for the message of the next writer that is refused. On release the
file is emptied and unlocked but kept: removing a flock'ed file races (B opens the file, A unlinks it
and unlocks, B locks the unlinked inode while C creates a new file and locks that: two holders), so
the file stays and only the lock on it comes and goes. A holder checks (`check()`) that the path still
names the inode it locked, which catches a lock file removed by hand while it was held. flock works
on local file systems and, on Linux, on NFS (emulated with byte-range locks).

gs://: there is no kernel to free a dead holder's lock, so the object carries a heartbeat:
- take: create the object with `if_generation_match=0` (only one creator can win);
- hold: a daemon thread rewrites it every `heartbeat_s` with `if_generation_match=<our generation>`;
  a precondition that fails means someone took the lock over: recorded, and `check()` and the end
  of the `with` block raise `lost_error`;
- take over: a lock whose object was last written (its `updated` time, GCS's own clock) more than
  `stale_s` ago, or whose holder ran on this machine (same host name, boot and pid namespace) in a
  process that no longer exists, is deleted with `if_generation_match=<the generation read>` and
  created again with `if_generation_match=0`: of several contenders only one wins both;
- release: delete with `if_generation_match=<our generation>`.
Staleness compares GCS's clock with this machine's: clocks must agree to well within `stale_s`.

Fencing: a lock made with `fences=FOLDER` (a run root's) fences this process's writes below FOLDER
while it is held (storage.fence): each write first calls `verify()`, which on gs:// reads the lock
object's generation (one metadata request) and records the lock lost when it is no longer ours, and
locally checks that the path still names the inode we locked. A holder paused past `stale_s` (a
laptop's sleep, SIGSTOP, a stalled VM) and taken over therefore writes nothing when it wakes, and a
caller that checks between its own steps (`storage.check_fences`) stops at once.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import threading
import time

import storage
from storage import gcs
from storage.holder import describe, holder_info, iso, now, process_gone, same_machine

log = logging.getLogger(__name__)


class LockBusy(Exception):
    """Another process holds the lock. `path` and `holder` (its JSON, {} when unreadable)."""

    def __init__(self, message: str, path: str = "", holder: dict | None = None):
        super().__init__(message)
        self.path, self.holder = path, holder or {}


class LockBroken(Exception):
    """The lock was taken over (or its file removed) while we held it."""


class Lock:
    """`with Lock(path): ...` holds the exclusive lock at `path` (local or gs://) for the block.

    A second holder fails at once with `held_error` (a LockBusy unless a subclass says otherwise);
    a lock lost while held raises `lost_error` from `check()` and at the end of the block.
    """

    held_error: type = LockBusy
    lost_error: type = LockBroken

    def __init__(self, path: str, *, heartbeat_s: float = 60.0, stale_s: float = 600.0, fences: str | None = None):
        self.path, self.heartbeat_s, self.stale_s, self.fences = path, heartbeat_s, stale_s, fences
        self._verified = 0.0                  # monotonic time of the last verify() that read the lock
        self.holder: dict | None = None
        self.lost: str | None = None          # why the lock was lost, once it is
        self.generation: int | None = None    # gs://: the generation of our object
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = threading.Lock()        # the heartbeat thread and release() take turns

    # ---- the interface ----------------------------------------------------------------------------
    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.release(raise_lost=exc_type is None)
        return False

    def acquire(self) -> "Lock":
        if self.holder is not None:
            raise RuntimeError(f"{self.path}: already held by this Lock")
        holder = holder_info()
        self.lost, self.generation, self._stop = None, None, threading.Event()
        if storage.is_gcs(self.path):
            self._acquire_gcs(holder)
        else:
            self._acquire_local(holder)
        self._verified = time.monotonic()
        if self.fences is not None:
            storage.fence(self.fences, self)
        return self

    def check(self) -> None:
        """Raises `lost_error` when the lock is no longer ours."""
        if self._fd is not None:
            self._check_inode(self._fd)
        if self.lost is not None:
            raise self.lost_error(self._lost_message())

    def verify(self, max_age_s: float = 0.0) -> None:
        """Raises `lost_error` when the lock is no longer ours, asking the store (gs://: the lock
        object's generation, one metadata read) unless it did so less than `max_age_s` seconds ago."""
        if storage.is_gcs(self.path) and self.lost is None and self.holder is not None \
                and time.monotonic() - self._verified >= max_age_s:
            from google.api_core import exceptions as gexc

            with self._state:   # not while the heartbeat rewrites it
                blob = self._blob()
                try:
                    blob.reload()
                    if int(blob.generation) != self.generation:
                        self.lost = "another run took it over"
                except gexc.NotFound:
                    self.lost = "it was deleted"
                self._verified = time.monotonic()
            if self.lost is not None:
                log.error("%s", self._lost_message())
        self.check()

    def release(self, raise_lost: bool = True) -> None:
        if self.holder is None:
            return
        storage.unfence(self)
        try:
            if storage.is_gcs(self.path):
                self._release_gcs()
            else:
                self._release_local()
        finally:
            self.holder = None
        if raise_lost and self.lost is not None:
            raise self.lost_error(self._lost_message())

    # ---- messages ---------------------------------------------------------------------------------
    def _held_message(self, holder: dict, age_s: float | None = None) -> str:
        if storage.is_gcs(self.path):
            heard = f" (last heartbeat {age_s:.0f} s ago)" if age_s is not None else ""
            todo = (f"wait for it to finish; a holder that stopped (no heartbeat for {self.stale_s:g} s) is "
                    f"taken over automatically, or delete {self.path} if you are sure it is gone")
        else:
            heard = ""
            todo = (f"wait for it to finish (a holder that died frees the lock by itself), or remove "
                    f"{self.path} if you are sure it is gone")
        return f"{self.path} is held by another run: {describe(holder)}{heard}; one writer per root: {todo}"

    def _lost_message(self) -> str:
        fenced = (f"; it stopped, writing nothing more under {self.fences} (fenced)" if self.fences is not None
                  else ": another run may have written the same files")
        return (f"{self.path}: this run lost its lock ({self.lost}){fenced}; check what the run that holds it now "
                "did before trusting this run's output")

    # ---- local: flock -----------------------------------------------------------------------------
    def _acquire_local(self, holder: dict) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(10):
            try:   # O_NOFOLLOW: a lock file that is a link (to sft/LATEST, say) is never written through
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise OSError(f"{self.path} is a symbolic link (to {os.readlink(self.path)[:200]!r}), never followed: "
                              "remove it, and the next run makes a plain lock file") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                seen = _read_holder_fd(fd)
                os.close(fd)
                raise self.held_error(self._held_message(seen), self.path, seen) from None
            if not self._names(fd):  # the file was removed between our open and our lock: lock the new one
                os.close(fd)
                continue
            try:
                data = json.dumps(holder).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)  # closing the only descriptor unlocks
                raise
            self._fd, self.holder = fd, holder
            return
        raise OSError(f"{self.path}: the lock file keeps being replaced; is something removing it?")

    def _release_local(self) -> None:
        fd, self._fd = self._fd, None
        try:
            self._check_inode(fd)
            os.ftruncate(fd, 0)  # the file at rest names no holder
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _check_inode(self, fd: int) -> None:
        """Records a loss when the path no longer names the file we locked (removed by hand)."""
        if not self._names(fd) and self.lost is None:
            self.lost = "its lock file was removed or replaced while we held it"

    def _names(self, fd: int) -> bool:
        """The path still names the file open as `fd`."""
        try:
            st, mine = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    # ---- gs://: generation preconditions and a heartbeat -------------------------------------------
    def _blob(self):
        return gcs.blob(self.path)

    def _read(self):
        """(generation, holder, seconds since the object was last written) of the lock object, or None
        when there is none."""
        from google.api_core import exceptions as gexc

        blob = self._blob()
        try:
            blob.reload()
            generation, written = int(blob.generation), blob.updated  # (a download resets the properties)
            data = blob.download_as_bytes(if_generation_match=generation)
        except (gexc.NotFound, gexc.PreconditionFailed):
            return None  # gone or rewritten between the two requests: look again
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {}
        if written is None and holder.get("heartbeat"):
            written = datetime.datetime.fromisoformat(holder["heartbeat"].replace("Z", "+00:00"))
        age = (now() - written).total_seconds() if written is not None else None
        return generation, holder, age

    def _payload(self, holder: dict) -> bytes:
        return json.dumps({**holder, "heartbeat": iso(now())}).encode()

    def _acquire_gcs(self, holder: dict) -> None:
        from google.api_core import exceptions as gexc

        for _ in range(20):
            blob = self._blob()
            try:
                blob.upload_from_string(self._payload(holder), content_type="application/json",
                                        if_generation_match=0)
            except gexc.PreconditionFailed:
                pass  # someone holds it: read who
            else:
                self.generation, self.holder = int(blob.generation), holder
                self._thread = threading.Thread(target=self._heartbeat, name=f"lock-heartbeat {self.path}",
                                                daemon=True)
                self._thread.start()
                return
            seen = self._read()
            if seen is None:
                continue  # released meanwhile: try to create it again
            generation, other, age = seen
            stale = age is not None and age > self.stale_s
            if not (stale or process_gone(other)):
                raise self.held_error(self._held_message(other, age), self.path, other)
            log.warning("%s: taking over the lock of %s (%s)", self.path, describe(other),
                        f"no heartbeat for {age:.0f} s" if stale else "its process is gone")
            try:
                self._blob().delete(if_generation_match=generation)
            except (gexc.PreconditionFailed, gexc.NotFound):
                pass  # another contender got there first; the create decides
        raise OSError(f"{self.path}: could not take the lock after 20 attempts (it keeps changing)")

    def _heartbeat(self) -> None:
        from google.api_core import exceptions as gexc

        while not self._stop.wait(self.heartbeat_s):
            with self._state:
                if self._stop.is_set() or self.lost is not None:
                    return
                blob = self._blob()
                try:
                    blob.upload_from_string(self._payload(self.holder), content_type="application/json",
                                            if_generation_match=self.generation)
                    self.generation = int(blob.generation)
                except (gexc.PreconditionFailed, gexc.NotFound):
                    self.lost = "another run took it over, or it was deleted"
                    log.error("%s", self._lost_message())
                    return
                except Exception as e:  # a network error: the next beat tries again
                    log.warning("%s: heartbeat failed (%s); retrying in %g s", self.path, e, self.heartbeat_s)

    def _release_gcs(self) -> None:
        from google.api_core import exceptions as gexc

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._state:
            if self.lost is not None:
                return  # not ours any more: leave the new holder's object alone
            try:
                self._blob().delete(if_generation_match=self.generation)
            except gexc.PreconditionFailed:
                self.lost = "another run took it over"
            except gexc.NotFound:
                log.warning("%s: the lock was already gone at release", self.path)


def _read_holder_fd(fd: int) -> dict:
    """The holder JSON in a lock file held by someone else; it writes it just after locking, so an
    empty file is read again a few times."""
    for attempt in range(5):
        try:
            data = os.pread(fd, 1 << 16, 0)
            if data:
                return json.loads(data)
        except (OSError, ValueError):
            pass
        time.sleep(0.02 * (attempt + 1))
    return {}


def peek(path: str, stale_s: float = 600.0) -> dict | None:
    """Who holds the lock at `path`, read without taking it (a test-lock would refuse a writer that
    starts meanwhile): None when it is free, else {"holder": its record, "stale": bool, "why": str}.
    Stale: its holder ran on this machine and its process is gone, or (gs://) it has not beaten for
    `stale_s`; the next writer takes such a lock. A local holder on another machine cannot be checked
    from here (`checked` False): its record says it holds the lock."""
    if storage.is_gcs(path):
        seen = Lock(path, stale_s=stale_s)._read()
        if seen is None:
            return None
        _, holder, age = seen
        if age is not None and age > stale_s:
            return {"holder": holder, "stale": True, "checked": True, "why": f"no heartbeat for {age:.0f} s"}
        gone = process_gone(holder)
        return {"holder": holder, "stale": gone, "checked": True,
                "why": "its process is gone" if gone else f"last heartbeat {age:.0f} s ago" if age is not None else ""}
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except FileNotFoundError:
        return None
    if not data.strip():   # a released lock file names no holder
        return None
    try:
        holder = json.loads(data)
    except ValueError:
        holder = {}
    holder = holder if isinstance(holder, dict) else {}
    gone = process_gone(holder)
    return {"holder": holder, "stale": gone, "checked": same_machine(holder),
            "why": "its process is gone" if gone else ""}
