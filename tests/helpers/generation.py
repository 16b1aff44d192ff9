"""A run root's generation stages as the tests drive them: a root copied from the prepared one, a stage
run with the tests' settings, its shards read back, and upstream rows made parseable."""
import json
import os

import pandas as pd

import schemas
import storage
from generation.job import GenerateConfig
from generation.runner import StageRunner
from lifecycle import provenance
from lifecycle.release import sha256_of


def copy_root(src, dst):
    import shutil

    shutil.copytree(os.path.join(src, "candidates"), os.path.join(dst, "candidates"))
    return str(dst)


def gen(root, stage, model, engine="hf", **kw):
    cfg = GenerateConfig(stage=stage, root=root, engine=engine, model=model, max_new_tokens=kw.pop("max_new_tokens", 12),
                         batch_size=4, seed=7, **kw)
    with StageRunner(cfg) as runner:
        return runner.run()


def give_instructions(root):
    """Random tiny models seldom end an output, so backtranslation rows are mostly `truncated`; to
    drive the downstream stages, the backtranslate shards get a valid instruction per row (the
    files are rewritten through the schema, as the runner writes them)."""
    folder = os.path.join(root, "generations", "backtranslate")
    for name in os.listdir(folder):
        if name.endswith(".parquet"):
            path = os.path.join(folder, name)
            rows = schemas.validate(storage.read_parquet(path), schemas.GENERATION, path).to_pylist()
            for r in rows:
                r.update(instruction=f"Explain the text of {r['id']}.", parse_error=None)
            rows[0].update(instruction=None, parse_error="echo")  # one upstream failure per shard
            storage.write_parquet(schemas.to_table(rows, schemas.GENERATION, path), path)
            reseal(path)


def reseal(path):
    """A shard rewritten by a test gets its marker's checksum renewed, as the runner writes it."""
    marker = path.replace(".parquet", ".metrics.json")
    metrics = json.load(open(marker))
    metrics[provenance.KEY].update(sha256=sha256_of(path), bytes=os.path.getsize(path))
    storage.write_text(marker, json.dumps(metrics))


def read_stage(root, stage):
    folder = os.path.join(root, "generations", stage)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
    return files, pd.concat([pd.read_parquet(os.path.join(folder, f)) for f in files], ignore_index=True)
