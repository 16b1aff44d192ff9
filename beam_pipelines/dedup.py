"""Exact deduplication keys.

Normalization (documented in docs/ARCHITECTURE.md): Unicode NFC, then every run of whitespace
(spaces, tabs, newlines, any Unicode space) collapsed to one space, leading/trailing whitespace
removed. Case and punctuation are kept: this is exact dedup of the same text laid out differently,
not near-dedup. The key is xxh3_128 of the UTF-8 bytes, as 32 hex digits.
"""
from __future__ import annotations

import unicodedata

import xxhash


def normalize_for_dedup(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_hash(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(normalize_for_dedup(text).encode("utf-8"))


def sample_key(doc_id: str, seed: int) -> int:
    """A stable pseudo-random rank for hash-based sampling: depends on the id and seed only."""
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8"), seed=seed)
