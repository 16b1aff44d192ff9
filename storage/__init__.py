"""Files on local disk or gs://, with whole-or-nothing writes: the one storage layer every stage uses
(Beam DoFns, generators, training), so that a run root can be a local folder or a bucket prefix.

This face holds the functions callers use; each picks its backend by the path (`_backend`) and
calls it: storage.local (files on this machine) or storage.gcs (objects in a bucket), two modules
with the same functions. Beside them: storage.errors (StorageError, DiskFull: GCS's errors as the
OSErrors a disk gives), storage.fencing (a holder that lost its lock writes nothing more below its
folder), storage.codecs (compressed JSON lines), storage.tables (Parquet and records files),
storage.lock (an exclusive lock on one file or object), storage.holder (who holds a lock, and
whether that process still lives) and storage.claims (a run's temporary folder, claimed).
"""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING, BinaryIO, Iterator

from storage import codecs, fencing, gcs, local, tables
from storage.codecs import CorruptFileError, compression, is_records_file
from storage.errors import DiskFull, NotAnInput, StorageError
from storage.gcs import gcs_client
from storage.tables import parquet_from_bytes

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["CorruptFileError", "DiskFull", "MiB", "NotAnInput", "StorageError", "check_fences", "check_input",
           "check_writable", "clear_debris", "compression", "delete", "delete_tree", "exists", "fence", "fingerprint",
           "gcs_client", "glob", "has_files", "is_gcs", "is_records_file", "join", "list_files", "not_regular",
           "open_lines", "open_read", "parent", "parquet_from_bytes", "read_bytes", "read_input", "read_parquet",
           "read_records", "read_text", "remove_empty_folder", "rename", "size", "special_entries", "unfence",
           "write_bytes", "write_parquet", "write_text"]

MiB = 1 << 20


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def _backend(path: str):
    """The backend module that serves `path`."""
    return gcs if is_gcs(path) else local


# ---- paths ----------------------------------------------------------------------------------------

def join(base: str, *parts: str) -> str:
    return _backend(base).join(base, *parts)


def parent(path: str) -> str:
    """The folder that holds `path`."""
    return _backend(path).parent(path)


# ---- fencing (storage.fencing) --------------------------------------------------------------------

def fence(folder: str, lock) -> None:
    """Fences the writes below `folder` with `lock` (its `verify(max_age_s)` raises once it is lost)."""
    fencing.fence(_backend(folder).absolute(folder), lock)


def unfence(lock) -> None:
    fencing.unfence(lock)


def check_fences(path: str, max_age_s: float = 0.0) -> None:
    """Raises the lost-lock error of a lock this process holds over `path` once it is not ours.
    `max_age_s`: a lock verified (on gs://, one metadata read) that recently is taken as still ours
    unless it is known lost (for checks between requests, too frequent for a read each)."""
    fencing.check(_backend(path).absolute(path), max_age_s)


# ---- reading --------------------------------------------------------------------------------------

def size(path: str) -> int:
    """Bytes of a stored file."""
    return _backend(path).size(path)


def fingerprint(path: str) -> dict:
    """{"bytes", "checksum"} of a stored file: GCS's own size and crc32c (one metadata request, no
    download), or the size and xxh3_128 of a local file's bytes (read in 8 MB blocks)."""
    return _backend(path).fingerprint(path)


def exists(path: str) -> bool:
    return _backend(path).exists(path)


def open_read(path: str) -> BinaryIO:
    """A binary stream of the file's bytes as stored (no decompression)."""
    return _backend(path).open_read(path)


def read_bytes(path: str) -> bytes:
    return _backend(path).read_bytes(path)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def open_lines(path: str) -> Iterator[bytes]:
    """The lines of a JSON-lines file as raw bytes (newline kept off), decompressing .gz and .zst.

    Raw bytes rather than text, so that a line of invalid UTF-8 becomes a reject, not a crash. A UTF-8
    byte order mark at the start of the file is dropped. A .gz or .zst stream that is cut short or
    corrupt raises CorruptFileError naming the file, after the lines read before the damage (a cut
    stream never reads as a short file). A plain file has no framing: a cut inside a line leaves a
    last line that is not JSON (a reject downstream); a cut between lines cannot be told from an end.
    """
    return codecs.lines(lambda: open_read(path), path, buffer=not is_gcs(path))  # GCS's stream is buffered


def read_parquet(path: str, columns: list[str] | None = None) -> "pa.Table":
    return _backend(path).read_parquet(path, columns)


