"""Near-duplicate documents: the MinHash core (beam_pipelines/minhash.py) on literal texts, the
clustering (large-star/small-star) on literal graphs, and `bft prepare --near-dedup` end to end on a
corpus with planted clusters, on one worker and on two processes."""
import os
import random

import apache_beam as beam
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import minhash as mh
from beam_pipelines.prepare import PrepareConfig
from beam_pipelines.prepare.near_dedup import ConnectedComponents, node_of
from schemas.errors import UserError
from schemas.keys import sample_key
from tests.conftest import LOCAL
from tests.helpers.near_duplicates import edited, jaccard, planted, run_prepare, write_planted

P = mh.MinHashParams()


def test_the_estimate_follows_the_true_jaccard_similarity(fixture_texts):
    rng = random.Random(5)
    errors = []
    for text in fixture_texts[:40]:
        copy = edited(text, rng.choice([0.01, 0.03, 0.06]), rng)
        errors.append(mh.similarity(mh.sketch(text, P), mh.sketch(copy, P), P) - jaccard(text, copy))
    assert abs(sum(errors) / len(errors)) < 0.03  # unbiased
    assert max(map(abs, errors)) < 0.2            # 112 hashes: a standard error of ~0.04
    assert mh.similarity(mh.sketch(fixture_texts[0], P), mh.sketch(fixture_texts[1], P), P) < 0.1


def test_the_same_normalized_text_collides_in_every_band_and_sketches_are_fixed():
    a = mh.sketch("The quick brown fox\njumps over  the lazy dog", P)
    assert a == mh.sketch("The quick brown fox jumps over the lazy dog ", P)  # exact dedup's normalization
    assert len(a) == P.sketch_bytes == 224 and mh.similarity(a, a, P) == 1.0
    # fixed hash functions: the same bytes in every process, on every machine, in every release
    assert mh.sketch("the quick brown fox jumps over the lazy dog", P)[:16].hex() == "bc694b9d3c4fc63c243ee6159114a678"
    other = mh.sketch("the quick brown fox jumps over the lazy cat", P)
    assert len(set(mh.band_keys(other, P)) & set(mh.band_keys(a, P))) < P.bands
    assert len(mh.shingles("two words", 5)) == 1  # a text shorter than a shingle is one shingle


def test_a_bucket_gives_a_star_and_a_path():
    assert list(mh.bucket_edges([1, 2])) == [(1, 2)]
    assert sorted(mh.bucket_edges([1, 2, 3, 4])) == [(1, 2), (1, 3), (1, 4), (2, 3), (3, 4)]


def test_in_memory_every_planted_cluster_is_found_and_its_smallest_rank_survives(fixture_texts):
    docs, cluster = planted(fixture_texts)
    sketches = {node_of(i, 0): mh.sketch(t, P) for i, t in docs}
    found = mh.survivors(sketches, P)
    assert {n[1] for n in found} == set(cluster)  # nothing else is clustered
    for c in set(cluster.values()):
        members = [node_of(i, 0) for i in cluster if cluster[i] == c]
        assert {found[m] for m in members} == {min(members)}


@pytest.mark.parametrize("seed", [0, 1])
def test_large_star_small_star_labels_every_node_with_its_components_smallest(seed):
    rng = random.Random(seed)
    order = list(range(40))
    rng.shuffle(order)  # a long path and a star, nodes in a random order
    path = [(order[i], order[i + 1]) for i in range(29)]
    star = [(order[30], order[j]) for j in range(31, 40)]
    expected = [(n, min(order[:30])) for n in order[:30] if n != min(order[:30])] + \
               [(n, min(order[30:])) for n in order[30:] if n != min(order[30:])]
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create(path + star) | ConnectedComponents(6)
        assert_that(out.labels, equal_to(expected))
        assert_that(out.tallies | beam.combiners.Count.Globally(), equal_to([2]), label="TwoClusters")


def test_too_few_rounds_fail_saying_what_to_do():
    path = [(i, i + 1) for i in range(40)][::-1]
    with pytest.raises(Exception, match="did not settle in 1 rounds: pass a larger --near-dedup-rounds"):
        with TestPipeline(runner="FnApiRunner") as p:
            _ = p | beam.Create(path) | ConnectedComponents(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, fixture_texts, bpe_tokenizer_path):
    """The planted corpus in two head files; the output of `prepare --near-dedup` on one worker."""
    root = tmp_path_factory.mktemp("near")
    docs, cluster, glob = write_planted(root, fixture_texts)
    stats = run_prepare(glob, root / "one", bpe_tokenizer_path)
    return {"glob": glob, "root": root, "docs": docs, "cluster": cluster, "stats": stats}


