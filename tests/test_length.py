"""The length filter's shortcuts are proved against full tokenization, with tokenizers of the real
structures (converted from the vocabularies mistral-common ships) and texts built to break them."""
import random

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from beam_pipelines.length import CUTS, FULL, PRETOKENS, TokenCounter, length_verdict, load_tokenizer, tokenizer_shape
from benchmarks import real_tokenizers

WEIRD = ["", " ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "\t", "\t\t", " \t ", "\r\n", "café", "cafe\u0301",
         "\u0301", " \u0301", "e\u0301\u0327", "日本語", "鱻", "𝔘𝔫𝔦", "🙂", "👩‍👩‍👧", "<s>", "</s>", "<unk>",
         "<|endoftext|>", "[INST]", "▁", "▁▁", "x▁y", " ▁ ", "<0x41>", "'s", "—", "ﬁ", "Ａ", "²", "\u00b4",
         "㎏", "Ⅻ", "\u00a0", "\u3000", "\u200b", "    return x", "\tif a:\n\t\tb()", "})", "1234567", "٣٤"]
SEPS = [" ", "  ", "", "\n", " \n ", "\t", "\n    ", "   "]


def adversarial_texts(fixture_texts, n=300, seed=0):
    rng = random.Random(seed)
    words = " ".join(fixture_texts[:20]).split(" ")
    out = []
    for _ in range(n):
        parts = [rng.choice(WEIRD) if rng.random() < 0.3 else rng.choice(words) for _ in range(rng.randint(1, 60))]
        out.append("".join(p + rng.choice(SEPS) for p in parts))
    code = "def f(x):\n    if x:\n        return  x\t# tab\n\n\n    return None  \n"
    return out + WEIRD + [code, code * 5, " " * 40, "\n" * 30, "a" + " " * 17 + "b", "  a  b  ", " <s> ", "a<s>b c",
                          "🙂🙂 🙂", "x" * 3000, "▁" * 50 + "a"]


def full_counts(tok, texts):
    return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """{structure: Tokenizer} for llama2, tekken and nfkc (benchmarks/real_tokenizers.py)."""
    return {s: real_tokenizers.build(s) for s in real_tokenizers.STRUCTURES}


@pytest.mark.parametrize("structure, path", [("llama2", CUTS), ("tekken", PRETOKENS), ("nfkc", PRETOKENS)])
def test_real_structures_count_exactly_by_words(real, structure, path, fixture_texts):
    tok = real[structure]
    counter = TokenCounter(tok)
    assert counter.shape.path == path, counter.shape.why
    texts = adversarial_texts(fixture_texts) + fixture_texts
    assert counter.count(texts) == full_counts(tok, texts)
    plain = [t for t in texts if not any(s in t for s in counter.shape.special_contents)]
    assert counter.counted_pieces == len(plain) > len(fixture_texts)  # the shortcut was really taken
    assert counter.count(texts) == full_counts(tok, texts)  # and again from a warm cache


@pytest.mark.parametrize("scheme, split, path", [("first", False, CUTS), ("always", False, CUTS),
                                                 ("always", True, PRETOKENS), ("never", True, PRETOKENS)])
def test_metaspace_variants_of_the_llama2_vocabulary(real, scheme, split, path, fixture_texts):
    """transformers' non-legacy Llama conversion (no normalizer, Metaspace(split=False)) is cut like
    Llama-2; Metaspace(split=True) is emulated in Python; both equal full tokenization."""
    tok = Tokenizer.from_str(real["llama2"].to_str())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    counter = TokenCounter(tok)
    assert counter.shape.path == path
    texts = adversarial_texts(fixture_texts, n=150, seed=4)
    assert counter.count(texts) == full_counts(tok, texts)


