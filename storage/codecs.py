"""How a stored file's bytes are encoded: the compression of JSON-lines inputs (by name), their lines
decoded (gzip through ISA-L, zstd frame by frame, plain), and which names hold records.

A cut or corrupt compressed stream is a CorruptFileError naming the file, never a short file.
"""
from __future__ import annotations

import gzip
import io
import zlib
from typing import BinaryIO, Callable, Iterator

from isal import igzip, isal_zlib


class CorruptFileError(OSError):
    """A compressed file is truncated or corrupt; the message names the file."""


_BOM = b"\xef\xbb\xbf"


def compression(path: str) -> str:
    """How a JSON-lines input is stored, by its name: ".gz", ".zst" (also .zstd) or "" (plain)."""
    return ".gz" if path.endswith(".gz") else ".zst" if path.endswith((".zst", ".zstd")) else ""


def lines(open_raw: Callable[[], BinaryIO], path: str, buffer: bool) -> Iterator[bytes]:
    """The lines of the JSON-lines file `path` (storage.open_lines says how), decompressed by its name,
    from the stream of its stored bytes that `open_raw()` opens when the first line is asked for, and
    closed at the end; `buffer`: read a plain file through a 1 MiB buffer (a stream that has none of
    its own)."""
    raw = open_raw()
    kind = compression(path)
    try:
        if kind == ".gz":
            # ISA-L's inflate: the same gzip format, read ~3x faster than zlib's (the read passes are
            # bound by it once token counting is cheap)
            stream: BinaryIO = igzip.IGzipFile(fileobj=raw, mode="rb")
        elif kind == ".zst":
            stream = io.BufferedReader(_ChunkReader(_zstd_chunks(raw, path)), buffer_size=1 << 20)
        else:
            stream = io.BufferedReader(raw, buffer_size=1 << 20) if buffer else raw
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
