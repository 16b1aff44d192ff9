"""`bft seed`: the seed set of the method from OpenAssistant oasst1 messages (Li et al. 2023; Nguyen et al. 2024, App. A.3).

A seed pair is the first turn of a conversation tree: the root prompter message and its assistant
reply of rank 0, both English, not deleted and with a passed review. `--n` pairs are sampled
deterministically (the smallest hashes of the tree ids under `--seed`; all pairs when fewer exist),
and written as sft-schema Parquet (origin "seed", no tag: `bft assemble` adds it).

Input: the Hugging Face export of the messages (`.jsonl`, `.jsonl.gz` or `.parquet`, local or gs://)
with at least message_id, parent_id, message_tree_id, role, text, lang, rank, deleted, review_result.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import schemas
from schemas.errors import UserError
from schemas.layout import RunLayout
from schemas.options import option, required
from schemas.keys import seed_tree_key
from schemas.examples import examples
import storage

COLUMNS = ["message_id", "parent_id", "message_tree_id", "role", "text", "lang", "rank", "deleted", "review_result"]


class SeedError(UserError):
    pass


@dataclass
class SeedConfig:
    """The options of `bft seed`."""

    oasst: str = required("oasst1 messages: .jsonl, .jsonl.gz or .parquet (local or gs://)")
    root: str | None = option(None, "run root: writes ROOT/seed/seed.parquet")
    output: str | None = option(None, "Parquet file of seed pairs (sft schema), if not under --root")
    n: int = option(3200, "pairs to sample (3,200 as in the paper)")
    seed: int = option(0, "seed of the sample")

    def check(self) -> None:
        if self.n < 1:
            raise SeedError("--n must be >= 1")
        if self.output is None:
            if self.root is None:
                raise SeedError("give --root or --output")
            self.output = RunLayout(self.root).seed_pairs


OASST_LIMIT = 1 << 30   # bytes of the --oasst file as stored (it is read whole into memory)


def read_messages(path: str) -> pa.Table:
    try:
        storage.check_input(path, OASST_LIMIT, "--oasst")
        table = storage.read_records(path)
    except ValueError as e:
        raise SeedError(str(e)) from e
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise SeedError(f"{path}: not an oasst1 messages export; missing columns {missing}")
    return table.select(COLUMNS)


def _true(col) -> pa.Array:
    return pc.fill_null(col.cast(pa.bool_()), False)


def select_pairs(messages: pa.Table) -> tuple[pa.Table, dict]:
    """(pairs, counts): first-turn pairs (tree, instruction, response) sorted by tree id, and how many
    trees were left out for each reason."""
    usable = pc.fill_null(pc.and_(pc.and_(pc.equal(messages["lang"], "en"), pc.invert(_true(messages["deleted"]))),
                                  _true(messages["review_result"])), False)
    root = pc.and_(pc.is_null(messages["parent_id"]), pc.equal(messages["role"], "prompter"))
    counts = collections.Counter({"trees": len(pc.unique(messages["message_tree_id"]))})
    ok_roots = messages.filter(pc.and_(root, usable))
    counts["root_not_english_deleted_or_unreviewed"] = pc.sum(root.cast(pa.int64())).as_py() - ok_roots.num_rows
    replies = messages.filter(pc.and_(pc.and_(pc.equal(messages["role"], "assistant"),
                                              pc.equal(messages["rank"].cast(pa.int64()), 0)), usable))
    replies = replies.select(["parent_id", "message_id", "text"]).rename_columns(["root_id", "reply_id", "response"])
    # one reply per root: the smallest message id if an export ever holds two of rank 0
    replies = replies.sort_by([("root_id", "ascending"), ("reply_id", "ascending")])
    first = np.ones(replies.num_rows, bool)
    roots_col = replies["root_id"].to_numpy(zero_copy_only=False)
    first[1:] = roots_col[1:] != roots_col[:-1]
    replies = replies.filter(pa.array(first))
    pairs = ok_roots.select(["message_tree_id", "message_id", "text"]).rename_columns(
        ["tree", "root_id", "instruction"]).join(replies, keys="root_id", join_type="inner")
    counts["no_usable_rank0_reply"] = ok_roots.num_rows - pairs.num_rows
    counts["pairs"] = pairs.num_rows
    return pairs.sort_by("tree"), dict(counts)


def sample_pairs(pairs: pa.Table, n: int, seed: int) -> pa.Table:
    """The n pairs with the smallest hash of their tree id (all when fewer), sorted by tree id."""
    if pairs.num_rows <= n:
        return pairs
    trees = pairs["tree"].to_pylist()
    order = sorted(range(len(trees)), key=lambda i: (seed_tree_key(trees[i], seed), trees[i]))
    return pairs.take(pa.array(sorted(order[:n])))


def to_sft(pairs: pa.Table) -> pa.Table:
    instructions = pc.utf8_trim_whitespace(pairs["instruction"]).combine_chunks()
    responses = pc.utf8_trim_whitespace(pairs["response"]).combine_chunks()
    n = pairs.num_rows
    ids = pa.array([f"oasst1/{t}" for t in pairs["tree"].to_pylist()], pa.string())
    return examples(instructions, responses, ids=ids, origin="seed", recipe=None, tag=None, scores=None,
                            n_tokens_instruction=pa.nulls(n, pa.int32()), n_tokens_response=pa.nulls(n, pa.int32()))


def run(cfg: SeedConfig) -> dict:
    oasst, output, n, seed = cfg.oasst, cfg.output, cfg.n, cfg.seed
    pairs, counts = select_pairs(read_messages(oasst))
    chosen = sample_pairs(pairs, n, seed)
    table = to_sft(chosen)
    storage.write_parquet(schemas.validate(table, schemas.SFT, output), output)
    counts["selected"] = table.num_rows
    return counts
