"""Synthetic Dolma-layout corpora with realistic text and lengths, for benchmarks and the sample.

Words are drawn by their real frequencies in the English prose of Python's standard library
(docstrings and comments: a natural Zipf law), in sentences and paragraphs, with a small share of
accented, CJK and emoji words so that byte fallback is exercised. Lengths are log-normal (median
~3K characters, long tail cut at 80K). A share of documents are exact copies of earlier ones.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sysconfig
from pathlib import Path

import numpy as np

EXOTIC = ["café", "naïve", "Zürich", "São", "façade", "日本語", "中文", "데이터", "Ελλάδα", "🙂", "🚀", "—", "…"]


def word_table(max_files: int = 1500) -> tuple[list[str], np.ndarray]:
    """(words, probabilities) from the prose of the standard library's sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    counts: collections.Counter = collections.Counter()
    files = sorted(stdlib.rglob("*.py"))[:max_files]
    prose = re.compile(r"(?:#|\"\"\"|''')([^\n]*)")
    for path in files:
        text = path.read_text(encoding="utf-8", errors="ignore")
        for line in prose.findall(text):
            counts.update(w for w in re.findall(r"[A-Za-z][a-z]{1,14}", line))
    words = [w for w, c in counts.most_common(30000) if c >= 2]
    freq = np.array([counts[w] for w in words], dtype=np.float64)
    return words, freq / freq.sum()


class TextMaker:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.words, self.p = word_table()
        self.cum = np.cumsum(self.p)

    def text(self, n_chars: int) -> str:
        """About `n_chars` characters of paragraphs of sentences."""
        rng = self.rng
        n_words = max(3, int(n_chars / 5.6))
        idx = np.searchsorted(self.cum, rng.random(n_words) * self.cum[-1])
        words = [self.words[i] for i in idx]
        exotic = rng.random(n_words) < 0.004
        for i in np.nonzero(exotic)[0]:
            words[i] = EXOTIC[rng.integers(len(EXOTIC))]
        out, i = [], 0
        para: list[str] = []
        while i < n_words:
            k = int(rng.integers(6, 28))
            sent = words[i:i + k]
            i += k
            sent[0] = sent[0].capitalize()
            if rng.random() < 0.15:
                sent.insert(int(rng.integers(len(sent))), str(int(rng.integers(1, 2030))))
            para.append(" ".join(sent) + (". " if rng.random() < 0.9 else "? "))
            if rng.random() < 0.2:
                out.append("".join(para).strip())
                para = []
        if para:
            out.append("".join(para).strip())
        return "\n\n".join(out)[: max(n_chars, 1)]

    def length(self, median: float = 3000.0, sigma: float = 1.0, cap: int = 80000) -> int:
        return int(min(cap, max(40, self.rng.lognormal(np.log(median), sigma))))


def write_dolma(root: str, n_docs: int, n_files: int, split: str = "cc_en_head",
                dup_rate: float = 0.02, seed: int = 0, maker: TextMaker | None = None,
                id_prefix: str = "", median_chars: float = 3000.0) -> list[str]:
    """Writes `n_docs` documents (log-normal lengths of median `median_chars`) as
    `root/documents/<split>/<split>-NNNN.json.gz`; returns the paths."""
    maker = maker or TextMaker(seed)
    folder = os.path.join(root, "documents", split)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{split}-{i:04d}.json.gz") for i in range(n_files)]
    handles = [gzip.open(p, "wt", encoding="utf-8", compresslevel=1) for p in paths]
    recent: collections.deque = collections.deque(maxlen=2000)
    try:
        for n in range(n_docs):
            if recent and maker.rng.random() < dup_rate:
                text = recent[int(maker.rng.integers(len(recent)))]
            else:
                text = maker.text(maker.length(median=median_chars))
                recent.append(text)
            doc = {
                "id": f"{id_prefix}{split}-{n:08d}",
                "text": text,
                "source": "common-crawl",
                "added": "2023-03-01T00:00:00.000Z",
                "created": "2019-09-15T00:00:00.000Z",
                "metadata": {"url": f"https://example.org/{split}/{n}", "bucket": split.rsplit("_", 1)[-1]},
            }
            handles[n % n_files].write(json.dumps(doc, ensure_ascii=False) + "\n")
    finally:
        for h in handles:
            h.close()
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", required=True)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--other-split-docs", type=int, default=0, help="documents in cc_en_middle")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    maker = TextMaker(args.seed)
    write_dolma(args.output, args.docs, args.files, maker=maker)
    if args.other_split_docs:
        write_dolma(args.output, args.other_split_docs, max(1, args.files // 4), split="cc_en_middle", maker=maker)


if __name__ == "__main__":
    main()
