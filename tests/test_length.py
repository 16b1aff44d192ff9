"""The length filter's shortcuts are proved against full tokenization."""
import random

import pytest
from tokenizers import Tokenizer

from beam_pipelines.length import TokenCounter, length_verdict, load_tokenizer, tokenizer_shape

WEIRD = ["", " ", "  ", "\n", "\n\n", "\t", "café", "日本語", "🙂", "<s>", "</s>", "▁", "x▁y", "<0x41>", "'s", "—"]


def random_texts(fixture_texts, n=300, seed=0):
    rng = random.Random(seed)
    words = " ".join(fixture_texts[:20]).split(" ")
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 60)):
            parts.append(rng.choice(WEIRD) if rng.random() < 0.25 else rng.choice(words))
        sep = [" ", "  ", "", "\n", " \n "]
        out.append("".join(p + rng.choice(sep) for p in parts))
    return [t for t in out if t] + ["a", " a", "a ", "  a  b  ", "<s>", " <s> ", "a<s>b c", "🙂🙂 🙂"]


def full_counts(tok, texts):
    return [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]


def test_piecewise_counts_equal_full_tokenization(bpe_tokenizer_path, fixture_texts):
    tok = Tokenizer.from_file(bpe_tokenizer_path)
    counter = TokenCounter(tok)
    assert counter.shape.piecewise
    texts = random_texts(fixture_texts) + fixture_texts
    assert counter.count(texts) == full_counts(tok, texts)
    assert counter.counted_pieces > len(fixture_texts)  # the shortcut was really taken
    # and again from a warm cache
    assert counter.count(texts) == full_counts(tok, texts)


def test_byte_level_tokenizer_is_counted_in_full(byte_level_tokenizer_path, fixture_texts):
    tok = Tokenizer.from_file(byte_level_tokenizer_path)
    counter = TokenCounter(tok)
    assert not counter.shape.piecewise
    texts = random_texts(fixture_texts, n=100)
    assert counter.count(texts) == full_counts(tok, texts)
    assert counter.counted_full == len(texts) and counter.counted_pieces == 0


@pytest.mark.parametrize("which", ["bpe_tokenizer_path", "byte_level_tokenizer_path"])
def test_lower_bound_never_exceeds_the_true_count(which, request, fixture_texts):
    tok = Tokenizer.from_file(request.getfixturevalue(which))
    counter = TokenCounter(tok)
    assert counter.shape.max_token_bytes > 0
    texts = random_texts(fixture_texts, seed=1) + ["x" * 5000, "🙂" * 700, "ab " * 900]
    for text, n in zip(texts, full_counts(tok, texts)):
        assert counter.lower_bound(text) <= n, text[:80]


def test_lower_bound_is_off_for_a_tokenizer_it_cannot_prove(fixture_texts):
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(fixture_texts[:50], trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    shape = tokenizer_shape(tok)
    assert shape == shape.__class__(piecewise=False, max_token_bytes=0, special_contents=("[UNK]",))
    assert TokenCounter(tok).lower_bound("x" * 100000) == 0


def test_length_verdict_bounds_are_inclusive():
    assert length_verdict(10, 10, 20) is None
    assert length_verdict(20, 10, 20) is None
    assert length_verdict(21, 10, 20) == "too_long"
    assert length_verdict(9, 10, 20) == "too_short"


def test_load_tokenizer_from_folder_and_missing_file(bpe_tokenizer_path, tmp_path):
    import os

    assert load_tokenizer(os.path.dirname(bpe_tokenizer_path)).get_vocab_size() > 0
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "nope.json"))
