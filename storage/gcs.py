"""The gs:// backend: objects in Google Cloud Storage through google-cloud-storage (storage's face
calls it for every gs:// path). Every function of storage.local is here with the same name and
arguments.

When STORAGE_EMULATOR_HOST is set (the gcp-storage-emulator in tests) the client uses anonymous
credentials, so no credential lookup and its retries happen. A write is one upload, which creates the
object whole when it completes; below a fence it is conditioned on the object's generation
(storage.fencing). Every call raises StorageError, not the client's exceptions (storage.errors).
Objects are always plain files and an upload that does not complete leaves nothing, so the checks
of links, devices and debris find nothing here.
"""
from __future__ import annotations

import errno
import functools
import io
import os
import pathlib
import posixpath
import re
import tempfile
from typing import BinaryIO

import pyarrow as pa

from storage import fencing, tables
from storage.errors import StorageError, gcs_errors, mapped
from storage.local import TMP_PREFIX


def absolute(path: str) -> str:
    return path


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def parent(path: str) -> str:
    return posixpath.dirname(path.rstrip("/"))


def _split(path: str) -> tuple[str, str]:
    bucket, _, name = path[len("gs://"):].partition("/")
    if not bucket:
        raise ValueError(f"{path}: a gs:// path needs a bucket")
    return bucket, name


@functools.lru_cache(maxsize=1)
def gcs_client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator"),
                              credentials=AnonymousCredentials())
    return storage.Client()


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY


def blob(path: str):
    """The client's Blob of the object at `path`."""
    bucket, name = _split(path)
    return gcs_client().bucket(bucket).blob(name)


def _md5(data: bytes) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _fenced_upload(path: str, upload, md5_of) -> None:
    """`upload(**precondition)` of a gs:// object: below a fence, conditioned on the generation read
    before the fence is verified (storage.fencing); a 412 is our own upload retried after it landed
    (the same md5) or another writer's object, which stays."""
    if not fencing.covers(path):
        upload()
        return
    from google.api_core import exceptions as gexc

    stored = blob(path)
    try:
        stored.reload()
        generation = int(stored.generation)
    except gexc.NotFound:
        generation = 0
    fencing.check(path)
    try:
        upload(if_generation_match=generation)
    except gexc.PreconditionFailed:
        fencing.check(path)
        stored = blob(path)
        stored.reload()
        if stored.md5_hash != md5_of():
            raise StorageError(errno.EBUSY, f"{path}: another writer replaced it while this run wrote it; "
                                            "not overwritten", path) from None


