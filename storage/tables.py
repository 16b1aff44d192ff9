"""Tables in files: Parquet written to a local file and read from bytes, JSON lines read as a table.

Where a Parquet file goes (beside its target, or uploaded) is its backend's (storage.local,
storage.gcs); the face (storage) reads and writes tables by path with these.
"""
from __future__ import annotations

import os
import posixpath
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import FULL, disk_full


def write_file(table: pa.Table, tmp: str, compression: str, target: str) -> int:
    """Writes `table` as Parquet to the local temporary file `tmp` (of the write of `target`); returns
    its bytes. A full disk is a DiskFull naming the folder of `tmp` and the target's name."""
    try:
        pq.write_table(table, tmp, compression=compression, row_group_size=8192)
    except OSError as e:   # Arrow's IOError carries the errno
        if e.errno in FULL:
            raise disk_full(e.errno, os.path.dirname(tmp), posixpath.basename(target),
                            f"up to {table.nbytes:,} bytes, its size in memory") from e
        raise
    return os.path.getsize(tmp)


def parquet_from_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file held in memory, as a table, read on the calling thread: `pq.read_table` of a
    BufferReader with Arrow's threads aborts the process (SIGABRT) in a few percent of runs, at the
    end of the read or at exit (apache/arrow#34314, #33975)."""
    return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)


def from_json_lines(lines: Iterable[bytes], path: str) -> pa.Table:
    """The JSON-lines `lines` of the file `path` as a table (blank lines skipped); a line that is not
    JSON is a ValueError naming the file and line."""
    import orjson

    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from e
    return pa.Table.from_pylist(rows)
