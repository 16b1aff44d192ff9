"""Near-duplicate documents: MinHash sketches of word n-gram shingles, LSH band keys, the verified
candidate edges of a band bucket, and the survivor of a cluster (the pure core of prepare's
NearDeduplicate, also run in memory by `bft plan` and the tests).

    shingles     the words of schemas.keys.normalize_for_dedup (exact dedup's normalization: NFC,
                 whitespace collapsed, case and punctuation kept) but those of ASCII punctuation
                 alone ("|", "--", "*" are layout: measured, generated pages that shared little more
                 than their layout reached an estimated Jaccard of 0.8 with them, and the
                 benchmark's precision went from 0.92 to 1.0 without them), every `ngram`
                 consecutive words hashed to one uint32 (each word by xxh3_64, the n-gram by a
                 polynomial of its words' hashes and a splitmix64 finalizer, vectorized); a text of
                 fewer words is one shingle
    minhash      bands x rows hash functions h_i(x) = a_i * x + b_i mod 2^32 (a_i odd: a bijection
                 of the already mixed 32-bit shingle hashes), the minimum over the shingles of each
    sketch       what travels (224 bytes at 14 x 8): the band keys, xxh3_64 of each band's `rows`
                 minima (seeded by the band index, so equal values in two bands are two keys), then
                 one byte of every minimum (b-bit MinHash, Li & Koenig 2010): enough to estimate
                 the Jaccard similarity of two documents (bias 1/256, corrected) without their text
    similarity   the estimated Jaccard: the share of equal bytes, corrected for chance agreement;
                 a candidate pair is an edge when it reaches MinHashParams.cutoff (the threshold
                 less two standard errors: the threshold is a true similarity, the estimate noisy)
    bucket_edges the candidate pairs of one band bucket (members sorted by rank): each member with the
                 bucket's first (a star) and with the one before it (a path); 2k-3 edges for k
                 members instead of k(k-1)/2, and the bucket stays one connected piece
    survivors    the in-memory reference of the whole computation: buckets, verified edges, connected
                 components (union-find), the smallest rank of each component survives

Every parameter is fixed (HASH_SEED, the functions drawn from it): sketches are equal on every
worker, runner and machine. Measured cost: docs/BENCHMARKS.md ("Near-duplicate documents").
"""
from __future__ import annotations

import itertools
import math
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Hashable, Iterable

import numpy as np
import xxhash

from schemas.keys import normalize_for_dedup

HASH_SEED = 1          # draws the hash functions: fixed, never an option (sketches must compare across runs)
CHUNK = 2048           # shingles hashed at once: bounds the (chunk x hashes) matrix of a long document
POLY = np.uint64(0x100000001B3)  # the n-gram polynomial's base (FNV's prime)
_BYTE_MIX = np.uint32(0x9E3779B1)
_LAYOUT = string.punctuation.encode()


@dataclass(frozen=True)
class MinHashParams:
    """Shingle size, LSH bands x rows (hashes per band), and the Jaccard similarity from which two
    documents are near-duplicates."""

    ngram: int = 5
    bands: int = 14
    rows: int = 8
    threshold: float = 0.8

    @property
    def hashes(self) -> int:
        return self.bands * self.rows

    @property
    def sketch_bytes(self) -> int:
        return 8 * self.bands + self.hashes

    @property
    def cutoff(self) -> float:
        """The estimate from which a candidate pair is an edge: the threshold less two standard errors
        of the estimate there (0.0378 at 0.8 with 112 hashes), so that a pair whose true similarity
        is the threshold passes 97.7% of the time. Measured (docs/BENCHMARKS.md): cutting at the
        threshold itself lost a fifth of the planted pairs of true similarity 0.8-0.85."""
        t = self.threshold
        return t - 2 * math.sqrt(t * (1 - t) / self.hashes)


