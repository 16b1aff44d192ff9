"""Seed mixing: --seed-data (bft seed's output, or any Parquet / JSON lines with instruction and
response) read by one worker, blank pairs counted and dropped, the rest tagged, counted in tokens and
hashed to output shards as seed parts. Seed pairs are neither deduplicated nor capped."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import storage
from beam_pipelines.assemble import recipes
from beam_pipelines.assemble.config import AssembleError
from beam_pipelines.assemble.join import token_counter
from beam_pipelines.runtime.options import configure_process
from schemas.keys import seed_row_shard
from schemas.layout import RunLayout

SEED_DATA_LIMIT = 1 << 30   # bytes of a --seed-data file as stored (the paper's 3,200 pairs: a few MB)


class ReadSeed(beam.DoFn):
    """Seed pairs (Parquet or JSON lines with instruction/response, optional id) -> seed parts by
    output shard. Main output: the ids kept; tagged: ("parts", (k, path)), ("partials", dict)."""

    def __init__(self, tag: str | None, tokenizer: str, proof, tmp: str, num_shards: int):
        self.tag, self.tokenizer, self.proof, self.tmp, self.num_shards = tag, tokenizer, proof, tmp, num_shards

    def setup(self):
        configure_process()
        self.count_tokens = token_counter(self.tokenizer, self.proof)

    def process(self, path: str):
        table = read_seed_table(path)
        instr = pc.utf8_trim_whitespace(pc.fill_null(table["instruction"], "")).combine_chunks()
        resp = pc.utf8_trim_whitespace(pc.fill_null(table["response"], "")).combine_chunks()
        ok = pc.and_(pc.greater(pc.utf8_length(instr), 0), pc.greater(pc.utf8_length(resp), 0))
        n_empty = table.num_rows - pc.sum(ok.cast(pa.int64())).as_py()
        ids, instr, resp = table["id"].combine_chunks().filter(ok), instr.filter(ok), resp.filter(ok)
        rows = recipes.examples(instr, resp, ids=ids, origin="seed", recipe=None, tag=self.tag, scores=None,
                                n_tokens_instruction=self.count_tokens(instr.to_pylist()),
                                n_tokens_response=self.count_tokens(resp.to_pylist()))
        shard = np.array([seed_row_shard(i, self.num_shards) for i in ids.to_pylist()], np.int64)
        for k in np.unique(shard):
            out = RunLayout.assemble_part(self.tmp, "seed", int(k))
            storage.write_parquet(rows.filter(pa.array(shard == k)), out)
            yield beam.pvalue.TaggedOutput("parts", (int(k), out))
        yield beam.pvalue.TaggedOutput("partials", {"seed": {"input": table.num_rows, "kept": rows.num_rows,
                                                             "dropped": {"empty": n_empty} if n_empty else {}}})
        yield from rows["id"].to_pylist()


class SeedData(beam.PTransform):
    """The --seed-data file (None: none) through ReadSeed: its outputs `ids`, `parts` and `partials`."""

    def __init__(self, path: str | None, tag: str | None, tokenizer: str, proof, tmp: str, num_shards: int):
        super().__init__()
        self.path, self.read = path, ReadSeed(tag, tokenizer, proof, tmp, num_shards)

    def expand(self, p):
        return (p | "SeedFile" >> beam.Create([self.path] if self.path else [])
                | "ReadSeed" >> beam.ParDo(self.read).with_outputs("parts", "partials", main="ids"))


def read_seed_table(path: str) -> pa.Table:
    """(id, instruction, response) from a Parquet or JSON-lines seed file (a regular file of at most
    SEED_DATA_LIMIT bytes as stored); ids made unique per file."""
    try:
        storage.check_input(path, SEED_DATA_LIMIT, "--seed-data")
        table = storage.read_records(path)
    except ValueError as e:
        raise AssembleError(str(e)) from e
    missing = [c for c in ("instruction", "response") if c not in table.column_names]
    if missing:
        raise AssembleError(f"{path}: seed data needs columns instruction and response; missing {missing}")
    if "id" not in table.column_names:
        name = path.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
        table = table.append_column("id", pa.array([f"seed:{name}:{i:06d}" for i in range(table.num_rows)]))
    table = table.select(["id", "instruction", "response"])
    try:
        table = table.cast(pa.schema([("id", pa.string()), ("instruction", pa.string()), ("response", pa.string())]))
    except pa.ArrowException as e:
        raise AssembleError(f"{path}: id, instruction and response must be strings ({e})") from e
    if table["id"].null_count or len(pc.unique(table["id"])) != table.num_rows:
        raise AssembleError(f"{path}: seed ids must be present and unique")
    return table
