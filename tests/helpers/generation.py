"""A run root's generation stages as the tests drive them: a root copied from the prepared one, a stage
run with the tests' settings, its shards read back, upstream rows made parseable, and gate shards
written from literal scores."""
import json
import os

import pandas as pd

import schemas
import storage
from generation.job import GenerateConfig
from generation.runner import StageRunner
from lifecycle import provenance
from schemas.layout import RunLayout
from lifecycle.release import sha256_of

# Tiny random models never score 5: the tests that drive every stage send rewrite and distill every row.
NO_GATE = {"rewrite": {"gate": "none"}, "distill": {"gate": "none"}}


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


def write_scores(root, stage, scores, config=None):
    """`stage` shards as a gate stage writes them: score per id from `scores` (missing: parse failure);
    `config`: the stage config its markers record (e.g. {"score_mode": "logprob"})."""
    layout = RunLayout(root)
    for k in range(3):
        bt = read_generation_rows(layout.generation_shard("backtranslate", k, 3))
        rows = [dict(r, stage=stage, score=scores.get(r["id"]), parse_error=None if r["id"] in scores else "no_match")
                for r in bt]
        path = layout.generation_shard(stage, k, 3)
        storage.write_parquet(schemas.to_table(rows, schemas.GENERATION, path), path)
        made = provenance.made_from(layout, {"candidates": layout.candidates_shard(k, 3),
                                             "backtranslate": layout.generation_shard("backtranslate", k, 3)}, {})
        storage.write_text(layout.generation_metrics(stage, k, 3),
                           json.dumps({provenance.KEY: provenance.seal(path, made), "config": config or {}}))


def read_generation_rows(path):
    return schemas.validate(storage.read_parquet(path), schemas.GENERATION, path).to_pylist()
