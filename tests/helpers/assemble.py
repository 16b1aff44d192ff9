"""A run root of literal generation shards for assemble (two candidates shards, every stage, one row
per drop reason), assemble run on it with the local runner, and its release read back."""
import json
import os

import pandas as pd

import schemas
import storage
from beam_pipelines.assemble import driver as assemble
from beam_pipelines.assemble.config import AssembleConfig
from lifecycle import provenance, release
from schemas.layout import RunLayout, release_split_of
from tests.conftest import LOCAL

SHARDS = [["a0", "a1", "a2", "a3", "a4", "a5"], ["b0", "b1", "b2", "b3", "b4", "b5"]]
INSTRUCTION = "Explain the topic of document {} please."


def doc(i):
    return f"Document {i} is about the weather in the mountains. " * 3


def gen_row(i, stage, **kw):
    row = {"id": i, "stage": stage, "model": f"tiny-{stage}", "prompt_tokens": 50, "output_tokens": 10,
           "finish_reason": "stop", "raw_output": "...", "instruction": None, "score": None, "reasoning": None,
           "response": None, "parse_error": None, "input_truncated": False, "seed": 1}
    row.update(kw)
    return row


def stage_rows(stage):
    """The literal generation output: one case per drop reason (tests/test_assemble.py's
    EXPECTED_KEPT)."""
    ids = [i for s in SHARDS for i in s]
    if stage == "backtranslate":
        rows = {i: gen_row(i, stage, instruction=INSTRUCTION.format(i)) for i in ids}
        rows["a1"].update(instruction=None, parse_error="echo")
        rows["a2"].update(instruction="Short")
        rows["b0"].update(instruction="  EXPLAIN the topic of document a0\n please.")  # duplicate of a0's
        rows["b1"].update(instruction=None, parse_error="engine_error: timeout")       # a failed request
    elif stage == "score":
        rows = {i: gen_row(i, stage, score=5.0, reasoning="fine") for i in ids}
        rows["a3"].update(score=4.0)
        rows["a4"].update(score=None, parse_error="no_match")
    elif stage in ("rewrite", "distill"):
        rows = {i: gen_row(i, stage, response=f"{stage.title()} answer for {i}.") for i in ids}
        rows["a5"].update(finish_reason="length", response=None, parse_error="truncated")
        rows["b3"].update(response="   ")
    else:  # rate
        rows = {i: gen_row(i, stage, score=4.5, reasoning="accurate") for i in ids}
        rows["b4"].update(score=4.0)
    return rows


def crawl_date(i):
    return f"2019-09-{10 + int(i[1:]):02d}T00:00:00.000Z"


def write_root(root, tokenizer, stages=("backtranslate", "score", "rewrite", "distill", "rate")):
    """Candidates (2 shards) and generation shards written through the schemas, as the pipeline does."""
    n = len(SHARDS)
    files = []
    for k, ids in enumerate(SHARDS):
        rows = [{"id": i, "text": doc(i), "source": "common-crawl", "url": f"https://example.org/{i}", "n_chars": len(doc(i)),
                 "n_tokens": 30, "shard": k, "text_hash": i, "crawl_date": crawl_date(i)} for i in ids]
        path = RunLayout(root).candidates_shard(k, n)
        storage.write_parquet(schemas.to_table(rows, schemas.CANDIDATE, path), path)
        files.append({"path": path, "rows": len(rows), "tokens": 180, "bytes": 0})
        instructions = {i: r["instruction"] for i, r in stage_rows("backtranslate").items() if not r["parse_error"]}
        for stage in stages:
            by_id = stage_rows(stage)
            for i, r in by_id.items():   # downstream rows carry their backtranslate row's instruction
                r["instruction"] = instructions.get(i)
            out = RunLayout(root).generation_shard(stage, k, n)
            storage.write_parquet(schemas.to_table([by_id[i] for i in ids], schemas.GENERATION, out), out)
            write_marker(root, stage, k, n)
    stats = {"input_records": 20, "kept": 12, "dropped": {"too_long": 8}, "shards": {"files": files},
             "config": {"tokenizer": tokenizer}}
    storage.write_text(RunLayout(root).prepare_stats, json.dumps(stats))
    return root


def write_marker(root, stage, k, n, inputs=None):
    """The marker the runner writes after a shard: its model and provenance (candidates shard k and,
    downstream, backtranslate shard k as its inputs)."""
    layout = RunLayout(root)
    if inputs is None:
        inputs = {"candidates": layout.candidates_shard(k, n)}
        if stage != "backtranslate":
            inputs["backtranslate"] = layout.generation_shard("backtranslate", k, n)
    out = layout.generation_shard(stage, k, n)
    record = provenance.seal(out, provenance.made_from(layout, inputs, {"model": f"tiny-{stage}"}))
    storage.write_text(layout.generation_metrics(stage, k, n), json.dumps({"model": f"tiny-{stage}", provenance.KEY: record}))


def write_seed(path, n=5):
    rows = [{"instruction": f"Seed question number {i}?", "response": f"Seed answer {i}."} for i in range(n)]
    rows.append({"instruction": "   ", "response": "no question"})
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(root, **kw):
    return assemble.run(AssembleConfig(root=root, **kw), LOCAL)


def read_release(root, version=None):
    folder = release.resolve(os.path.join(root, "sft")) if version is None else os.path.join(root, "sft", version)
    splits = {}
    for split in ("train", "validation"):
        files = [p for p in release.data_files(folder) if release_split_of(p[len(folder) + 1:]) == split]
        frames = [pd.read_parquet(p) for p in files]
        splits[split] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=schemas.SFT.names)
    return folder, splits


def rewrite_shard(root, stage, k, change, n=2):
    """Rows of generation shard k changed by `change(row)`, rewritten with a fresh marker."""
    path = RunLayout(root).generation_shard(stage, k, n)
    rows = [change(r) or r for r in storage.read_parquet(path).to_pylist()]
    storage.write_parquet(schemas.to_table(rows, schemas.GENERATION, path), path)
    write_marker(root, stage, k, n)
    return path