@lru_cache(maxsize=8)
def _functions(hashes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(HASH_SEED)
    a = rng.integers(0, 1 << 32, size=hashes, dtype=np.uint32) | np.uint32(1)
    return a, rng.integers(0, 1 << 32, size=hashes, dtype=np.uint32)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place (uint64): every input bit reaches every output bit. Also
    decontaminate.py's n-gram hash finalizer."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def words(text: str) -> list[bytes]:
    """The words (UTF-8) of exact dedup's normalized text, less those made of ASCII punctuation alone
    (all of them when nothing else is left)."""
    raw = normalize_for_dedup(text).encode("utf-8")
    tokens = raw.split(b" ")
    # deleting bytes keeps the spaces, so the stripped tokens line up with the tokens
    return list(itertools.compress(tokens, map(bool, raw.translate(None, _LAYOUT).split(b" ")))) or tokens


def shingles(text: str, ngram: int) -> np.ndarray:
    """The uint32 hashes of the text's word n-grams (with repeats), in order."""
    words_ = words(text)
    hashed = np.fromiter(map(xxhash.xxh3_64_intdigest, words_), np.uint64, len(words_))
    n = min(ngram, len(hashed))
    count = len(hashed) - n + 1
    out = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            out *= POLY
            out += hashed[k:k + count]
    return (mix(out) >> np.uint64(32)).astype(np.uint32)


def minhash(shingle_hashes: np.ndarray, hashes: int) -> np.ndarray:
    """The `hashes` minima (uint32) of h_i over the shingles. 32-bit arithmetic: half the memory
    traffic of 64-bit (measured 1.7x faster), and two different minima tie with odds 1/2^32."""
    a, b = _functions(hashes)
    mins = np.full(hashes, np.iinfo(np.uint32).max, np.uint32)
    with np.errstate(over="ignore"):
        for start in range(0, len(shingle_hashes), CHUNK):
            values = shingle_hashes[start:start + CHUNK, None] * a
            values += b
            np.minimum(mins, values.min(axis=0), out=mins)
    return mins


def band_hashes(mins: np.ndarray, bands: int) -> np.ndarray:
    """The LSH band keys (uint64) of a MinHash signature: each band's minima hashed into one key."""
    per_band = mins.view(np.uint8).reshape(bands, -1)
    return np.array([xxhash.xxh3_64_intdigest(per_band[i].tobytes(), seed=i) for i in range(bands)], np.uint64)


def sketch(text: str, params: MinHashParams) -> bytes:
    """A document's sketch: its band keys (uint64 each), then one byte of each minimum (its top byte
    after a multiply: the low bits of a*x+b depend on the low bits of x alone)."""
    mins = minhash(shingles(text, params.ngram), params.hashes)
    keys = band_hashes(mins, params.bands)
    with np.errstate(over="ignore"):
        low = ((mins * _BYTE_MIX) >> np.uint32(24)).astype(np.uint8)
    return keys.tobytes() + low.tobytes()


def band_keys(sk: bytes, params: MinHashParams) -> list[int]:
    """The sketch's band keys, as signed 64-bit integers (Beam's integer coder)."""
    return np.frombuffer(sk, np.int64, params.bands).tolist()


def similarity(a: bytes, b: bytes, params: MinHashParams) -> float:
    """The estimated Jaccard similarity of two sketched documents: the share of equal bytes of
    their minima, less the 1/256 at which two different minima agree by chance."""
    start = 8 * params.bands
    agree = np.count_nonzero(np.frombuffer(a, np.uint8, offset=start) == np.frombuffer(b, np.uint8, offset=start))
    chance = 1 / 256
    return max(0.0, (agree / params.hashes - chance) / (1 - chance))


def similar(a: bytes, b: bytes, params: MinHashParams) -> bool:
    return similarity(a, b, params) >= params.cutoff


def bucket_edges(members: list) -> Iterable[tuple]:
    """Candidate pairs (smaller, larger) of one band bucket whose members are sorted ascending: each
    with the first (star) and with its predecessor (path), each pair once."""
    first = members[0]
    for i in range(1, len(members)):
        yield first, members[i]
        if i > 1:
            yield members[i - 1], members[i]


def survivors(sketches: dict[Hashable, bytes], params: MinHashParams) -> dict[Hashable, Hashable]:
    """{node: the smallest node of its cluster} for every node in a cluster of two or more, computed
    in memory; nodes are ranks (prepare: (sample_key(id, seed), id)), compared as they are."""
    buckets: dict[tuple[int, int], list] = {}
    for node, sk in sketches.items():
        for band, key in enumerate(band_keys(sk, params)):
            buckets.setdefault((band, key), []).append(node)
    parent: dict = {}

    def root(x):
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    edges = {e for members in buckets.values() if len(members) > 1 for e in bucket_edges(sorted(members))}
    clustered = set()
    for u, v in edges:
        if similar(sketches[u], sketches[v], params):
            clustered.update((u, v))
            ru, rv = root(u), root(v)
            if ru != rv:
                parent[max(ru, rv)] = min(ru, rv)
    return {node: root(node) for node in clustered}