class _Reader(io.RawIOBase):
    """A GCS blob reader whose read errors (the object deleted after it was listed, a connection
    dropped past the client's retries) are StorageErrors naming the path."""

    def __init__(self, path: str, reader):
        self.path, self.reader = path, reader

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:  # Parquet readers seek to the footer
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call(self.reader.seek, offset, whence)

    def tell(self) -> int:
        return self.reader.tell()

    def _call(self, func, *args):
        try:
            return func(*args)
        except Exception as e:
            error = mapped(e, self.path)
            if error is None:
                raise
            raise error from e

    def readinto(self, buffer) -> int:
        data = self._call(self.reader.read, len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self.reader.close()
        except Exception:  # closing a reader of a deleted object must not hide the read's error
            pass
        super().close()


@gcs_errors
def size(path: str) -> int:
    stored = blob(path)
    stored.reload()
    return int(stored.size)


@gcs_errors
def fingerprint(path: str) -> dict:
    """GCS's own size and crc32c (one metadata request, no download)."""
    stored = blob(path)
    stored.reload()
    return {"bytes": int(stored.size), "checksum": f"crc32c:{stored.crc32c}"}


@gcs_errors
def exists(path: str) -> bool:
    return blob(path).exists()


@gcs_errors
def open_read(path: str) -> BinaryIO:
    return io.BufferedReader(_Reader(path, blob(path).open("rb", chunk_size=8 << 20)), 1 << 20)


@gcs_errors
def read_bytes(path: str) -> bytes:
    return blob(path).download_as_bytes()


@gcs_errors
def write_bytes(path: str, data: bytes) -> None:
    """A single upload."""
    # our writes replace a whole object with the same bytes when repeated, so a 429/5xx is retried
    # (the client retries an upload without a precondition only when told)
    _fenced_upload(path, lambda **pre: blob(path).upload_from_string(data, retry=_retry(), **pre),
                   lambda: _md5(data))


def write_parquet(table: pa.Table, path: str, compression: str) -> int:
    """Streamed to a temporary file on local disk, then one upload."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + posixpath.basename(path) + ".")
    os.close(fd)
    try:
        size = tables.write_file(table, tmp, compression, path)
        try:
            _fenced_upload(path, lambda **pre: blob(path).upload_from_filename(tmp, retry=_retry(), **pre),
                           lambda: _md5(pathlib.Path(tmp).read_bytes()))
        except Exception as e:
            raise (mapped(e, path) or e) from e
        return size
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@gcs_errors
def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    return tables.parquet_from_bytes(read_bytes(path), columns)


@gcs_errors
def rename(src: str, dst: str) -> None:
    """A server-side copy, then the delete of the source (a kill in between leaves both, never
    neither)."""
    fencing.check(dst)
    fencing.check(src)
    source = blob(src)
    bucket, name = _split(dst)
    source.bucket.copy_blob(source, gcs_client().bucket(bucket), name, retry=_retry())
    source.delete()


@gcs_errors
def delete(path: str) -> None:
    fencing.check(path)
    stored = blob(path)
    if stored.exists():
        stored.delete()


@gcs_errors
def delete_tree(prefix: str) -> None:
    fencing.check(prefix)
    bucket, name = _split(prefix.rstrip("/") + "/")
    for stored in gcs_client().list_blobs(bucket, prefix=name):
        stored.delete()


@gcs_errors
def list_files(prefix: str) -> list[str]:
    bucket, name = _split(prefix.rstrip("/") + "/")
    return sorted(f"gs://{bucket}/{b.name}" for b in gcs_client().list_blobs(bucket, prefix=name))


@gcs_errors
def has_files(prefix: str) -> bool:
    """One listing request."""
    bucket, name = _split(prefix.rstrip("/") + "/")
    return any(True for _ in gcs_client().list_blobs(bucket, prefix=name, max_results=1))


def glob(pattern: str) -> list[str]:
    """One listing of the pattern's literal prefix, matched by `_glob_regex`."""
    bucket, name = _split(pattern)
    literal = name
    for i, ch in enumerate(name):
        if ch in "*?[":
            literal = name[:i]
            break
    compiled = re.compile(_glob_regex(name))
    blobs = gcs_client().list_blobs(bucket, prefix=literal)
    return sorted(f"gs://{bucket}/{b.name}" for b in blobs if compiled.fullmatch(b.name))


def _glob_regex(pattern: str) -> str:
    """A regex for a glob where `*` stays within one path segment and `**` crosses segments."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(ch))
                i += 1
            else:
                body = pattern[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body + "]")
                i = j + 1
        else:
            out.append(re.escape(ch))
            i += 1
    return "".join(out)


def make_folder(folder: str) -> None:
    """Nothing to make: a bucket has no folders."""


def not_regular(path: str) -> str | None:
    return None


def input_size(path: str, what: str) -> int:
    return size(path)


def read_at_most(path: str, limit: int, what: str) -> bytes:
    return read_bytes(path)


def special_entries(prefix: str) -> list[tuple[str, str]]:
    return []


def clear_debris(folder: str, before: float, owned=lambda name: True) -> list[str]:
    return []


def remove_empty_folder(folder: str) -> None:
    """Nothing to remove: a bucket has no folders."""
