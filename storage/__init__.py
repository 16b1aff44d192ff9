"""Files on local disk or gs://, with whole-or-nothing writes.

One small layer used by every stage (Beam DoFns, generators, training), so that a run root can be a
local folder or a bucket prefix. gs:// goes through google-cloud-storage; when STORAGE_EMULATOR_HOST is
set (the gcp-storage-emulator in tests) the client uses anonymous credentials, so no credential lookup
and its retries happen.

Fencing: a lock this process holds over a folder (storage.lock, a run root's RootLock) is registered
with `fence`; every write, rename and delete below that folder first asks it (`verify`), so a holder
that lost its lock (taken over, its file removed) writes nothing more there. On gs:// a write is also
conditioned on the object's generation as read BEFORE the lock was verified (`if_generation_match`):
a new holder takes the lock before it writes, so an object it wrote after our check fails our write
(412) instead of being overwritten, and one it writes later overwrites ours: the old holder never
replaces what the new one wrote. Locally the lock file's inode is checked just before the rename that
publishes a file.
"""
from __future__ import annotations

import errno
import functools
import gzip
import io
import os
import pathlib
import posixpath
import re
import stat
import tempfile
import zlib
from typing import BinaryIO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from isal import igzip, isal_zlib


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


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


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(code: int, folder: str, name: str, needed: str) -> DiskFull:
    why = "no space left on the device" if code == errno.ENOSPC else "the disk quota is spent"
    return DiskFull(code, f"{folder}: {why} while writing {name} ({needed} needed); free space there "
                                 "and run again (what was written before is kept)", folder)


def _mapped(error: Exception, path: str) -> Exception | None:
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


def _gcs_errors(func):
    """Calls on a gs:// path raise StorageError (see _mapped) instead of the client's exceptions."""
    @functools.wraps(func)
    def wrapper(path, *args, **kwargs):
        if not is_gcs(path):
            return func(path, *args, **kwargs)
        try:
            return func(path, *args, **kwargs)
        except Exception as e:
            mapped = _mapped(e, path)
            if mapped is None:
                raise
            raise mapped from e
    return wrapper


class _GcsReader(io.RawIOBase):
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
            mapped = _mapped(e, self.path)
            if mapped is None:
                raise
            raise mapped from e

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


# ---- fencing (module docstring) -------------------------------------------------------------------

_FENCES: list[tuple[str, object]] = []   # (folder, lock) of the locks this process holds


def fence(folder: str, lock) -> None:
    """Fences the writes below `folder` with `lock` (its `verify(max_age_s)` raises once it is lost)."""
    _FENCES.append((folder if is_gcs(folder) else os.path.abspath(folder), lock))


def unfence(lock) -> None:
    _FENCES[:] = [(folder, held) for folder, held in _FENCES if held is not lock]


def check_fences(path: str, max_age_s: float = 0.0) -> None:
    """Raises the lost-lock error of a lock this process holds over `path` once it is not ours.
    `max_age_s`: a lock verified (on gs://, one metadata read) that recently is taken as still ours
    unless it is known lost (for checks between requests, too frequent for a read each)."""
    if not _FENCES:
        return
    where = path if is_gcs(path) else os.path.abspath(path)
    for folder, lock in list(_FENCES):
        if where == folder or where.startswith(folder.rstrip("/") + "/"):
            try:
                lock.verify(max_age_s)
            except Exception as e:   # the lock object could not be read: an OSError naming it
                mapped = _mapped(e, lock.path)
                if mapped is None:
                    raise
                raise mapped from e


def _fenced(path: str) -> bool:
    where = path if is_gcs(path) else os.path.abspath(path)
    return any(where == f or where.startswith(f.rstrip("/") + "/") for f, _ in _FENCES)


