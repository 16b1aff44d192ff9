"""The record contracts of the product: one pyarrow schema per record kind, versioned.

Every Parquet file the product writes carries its kind and version in the file's schema metadata
(`bft.kind`, `bft.schema_version`), and is checked by `validate` on write and on read. A reader
gets a `SchemaError` that names the file and the column at fault.

A column added to a kind after files of it exist (`added`: nullable, marked in its field metadata)
does not bump SCHEMA_VERSION, which is one number for every kind: a bump would make every candidate
and generation shard and every release written before unreadable. A file without such a column reads
it as nulls (`validate` adds it), so older shards and releases stay valid.
"""
from __future__ import annotations

import pyarrow as pa

from schemas.errors import UserError

SCHEMA_VERSION = "1"


class SchemaError(UserError, ValueError):
    """A table or file does not follow its record contract."""


ADDED = b"bft.added"   # field metadata of a column added after the kind's first files (see above)


def added(name: str, type_: pa.DataType) -> pa.Field:
    """A nullable column added to a kind later: files written before it read it as nulls."""
    return pa.field(name, type_, nullable=True, metadata={ADDED: b"1"})


def is_added(f: pa.Field) -> bool:
    return bool(f.metadata and f.metadata.get(ADDED))


def _schema(kind: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"bft.kind": kind, "bft.schema_version": SCHEMA_VERSION})


CANDIDATE = _schema("candidate", [
    pa.field("id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("url", pa.string()),
    pa.field("n_chars", pa.int32(), nullable=False),
    pa.field("n_tokens", pa.int32()),  # null: kept by its upper bound, uncounted (tokens.judge)
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("text_hash", pa.string(), nullable=False),
    added("crawl_date", pa.string()),   # Dolma's `created` as the input gives it (Common Crawl: the crawl's date)
])

REJECT = _schema("reject", [
    pa.field("file", pa.string(), nullable=False),
    pa.field("line", pa.int64(), nullable=False),
    pa.field("id", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
    pa.field("raw", pa.binary()),
])

GENERATION = _schema("generation", [
    pa.field("id", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("raw_output", pa.string()),
    pa.field("instruction", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("reasoning", pa.string()),
    pa.field("response", pa.string()),
    pa.field("parse_error", pa.string()),
    pa.field("input_truncated", pa.bool_()),
    pa.field("seed", pa.int64()),
    pa.field("input_hash", pa.string()),   # schemas.keys.input_hash of what was (or was not) sent
])

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])

SFT = _schema("sft", [
    pa.field("id", pa.string(), nullable=False),
    pa.field("origin", pa.string(), nullable=False),
    pa.field("recipe", pa.string()),
    pa.field("instruction", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("messages", pa.list_(MESSAGE), nullable=False),
    pa.field("tag", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("n_tokens_instruction", pa.int32()),
    pa.field("n_tokens_response", pa.int32()),
    # lineage (null for seed pairs): the source document's url and crawl date (the id is its Dolma id),
    # and per generation stage that made the pair a key the manifest's inputs.made_by maps to the
    # stage's model and config (lifecycle.provenance.maker_key)
    added("url", pa.string()),
    added("crawl_date", pa.string()),
    added("made_by", pa.list_(pa.string())),
])

def to_table(rows: list[dict], schema: pa.Schema, where: str = "") -> pa.Table:
    """Rows (dicts) to a table of `schema`, validated; `where` names the destination in errors."""
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, KeyError) as e:
        raise SchemaError(f"{where}: rows do not fit the {kind_of(schema)} schema: {e}") from e
    validate(table, schema, where)
    return table


def kind_of(schema: pa.Schema) -> str:
    return (schema.metadata or {}).get(b"bft.kind", b"?").decode()


def validate(table: pa.Table, schema: pa.Schema, where: str = "") -> pa.Table:
    """Checks `table` against `schema`: columns, types, non-null fields and version.

    Returns the table with the schema's metadata attached; raises `SchemaError` naming `where`.
    """
    kind = kind_of(schema)
    meta = table.schema.metadata or {}
    if b"bft.kind" in meta and meta[b"bft.kind"].decode() != kind:
        raise SchemaError(f"{where}: holds {meta[b'bft.kind'].decode()} records, expected {kind}")
    if b"bft.schema_version" in meta and meta[b"bft.schema_version"].decode() != SCHEMA_VERSION:
        raise SchemaError(f"{where}: schema version {meta[b'bft.schema_version'].decode()}, "
                          f"this code reads version {SCHEMA_VERSION}")
    names = table.schema.names
    for f in schema:
        if is_added(f) and f.name not in names:   # a file written before the column existed
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    names = table.schema.names
    missing = [f.name for f in schema if f.name not in names]
    extra = [n for n in names if n not in schema.names]
    if missing or extra:
        raise SchemaError(f"{where}: {kind} columns differ: missing {missing}, unexpected {extra}")
    for f in schema:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            raise SchemaError(f"{where}: column {f.name!r} is {col.type}, expected {f.type}")
        if not f.nullable and col.null_count:
            raise SchemaError(f"{where}: column {f.name!r} has {col.null_count} null values")
    return table.select(schema.names).cast(schema)
