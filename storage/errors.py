"""The errors of storage, and how a GCS client's exceptions become them.

A bucket is treated as a disk is: GCS's errors become the OSErrors a local file gives (`mapped`,
applied to every call of the GCS backend by `gcs_errors`), so that every caller handles both alike
(--skip-unreadable-files, a release problem, a one-line error naming the path). A full local disk is
`DiskFull`, a file the user named that cannot be read whole is `NotAnInput`.
"""
from __future__ import annotations

import errno
import functools


class StorageError(OSError):
    """A stored object could not be read or written: GCS's errors as the OSErrors a local file gives
    (NotFound -> FileNotFoundError, Forbidden/Unauthorized -> PermissionError, a 429/5xx or a dropped
    connection still failing after the client's own retries -> OSError), so that every caller treats
    a bucket as it treats a disk (--skip-unreadable-files, a release problem, a one-line error). The
    message names the gs:// path."""

    def __init__(self, code: int, message: str, path: str):
        super().__init__(code, message, path)

    def __str__(self) -> str:
        return self.strerror


class StoredFileNotFound(StorageError, FileNotFoundError):
    pass


class StoredFileForbidden(StorageError, PermissionError):
    pass


class DiskFull(StorageError):
    """A local write found no space left (ENOSPC) or the user's quota spent (EDQUOT): one line naming
    the folder and the bytes the write needed. Writes are whole or not at all, so nothing written
    before is touched, and a rerun after space is freed resumes."""


FULL = (errno.ENOSPC, errno.EDQUOT)   # the errnos of a DiskFull


def disk_full(code: int, folder: str, name: str, needed: str) -> DiskFull:
    why = "no space left on the device" if code == errno.ENOSPC else "the disk quota is spent"
    return DiskFull(code, f"{folder}: {why} while writing {name} ({needed} needed); free space there "
                                 "and run again (what was written before is kept)", folder)


class NotAnInput(StorageError):
    """A file the user named that is no regular file, or over the size limit of its kind."""


def mapped(error: Exception, path: str) -> Exception | None:
    """The StorageError for a GCS client's exception, or None for one that is not about storage."""
    if isinstance(error, StorageError):
        return None
    from google.api_core import exceptions as gexc

    detail = (getattr(error, "message", None) or str(error) or type(error).__name__).splitlines()[0][:300]
    if isinstance(error, gexc.NotFound):
        return StoredFileNotFound(errno.ENOENT, f"{path}: not found in the bucket (deleted after it was listed?)", path)
    if isinstance(error, (gexc.Forbidden, gexc.Unauthorized)):
        return StoredFileForbidden(errno.EACCES, f"{path}: access denied ({detail})", path)
    if isinstance(error, (gexc.GoogleAPIError, gexc.RetryError)) or _is_transport_error(error):
        return StorageError(errno.EIO, f"{path}: {type(error).__name__} after the storage client's retries "
                                       f"({detail})", path)
    return None


def _is_transport_error(error: Exception) -> bool:
    import requests
    from google.auth import exceptions as auth_exc

    return isinstance(error, (requests.exceptions.RequestException, auth_exc.TransportError, ConnectionError))


def gcs_errors(func):
    """A call on a gs:// path (its first argument) raises StorageError (see `mapped`) instead of the
    client's exceptions."""
    @functools.wraps(func)
    def wrapper(path, *args, **kwargs):
        try:
            return func(path, *args, **kwargs)
        except Exception as e:
            error = mapped(e, path)
            if error is None:
                raise
            raise error from e
    return wrapper