def _fenced_upload(path: str, upload, md5_of) -> None:
    """`upload(**precondition)` of a gs:// object: below a fence, conditioned on the generation read
    before the fence is verified (module docstring); a 412 is our own upload retried after it landed
    (the same md5) or another writer's object, which stays."""
    if not _fenced(path):
        upload()
        return
    from google.api_core import exceptions as gexc

    blob = _blob(path)
    try:
        blob.reload()
        generation = int(blob.generation)
    except gexc.NotFound:
        generation = 0
    check_fences(path)
    try:
        upload(if_generation_match=generation)
    except gexc.PreconditionFailed:
        check_fences(path)
        blob = _blob(path)
        blob.reload()
        if blob.md5_hash != md5_of():
            raise StorageError(errno.EBUSY, f"{path}: another writer replaced it while this run wrote it; "
                                            "not overwritten", path) from None


def _md5(data: bytes) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.md5(data).digest()).decode()


def join(base: str, *parts: str) -> str:
    if is_gcs(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    """The folder that holds `path`."""
    if is_gcs(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(path.rstrip("/"))


@_gcs_errors
def size(path: str) -> int:
    """Bytes of a stored file."""
    if is_gcs(path):
        blob = _blob(path)
        blob.reload()
        return int(blob.size)
    return os.path.getsize(path)


def not_regular(path: str) -> str | None:
    """Why `path` is not a plain stored file (a symbolic link, a device, a FIFO, a folder), or None.
    Objects in a bucket are always plain; a local path is looked at without following a link, so a
    checker never reads /dev/zero or a file outside the folder it checks."""
    if is_gcs(path):
        return None
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)[:200]!r})"
    return _not_a_file(mode)


def _not_a_file(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")


MiB = 1 << 20


class NotAnInput(StorageError):
    """A file the user named that is no regular file, or over the size limit of its kind."""


def check_input(path: str, limit: int, what: str) -> int:
    """The size of the file the user named at `path` (`what`: its option, for the message), opened only
    when it is a regular file (a link is followed to one; a FIFO, a device or a folder is refused before
    it is opened, so it can neither hang nor be read forever); NotAnInput when it is not one or holds
    more than `limit` bytes (the caller reads it whole). FileNotFoundError when it is missing."""
    if is_gcs(path):
        found = size(path)
    else:
        info = os.stat(path)
        kind = _not_a_file(info.st_mode)
        if kind:
            raise NotAnInput(errno.EINVAL, f"{path}: {kind}, not a regular file ({what}); never read", path)
        found = info.st_size
    if found > limit:
        raise NotAnInput(errno.EFBIG, f"{path}: {found:,} bytes, over the {limit:,}-byte limit of {what} "
                                      "(it is read whole into memory)", path)
    return found


def read_input(path: str, limit: int, what: str) -> bytes:
    """The bytes of the file the user named at `path`, checked as `check_input` says, and read no
    further than `limit` (a file that grows while it is read is refused as over the limit)."""
    check_input(path, limit, what)
    if is_gcs(path):
        return read_bytes(path)
    # O_NONBLOCK: a FIFO swapped in after the check opens at once instead of waiting for a writer
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        kind = _not_a_file(os.fstat(f.fileno()).st_mode)
        if kind:
            raise NotAnInput(errno.EINVAL, f"{path}: {kind}, not a regular file ({what}); never read", path)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise NotAnInput(errno.EFBIG, f"{path}: over the {limit:,}-byte limit of {what} (it grew while read)", path)
    return data


def special_entries(prefix: str) -> list[tuple[str, str]]:
    """(path, why) for every entry below the local folder `prefix` that is not a plain file or folder
    (links, devices, FIFOs), links to folders included (os.walk does not descend into them); [] on GCS."""
    if is_gcs(prefix):
        return []
    out = []
    for dirpath, dirnames, names in os.walk(prefix):
        for name in dirnames + names:
            full = os.path.join(dirpath, name)
            why = not_regular(full)
            if why and why != "a folder":
                out.append((full, why))
    return sorted(out)


@_gcs_errors
def fingerprint(path: str) -> dict:
    """{"bytes", "checksum"} of a stored file: GCS's own size and crc32c (one metadata request, no
    download), or the size and xxh3_128 of a local file's bytes (read in 8 MB blocks)."""
    if is_gcs(path):
        blob = _blob(path)
        blob.reload()
        return {"bytes": int(blob.size), "checksum": f"crc32c:{blob.crc32c}"}
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "checksum": f"xxh3_128:{digest.hexdigest()}"}


