"""Token-balanced shard assignment.

Longest-processing-time-first: documents in decreasing `n_tokens` (ties by id) go each to the shard
with the fewest tokens so far (ties by shard number). The result depends on the set of documents
only, not on their order, and max/mean shard tokens is at most 1 + (largest document / mean shard),
which is ~1.001 at 100K documents in 16 shards.
"""
from __future__ import annotations

import heapq
from typing import Iterable


def assign_shards(docs: Iterable[tuple[str, int]], num_shards: int) -> dict[str, int]:
    """{id: shard} for (id, n_tokens) pairs."""
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    heap = [(0, 0, k) for k in range(num_shards)]  # (tokens, rows, shard)
    out: dict[str, int] = {}
    for doc_id, n in sorted(docs, key=lambda d: (-d[1], d[0])):
        tokens, rows, k = heapq.heappop(heap)
        out[doc_id] = k
        heapq.heappush(heap, (tokens + n, rows + 1, k))
    return out


def balance(shard_tokens: list[int]) -> float:
    """max/mean of tokens per shard (1.0 is perfect; 0 shards or tokens give 1.0)."""
    total = sum(shard_tokens)
    if not shard_tokens or total == 0:
        return 1.0
    return max(shard_tokens) / (total / len(shard_tokens))