def test_llama2_conversion_is_sentencepiece(real):
    """The converted Llama-2-structure tokenizer tokenizes as sentencepiece itself does."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=real_tokenizers._data("tokenizer.model.v1"))
    for text in ["Hello  world\n\tfoo", " café 日本語 🙂  x", "def f():\n    return  1", "鱻 ﬁ ▁x"]:
        assert real["llama2"].encode(text, add_special_tokens=False).tokens == sp.encode(text, out_type=str)


def test_a_vocabulary_entry_across_a_cut_turns_the_cut_rule_off(fixture_texts):
    """"a▁b" in the vocabulary: cutting before "▁" would give a▁b 2+ tokens; the scan refuses."""
    vocab = {"<unk>": 0, "a": 1, "b": 2, "▁": 3, "a▁": 4, "a▁b": 5, "▁b": 6}
    tok = Tokenizer(models.BPE(vocab, [("a", "▁"), ("a▁", "b"), ("▁", "b")], unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    shape = tokenizer_shape(tok)
    assert shape.path == FULL and "'a▁'" in shape.why
    counter = TokenCounter(tok)
    assert counter.count(["a b", "b a b"]) == full_counts(tok, ["a b", "b a b"]) == [2, 3]
    assert counter.counted_full == 2
    # the same vocabulary without the straddling entries is cut
    ok = Tokenizer(models.BPE({"<unk>": 0, "a": 1, "b": 2, "▁": 3, "▁b": 4}, [("▁", "b")], unk_token="<unk>"))
    ok.normalizer = tok.normalizer
    assert tokenizer_shape(ok).path == CUTS


def test_bpe_dropout_is_counted_in_full():
    tok = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")], dropout=0.5))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tokenizer_shape(tok).path == FULL


def test_byte_level_and_metaspace_tokenizers_count_by_pretokens(bpe_tokenizer_path, byte_level_tokenizer_path,
                                                                fixture_texts):
    for path in (bpe_tokenizer_path, byte_level_tokenizer_path):
        tok = Tokenizer.from_file(path)
        counter = TokenCounter(tok)
        assert counter.shape.path == PRETOKENS
        texts = adversarial_texts(fixture_texts, n=100, seed=2)
        assert counter.count(texts) == full_counts(tok, texts)


@pytest.mark.parametrize("structure", real_tokenizers.STRUCTURES)
def test_lower_bound_never_exceeds_the_true_count_real(real, structure, fixture_texts):
    tok = real[structure]
    counter = TokenCounter(tok)
    assert counter.shape.max_token_bytes > 0
    texts = adversarial_texts(fixture_texts, seed=1) + ["x" * 5000, "🙂" * 700, "ab " * 900, "ﬁ" * 900, "㎏" * 500]
    for text, n in zip(texts, full_counts(tok, texts)):
        assert counter.lower_bound(text) <= n, text[:80]


@pytest.mark.parametrize("which", ["bpe_tokenizer_path", "byte_level_tokenizer_path"])
def test_lower_bound_never_exceeds_the_true_count(which, request, fixture_texts):
    tok = Tokenizer.from_file(request.getfixturevalue(which))
    counter = TokenCounter(tok)
    assert counter.shape.max_token_bytes > 0
    texts = adversarial_texts(fixture_texts, seed=1) + ["x" * 5000, "🙂" * 700, "ab " * 900]
    for text, n in zip(texts, full_counts(tok, texts)):
        assert counter.lower_bound(text) <= n, text[:80]


def test_lower_bound_is_off_for_a_tokenizer_it_cannot_prove(fixture_texts):
    from tokenizers import trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(fixture_texts[:50], trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    shape = tokenizer_shape(tok)
    assert shape == shape.__class__(path=PRETOKENS, why="", max_token_bytes=0, special_contents=("[UNK]",))
    counter = TokenCounter(tok)
    assert counter.lower_bound("x" * 100000) == 0
    texts = adversarial_texts(fixture_texts, n=50, seed=3)
    assert counter.count(texts) == full_counts(tok, texts)


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
