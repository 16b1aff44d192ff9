"""Benchmark of `bft prepare --near-dedup` against datatrove's MinHash pipeline (issue 22).

A corpus of real text (benchmarks/real_corpus.py's extracted text; base documents are runs of lines
drawn at random from all of it, so that no two are alike at any size: `line_documents`) with planted
near-duplicate clusters: a share of the documents get 1-3 copies, each with 1-10% of its words replaced (scattered
words, or one run of consecutive words) and, at random, a boilerplate prefix and/or suffix (a menu, a
cookie notice, a copyright line). The true Jaccard similarity (5-word shingles, prepare's
normalization) of every planted pair is computed when it is made. Then, on the same files:

- bft prepare without and with --near-dedup (subprocesses, the local runner with 2 worker processes):
  wall time, peak RSS of the process tree and of its largest process; the difference is near-dedup's cost;
- datatrove 0.10's MinhashDedupSignature -> MinhashDedupBuckets -> MinhashDedupCluster ->
  MinhashDedupFilter (2 workers, the same 5-grams, 14 bands x 8 hashes; its own text normalization,
  words split on whitespace: its English word tokenizer needs spaCy, not installed here), reading the
  .json.gz files and writing Parquet;

and for each tool: recall (planted pairs of true Jaccard >= 0.8 that end in one cluster), precision
(pairs put in one cluster that are planted, or whose true Jaccard is >= 0.8: the real text has a few
near-duplicates of its own at 100K+ documents), and the share of documents whose cluster (its set of
members) is the same in both tools.

    .venv/bin/python -m benchmarks.near_dedup_bench --docs 5000 --files 4          # a smoke run (~2 min)
    .venv/bin/python -m benchmarks.near_dedup_bench --docs 100000 --files 20
    .venv/bin/python -m benchmarks.near_dedup_bench --docs 1000000 --files 20 --skip-plain
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import random
import shutil
import sys

import xxhash
from datatrove.utils.word_tokenizers import WordTokenizer

from benchmarks.prepare_bench import ENV, PY, WORK, make_tokenizer, measure

BOILERPLATE = (
    "Home | About us | Products | Blog | Contact | Login",
    "This website uses cookies to improve your experience. By continuing to browse the site you agree to our "
    "use of cookies. Accept",
    "Skip to main content. Menu. Search this site.",
)
MEDIAN_CHARS = 1500  # base documents' median length (real_corpus draws 3,000): 1M documents are ~2.5 GB of text
FOOTERS = (
    "Copyright 2023 All rights reserved. Privacy Policy | Terms of Use | Sitemap",
    "Share this: Twitter Facebook LinkedIn Email. Like this: Like Loading... Related posts",
    "Posted in Uncategorized. Leave a comment. Previous post Next post",
)


class WhitespaceWords(WordTokenizer):
    """datatrove's words for this benchmark: split on whitespace (after datatrove's own normalization)."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def edit(text: str, share: float, rng: random.Random, vocabulary: list[str]) -> str:
    """`share` of the words replaced by words of the corpus: scattered, or one run of consecutive words."""
    words = text.split()
    n = max(1, round(len(words) * share))
    if rng.random() < 0.5:
        picks = rng.sample(range(len(words)), min(n, len(words)))
    else:
        start = rng.randrange(max(1, len(words) - n + 1))
        picks = range(start, min(len(words), start + n))
    for i in picks:
        words[i] = rng.choice(vocabulary)
    text = " ".join(words)
    if rng.random() < 0.5:
        text = rng.choice(BOILERPLATE) + "\n" + text
    if rng.random() < 0.5:
        text = text + "\n" + rng.choice(FOOTERS)
    return text


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    from beam_pipelines.minhash import shingles

    x, y = set(shingles(a, ngram).tolist()), set(shingles(b, ngram).tolist())
    return len(x & y) / max(len(x | y), 1)


