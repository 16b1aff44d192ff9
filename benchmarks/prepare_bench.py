"""Benchmark of `bft prepare` against datatrove, side by side in one run (issue: pass 1).

For each corpus size: generate a Dolma-layout corpus (benchmarks/corpus.py; cached), train a 32K-piece
byte-fallback BPE on a sample of it (cached), then run both tools as subprocesses on the same files
with the same tokenizer and limit, measuring wall time and the peak RSS of the whole process tree.
Both sides' length decisions are compared document by document. Prints a markdown table and writes
benchmarks/work/prepare_bench.json.

    .venv/bin/python -m benchmarks.prepare_bench --docs 30000 100000 300000
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pandas as pd
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work")
PY = sys.executable
BFT = os.path.join(os.path.dirname(PY), "bft")


def make_corpus(n_docs: int, files: int) -> str:
    from benchmarks.corpus import TextMaker, write_dolma

    root = os.path.join(WORK, f"corpus-{n_docs}")
    if not os.path.exists(os.path.join(root, "DONE")):
        shutil.rmtree(root, ignore_errors=True)
        write_dolma(root, n_docs, files, maker=TextMaker(seed=n_docs))
        open(os.path.join(root, "DONE"), "w").close()
    return root


def make_tokenizer(vocab: int = 32000) -> str:
    from benchmarks.corpus import TextMaker
    from training.tiny import train_byte_fallback_bpe

    path = os.path.join(WORK, f"tokenizer-{vocab}.json")
    if not os.path.exists(path):
        maker = TextMaker(seed=12345)
        train_byte_fallback_bpe([maker.text(maker.length()) for _ in range(4000)], vocab).save(path)
    return path


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Runs `cmd`; wall seconds and peak RSS (bytes) summed over its process tree, sampled every 50 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [root] + root.children(recursive=True))
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed:\n{out[-4000:]}")
    return {"wall_s": wall, "peak_rss_bytes": peak[0], "log_tail": out[-2000:]}


def run_size(n_docs: int, files: int, max_tokens: int, shards: int, tokenizer: str) -> dict:
    corpus = make_corpus(n_docs, files)
    head = os.path.join(corpus, "documents", "cc_en_head")
    ours_root = os.path.join(WORK, f"ours-{n_docs}")
    ours_out = os.path.join(ours_root, "candidates")
    peer_out = os.path.join(WORK, f"datatrove-{n_docs}")
    for d in (ours_root, peer_out, peer_out + "-logs"):
        shutil.rmtree(d, ignore_errors=True)
    ours = measure([BFT, "prepare", "--input", os.path.join(head, "*.json.gz"), "--root", ours_root,
                    "--tokenizer", tokenizer, "--max-tokens", str(max_tokens), "--num-shards", str(shards)])
    peer = measure([PY, "-m", "benchmarks.datatrove_peer", "--input-dir", head, "--output", peer_out,
                    "--tokenizer", tokenizer, "--max-tokens", str(max_tokens), "--tasks", str(files)],
                   env={"PYTHONPATH": os.path.dirname(HERE)})
    stats = json.load(open(os.path.join(ours_out, "stats.json")))
    # Length decisions, document by document: datatrove keeps exactly what we keep or drop as a duplicate
    # (it does not dedup), with the same token count; what we drop as too long it drops.
    mine = pd.concat([pd.read_parquet(f, columns=["id", "n_tokens"])
                      for f in glob.glob(os.path.join(ours_out, "candidates-*.parquet"))])
    rejects = pd.concat([pd.read_parquet(f, columns=["id", "reason"])
                         for f in glob.glob(os.path.join(ours_out, "rejects", "*.parquet"))])
    theirs = pd.concat([pd.read_parquet(f, columns=["id", "metadata"])
                        for f in glob.glob(os.path.join(peer_out, "*.parquet"))])
    theirs_tokens = dict(zip(theirs["id"], (m["token_count"] for m in theirs["metadata"])))
    length_ok_ours = set(mine["id"]) | set(rejects.loc[rejects.reason == "duplicate", "id"])
    same_decisions = length_ok_ours == set(theirs_tokens)
    same_counts = all(theirs_tokens.get(i) == n for i, n in zip(mine["id"], mine["n_tokens"]))
    lf = stats["length_filter"]
    measured = sum(lf.values())
    return {
        "docs": n_docs,
        "ours": {k: ours[k] for k in ("wall_s", "peak_rss_bytes")},
        "datatrove": {k: peer[k] for k in ("wall_s", "peak_rss_bytes")},
        "ours_docs_per_s": n_docs / ours["wall_s"],
        "datatrove_docs_per_s": n_docs / peer["wall_s"],
        "speed_ratio": peer["wall_s"] / ours["wall_s"],
        "same_length_decisions": same_decisions,
        "same_token_counts": same_counts,
        "share_tokenized_in_full": lf["tokenized_in_full"] / measured if measured else 0.0,
        "share_rejected_by_bound": lf["rejected_by_bound"] / measured if measured else 0.0,
        "balance_max_over_mean": stats["shards"]["balance_max_over_mean"],
        "kept": stats["kept"],
        "dropped": stats["dropped"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=3584)
    ap.add_argument("--num-shards", type=int, default=16)
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    tokenizer = make_tokenizer()
    results = []
    for n in args.docs:
        r = run_size(n, args.files, args.max_tokens, args.num_shards, tokenizer)
        results.append(r)
        print(json.dumps(r), flush=True)
    json.dump(results, open(os.path.join(WORK, "prepare_bench.json"), "w"), indent=2)
    print("\n| docs | bft prepare docs/s | datatrove docs/s | ratio | bft peak RSS | datatrove peak RSS |"
          " same decisions | tokenized in full | balance |")
    print("|---:|---:|---:|---:|---:|---:|:---:|---:|---:|")
    for r in results:
        print(f"| {r['docs']:,} | {r['ours_docs_per_s']:,.0f} | {r['datatrove_docs_per_s']:,.0f} | "
              f"{r['speed_ratio']:.2f}x | {r['ours']['peak_rss_bytes'] / 2**20:,.0f} MiB | "
              f"{r['datatrove']['peak_rss_bytes'] / 2**20:,.0f} MiB | "
              f"{'yes' if r['same_length_decisions'] and r['same_token_counts'] else 'NO'} | "
              f"{r['share_tokenized_in_full']:.1%} | {r['balance_max_over_mean']:.4f} |")


if __name__ == "__main__":
    main()