def read(folder):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
    return pd.concat([pd.read_parquet(os.path.join(folder, f)) for f in files], ignore_index=True)


def test_prepare_drops_every_planted_near_duplicate_naming_its_survivor(corpus):
    stats, cluster = corpus["stats"], corpus["cluster"]
    kept = set(read(corpus["root"] / "one" / "candidates")["id"])
    rejects = read(corpus["root"] / "one" / "candidates" / "rejects")
    survivor = {c: min((i for i in cluster if cluster[i] == c), key=lambda i: (sample_key(i, 0), i))
                for c in set(cluster.values())}
    assert kept == {i for i, _ in corpus["docs"]} - set(cluster) | set(survivor.values())
    assert sorted(rejects["reason"].unique()) == ["near_duplicate"]
    assert {(r.id, r.detail) for r in rejects.itertuples()} == {
        (i, f"near duplicate of {survivor[c]}") for i, c in cluster.items() if i != survivor[c]}
    # the funnel adds up (write_stats checked it too) and counts the drops
    assert stats["dropped"] == {"near_duplicate": len(cluster) - len(survivor)}
    assert stats["input_records"] == stats["kept"] + len(cluster) - len(survivor) == len(corpus["docs"])
    assert stats["near_dedup"]["clusters"] == len(survivor)
    assert stats["config"]["near_dedup_bands"] == 14 and "near_dedup_rounds" not in stats["config"]  # run-only


def test_survivors_are_the_same_on_two_worker_processes_and_as_computed_in_memory(corpus, bpe_tokenizer_path):
    run_prepare(corpus["glob"], corpus["root"] / "two", bpe_tokenizer_path,
                LOCAL + ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    for sub in ("candidates", "candidates/rejects"):
        assert read(corpus["root"] / "one" / sub).equals(read(corpus["root"] / "two" / sub))
    found = mh.survivors({node_of(i, 0): mh.sketch(t, P) for i, t in corpus["docs"]}, P)
    rejects = read(corpus["root"] / "two" / "candidates" / "rejects")
    assert dict(zip(rejects["id"], rejects["detail"])) == {n[1]: f"near duplicate of {s[1]}" for n, s in found.items()
                                                           if n != s}


def test_a_sample_with_near_dedup_is_the_bottom_k_of_all_survivors(corpus, bpe_tokenizer_path):
    s = run_prepare(corpus["glob"], corpus["root"] / "sample", bpe_tokenizer_path, target_docs=20, seed=0)
    kept = read(corpus["root"] / "sample" / "candidates")["id"]
    everything = read(corpus["root"] / "one" / "candidates")["id"]
    assert sorted(kept) == sorted(sorted(everything, key=lambda i: (sample_key(i, 0), i))[:20])
    assert s["dropped"]["near_duplicate"] == corpus["stats"]["dropped"]["near_duplicate"]
    assert s["dropped"]["not_sampled"] == len(everything) - 20


def test_without_near_dedup_the_config_is_the_one_recorded_before_it_existed(tmp_path):
    cfg = PrepareConfig(input=["x"], root=str(tmp_path), tokenizer="t")
    assert not any(k.startswith("near_dedup") for k in cfg.identity())
    with pytest.raises(UserError, match="--near-dedup-threshold 1.5 is not in"):
        PrepareConfig(input=["x"], root=str(tmp_path), tokenizer="t", near_dedup_threshold=1.5).check()


def test_prepare_help_lists_the_near_dedup_flags(capsys):
    from bft import cli

    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    out = capsys.readouterr().out
    for flag in ("--near-dedup ", "--near-dedup-ngram", "--near-dedup-bands", "--near-dedup-rows",
                 "--near-dedup-threshold", "--near-dedup-rounds"):
        assert flag in out, flag


def test_plan_estimates_the_near_duplicates_of_its_sample(corpus, bpe_tokenizer_path, tmp_path):
    from types import SimpleNamespace

    from bft.plan_inputs import _estimate_from_input

    def estimate(near_dedup):
        cfg = PrepareConfig(input=[corpus["glob"]], root=str(tmp_path), tokenizer=bpe_tokenizer_path,
                            max_tokens=100_000, near_dedup=near_dedup)
        return _estimate_from_input(SimpleNamespace(prepare=cfg), 2000)

    plain, near = estimate(False), estimate(True)
    first = corpus["docs"][0::2]  # the sampled file, a.json.gz: its near-duplicates of one another
    drops = sum(n != s for n, s in mh.survivors({i: mh.sketch(t, P) for i, t in first}, P).items())
    assert drops >= 4
    assert plain["rows"] - near["rows"] == drops * 2  # two files of the sampled file's size
    assert near["source"].endswith(f"less the {drops} near-duplicates among them")