def line_documents(real, n_docs: int, seed: int = 0, median_chars: float = MEDIAN_CHARS, sigma: float = 1.0,
                   cap: int = 80000):
    """(text, url) of `n_docs` base documents whose text is distinct at any size: each is a run of lines
    drawn at random from every line of the real text (its words, line lengths and layout; not its
    paragraphs in order), its length drawn as real_corpus's documents are. Windows of whole paragraphs
    (real_corpus.RealText.documents) run out of distinct text at ~17K documents, after which unplanted
    documents are near-duplicates of each other and the benchmark's precision measures the corpus."""
    import numpy as np

    lines, urls, owner = [], [], []
    for _source, url, paragraphs in real.files:
        for p in paragraphs:
            for line in p.splitlines(keepends=True):
                if line.strip():
                    lines.append(line)
                    owner.append(len(urls))
        urls.append(url)
    rng = np.random.default_rng([seed, 2])
    for _ in range(n_docs):
        target = int(min(cap, max(40, rng.lognormal(np.log(median_chars), sigma))))
        parts, total = [], 0
        while total < target:
            for i in rng.integers(len(lines), size=max(4, (target - total) // 40)).tolist():
                parts.append(i)
                total += len(lines[i])
                if total >= target:
                    break
        yield "".join(lines[i] for i in parts).rstrip(), urls[owner[parts[0]]]


def make_corpus(folder: str, n_docs: int, files: int, planted_share: float, seed: int = 0) -> dict:
    """Writes `n_docs` documents (about `planted_share` of them copies) into `files` .json.gz files of
    folder/documents/cc_en_head; returns {"cluster": {id: planted cluster}, "pairs": [(a, b, jaccard)]}."""
    from benchmarks.real_corpus import RealText

    rng = random.Random(seed)
    head = os.path.join(folder, "documents", "cc_en_head")
    os.makedirs(head, exist_ok=True)
    handles = [gzip.open(os.path.join(head, f"cc_en_head-{i:04d}.json.gz"), "wt", encoding="utf-8", compresslevel=1)
               for i in range(files)]
    cluster, pairs, vocabulary = {}, [], []
    # 1-3 copies (2 on average) of a planted document: a share p of planted documents makes 3p planted
    # documents of every 1 + 2p written
    p_plant = planted_share / (3 - 2 * planted_share)
    written = 0

    def write(doc_id: str, text: str, url: str):
        nonlocal written
        handles[rng.randrange(files)].write(json.dumps({"id": doc_id, "text": text, "source": "common-crawl",
                                                         "metadata": {"url": url}}, ensure_ascii=False) + "\n")
        written += 1

    try:
        for n, (text, url) in enumerate(line_documents(RealText(), n_docs, seed=seed)):
            if written >= n_docs:
                break
            base = f"nd-{n:08d}"
            write(base, text, url)
            if len(vocabulary) < 50_000:
                vocabulary.extend(text.split()[:50])
            if rng.random() < p_plant and vocabulary:
                group = [(base, text)]
                for k in range(rng.choice((1, 2, 3))):
                    if written >= n_docs:
                        break
                    copy = edit(text, rng.uniform(0.01, 0.10), rng, vocabulary)
                    write(f"{base}-copy{k}", copy, url)
                    group.append((f"{base}-copy{k}", copy))
                for i, (a, ta) in enumerate(group):
                    cluster[a] = base
                    for b, tb in group[i + 1:]:
                        pairs.append((a, b, jaccard(ta, tb)))
    finally:
        for h in handles:
            h.close()
    return {"cluster": cluster, "pairs": pairs, "docs": written}


# ---- datatrove's pipeline (run as its own process: `python -m benchmarks.near_dedup_bench datatrove ...`) ----

def _xxhash64(data: str | bytes) -> int:
    """datatrove 0.10's xxhash64 with xxhash 4, which hashes bytes only."""
    return xxhash.xxh64_intdigest(data.encode("utf-8") if isinstance(data, str) else data)


def run_datatrove_pipeline(head: str, out: str, files: int, workers: int) -> None:
    import datatrove.utils.hashes.xxhash as datatrove_xxhash
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import ParquetWriter

    datatrove_xxhash.xxhash64 = _xxhash64
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    words = WhitespaceWords()

    def reader():
        return JsonlReader(head, glob_pattern="*.json.gz", compression="gzip")

    LocalPipelineExecutor([reader(), MinhashDedupSignature(f"{out}/sigs", config=config, language=words)],
                          tasks=files, workers=workers, logging_dir=f"{out}/logs/sigs").run()
    LocalPipelineExecutor([MinhashDedupBuckets(f"{out}/sigs", f"{out}/buckets", config=config)],
                          tasks=config.num_buckets, workers=workers, logging_dir=f"{out}/logs/buckets").run()
    LocalPipelineExecutor([MinhashDedupCluster(f"{out}/buckets", f"{out}/remove", config=config, save_cluster_id=True)],
                          tasks=1, logging_dir=f"{out}/logs/cluster").run()
    LocalPipelineExecutor([reader(), MinhashDedupFilter(f"{out}/remove", load_cluster_ids=True,
                                                        exclusion_writer=ParquetWriter(f"{out}/removed")),
                           ParquetWriter(f"{out}/kept")],
                          tasks=files, workers=workers, logging_dir=f"{out}/logs/filter").run()


# ---- reading the results -----------------------------------------------------------------------

def our_labels(root: str) -> dict:
    """{id: its cluster's survivor} for every document in a cluster of prepare's output."""
    import pandas as pd

    folder = os.path.join(root, "candidates", "rejects")
    rejects = pd.concat([pd.read_parquet(os.path.join(folder, f)) for f in sorted(os.listdir(folder))])
    near = rejects[rejects["reason"] == "near_duplicate"]
    labels = {i: d.removeprefix("near duplicate of ") for i, d in zip(near["id"], near["detail"])}
    return {**labels, **{s: s for s in set(labels.values())}}


def datatrove_labels(out: str) -> dict:
    """{id: cluster id} for every document datatrove put in a cluster."""
    import pandas as pd

    labels = {}
    for sub in ("kept", "removed"):
        for path in sorted(os.listdir(os.path.join(out, sub))) if os.path.isdir(os.path.join(out, sub)) else []:
            t = pd.read_parquet(os.path.join(out, sub, path), columns=["id", "metadata"])
            for i, meta in zip(t["id"], t["metadata"]):
                if meta.get("minhash_cluster_id", -1) != -1:
                    labels[i] = meta["minhash_cluster_id"]
    return labels


def texts_of(head: str, ids: set) -> dict:
    out = {}
    for path in sorted(os.listdir(head)):
        with gzip.open(os.path.join(head, path), "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                if doc["id"] in ids:
                    out[doc["id"]] = doc["text"]
    return out


def quality(labels: dict, truth: dict, head: str) -> dict:
    """Recall of the planted pairs of true Jaccard >= 0.8, and precision of the pairs put in one cluster."""
    found = [labels.get(a) is not None and labels.get(a) == labels.get(b) for a, b, j in truth["pairs"] if j >= 0.8]
    members = collections.defaultdict(list)
    for i, label in labels.items():
        members[label].append(i)
    planted = truth["cluster"]
    predicted, correct, unplanted = 0, 0, []
    for group in members.values():
        for x in range(len(group)):
            for y in range(x + 1, len(group)):
                predicted += 1
                a, b = group[x], group[y]
                if a in planted and planted.get(a) == planted.get(b):
                    correct += 1
                else:
                    unplanted.append((a, b))
    texts = texts_of(head, {i for pair in unplanted for i in pair}) if unplanted else {}
    natural = sum(jaccard(texts[a], texts[b]) >= 0.8 for a, b in unplanted)
    return {"recall": sum(found) / max(len(found), 1), "pairs_at_0.8": len(found), "predicted_pairs": predicted,
            "precision": (correct + natural) / max(predicted, 1), "unplanted_pairs": len(unplanted),
            "unplanted_at_0.8": natural, "clustered_docs": len(labels)}


def agreement(ours: dict, theirs: dict, n_docs: int) -> float:
    """The share of documents whose cluster (the set of its members; alone: itself) is the same in both."""
    def sets(labels):
        groups = collections.defaultdict(set)
        for i, label in labels.items():
            groups[label].add(i)
        return {i: frozenset(groups[label]) for i, label in labels.items()}

    a, b = sets(ours), sets(theirs)
    differ = sum(a.get(i, frozenset([i])) != b.get(i, frozenset([i])) for i in set(a) | set(b))
    return 1 - differ / n_docs


def run(n_docs: int, files: int, planted_share: float, structure: str, workers: int, skip_datatrove: bool,
        skip_plain: bool = False) -> dict:
    folder = os.path.join(WORK, f"near-dedup-lines-{n_docs}")
    truth_path = os.path.join(folder, "truth.json")
    if not os.path.exists(truth_path):
        shutil.rmtree(folder, ignore_errors=True)
        truth = make_corpus(folder, n_docs, files, planted_share)
        json.dump(truth, open(truth_path, "w"))
    truth = json.load(open(truth_path))
    head = os.path.join(folder, "documents", "cc_en_head")
    tokenizer = make_tokenizer(structure)
    beam = [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    result = {"docs": truth["docs"], "planted_docs": len(truth["cluster"]), "planted_pairs": len(truth["pairs"])}
    for name, extra in (("prepare", []), ("prepare_near_dedup", ["--near-dedup"]))[skip_plain:]:
        root = os.path.join(WORK, f"near-dedup-{name}-{n_docs}")
        shutil.rmtree(root, ignore_errors=True)
        result[name] = measure([PY, "-m", "bft.cli", "prepare", "--input", os.path.join(head, "*.json.gz"), "--root",
                                root, "--tokenizer", tokenizer, "--max-tokens", "10000000", "--num-shards", "4",
                                *extra, *beam], env=ENV)
    ours = our_labels(os.path.join(WORK, f"near-dedup-prepare_near_dedup-{n_docs}"))
    result["ours"] = quality(ours, truth, head)
    if not skip_datatrove:
        out = os.path.join(WORK, f"near-dedup-datatrove-{n_docs}")
        shutil.rmtree(out, ignore_errors=True)
        result["datatrove"] = measure([PY, "-m", "benchmarks.near_dedup_bench", "datatrove", "--head", head,
                                       "--out", out, "--files", str(files), "--workers", str(workers)], env=ENV)
        theirs = datatrove_labels(out)
        result["theirs"] = quality(theirs, truth, head)
        result["same_clusters"] = agreement(ours, theirs, truth["docs"])
    return result


def main(argv=None) -> None:
    if argv is None and sys.argv[1:2] == ["datatrove"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("--head", required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("--files", type=int, required=True)
        ap.add_argument("--workers", type=int, default=2)
        args = ap.parse_args(sys.argv[2:])
        run_datatrove_pipeline(args.head, args.out, args.files, args.workers)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--planted", type=float, default=0.2, help="share of documents in planted clusters (about)")
    ap.add_argument("--tokenizer", default="llama2", help="benchmarks/real_tokenizers.py structure")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--skip-plain", action="store_true", help="no run of bft prepare without --near-dedup")
    args = ap.parse_args(argv)
    results = []
    mib = 1 << 20
    for n in args.docs:
        r = run(n, args.files, args.planted, args.tokenizer, args.workers, args.skip_datatrove, args.skip_plain)
        results.append(r)
        json.dump(r, open(os.path.join(WORK, f"near_dedup_bench-{n}.json"), "w"), indent=2)
    print("\n| docs | planted docs | tool | wall | peak RSS, all processes | peak RSS, largest process | "
          "recall (J >= 0.8) | precision | clustered docs |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rows = [("bft prepare", r["prepare"], None)] if "prepare" in r else []
        rows.append(("bft prepare --near-dedup", r["prepare_near_dedup"], r["ours"]))
        if "datatrove" in r:
            rows.append(("datatrove MinHash (4 stages)", r["datatrove"], r["theirs"]))
        for name, m, q in rows:
            quality_cells = (f"{q['recall']:.4f} of {q['pairs_at_0.8']:,} | {q['precision']:.4f} of "
                             f"{q['predicted_pairs']:,} | {q['clustered_docs']:,}") if q else "| |"
            print(f"| {r['docs']:,} | {r['planted_docs']:,} | {name} | {m['wall_s']:.1f} s | "
                  f"{m['peak_rss_bytes'] / mib:,.0f} MiB | {m['peak_process_rss_bytes'] / mib:,.0f} MiB | {quality_cells} |")
        if "same_clusters" in r:
            print(f"| {r['docs']:,} | | same clusters as datatrove | {r['same_clusters']:.4%} of documents "
                  "| | | | | |")


if __name__ == "__main__":
    main()
