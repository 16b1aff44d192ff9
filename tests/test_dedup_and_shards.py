import os
import random

import pytest

from beam_pipelines.prepare.shards import BUCKET_DOCS, assign_bucket, balance, num_buckets
from schemas.keys import balance_bucket, normalize_for_dedup, sample_key, text_hash
from schemas.layout import LayoutError, RunLayout, parse_shard_name, shard_name
from tests.helpers.shards import assign_in_one_process


def test_normalization_collapses_whitespace_and_composes_unicode():
    assert normalize_for_dedup("  a\t b\n\n c  ") == "a b c"
    assert normalize_for_dedup("cafe\u0301") == normalize_for_dedup("caf\u00e9")
    assert normalize_for_dedup("A b") != normalize_for_dedup("a b")  # case is kept


def test_text_hash_is_xxh3_128_of_the_normalized_text():
    import xxhash

    assert text_hash(" a  b ") == text_hash("a b") == xxhash.xxh3_128_hexdigest(b"a b")
    assert len(text_hash("x")) == 32


def test_sample_key_depends_on_id_and_seed_only():
    assert sample_key("doc-1", 0) == sample_key("doc-1", 0)
    assert sample_key("doc-1", 0) != sample_key("doc-1", 1)


@pytest.mark.parametrize("n_buckets", [None, 7])
def test_assignment_is_balanced_and_independent_of_order(n_buckets):
    """100K documents in 16 shards, in one bucket (the default at this size) or in 7."""
    rng = random.Random(0)
    docs = [(f"d{i}", int(rng.lognormvariate(6.5, 1.0)) % 3584 + 1) for i in range(100_000)]
    a = assign_in_one_process(docs, 16, n_buckets)
    rng.shuffle(docs)
    assert assign_in_one_process(docs, 16, n_buckets) == a
    tokens = [0] * 16
    for doc_id, n in docs:
        tokens[a[doc_id]] += n
    assert balance(tokens) <= 1.02
    assert set(a.values()) == set(range(16))


def test_buckets_follow_the_corpus_size_and_a_document_keeps_its_bucket():
    assert num_buckets(0) == num_buckets(BUCKET_DOCS) == 1 and num_buckets(BUCKET_DOCS + 1) == 2
    assert num_buckets(10_000_000) == 10_000_000 // BUCKET_DOCS
    assert balance_bucket("doc-1", 50) == balance_bucket("doc-1", 50) < 50


def test_fewer_documents_than_shards_leaves_shards_empty():
    a = assign_bucket([("a", 5), ("b", 5)], 4)
    assert sorted(a.values()) == [0, 1]
    assert balance([0, 0, 0]) == 1.0


def test_shard_names():
    assert shard_name("candidates", 3, 16) == "candidates-00003-of-00016.parquet"
    assert parse_shard_name("/r/generations/score/score-00002-of-00016.metrics.json") == ("score", 2, 16)
    assert parse_shard_name("gs://b/r/candidates/candidates-00003-of-00016.parquet") == ("candidates", 3, 16)
    assert parse_shard_name("candidates-3-of-16.parquet") is None and parse_shard_name("stats.json") is None
    with pytest.raises(ValueError):
        shard_name("candidates", 16, 16)


def test_the_layout_owns_every_path_under_a_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = RunLayout("run/")
    assert layout.root == str(tmp_path / "run")  # recorded paths name the file from any directory
    assert layout.candidates_shard(0, 2) == str(tmp_path / "run" / "candidates" / "candidates-00000-of-00002.parquet")
    assert layout.generation_metrics("score", 1, 2).endswith("/generations/score/score-00001-of-00002.metrics.json")
    assert RunLayout("gs://b/runs/x/").release("v1") == "gs://b/runs/x/sft/v1"
    with pytest.raises(LayoutError, match="run bft prepare first"):
        layout.candidate_shards()
    os.makedirs(tmp_path / "run" / "candidates" / "rejects")
    for name in ("stats.json", "candidates-00000-of-00002.parquet", "candidates-00001-of-00002.parquet",
                 "rejects/rejects-00000-of-00001.parquet"):
        (tmp_path / "run" / "candidates" / name).write_bytes(b"")
    assert [k for k, _, _ in layout.candidate_shards()] == [0, 1]
    os.remove(tmp_path / "run" / "candidates" / "candidates-00001-of-00002.parquet")
    with pytest.raises(LayoutError, match="not exactly 0..1 of 2"):
        layout.candidate_shards()


