"""Word trigrams as the paper's Figure 3 counts them, vectorized: NLTK's `wordpunct_tokenize` on
lower-cased text (regex tokens, no downloaded NLTK data), then `nltk.ngrams(tokens, 3)` within each
text, each trigram hashed to 64 bits. Arrow splits the texts and one Python hash is computed per
distinct token, so a corpus's trigrams cost a few vector operations (tests/test_report.py checks the
set against NLTK itself)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sort + compare: several times faster than np.unique's hash path on uint64."""
    a = np.sort(values)
    if len(a) < 2:
        return a
    keep = np.empty(len(a), bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


# NLTK's WordPunctTokenizer pattern is r"\w+|[^\w\s]+"; RE2 spells Python's Unicode \w this way.
_WORD = r"([\p{L}\p{N}_]+)"
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def trigram_hashes(texts) -> np.ndarray:
    """64-bit hashes of the word trigrams of each text (lower-cased wordpunct tokens; a trigram
    never spans two texts), unique. Vectorized: Arrow splits, one Python hash per distinct token."""
    return sorted_unique(_trigrams(texts)[0])


def trigrams_per_text(texts) -> list[np.ndarray]:
    """The unique trigram hashes of each text apart."""
    tri, row = _trigrams(texts)
    order = np.argsort(row, kind="stable")
    bounds = np.searchsorted(row[order], np.arange(len(texts) + 1))
    return [sorted_unique(tri[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


def _trigrams(texts) -> tuple[np.ndarray, np.ndarray]:
    """(trigram hashes, index of the text each comes from), with repeats."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if len(texts) == 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    texts = pc.fill_null(texts.cast(pa.string()), "")
    spaced = pc.utf8_trim_whitespace(pc.replace_substring_regex(pc.utf8_lower(texts), _WORD, r" \1 "))
    tokens = pc.split_pattern_regex(spaced, r"\s+")
    # a blank text splits into one empty token; it has none
    tokens = pc.if_else(pc.equal(pc.utf8_length(spaced), 0), pa.scalar([], tokens.type), tokens)
    lengths = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(tokens)
    if len(flat) < 3:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    encoded = pc.dictionary_encode(flat)
    vocab = encoded.dictionary.to_pylist()
    token_hash = np.fromiter((xxhash.xxh3_64_intdigest(t.encode("utf-8")) for t in vocab), np.uint64, len(vocab))
    h = token_hash[encoded.indices.to_numpy(zero_copy_only=False)]
    row = np.repeat(np.arange(len(lengths)), lengths)
    same_text = row[:-2] == row[2:]
    with np.errstate(over="ignore"):
        tri = (h[:-2] * np.uint64(0x9E3779B97F4A7C15)) ^ _rotl(h[1:-1], 21) * np.uint64(0xC2B2AE3D27D4EB4F) ^ _rotl(h[2:], 42)
    return tri[same_text] & _MASK, row[:-2][same_text]


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))
