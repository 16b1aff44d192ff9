"""Token-balanced shard assignment with bounded memory per worker.

A document's balancing bucket is a hash of its id (schemas.keys.balance_bucket) among
num_buckets(kept documents) buckets of about BUCKET_DOCS documents each; the only global input is
that count, a small summary. Inside a bucket, longest-processing-time-first: documents in decreasing
`n_tokens` (ties by id) go each to the shard with the fewest tokens of that bucket so far (ties by the
shard's rank in the bucket's rotation, which starts at shard `bucket % num_shards`, so that the
buckets' remainders fall on different shards). A bucket's max/mean is at most 1 + largest document /
its mean shard, and summing the buckets keeps that bound for the whole: ~1.001 at 100K documents in
16 shards; benchmarks/shard_balance.py simulates 10M. The result depends on the set of documents only,
never on their order or the runner.

A document keeps its bucket as the corpus grows while the number of buckets stays the same; its shard
inside the bucket can change when documents are added to that bucket (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import heapq
import math
from typing import Iterable

BUCKET_DOCS = 50_000  # documents balanced together by one worker (~30 MB of their keys)


def num_buckets(n_docs: int) -> int:
    """Buckets for `n_docs` kept documents: at most ~BUCKET_DOCS documents each."""
    return max(1, math.ceil(n_docs / BUCKET_DOCS))


def assign_bucket(docs: Iterable[tuple[str, int]], num_shards: int, bucket: int = 0,
                  prior: dict[str, int] | None = None) -> dict[str, int]:
    """{id: shard} for the (id, n_tokens) pairs of one bucket. `prior` ({id: shard} of the output this
    one replaces): a document already seen keeps its shard, and the new ones are balanced onto the
    shards' loads (so a nightly rebuild moves no document, and generates only for the new ones)."""
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    out: dict[str, int] = {}
    loads = [0] * num_shards
    new = []
    for doc_id, n in docs:
        k = (prior or {}).get(doc_id)
        if k is not None and 0 <= k < num_shards:
            out[doc_id] = k
            loads[k] += n
        else:
            new.append((doc_id, n))
    heap = [(loads[k], (k - bucket) % num_shards, k) for k in range(num_shards)]  # (tokens, rank, shard)
    heapq.heapify(heap)
    for doc_id, n in sorted(new, key=lambda d: (-d[1], d[0])):
        tokens, rank, k = heapq.heappop(heap)
        out[doc_id] = k
        heapq.heappush(heap, (tokens + n, rank, k))
    return out


def balance(shard_tokens: list[int]) -> float:
    """max/mean of tokens per shard (1.0 is perfect; 0 shards or tokens give 1.0)."""
    total = sum(shard_tokens)
    if not shard_tokens or total == 0:
        return 1.0
    return max(shard_tokens) / (total / len(shard_tokens))