def test_documents_already_seen_keep_their_shard_and_new_ones_level_the_loads():
    old = {"a": 0, "b": 0, "c": 1}
    out = assign_bucket([("a", 10), ("b", 10), ("c", 5), ("n1", 9), ("n2", 1)], 3, prior=old)
    assert {k: out[k] for k in old} == old
    assert out["n1"] == 2 and out["n2"] == 1  # longest first onto the lightest: loads 20, 5, 0 -> 20, 5, 9 -> 20, 6, 9
    assert assign_bucket([("a", 10)], 3, prior={"a": 7})["a"] in range(3)  # a prior of another shard count


def test_the_samples_survivor_count_is_what_deduplicate_keeps():
    """SurvivorsAndMeasured (a round's stopping rule in SampleByKey) counts exactly the documents that
    Deduplicate keeps: duplicate ids (smallest text_hash wins), then duplicate texts; in any order and
    across merged accumulators."""
    import apache_beam as beam

    from beam_pipelines.prepare import Doc
    from beam_pipelines.prepare.dedup import Deduplicate
    from beam_pipelines.prepare.sample import SurvivorsAndMeasured, _progress
    from tests.conftest import LOCAL

    rng = random.Random(3)
    docs = [Doc(f"id{rng.randrange(60)}", f"h{rng.randrange(40)}", 10, 10, rng.randrange(3), line, 10)
            for line in range(200)]
    counted = SurvivorsAndMeasured()
    halves = [counted.create_accumulator(), counted.create_accumulator()]
    for k, d in enumerate(docs):
        halves[k % 2] = counted.add_input(halves[k % 2], _progress(d))
    halves[0] = counted.add_input(halves[0], ("m", 7))
    survivors, measured = counted.extract_output(counted.merge_accumulators(halves))
    from apache_beam.testing.util import assert_that, equal_to

    with beam.Pipeline(argv=LOCAL) as p:
        kept = (p | beam.Create(docs) | Deduplicate(0, ["a", "b", "c"]))[0]
        assert_that(kept | beam.combiners.Count.Globally(), equal_to([survivors]))
    assert 20 < survivors < 40 and measured == 7


def test_a_document_record_crosses_a_shuffle_as_a_tuple_and_comes_back_named():
    """Doc's coder (registered with Beam) writes the plain tuple of its fields, as compact as the bare
    tuples records once were, and decodes to a Doc; a PCollection declared to hold Docs uses it."""
    import apache_beam as beam
    from apache_beam.coders import FastPrimitivesCoder

    from beam_pipelines.prepare.records import Doc, DocCoder

    doc = Doc("doc-1", "0" * 32, None, 40, 3, 17, 41, prior=2)
    coder = beam.coders.registry.get_coder(Doc)
    assert isinstance(coder, DocCoder)
    assert coder.decode(coder.encode(doc)) == doc and type(coder.decode(coder.encode(doc))) is Doc
    assert coder.encode(doc) == FastPrimitivesCoder().encode(tuple(doc))
    assert coder.is_deterministic()


def test_an_id_seen_with_another_text_is_its_own_reject_reason_and_the_smallest_text_hash_wins():
    """Two documents sharing an id with different texts. The copy of smallest text hash
    survives whatever order the runner hands them in; an exact copy is `duplicate_id`, a copy with
    another text `conflicting_id`, naming where the kept copy is."""
    from beam_pipelines.prepare import Doc
    from beam_pipelines.prepare.dedup import unique_ids

    files = ["in/a.json.gz", "in/b.json.gz"]
    docs = [Doc("x", "h2", 5, 10, 0, 3, 10), Doc("x", "h1", 5, 10, 1, 7, 10), Doc("x", "h1", 5, 10, 0, 9, 10)]
    for order in (docs, docs[::-1], docs[1:] + docs[:1]):
        out = list(unique_ids(order, files))
        assert out[0] == docs[2]   # h1 (smallest hash), first file, then the first line
        rejects = sorted((o.value["file"], o.value["line"], o.value["reason"], o.value["detail"])
                         for o in out[1:] if o.tag == "rejects")
        assert rejects == [
            ("in/a.json.gz", 3, "conflicting_id",
             "id also at in/a.json.gz:9 with another text, kept as the text of smallest hash"),
            ("in/b.json.gz", 7, "duplicate_id", "id also at in/a.json.gz:9")]
        assert sorted(o.value for o in out[1:] if o.tag == "tallies") == [("dropped/conflicting_id", 1),
                                                                        ("dropped/duplicate_id", 1)]