def _split_gcs(path: str) -> tuple[str, str]:
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


def _blob(path: str):
    bucket, name = _split_gcs(path)
    return gcs_client().bucket(bucket).blob(name)


@_gcs_errors
def exists(path: str) -> bool:
    if is_gcs(path):
        return _blob(path).exists()
    return os.path.exists(path)


@_gcs_errors
def open_read(path: str) -> BinaryIO:
    """A binary stream of the file's bytes as stored (no decompression)."""
    if is_gcs(path):
        return io.BufferedReader(_GcsReader(path, _blob(path).open("rb", chunk_size=8 << 20)), 1 << 20)
    return open(path, "rb")


@_gcs_errors
def read_bytes(path: str) -> bytes:
    if is_gcs(path):
        return _blob(path).download_as_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


@_gcs_errors
def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` so that `path` appears whole or not at all.

    Local: a temporary file in the same folder, fsync, then an atomic rename. GCS: a single upload,
    which creates the object atomically when it completes.
    """
    if is_gcs(path):
        # our writes replace a whole object with the same bytes when repeated, so a 429/5xx is retried
        # (the client retries an upload without a precondition only when told)
        _fenced_upload(path, lambda **pre: _blob(path).upload_from_string(data, retry=_retry(), **pre),
                       lambda: _md5(data))
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _readable(tmp)
        check_fences(path)   # just before the rename that publishes it
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _FULL:
            raise _disk_full(e.errno, folder, os.path.basename(path), f"{len(data):,} bytes") from e
        raise


TMP_PREFIX = ".tmp-"   # write_bytes' and write_parquet's temporary files: .tmp-<target name>.<random>


def clear_debris(folder: str, before: float, owned=lambda name: True) -> list[str]:
    """Removes the temporary files that writes killed midway left directly in the local `folder`:
    those last modified before `before` (the run's start, so no write of this run is one) whose target
    name `owned(name)` says is the caller's (a generate worker's own shards). Returns their paths. On
    GCS there are none (an upload that does not complete leaves no object)."""
    if is_gcs(folder) or not os.path.isdir(folder):
        return []
    removed = []
    for entry in os.scandir(folder):
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        target = entry.name[len(TMP_PREFIX):].rsplit(".", 1)[0]
        if entry.stat(follow_symlinks=False).st_mtime < before and owned(target):
            os.unlink(entry.path)
            removed.append(entry.path)
    return sorted(removed)


def remove_empty_folder(folder: str) -> None:
    """Removes the local `folder` when it is empty (a folder in use is never removed: rmdir refuses)."""
    if not is_gcs(folder):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it, which races with threads


def _readable(tmp: str) -> None:
    """mkstemp makes 0600 files; give the output the mode a plain open() would (0666 less umask)."""
    os.chmod(tmp, 0o666 & ~_UMASK)


def check_writable(folder: str) -> None:
    """Creates `folder` (local) and writes and deletes a probe file in it; the OSError of a folder
    that cannot be written (a file in its path, read-only, no permission on the bucket)."""
    if not is_gcs(folder):
        node = os.path.abspath(folder)
        while not os.path.exists(node):
            node = os.path.dirname(node)
        if not os.path.isdir(node):
            raise NotADirectoryError(errno.ENOTDIR, "a file stands where a folder is needed", node)
        os.makedirs(folder, exist_ok=True)
    probe = join(folder, ".bft-write-probe")
    write_bytes(probe, b"")
    delete(probe)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@_gcs_errors
def rename(src: str, dst: str) -> None:
    """Moves a file within one store: an atomic rename locally; on GCS a server-side copy, then the
    delete of the source (a kill in between leaves both, never neither)."""
    check_fences(dst)
    check_fences(src)
    if is_gcs(src):
        blob = _blob(src)
        bucket, name = _split_gcs(dst)
        blob.bucket.copy_blob(blob, gcs_client().bucket(bucket), name, retry=_retry())
        blob.delete()
        return
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    os.replace(src, dst)


@_gcs_errors
def delete(path: str) -> None:
    check_fences(path)
    if is_gcs(path):
        blob = _blob(path)
        if blob.exists():
            blob.delete()
    elif os.path.exists(path):
        os.unlink(path)


@_gcs_errors
def delete_tree(prefix: str) -> None:
    """Removes every file under the folder `prefix`."""
    check_fences(prefix)
    if is_gcs(prefix):
        bucket, name = _split_gcs(prefix.rstrip("/") + "/")
        for blob in gcs_client().list_blobs(bucket, prefix=name):
            blob.delete()
        return
    import shutil

    shutil.rmtree(prefix, ignore_errors=True)


@_gcs_errors
def list_files(prefix: str) -> list[str]:
    """Every file below the folder `prefix`, sorted."""
    if is_gcs(prefix):
        bucket, name = _split_gcs(prefix.rstrip("/") + "/")
        return sorted(f"gs://{bucket}/{b.name}" for b in gcs_client().list_blobs(bucket, prefix=name))
    out = []
    for dirpath, _, names in os.walk(prefix):
        out.extend(os.path.join(dirpath, n) for n in names)
    return sorted(out)


@_gcs_errors
def has_files(prefix: str) -> bool:
    """Whether any file lies below the folder `prefix` (one listing request on GCS)."""
    if is_gcs(prefix):
        bucket, name = _split_gcs(prefix.rstrip("/") + "/")
        return any(True for _ in gcs_client().list_blobs(bucket, prefix=name, max_results=1))
    return any(names for _, _, names in os.walk(prefix))


def glob(pattern: str) -> list[str]:
    """Files matching `pattern` (`*`, `?`, `[..]`, and `**` for any depth), local or gs://, sorted."""
    if not is_gcs(pattern):
        import glob as _glob

        return sorted(p for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p))
    bucket, name = _split_gcs(pattern)
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


class CorruptFileError(OSError):
    """A compressed file is truncated or corrupt; the message names the file."""


_BOM = b"\xef\xbb\xbf"


def compression(path: str) -> str:
    """How a JSON-lines input is stored, by its name: ".gz", ".zst" (also .zstd) or "" (plain)."""
    return ".gz" if path.endswith(".gz") else ".zst" if path.endswith((".zst", ".zstd")) else ""


def open_lines(path: str) -> Iterator[bytes]:
    """The lines of a JSON-lines file as raw bytes (newline kept off), decompressing .gz and .zst.

    Raw bytes rather than text, so that a line of invalid UTF-8 becomes a reject, not a crash. A UTF-8
    byte order mark at the start of the file is dropped. A .gz or .zst stream that is cut short or
    corrupt raises CorruptFileError naming the file, after the lines read before the damage (a cut
    stream never reads as a short file). A plain file has no framing: a cut inside a line leaves a
    last line that is not JSON (a reject downstream); a cut between lines cannot be told from an end.
    """
    raw = open_read(path)
    kind = compression(path)
    try:
        if kind == ".gz":
            # ISA-L's inflate: the same gzip format, read ~3x faster than zlib's (the read passes are
            # bound by it once token counting is cheap)
            stream: BinaryIO = igzip.IGzipFile(fileobj=raw, mode="rb")
        elif kind == ".zst":
            stream = io.BufferedReader(_ChunkReader(_zstd_chunks(raw, path)), buffer_size=1 << 20)
        else:
            stream = io.BufferedReader(raw, buffer_size=1 << 20) if not is_gcs(path) else raw  # buffered
        first = True
        try:
            for line in stream:
                if first:
                    first = False
                    if line.startswith(_BOM):
                        line = line[len(_BOM):]
                yield line.rstrip(b"\r\n") if line.endswith(b"\n") else line
        except (EOFError, zlib.error, isal_zlib.error, gzip.BadGzipFile) as e:  # a cut or bad stream
            raise CorruptFileError(f"{path}: truncated or corrupt gzip stream ({e})") from e
    finally:
        raw.close()


def _zstd_chunks(raw: BinaryIO, path: str) -> Iterator[bytes]:
    """The decompressed bytes of every zstd frame in `raw`; CorruptFileError when a frame is corrupt or
    the stream ends inside one (zstandard's stream_reader takes such an end for the end of the data)."""
    import zstandard

    dctx, frame = zstandard.ZstdDecompressor(), None
    while chunk := raw.read(1 << 20):
        while chunk:
            if frame is None:
                frame = dctx.decompressobj()
            try:
                out = frame.decompress(chunk)
            except zstandard.ZstdError as e:
                raise CorruptFileError(f"{path}: corrupt zstd stream ({e})") from e
            if out:
                yield out
            chunk, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    if frame is not None:
        raise CorruptFileError(f"{path}: truncated zstd stream (it ends inside a frame)")


class _ChunkReader(io.RawIOBase):
    """A readable raw stream over an iterator of byte chunks (for io.BufferedReader's line splitting)."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks, self.rest = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.rest:
            self.rest = next(self.chunks, b"")
            if not self.rest:
                return 0
        n = min(len(buffer), len(self.rest))
        buffer[:n], self.rest = self.rest[:n], self.rest[n:]
        return n


def is_records_file(path: str) -> bool:
    """Whether `read_records` reads `path` by its name: Parquet, or JSON lines (.jsonl, plain or
    compressed; .json when compressed: a plain .json is one JSON document, not lines)."""
    if path.endswith(".parquet"):
        return True
    kind = compression(path)
    base = path.rsplit(".", 1)[0] if kind else path
    return base.endswith(".jsonl") or bool(kind) and base.endswith(".json")


def read_records(path: str) -> pa.Table:
    """A Parquet file, or a JSON-lines file (plain, .gz or .zst), as a table. A line that is not JSON
    is a ValueError naming the file and line."""
    if path.endswith(".parquet"):
        return read_parquet(path)
    import orjson

    rows = []
    for i, line in enumerate(open_lines(path), 1):
        if line.strip():
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from e
    return pa.Table.from_pylist(rows)


def write_parquet(table: pa.Table, path: str, compression: str = "zstd") -> int:
    """Writes `table` (zstd, unless told) to `path` whole-or-nothing; returns the bytes written.

    The file is streamed to a temporary file beside the target (local) or on local disk (GCS, then one
    upload), never held in memory whole.
    """
    local_dir = None if is_gcs(path) else os.path.dirname(os.path.abspath(path))
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=TMP_PREFIX + posixpath.basename(path) + ".")
    os.close(fd)
    try:
        try:
            pq.write_table(table, tmp, compression=compression, row_group_size=8192)
        except OSError as e:   # Arrow's IOError carries the errno
            if e.errno in _FULL:
                raise _disk_full(e.errno, os.path.dirname(tmp), posixpath.basename(path),
                                 f"up to {table.nbytes:,} bytes, its size in memory") from e
            raise
        size = os.path.getsize(tmp)
        if local_dir:
            _readable(tmp)
            check_fences(path)   # just before the rename that publishes it
            os.replace(tmp, path)
        else:
            try:
                _fenced_upload(path, lambda **pre: _blob(path).upload_from_filename(tmp, retry=_retry(), **pre),
                               lambda: _md5(pathlib.Path(tmp).read_bytes()))
            except Exception as e:
                raise (_mapped(e, path) or e) from e
        return size
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@_gcs_errors
def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    if is_gcs(path):
        return parquet_from_bytes(read_bytes(path), columns)
    return pq.read_table(path, columns=columns)


def parquet_from_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file held in memory, as a table, read on the calling thread: `pq.read_table` of a
    BufferReader with Arrow's threads aborts the process (SIGABRT) in a few percent of runs, at the
    end of the read or at exit (apache/arrow#34314, #33975)."""
    return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)
