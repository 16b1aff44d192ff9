import random

from beam_pipelines.dedup import normalize_for_dedup, sample_key, text_hash
from beam_pipelines.shards import assign_shards, balance, shard_name


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


def test_assignment_is_balanced_and_independent_of_order():
    rng = random.Random(0)
    docs = [(f"d{i}", int(rng.lognormvariate(6.5, 1.0)) % 3584 + 1) for i in range(20000)]
    a = assign_shards(docs, 16)
    rng.shuffle(docs)
    assert assign_shards(docs, 16) == a
    tokens = [0] * 16
    for doc_id, n in docs:
        tokens[a[doc_id]] += n
    assert balance(tokens) <= 1.02
    assert set(a.values()) == set(range(16))


def test_fewer_documents_than_shards_leaves_shards_empty():
    a = assign_shards([("a", 5), ("b", 5)], 4)
    assert sorted(a.values()) == [0, 1]
    assert balance([0, 0, 0]) == 1.0


def test_shard_names():
    assert shard_name("candidates", 3, 16) == "candidates-00003-of-00016.parquet"
