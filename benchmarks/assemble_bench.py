"""Benchmark of `bft assemble` on the local runner: rows/s, peak RSS, and the share of time in stats.

Builds (once, cached under benchmarks/work/assemble-N/) N candidates in 16 shards with realistic text
(benchmarks.corpus.TextMaker), matching backtranslate / score / rewrite shards written through the
generation schema (instructions from the text, scores 1..5 with 40% fives, rewrites of ~half the
document, 2-3% parse failures per stage), and 3,200 seed pairs; then times `bft assemble` for the
default recipe (filter+rewrite) and for `filter`, each in a fresh process.

    python -m benchmarks.assemble_bench [--candidates 100000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

from benchmarks.prepare_bench import PY, WORK, make_tokenizer, measure

SHARDS = 16


def build_root(n: int, tokenizer: str) -> str:
    import schemas
    from benchmarks.corpus import TextMaker
    import storage
    from lifecycle import provenance
    from schemas.layout import RunLayout
    from schemas.outcomes import BELOW_GATE

    root = os.path.join(WORK, f"assemble-{n}")
    if os.path.exists(os.path.join(root, "DONE")):
        return root
    shutil.rmtree(root, ignore_errors=True)
    maker, rng = TextMaker(seed=7), np.random.default_rng(7)
    files = []
    for k in range(SHARDS):
        ids = [f"doc-{i:08d}" for i in range(k, n, SHARDS)]
        texts = [maker.text(maker.length(median=2000, cap=12000)) for _ in ids]
        cands = [{"id": i, "text": t, "source": "common-crawl", "url": None, "n_chars": len(t),
                  "n_tokens": len(t) // 4, "shard": k, "text_hash": i} for i, t in zip(ids, texts)]
        path = os.path.join(root, "candidates", f"candidates-{k:05d}-of-{SHARDS:05d}.parquet")
        storage.write_parquet(schemas.to_table(cands, schemas.CANDIDATE, path), path)
        files.append({"path": path, "rows": len(ids), "tokens": sum(c["n_tokens"] for c in cands), "bytes": 0})
        base = {"model": "synthetic", "prompt_tokens": 600, "output_tokens": 40, "finish_reason": "stop",
                "raw_output": None, "instruction": None, "score": None, "reasoning": None, "response": None,
                "parse_error": None, "input_truncated": False, "seed": 0}
        bt, sc, rw = [], [], []
        for i, t in zip(ids, texts):
            first = t.split(". ")[0][:300]
            fail = rng.random(3) < np.array([0.03, 0.02, 0.02])
            # a few instructions repeat across documents, as backtranslation does for similar pages
            instr = f"What can you tell me about {first.lower()}?" if rng.random() > 0.01 else "What is this about?"
            bt.append({**base, "id": i, "stage": "backtranslate", "instruction": None if fail[0] else instr,
                       "parse_error": "echo" if fail[0] else None, "raw_output": instr})
            score = float(rng.choice([1, 2, 3, 4, 5], p=[0.1, 0.15, 0.15, 0.2, 0.4]))
            carried = None if fail[0] else instr
            sc.append({**base, "id": i, "stage": "score", "score": None if fail[1] else score, "instruction": carried,
                       "reasoning": "The answer is relevant.", "raw_output": f"Relevant.\nScore: {score:g}",
                       "parse_error": "no_match" if fail[1] else None})
            rewrite = t[: max(200, len(t) // 2)]
            if fail[0] or fail[1] or score < 5:   # as generate's default gate writes what it does not send
                rw.append({**base, "id": i, "stage": "rewrite", "instruction": carried, "prompt_tokens": None,
                           "output_tokens": None, "finish_reason": None, "parse_error": BELOW_GATE})
                continue
            rw.append({**base, "id": i, "stage": "rewrite", "response": None if fail[2] else rewrite, "instruction": carried,
                       "raw_output": f"[RES]{rewrite}[/RES]", "parse_error": "unclosed" if fail[2] else None})
        layout = RunLayout(root)
        for stage, rows in (("backtranslate", bt), ("score", sc), ("rewrite", rw)):
            out = layout.generation_shard(stage, k, SHARDS)
            storage.write_parquet(schemas.to_table(rows, schemas.GENERATION, out), out)
            inputs = {"candidates": path, **({} if stage == "backtranslate" else
                                             {"backtranslate": layout.generation_shard("backtranslate", k, SHARDS)})}
            record = provenance.seal(out, provenance.made_from(layout, inputs, {"model": "synthetic"}))
            storage.write_text(layout.generation_metrics(stage, k, SHARDS),
                               json.dumps({"model": "synthetic", provenance.KEY: record}))
    stats = {"input_records": n, "kept": n, "dropped": {}, "shards": {"files": files},
             "config": {"tokenizer": tokenizer}}
    storage.write_text(os.path.join(root, "candidates", "stats.json"), json.dumps(stats))
    with open(os.path.join(root, "seed.jsonl"), "w") as f:
        for i in range(3200):
            f.write(json.dumps({"id": f"oasst1/{i:05d}", "instruction": maker.text(120) + "?",
                                "response": maker.text(maker.length(median=900, cap=4000))}) + "\n")
    open(os.path.join(root, "DONE"), "w").close()
    return root


def run_recipe(root: str, n: int, recipe: str) -> dict:
    version = f"bench-{recipe.replace('+', '-')}"
    shutil.rmtree(os.path.join(root, "sft", version), ignore_errors=True)
    m = measure([PY, "-m", "bft.cli", "assemble", "--root", root, "--recipe", recipe, "--seed-data", os.path.join(root, "seed.jsonl"),
                 "--version", version])
    stats = json.load(open(os.path.join(root, "sft", version, "stats.json")))
    t = stats["timing"]
    return {"recipe": recipe, "candidates": n, "examples": stats["funnel"]["final"]["total"],
            "wall_s": round(m["wall_s"], 2), "rows_per_s": round(n / m["wall_s"]),
            "peak_rss_gb": round(m["peak_rss_bytes"] / 1e9, 3),
            "stats_share_of_worker_time": round(t["stats_in_pipeline_worker_s"] / max(t["pipeline_worker_s"], 1e-9), 3),
            "report_s": t["report_s"], "pipeline_s": t["pipeline_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", type=int, default=100_000)
    args = ap.parse_args()
    root = build_root(args.candidates, make_tokenizer())
    results = [run_recipe(root, args.candidates, r) for r in ("filter+rewrite", "filter")]
    out = os.path.join(WORK, "assemble_bench.json")
    json.dump(results, open(out, "w"), indent=2)
    print("| recipe | candidates | examples | wall s | rows/s | peak RSS GB | stats share of worker time | report s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['recipe']} | {r['candidates']:,} | {r['examples']:,} | {r['wall_s']} | {r['rows_per_s']:,} | "
              f"{r['peak_rss_gb']} | {r['stats_share_of_worker_time']:.1%} | {r['report_s']} |")


if __name__ == "__main__":
    main()