def read_records(path: str) -> "pa.Table":
    """A Parquet file, or a JSON-lines file (plain, .gz or .zst), as a table. A line that is not JSON
    is a ValueError naming the file and line."""
    if path.endswith(".parquet"):
        return read_parquet(path)
    return tables.from_json_lines(open_lines(path), path)


def check_input(path: str, limit: int, what: str) -> int:
    """The size of the file the user named at `path` (`what`: its option, for the message), opened only
    when it is a regular file (a link is followed to one; a FIFO, a device or a folder is refused before
    it is opened, so it can neither hang nor be read forever); NotAnInput when it is not one or holds
    more than `limit` bytes (the caller reads it whole). FileNotFoundError when it is missing."""
    found = _backend(path).input_size(path, what)
    if found > limit:
        raise NotAnInput(errno.EFBIG, f"{path}: {found:,} bytes, over the {limit:,}-byte limit of {what} "
                                      "(it is read whole into memory)", path)
    return found


def read_input(path: str, limit: int, what: str) -> bytes:
    """The bytes of the file the user named at `path`, checked as `check_input` says, and read no
    further than `limit` (a file that grows while it is read is refused as over the limit)."""
    check_input(path, limit, what)
    return _backend(path).read_at_most(path, limit, what)


# ---- writing: whole or not at all -----------------------------------------------------------------

def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` so that `path` appears whole or not at all.

    Local: a temporary file in the same folder, fsync, then an atomic rename. GCS: a single upload,
    which creates the object atomically when it completes.
    """
    _backend(path).write_bytes(path, data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_parquet(table: "pa.Table", path: str, compression: str = "zstd") -> int:
    """Writes `table` (zstd, unless told) to `path` whole-or-nothing; returns the bytes written.

    The file is streamed to a temporary file beside the target (local) or on local disk (GCS, then one
    upload), never held in memory whole.
    """
    return _backend(path).write_parquet(table, path, compression)


def rename(src: str, dst: str) -> None:
    """Moves a file within one store: an atomic rename locally; on GCS a server-side copy, then the
    delete of the source (a kill in between leaves both, never neither)."""
    _backend(src).rename(src, dst)


def delete(path: str) -> None:
    _backend(path).delete(path)


def delete_tree(prefix: str) -> None:
    """Removes every file under the folder `prefix`."""
    _backend(prefix).delete_tree(prefix)


def check_writable(folder: str) -> None:
    """Creates `folder` (local) and writes and deletes a probe file in it; the OSError of a folder
    that cannot be written (a file in its path, read-only, no permission on the bucket)."""
    _backend(folder).make_folder(folder)
    probe = join(folder, ".bft-write-probe")
    write_bytes(probe, b"")
    delete(probe)


# ---- listing --------------------------------------------------------------------------------------

def list_files(prefix: str) -> list[str]:
    """Every file below the folder `prefix`, sorted."""
    return _backend(prefix).list_files(prefix)


def has_files(prefix: str) -> bool:
    """Whether any file lies below the folder `prefix` (one listing request on GCS)."""
    return _backend(prefix).has_files(prefix)


def glob(pattern: str) -> list[str]:
    """Files matching `pattern` (`*`, `?`, `[..]`, and `**` for any depth), local or gs://, sorted."""
    return _backend(pattern).glob(pattern)


def not_regular(path: str) -> str | None:
    """Why `path` is not a plain stored file (a symbolic link, a device, a FIFO, a folder), or None.
    Objects in a bucket are always plain; a local path is looked at without following a link, so a
    checker never reads /dev/zero or a file outside the folder it checks."""
    return _backend(path).not_regular(path)


def special_entries(prefix: str) -> list[tuple[str, str]]:
    """(path, why) for every entry below the local folder `prefix` that is not a plain file or folder
    (links, devices, FIFOs), links to folders included (os.walk does not descend into them); [] on GCS."""
    return _backend(prefix).special_entries(prefix)


def clear_debris(folder: str, before: float, owned=lambda name: True) -> list[str]:
    """Removes the temporary files that writes killed midway left directly in the local `folder`:
    those last modified before `before` (the run's start, so no write of this run is one) whose target
    name `owned(name)` says is the caller's (a generate worker's own shards). Returns their paths. On
    GCS there are none (an upload that does not complete leaves no object)."""
    return _backend(folder).clear_debris(folder, before, owned)


def remove_empty_folder(folder: str) -> None:
    """Removes the local `folder` when it is empty (a folder in use is never removed: rmdir refuses)."""
    _backend(folder).remove_empty_folder(folder)
