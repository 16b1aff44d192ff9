"""Benchmark of `bft prepare` against datatrove, side by side in one run (issue 10).

Three parts, each writing into benchmarks/work/ and printing markdown tables:

1. Speed, per tokenizer structure (benchmarks/real_tokenizers.py: `llama2` = Mistral-7B's sentencepiece
   model in Llama-2's structure, `tekken` = byte-level BPE with a split regex as Llama-3's, `nfkc` = an
   NFKC-normalized sentencepiece BPE) and corpus size: both tools run as subprocesses on the same files
   with the same tokenizer and limit; wall time, docs/s, the ratio, the peak RSS of the whole process
   tree, the share of documents counted each way (and kept uncounted by their upper bound), and whether
   both tools' length decisions agree document by document, and their counts wherever bft prepare gives
   one. Beside them the floor (benchmarks/prepare_floor.py): the same pass with the same decisions and
   no token counting at all (read, decompress, parse, hash, dedup, balance, write), and prepare's time
   as a multiple of it; and the shards' balance in exact tokens (datatrove's counts), whatever they were
   balanced by. `--exact-counts` runs prepare with that flag.
2. `--target-docs` on a corpus (default 300K documents): wall time of the sample against the full pass,
   and how many documents each measured.
3. Memory per process on short documents (default 30K, 300K, 1M): the peak RSS of the largest worker
   process and of the driver, which runs the local runner and holds its shuffles (flat is the target).

Each part runs on the synthetic corpus (benchmarks/corpus.py: words drawn by frequency, kind to the chunk
cache), on real text (benchmarks/real_corpus.py: man pages, info manuals, /usr/share/doc, Python's docs,
package READMEs) or on both (`--corpus`, default both); every row says which.

    .venv/bin/python -m benchmarks.prepare_bench                               # everything, as documented
    .venv/bin/python -m benchmarks.prepare_bench --docs 2000 --files 4 --sample-docs 3000 --target 100 \\
        --memory-docs 2000 4000                                                # a smoke run
    .venv/bin/python -m benchmarks.prepare_bench --corpus real --docs 30000 --sample-docs 0 --memory-docs
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
REPO = os.path.dirname(HERE)
ENV = {"PYTHONPATH": REPO}


CORPORA = ("synthetic", "real")


def _tag(corpus: str) -> str:
    """The suffix of a work folder: none for the synthetic corpus (the names it always had)."""
    return "" if corpus == "synthetic" else f"-{corpus}"


def make_corpus(n_docs: int, files: int, median_chars: int = 3000, corpus: str = "synthetic") -> str:
    from benchmarks.corpus import TextMaker, write_dolma
    from benchmarks.real_corpus import make_real_corpus

    name = f"corpus-{n_docs}" if corpus == "synthetic" else f"{corpus}-corpus-{n_docs}"
    root = os.path.join(WORK, name + ("" if median_chars == 3000 else f"-m{median_chars}"))
    if not os.path.exists(os.path.join(root, "DONE")):
        shutil.rmtree(root, ignore_errors=True)
        if corpus == "synthetic":
            write_dolma(root, n_docs, files, maker=TextMaker(seed=n_docs), median_chars=median_chars)
        else:
            make_real_corpus(root, n_docs, files, seed=n_docs, median_chars=median_chars)
        open(os.path.join(root, "DONE"), "w").close()
    return root


def make_tokenizer(structure: str) -> str:
    from benchmarks.real_tokenizers import save

    return save(structure, os.path.join(WORK, f"tokenizer-{structure}"))


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Runs `cmd`; wall seconds, peak RSS (bytes) summed over its process tree and the largest RSS of
    any one of its processes, sampled every 50 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak, peak_root, peak_child = [0], [0], [0]

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = [p.memory_info().rss for p in [root] + root.children(recursive=True)]
                peak[0] = max(peak[0], sum(rss))
                peak_root[0] = max(peak_root[0], rss[0])
                peak_child[0] = max(peak_child[0], max(rss[1:], default=0))
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
    return {"wall_s": wall, "peak_rss_bytes": peak[0], "peak_process_rss_bytes": max(peak_root[0], peak_child[0]),
            "peak_driver_rss_bytes": peak_root[0], "peak_worker_rss_bytes": peak_child[0]}


def run_ours(head: str, root: str, tokenizer: str, max_tokens: int, shards: int, *extra: str) -> tuple[dict, dict]:
    shutil.rmtree(root, ignore_errors=True)
    m = measure([PY, "-m", "bft.cli", "prepare", "--input", os.path.join(head, "*.json.gz"), "--root", root,
                 "--tokenizer", tokenizer, "--max-tokens", str(max_tokens), "--num-shards", str(shards), *extra],
                env=ENV)
    return m, json.load(open(os.path.join(root, "candidates", "stats.json")))


def run_floor(head: str, root: str, tokenizer: str, max_tokens: int, shards: int, keep: set[str]) -> tuple[dict, dict]:
    """The same prepare command with no token counting (benchmarks/prepare_floor.py), keeping `keep`."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(WORK, exist_ok=True)
    ids = root + "-keep.txt"
    with open(ids, "w") as f:
        f.write("\n".join(sorted(keep)) + "\n")
    m = measure([PY, "-m", "benchmarks.prepare_floor", "prepare", "--input", os.path.join(head, "*.json.gz"),
                 "--root", root, "--tokenizer", tokenizer, "--max-tokens", str(max_tokens), "--num-shards",
                 str(shards)], env={**ENV, "FLOOR_KEEP": ids})
    return m, json.load(open(os.path.join(root, "candidates", "stats.json")))


