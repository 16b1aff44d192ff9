"""Dolma documents: which split a file belongs to, and one raw line -> a document or a reject.

Dolma's layout is `documents/<split>/<split>-NNNN.json.gz`, one JSON object per line with the fields
id, text, source, added, created and metadata (allenai/dolma, docs/data-format.md). Lines are read as
bytes and decoded here, so that no malformed line can crash a job: it becomes a reject with a reason.
"""
from __future__ import annotations

import orjson
from dataclasses import dataclass
from typing import Any

RAW_KEEP_BYTES = 4096  # how much of an unparseable line a reject keeps


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str | None
    url: str | None
    record: dict
    crawl_date: str | None = None   # Dolma's `created` (Common Crawl: when the page was crawled)


@dataclass(frozen=True)
class Reject:
    reason: str
    detail: str
    id: str | None = None
    raw: bytes | None = None


def split_of(path: str, splits: list[str]) -> str | None:
    """The split folder in `splits` that `path` lies under (the nearest one), or None."""
    parts = path.replace("\\", "/").split("/")[:-1]
    for part in reversed(parts):
        if part in splits:
            return part
    return None


def field(record: dict, dotted: str) -> Any:
    """A nested field ("metadata.url") of a record, or None."""
    node: Any = record
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def selected(record: dict, where: list[tuple[str, set[str]]]) -> bool:
    """Whether `record` has, for each (field, values) of `where` (parse_where), one of the values."""
    return all(str(field(record, name)) in values for name, values in where)


def parse_where(expr: str) -> tuple[str, set[str]]:
    """`FIELD=V1,V2` -> (field, {values}); the field may be dotted (metadata.bucket)."""
    name, sep, values = expr.partition("=")
    if not sep or not name.strip() or not values:
        raise ValueError(f"--select-where {expr!r}: expected FIELD=VALUE[,VALUE...]")
    return name.strip(), {v.strip() for v in values.split(",")}


def parse_line(raw: bytes, max_line_bytes: int) -> Document | Reject:
    """One JSON line (bytes, newline removed) -> a `Document`, or a `Reject` with its reason."""
    if not raw.strip():
        return Reject("empty_line", "the line is empty")
    if len(raw) > max_line_bytes:
        return Reject("too_large", f"{len(raw)} bytes > --max-line-bytes {max_line_bytes}",
                      id=_peek_id(raw), raw=raw[:RAW_KEEP_BYTES])
    try:
        record = orjson.loads(raw)  # validates UTF-8 itself
    except orjson.JSONDecodeError as e:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return Reject("invalid_utf8", str(bad), raw=raw[:RAW_KEEP_BYTES])
        return Reject("malformed_json", str(e), raw=raw[:RAW_KEEP_BYTES])
    if not isinstance(record, dict):
        return Reject("not_an_object", f"a JSON {type(record).__name__}, not an object",
                      raw=raw[:RAW_KEEP_BYTES])
    doc_id = record.get("id")
    if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()) or isinstance(doc_id, (dict, list)):
        return Reject("missing_id", "no usable 'id' field", raw=raw[:RAW_KEEP_BYTES])
    doc_id = str(doc_id)
    text = record.get("text")
    if not isinstance(text, str):
        return Reject("missing_text", f"'text' is {type(text).__name__}", id=doc_id)
    if not text.strip():
        return Reject("blank_text", "'text' is blank", id=doc_id)
    source = record.get("source")
    url = field(record, "metadata.url") or record.get("url")
    # `created`, not `added` (when Dolma took the document in): the crawl date, kept as the input writes it
    created = record.get("created")
    return Document(id=doc_id, text=text, source=None if source is None else str(source),
                    url=None if url is None else str(url), record=record,
                    crawl_date=None if created is None else str(created))


def _peek_id(raw: bytes) -> str | None:
    """The id of an oversized line, if it can be read from its start without parsing it all."""
    head = raw[:512].decode("utf-8", errors="ignore")
    key = head.find('"id"')
    if key < 0:
        return None
    start = head.find('"', head.find(":", key) + 1)
    end = head.find('"', start + 1)
    return head[start + 1:end] if 0 <= start < end else None
