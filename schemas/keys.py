"""Every deterministic key of the product, in one place.

Each key depends on its inputs and the seed only, never on order, runner or worker count, so that
outputs are reproducible and stable as the input grows.

    text_hash          prepare's exact text dedup: xxh3_128 of NFC + collapsed whitespace (case kept)
    sample_key         prepare's --target-docs sample, assemble's --max-examples cap and bft plan --pilot's
                       sample (the N smallest keys over the candidates, with prepare's seed): xxh3_64(id, seed)
    instruction_key    assemble's instruction dedup: xxh3_128 of NFC + collapsed whitespace + casefold
    in_validation      assemble's train/validation split: xxh3_64(id, seed + 1) < fraction * 2^64; with a
                       cap, the validation_size smallest of these keys among the capped web examples
    seed_row_shard     the output shard of a seed example: xxh3_64(id) % shards
    balance_bucket     prepare's shard-balancing bucket of a kept document: xxh3_64(id, seed 7) % buckets
    row_seed           a generation request's sampling seed: xxh3_64(stage \\0 id, seed) % 2^31
    seed_tree_key      bft seed's sample of oasst1 trees: xxh3_64(tree id, seed)
    input_hash         what a generation row was made from: xxh3_128 of its prompt values (or of the
                       reason it was not sent); a rerun reuses a row whose input_hash and carried
                       fields (generation/stages.py: StageSpec.stale_carried) are unchanged
"""
from __future__ import annotations

import math
import unicodedata

import pyarrow as pa
import xxhash


def normalize_for_dedup(text: str) -> str:
    """NFC, then every run of whitespace (any Unicode space) collapsed to one space, ends stripped.
    Case and punctuation are kept: exact dedup of the same text laid out differently."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_hash(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(normalize_for_dedup(text).encode("utf-8"))


def sample_key(doc_id: str, seed: int) -> int:
    """A stable pseudo-random rank for bottom-k sampling: depends on the id and seed only."""
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8"), seed=seed)


def instruction_key(instruction: str) -> str:
    return xxhash.xxh3_128_hexdigest(normalize_for_dedup(instruction).casefold().encode("utf-8"))


def validation_key(doc_id: str, seed: int) -> int:
    """An example is in validation when this key is below fraction * 2**64."""
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8"), seed=seed + 1)


def in_validation(doc_id: str, fraction: float, seed: int) -> bool:
    return validation_key(doc_id, seed) < int(fraction * 2**64)


def validation_mask(ids: pa.Array | pa.ChunkedArray, fraction: float, seed: int, always: str | None = None) -> pa.Array:
    """Which ids are in validation. `always` (the release's id with the smallest validation key) is
    in it whenever fraction > 0, so that a small release still has a validation example; a release
    whose validation split is not empty holds that id anyway, so this changes only small releases."""
    limit = int(fraction * 2**64)
    return pa.array([validation_key(i, seed) < limit or (fraction > 0 and i == always) for i in ids.to_pylist()],
                    pa.bool_())


def validation_size(max_examples: int, fraction: float) -> int:
    """The validation examples assemble takes beside a cap of `max_examples` train examples, so that
    they are `fraction` of the total."""
    return math.ceil(max_examples * fraction / (1 - fraction)) if fraction > 0 else 0


def seed_row_shard(row_id: str, num_shards: int) -> int:
    return xxhash.xxh3_64_intdigest(row_id.encode("utf-8")) % num_shards


def balance_bucket(doc_id: str, n_buckets: int) -> int:
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8"), seed=7) % n_buckets


def row_seed(doc_id: str, stage: str, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(f"{stage}\0{doc_id}".encode("utf-8"), seed=seed) % (2**31)


def seed_tree_key(tree_id: str, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(tree_id.encode("utf-8"), seed=seed)


def input_hash(values: dict | None, reason: str | None) -> str:
    """What one generation row is made from, beyond the stage config: the template values it is
    prompted with (document, instruction), or the reason it is not sent."""
    import json

    blob = json.dumps({"values": values, "not_sent": reason}, sort_keys=True, ensure_ascii=False)
    return xxhash.xxh3_128_hexdigest(blob.encode("utf-8"))