def run_speed(n_docs: int, files: int, max_tokens: int, shards: int, structure: str,
              corpus: str = "synthetic", exact_counts: bool = False) -> dict:
    tokenizer = make_tokenizer(structure)
    head = os.path.join(make_corpus(n_docs, files, corpus=corpus), "documents", "cc_en_head")
    ours_root = os.path.join(WORK, f"ours-{structure}-{n_docs}{_tag(corpus)}")
    peer_out = os.path.join(WORK, f"datatrove-{structure}-{n_docs}{_tag(corpus)}")
    for d in (peer_out, peer_out + "-logs"):
        shutil.rmtree(d, ignore_errors=True)
    ours, stats = run_ours(head, ours_root, tokenizer, max_tokens, shards, *(["--exact-counts"] if exact_counts else []))
    peer = measure([PY, "-m", "benchmarks.datatrove_peer", "--input-dir", head, "--output", peer_out,
                    "--tokenizer", tokenizer, "--max-tokens", str(max_tokens), "--tasks", str(files)], env=ENV)
    ours_out = os.path.join(ours_root, "candidates")
    # Length decisions, document by document: datatrove keeps exactly what we keep or drop as a duplicate
    # (it does not dedup); what we drop as too long it drops; every count we give (the documents kept by
    # their upper bound have none) is its count.
    mine = pd.concat([pd.read_parquet(f, columns=["id", "n_tokens", "shard"])
                      for f in glob.glob(os.path.join(ours_out, "candidates-*.parquet"))])
    rejects = pd.concat([pd.read_parquet(f, columns=["id", "reason"])
                         for f in glob.glob(os.path.join(ours_out, "rejects", "*.parquet"))])
    theirs = pd.concat([pd.read_parquet(f, columns=["id", "metadata"])
                        for f in glob.glob(os.path.join(peer_out, "*.parquet"))])
    theirs_tokens = dict(zip(theirs["id"], (m["token_count"] for m in theirs["metadata"])))
    length_ok_ours = set(mine["id"]) | set(rejects.loc[rejects.reason == "duplicate", "id"])
    counted = mine[mine["n_tokens"].notna()]
    # the floor: the same pass with the same decisions and no counting
    floor, floor_stats = run_floor(head, os.path.join(WORK, f"floor-{structure}-{n_docs}{_tag(corpus)}"), tokenizer,
                                   max_tokens, shards, length_ok_ours)
    # the shards' balance in exact tokens (datatrove counted every kept document), whatever they were balanced by
    from beam_pipelines.prepare.shards import balance

    shard_tokens = [0] * shards
    for i, k in zip(mine["id"], mine["shard"]):
        shard_tokens[k] += theirs_tokens.get(i, 0)
    lf = stats["length_filter"]
    measured = lf["measured"] or 1
    from beam_pipelines.tokens.load import load_tokenizer
    from beam_pipelines.tokens.shape import tokenizer_shape

    return {
        "corpus": corpus,
        "structure": structure,
        "path": tokenizer_shape(load_tokenizer(tokenizer)).path,
        "docs": n_docs,
        "exact_counts": exact_counts,
        "ours": ours,
        "datatrove": peer,
        "floor": floor,
        "ours_docs_per_s": n_docs / ours["wall_s"],
        "datatrove_docs_per_s": n_docs / peer["wall_s"],
        "floor_docs_per_s": n_docs / floor["wall_s"],
        "speed_ratio": peer["wall_s"] / ours["wall_s"],
        "over_floor": ours["wall_s"] / floor["wall_s"],
        "floor_kept_the_same": floor_stats["kept"] == stats["kept"],
        "same_length_decisions": length_ok_ours == set(theirs_tokens),
        "same_token_counts": all(theirs_tokens.get(i) == n for i, n in zip(counted["id"], counted["n_tokens"])),
        "share_kept_uncounted": (lf.get("kept_by_bound", 0) + lf.get("kept_by_prefix", 0)
                                 + lf.get("kept_by_chunks", 0) + lf.get("kept_by_share", 0)) / measured,
        "share_kept_by_share": lf.get("kept_by_share", 0) / measured,
        "share_rejected_by_share": lf.get("rejected_by_share", 0) / measured,
        "share_chars": lf.get("share_chars", 0), "rest_chars": lf.get("rest_chars", 0),
        "share_kept_by_prefix": lf.get("kept_by_prefix", 0) / measured,
        "share_kept_by_chunks": lf.get("kept_by_chunks", 0) / measured,
        "share_rejected_by_chunks": lf.get("rejected_by_chunks", 0) / measured,
        "balanced_by": stats["shards"].get("balanced_by", "tokens"),
        "balance_in_tokens": balance(shard_tokens),
        "share_counted_by_words": lf["counted_from_pieces"] / measured,
        "share_tokenized_in_full": lf["tokenized_in_full"] / measured,
        "share_rejected_by_bound": lf["rejected_by_bound"] / measured,
        "share_rejected_by_prefix": lf.get("rejected_by_prefix", 0) / measured,
        "share_in_full_by_switch": lf.get("in_full_by_switch", 0) / measured,
        "chunk_hit_rate": 1 - lf.get("chunk_misses", 0) / lf["chunk_lookups"] if lf.get("chunk_lookups") else None,
        "balance_max_over_mean": stats["shards"]["balance_max_over_mean"],
        "kept": stats["kept"],
    }


