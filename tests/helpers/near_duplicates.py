"""A planted near-duplicate corpus (fixture texts and edited copies of some, a known cluster each) and
`prepare --near-dedup` run on it with the local runner."""
import random

from beam_pipelines import minhash as mh
from beam_pipelines import prepare
from beam_pipelines.prepare import PrepareConfig
from tests.conftest import LOCAL, dolma_line, write_dolma_file


def jaccard(a: str, b: str) -> float:
    x, y = set(mh.shingles(a, 5).tolist()), set(mh.shingles(b, 5).tolist())
    return len(x & y) / len(x | y)


def edited(text: str, share: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(len(words) * share))):
        words[i] = f"edit{rng.randrange(10 ** 6)}"
    return " ".join(words)


def planted(fixture_texts, clusters=8, copies=3, seed=0):
    """(id, text) documents: 60 fixture texts, and `copies` near-duplicates of each of the first
    `clusters` of 150 words or more (a word in 100 edited, some with a boilerplate prefix or suffix:
    true Jaccard similarity 0.8-0.95 with their original); {id: cluster}."""
    rng = random.Random(seed)
    docs, cluster = [], {}
    for i, text in enumerate(fixture_texts[:60]):
        docs.append((f"d{i:03d}", text))
        if len(set(cluster.values())) < clusters and len(text.split()) >= 150:
            cluster[f"d{i:03d}"] = i
            for k in range(copies):
                copy = edited(text, 0.01, rng)
                copy = ["Home | News | Contact\n" + copy, copy + "\nCopyright 2023. All rights reserved.", copy][k % 3]
                assert jaccard(text, copy) >= 0.8
                docs.append((f"c{i}-{k}", copy))
                cluster[f"c{i}-{k}"] = i
    return docs, cluster


def write_planted(root, fixture_texts):
    """The planted corpus in two head files under root/in; returns (docs, cluster, the input glob)."""
    docs, cluster = planted(fixture_texts)
    lines = [dolma_line(i, t) for i, t in docs]
    write_dolma_file(str(root / "in" / "cc_en_head" / "a.json.gz"), lines[0::2])
    write_dolma_file(str(root / "in" / "cc_en_head" / "b.json.gz"), lines[1::2])
    return docs, cluster, str(root / "in" / "*" / "*.json.gz")


def run_prepare(glob, out, tok, beam_args=LOCAL, **kw):
    cfg = PrepareConfig(input=[glob], root=str(out), tokenizer=tok, max_tokens=100_000, num_shards=2,
                        reject_shards=1, near_dedup=True, **kw)
    cfg.check()
    return prepare.run(cfg, beam_args)
