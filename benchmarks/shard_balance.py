"""Simulates prepare's shard assignment on synthetic lengths: balance (max/mean tokens per shard) and
the largest bucket one worker holds, for any number of documents, without running prepare.

    python -m benchmarks.shard_balance --docs 100000 10000000 --shards 16

Lengths are log-normal (median ~660 tokens, cut at 3584, as the length filter leaves them); ids are
"d<i>". Buckets are balanced one at a time, as the pipeline's workers do, so memory is one bucket.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from beam_pipelines.prepare.shards import assign_bucket, balance, num_buckets
from schemas.keys import balance_bucket


def simulate(n_docs: int, num_shards: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(6.5, 1.0, n_docs).astype(np.int64) + 1, 3584)
    n_buckets = num_buckets(n_docs)
    bucket = np.fromiter((balance_bucket(f"d{i}", n_buckets) for i in range(n_docs)), dtype=np.int64, count=n_docs)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
    tokens = [0] * num_shards
    largest = 0
    for b in range(n_buckets):
        members = order[bounds[b]:bounds[b + 1]]
        largest = max(largest, len(members))
        shard_of = assign_bucket(((f"d{i}", int(lengths[i])) for i in members), num_shards, b)
        for i in members:
            tokens[shard_of[f"d{i}"]] += int(lengths[i])
    return {"docs": n_docs, "shards": num_shards, "buckets": n_buckets, "largest_bucket_docs": largest,
            "balance_max_over_mean": round(balance(tokens), 6)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000, 10_000_000])
    ap.add_argument("--shards", type=int, default=16)
    args = ap.parse_args(argv)
    for n in args.docs:
        print(json.dumps(simulate(n, args.shards)), flush=True)


if __name__ == "__main__":
    main()
