"""The local backend: files on this machine's disks (storage's face calls it for every path that is
not gs://). Every function of storage.gcs is here with the same name and arguments.

Writes are whole or not at all: a temporary file beside the target (`TMP_PREFIX`), fsync, then an
atomic rename, checked against the fences (storage.fencing) just before the rename that publishes it.
A full disk is a DiskFull naming the folder, and leaves no temporary file.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from storage import fencing, tables
from storage.errors import FULL, NotAnInput, disk_full

TMP_PREFIX = ".tmp-"   # write_bytes' and write_parquet's temporary files: .tmp-<target name>.<random>


def absolute(path: str) -> str:
    """`path` as the fences compare it."""
    return os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    return os.path.dirname(path.rstrip("/"))


def size(path: str) -> int:
    return os.path.getsize(path)


def fingerprint(path: str) -> dict:
    """The size and xxh3_128 of the file's bytes (read in 8 MB blocks)."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "checksum": f"xxh3_128:{digest.hexdigest()}"}


def exists(path: str) -> bool:
    return os.path.exists(path)


def open_read(path: str) -> BinaryIO:
    return open(path, "rb")


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """A temporary file in the same folder, fsync, then an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _readable(tmp)
        fencing.check(absolute(path))   # just before the rename that publishes it
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in FULL:
            raise disk_full(e.errno, folder, os.path.basename(path), f"{len(data):,} bytes") from e
        raise


def write_parquet(table: pa.Table, path: str, compression: str) -> int:
    """Streamed to a temporary file beside the target, then renamed over it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX + os.path.basename(path) + ".")
    os.close(fd)
    try:
        size = tables.write_file(table, tmp, compression, path)
        _readable(tmp)
        fencing.check(absolute(path))   # just before the rename that publishes it
        os.replace(tmp, path)
        return size
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it, which races with threads


def _readable(tmp: str) -> None:
    """mkstemp makes 0600 files; give the output the mode a plain open() would (0666 less umask)."""
    os.chmod(tmp, 0o666 & ~_UMASK)


def rename(src: str, dst: str) -> None:
    """An atomic rename."""
    fencing.check(absolute(dst))
    fencing.check(absolute(src))
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    os.replace(src, dst)


def delete(path: str) -> None:
    fencing.check(absolute(path))
    if os.path.exists(path):
        os.unlink(path)


def delete_tree(prefix: str) -> None:
    fencing.check(absolute(prefix))
    import shutil

    shutil.rmtree(prefix, ignore_errors=True)


def list_files(prefix: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(prefix):
        out.extend(os.path.join(dirpath, n) for n in names)
    return sorted(out)


def has_files(prefix: str) -> bool:
    return any(names for _, _, names in os.walk(prefix))


def glob(pattern: str) -> list[str]:
    import glob as _glob

    return sorted(p for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p))


def make_folder(folder: str) -> None:
    """Creates `folder`; NotADirectoryError naming the file that stands where a folder is needed."""
    node = os.path.abspath(folder)
    while not os.path.exists(node):
        node = os.path.dirname(node)
    if not os.path.isdir(node):
        raise NotADirectoryError(errno.ENOTDIR, "a file stands where a folder is needed", node)
    os.makedirs(folder, exist_ok=True)


def not_regular(path: str) -> str | None:
    """Looked at without following a link, so a checker never reads /dev/zero or a file outside the
    folder it checks."""
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


def input_size(path: str, what: str) -> int:
    """A link is followed to a regular file; a FIFO, a device or a folder is refused before it is
    opened, so it can neither hang nor be read forever."""
    info = os.stat(path)
    kind = _not_a_file(info.st_mode)
    if kind:
        raise NotAnInput(errno.EINVAL, f"{path}: {kind}, not a regular file ({what}); never read", path)
    return info.st_size


def read_at_most(path: str, limit: int, what: str) -> bytes:
    """A file that grows while it is read is refused as over the limit."""
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
    """Links to folders included (os.walk does not descend into them)."""
    out = []
    for dirpath, dirnames, names in os.walk(prefix):
        for name in dirnames + names:
            full = os.path.join(dirpath, name)
            why = not_regular(full)
            if why and why != "a folder":
                out.append((full, why))
    return sorted(out)


def clear_debris(folder: str, before: float, owned=lambda name: True) -> list[str]:
    if not os.path.isdir(folder):
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
    """rmdir refuses a folder in use."""
    try:
        os.rmdir(folder)
    except OSError:
        pass
