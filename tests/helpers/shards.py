"""The prepare pass's shard assignment done in one process, the oracle its Beam output is compared with:
each document to its balancing bucket (schemas.keys.balance_bucket), then each bucket balanced by
beam_pipelines.prepare.shards.assign_bucket, as each bucket's worker does."""
from beam_pipelines.prepare.shards import assign_bucket, num_buckets
from schemas.keys import balance_bucket


def assign_in_one_process(docs, num_shards: int, n_buckets: int | None = None) -> dict[str, int]:
    """{id: shard} for (id, n_tokens) pairs; `n_buckets` defaults to the pipeline's for their count."""
    docs = list(docs)
    n_buckets = num_buckets(len(docs)) if n_buckets is None else n_buckets
    buckets: dict[int, list[tuple[str, int]]] = {}
    for d in docs:
        buckets.setdefault(balance_bucket(d[0], n_buckets), []).append(d)
    out: dict[str, int] = {}
    for b, members in buckets.items():
        out.update(assign_bucket(members, num_shards, b))
    return out
