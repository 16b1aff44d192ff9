"""Builds samples/dolma: the bundled Dolma-layout sample of the demo (deterministic).

Two head-split files and one middle-split file of synthetic documents (benchmarks/corpus.py), plus the
bad input a real crawl has: malformed JSON, a JSON array, missing/blank text, invalid UTF-8, a 2 MB
document, an exact duplicate, a whitespace-variant duplicate and a document too long for the context.
"""
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.corpus import TextMaker  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "dolma")


def doc(i: int, split: str, text: str) -> bytes:
    return json.dumps({"id": f"{split}-{i:05d}", "text": text, "source": "common-crawl",
                       "added": "2023-03-01T00:00:00.000Z", "created": "2019-09-15T00:00:00.000Z",
                       "metadata": {"url": f"https://example.org/{split}/{i}"}}, ensure_ascii=False).encode()


def main() -> None:
    maker = TextMaker(seed=7)
    lines = {0: [], 1: []}
    texts = []
    for i in range(120):
        text = maker.text(maker.length(median=700, sigma=0.6, cap=4000))
        texts.append(text)
        lines[i % 2].append(doc(i, "cc_en_head", text))
    lines[0] += [
        b'{"id": "broken-1", "text": "unterminated',
        b'["an", "array"]',
        b'{"id": "no-text-1", "source": "common-crawl"}',
        b'{"id": "blank-1", "text": "   \\n "}',
        b'{"id": "bad-utf8-1", "text": "caf\xe9 latin-1 bytes"}',
        doc(900, "cc_en_head", texts[3]),
        doc(901, "cc_en_head", "  " + texts[5].replace(" ", "  ") + "\n"),
        doc(902, "cc_en_head", maker.text(30000)),
    ]
    lines[1].append(doc(903, "cc_en_head", "x" * (2 << 20)))
    for k, body in lines.items():
        path = os.path.join(ROOT, "documents", "cc_en_head", f"cc_en_head-{k:04d}.json.gz")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(b"\n".join(body) + b"\n")
    path = os.path.join(ROOT, "documents", "cc_en_middle", "cc_en_middle-0000.json.gz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(b"\n".join(doc(i, "cc_en_middle", maker.text(800)) for i in range(40)) + b"\n")


if __name__ == "__main__":
    main()