def run_sample(n_docs: int, files: int, max_tokens: int, shards: int, target: int, structure: str,
               corpus: str = "synthetic") -> dict:
    tokenizer = make_tokenizer(structure)
    head = os.path.join(make_corpus(n_docs, files, corpus=corpus), "documents", "cc_en_head")
    full, full_stats = run_ours(head, os.path.join(WORK, f"sample-full-{n_docs}{_tag(corpus)}"), tokenizer,
                                max_tokens, shards)
    samp, samp_stats = run_ours(head, os.path.join(WORK, f"sample-{target}-{n_docs}{_tag(corpus)}"), tokenizer,
                                max_tokens, shards, "--target-docs", str(target))
    return {"corpus": corpus, "docs": n_docs, "target": target, "structure": structure, "full": full, "sample": samp,
            "wall_share": samp["wall_s"] / full["wall_s"],
            "measured_full": full_stats["length_filter"]["measured"],
            "measured_sample": samp_stats["length_filter"]["measured"],
            "sample_rounds": samp_stats["length_filter"]["sample_rounds"], "kept": samp_stats["kept"]}


def run_memory(n_docs: int, files: int, max_tokens: int, shards: int, structure: str,
               corpus: str = "synthetic") -> dict:
    tokenizer = make_tokenizer(structure)
    head = os.path.join(make_corpus(n_docs, files, median_chars=300, corpus=corpus), "documents", "cc_en_head")
    m, stats = run_ours(head, os.path.join(WORK, f"memory-{n_docs}{_tag(corpus)}"), tokenizer, max_tokens, shards)
    return {"corpus": corpus, "docs": n_docs, "structure": structure, **m, "kept": stats["kept"]}


def main(argv=None) -> None:
    from benchmarks.real_tokenizers import STRUCTURES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, nargs="*", default=[30_000, 100_000])
    ap.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=3584)
    ap.add_argument("--num-shards", type=int, default=16)
    ap.add_argument("--sample-docs", type=int, default=300_000, help="corpus of the --target-docs part (0: skip)")
    ap.add_argument("--target", type=int, default=1000)
    ap.add_argument("--memory-docs", type=int, nargs="*", default=[30_000, 300_000, 1_000_000])
    ap.add_argument("--corpus", choices=(*CORPORA, "both"), default="both",
                    help="synthetic (benchmarks/corpus.py), real text (benchmarks/real_corpus.py) or both")
    ap.add_argument("--exact-counts", action="store_true", help="run bft prepare with --exact-counts (the speed part)")
    args = ap.parse_args(argv)
    os.makedirs(WORK, exist_ok=True)
    common = (args.files, args.max_tokens, args.num_shards)
    corpora = CORPORA if args.corpus == "both" else (args.corpus,)
    results: dict = {"speed": [], "sample": [], "memory": []}

    def save():
        json.dump(results, open(os.path.join(WORK, "prepare_bench.json"), "w"), indent=2)

    for n in args.docs:
        for corpus in corpora:
            for structure in args.structures:
                results["speed"].append(run_speed(n, *common, structure, corpus, args.exact_counts))
                print(json.dumps(results["speed"][-1]), flush=True)
                save()
    for corpus in corpora if args.sample_docs else ():
        results["sample"].append(run_sample(args.sample_docs, *common, args.target, args.structures[0], corpus))
        print(json.dumps(results["sample"][-1]), flush=True)
        save()
    for n in args.memory_docs:
        for corpus in corpora:
            results["memory"].append(run_memory(n, *common, args.structures[0], corpus))
            print(json.dumps(results["memory"][-1]), flush=True)
            save()

    mib = 2 ** 20
    print("\n| corpus | tokenizer | path | counts | docs | bft prepare docs/s | datatrove docs/s | ratio | "
          "floor docs/s | prepare / floor | bft peak RSS | datatrove peak RSS | kept uncounted (of which by chunk bounds / by a share / by prefix) | "
          "by pieces / in full (by the switch) / too long by bound / by chunks / by a share / by prefix | "
          "missed characters counted (in shares / after them) | chunk cache hits | "
          "balance in tokens (balanced by) | "
          "same decisions and counts |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|:---:|")
    for r in results["speed"]:
        same = r["same_length_decisions"] and r["same_token_counts"] and r["floor_kept_the_same"]
        print(f"| {r['corpus']} | {r['structure']} | {r['path']} | {'exact' if r['exact_counts'] else 'bounded'} | "
              f"{r['docs']:,} | {r['ours_docs_per_s']:,.0f} | {r['datatrove_docs_per_s']:,.0f} | "
              f"{r['speed_ratio']:.2f}x | {r['floor_docs_per_s']:,.0f} | {r['over_floor']:.2f}x | "
              f"{r['ours']['peak_rss_bytes'] / mib:,.0f} MiB | {r['datatrove']['peak_rss_bytes'] / mib:,.0f} MiB | "
              f"{r['share_kept_uncounted']:.1%} ({r.get('share_kept_by_chunks', 0):.1%} / "
              f"{r.get('share_kept_by_share', 0):.1%} / {r.get('share_kept_by_prefix', 0):.1%}) | "
              f"{r['share_counted_by_words']:.1%} / "
              f"{r['share_tokenized_in_full']:.1%} ({r.get('share_in_full_by_switch', 0):.1%}) / "
              f"{r['share_rejected_by_bound']:.1%} / {r.get('share_rejected_by_chunks', 0):.1%} / "
              f"{r.get('share_rejected_by_share', 0):.1%} / {r['share_rejected_by_prefix']:.1%} | "
              f"{r.get('share_chars', 0) / 1e6:.1f}M / {r.get('rest_chars', 0) / 1e6:.1f}M | "
              f"{'' if r.get('chunk_hit_rate') is None else format(r['chunk_hit_rate'], '.1%')} | "
              f"{r['balance_in_tokens']:.4f} ({r['balanced_by']}) | {'yes' if same else 'NO'} |")
    if results["sample"]:
        print("\n| corpus | docs | --target-docs | full pass | sample | share of the full pass | "
              "measured (full / sample) | rounds |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in results["sample"]:
        print(f"| {s['corpus']} | {s['docs']:,} | {s['target']:,} | {s['full']['wall_s']:.1f} s | "
              f"{s['sample']['wall_s']:.1f} s | {s['wall_share']:.1%} | {s['measured_full']:,} / "
              f"{s['measured_sample']:,} | {s['sample_rounds']} |")
    if results["memory"]:
        print("\n| corpus | short documents | wall | peak RSS, largest worker | peak RSS, driver (the local runner) | "
              "peak RSS, all processes |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in results["memory"]:
            print(f"| {r['corpus']} | {r['docs']:,} | {r['wall_s']:.1f} s | "
                  f"{r['peak_worker_rss_bytes'] / mib:,.0f} MiB | {r['peak_driver_rss_bytes'] / mib:,.0f} MiB | "
                  f"{r['peak_rss_bytes'] / mib:,.0f} MiB |")


if __name__ == "__main__":
    main()
