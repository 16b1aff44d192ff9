"""The length filter's shortcuts are proved against full tokenization, with tokenizers of the real
structures (converted from the vocabularies mistral-common ships) and texts built to break them."""
import json
import random
import re

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from tokenizers import AddedToken, Regex

from beam_pipelines.tokens.counter import TokenCounter
from beam_pipelines.tokens.judge import judge, length_verdict
from beam_pipelines.tokens.load import load_tokenizer
from beam_pipelines.tokens.shape import CHUNKS, CUTS, FULL, PRETOKENS, tokenizer_shape
from beam_pipelines.tokens.space_cuts import CANDIDATES, space_cuts
from benchmarks import real_tokenizers

WEIRD = ["", " ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "\t", "\t\t", " \t ", "\r\n", "café", "cafe\u0301",
         "\u0301", " \u0301", "e\u0301\u0327", "日本語", "鱻", "𝔘𝔫𝔦", "🙂", "👩‍👩‍👧", "<s>", "</s>", "<unk>",
         "<|endoftext|>", "[INST]", "▁", "▁▁", "x▁y", " ▁ ", "<0x41>", "'s", "—", "ﬁ", "Ａ", "²", "\u00b4",
         "㎏", "Ⅻ", "\u00a0", "\u3000", "\u200b", "    return x", "\tif a:\n\t\tb()", "})", "1234567", "٣٤",
         "'S", " 's", "IT'S", "ſ", "\u212a", "x\u00a0 y", "a \u0301b", "a\u0301 b", "1,000 000", "x▁ y", "▁ x",
         "a\r\n b", "''", " ' ", "Ġ", "x Ġ"]
SEPS = [" ", " ", " ", "  ", "", "\n", " \n ", "\t", "\n    ", "   "]
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")


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


@pytest.mark.parametrize("structure", real_tokenizers.STRUCTURES)
def test_real_structures_count_exactly_by_chunks(real, structure, fixture_texts):
    """Every real structure is proved cuttable before a space after any printable ASCII character, and
    chunk counting equals full tokenization, cold and from a warm cache."""
    tok = real[structure]
    counter = TokenCounter(tok)
    assert counter.shape.path == CHUNKS and counter.shape.cut_after == CANDIDATES, counter.shape.why
    texts = adversarial_texts(fixture_texts) + fixture_texts
    assert counter.count(texts) == full_counts(tok, texts)
    plain = [t for t in texts if not any(s in t for s in counter.shape.special_contents)]
    assert counter.counted_pieces == len(plain) > len(fixture_texts)  # the shortcut was really taken
    assert counter.count(texts) == full_counts(tok, texts)  # and again from a warm cache
    assert counter.count(texts[::-1]) == full_counts(tok, texts[::-1])


def _with_normalized_added_token(tok):
    """The same tokenizer with an added token that is normalized: the chunk proof refuses it."""
    tok = Tokenizer.from_str(tok.to_str())
    tok.add_tokens([AddedToken("<extra>", normalized=True)])
    return tok


@pytest.mark.parametrize("structure, path", [("llama2", CUTS), ("tekken", PRETOKENS), ("nfkc", PRETOKENS)])
def test_real_structures_count_exactly_by_words_without_chunks(real, structure, path, fixture_texts):
    """Where chunks are not proved, the word paths on the normalized text still are exact."""
    tok = _with_normalized_added_token(real[structure])
    counter = TokenCounter(tok)
    assert counter.shape.path == path and "normalized" in space_cuts(json.loads(tok.to_str())).why
    texts = adversarial_texts(fixture_texts) + fixture_texts + ["a <extra> b", "<extra>"]
    exact = full_counts(tok, texts)
    assert counter.count(texts) == exact
    assert counter.counted_pieces > len(fixture_texts)
    # the length filter off the chunk path: its bounds and verdicts, no chunk look-up
    limit = sorted(exact)[len(exact) // 2]
    assert [j.verdict for j in judge(counter, texts, 1, limit)] == [length_verdict(n, 1, limit) for n in exact]


@pytest.mark.parametrize("scheme, split", [("first", False), ("always", False), ("always", True), ("never", True)])
def test_metaspace_variants_of_the_llama2_vocabulary(real, scheme, split, fixture_texts):
    """transformers' non-legacy Llama conversion (no normalizer, Metaspace(split=False)) and the
    split=True variants, by chunks and (with a normalized added token) by words: both equal full
    tokenization."""
    tok = Tokenizer.from_str(real["llama2"].to_str())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    texts = adversarial_texts(fixture_texts, n=150, seed=4)
    for t, path in ((tok, CHUNKS), (_with_normalized_added_token(tok), PRETOKENS if split else CUTS)):
        counter = TokenCounter(t)
        assert counter.shape.path == path
        assert counter.count(texts) == full_counts(t, texts)


def _tekken_with(pre_tokenizer=None, normalizer=None):
    tok = real_tokenizers.build("tekken")
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.normalizer = normalizer
    return tok


def test_llama3_and_gpt2_regexes_and_lowercase_count_exactly_by_chunks(fixture_texts):
    """Llama-3's split regex (with its case-insensitive contractions), GPT-2's (ByteLevel's own regex)
    and a Lowercase + NFC normalizer, on a real byte-level vocabulary."""
    texts = adversarial_texts(fixture_texts, n=200, seed=5)
    for tok in (_tekken_with(pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(LLAMA3), "isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
                _tekken_with(pre_tokenizers.ByteLevel(add_prefix_space=True)),
                _tekken_with(normalizer=normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()]))):
        counter = TokenCounter(tok)
        assert counter.shape.path == CHUNKS and counter.shape.cut_after == CANDIDATES
        assert counter.count(texts) == full_counts(tok, texts)


def test_a_split_regex_that_holds_a_space_narrows_the_cuts(fixture_texts):
    """A regex whose matches can hold a word character then a space ("\\w+ \\w+") allows cuts only
    after the other characters; one that looks ahead for a space after "a" forbids cuts after "a";
    one without a run of spaces as an alternative (a gap could span a cut) allows none."""
    texts = adversarial_texts(fixture_texts, n=150, seed=6) + ["ab cd, ef gh. a b", "x a b a  b"]
    words = _tekken_with(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+ \w+|\s+|[^\w\s]+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    counter = TokenCounter(words)
    assert counter.shape.path == CHUNKS
    assert set(counter.shape.cut_after) == {c for c in CANDIDATES if not (c.isalnum() or c == "_")}
    assert counter.count(texts) == full_counts(words, texts)
    look = _tekken_with(pre_tokenizers.Split(Regex(r"a(?= )|\s+|[^a\s]+|a"), "isolated"))
    assert "a" not in tokenizer_shape(look).cut_after and "b" in tokenizer_shape(look).cut_after
    assert TokenCounter(look).count(texts) == full_counts(look, texts)
    gaps = _tekken_with(pre_tokenizers.Split(Regex(r"\w+"), "isolated"))
    assert not space_cuts(json.loads(gaps.to_str())).left
    assert "run of spaces" in space_cuts(json.loads(gaps.to_str())).why
    assert TokenCounter(gaps).count(texts) == full_counts(gaps, texts)


@pytest.mark.parametrize("normalizer, why", [
    (normalizers.Strip(), "Strip"), (normalizers.Replace(" ", "_"), "Replace"),
    (normalizers.Replace(Regex(" +"), "▁"), "Replace")])
def test_a_normalizer_that_is_not_local_at_a_space_gets_no_chunks(real, normalizer, why, fixture_texts):
    tok = Tokenizer.from_str(real["llama2"].to_str())
    tok.normalizer = normalizers.Sequence([normalizer, normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    cuts = space_cuts(json.loads(tok.to_str()))
    assert not cuts.left and why in cuts.why
    texts = adversarial_texts(fixture_texts, n=100, seed=7)
    assert TokenCounter(tok).count(texts) == full_counts(tok, texts)


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
    assert shape.path == CHUNKS and "a" not in shape.cut_after and "b" in shape.cut_after  # chunks: not after "a"
    assert _with_normalized_added_token(tok).to_str() and "'a▁'" in tokenizer_shape(_with_normalized_added_token(tok)).why
    counter = TokenCounter(tok)
    assert counter.count(["a b", "b a b", "b b a b"]) == full_counts(tok, ["a b", "b a b", "b b a b"]) == [2, 3, 4]
    assert TokenCounter(_with_normalized_added_token(tok)).count(["a b"]) == [2]
    # the same vocabulary without the straddling entries is cut after any character
    ok = Tokenizer(models.BPE({"<unk>": 0, "a": 1, "b": 2, "▁": 3, "▁b": 4}, [("▁", "b")], unk_token="<unk>"))
    ok.normalizer = tok.normalizer
    assert tokenizer_shape(ok).cut_after == CANDIDATES
    assert tokenizer_shape(_with_normalized_added_token(ok)).path == CUTS


@pytest.mark.parametrize("structure", ["llama2", "tekken"])
def test_a_tokenizer_saved_with_truncation_and_padding_is_counted_whole(real, structure, fixture_texts):
    tok = Tokenizer.from_str(real[structure].to_str())
    tok.enable_truncation(max_length=8)
    tok.enable_padding(length=64)
    texts = fixture_texts[:20] + ["a"]
    assert TokenCounter(tok).count(texts) == full_counts(real[structure], texts)
    assert all(n > 8 for n in full_counts(real[structure], fixture_texts[:20]))


def test_bpe_dropout_is_counted_in_full():
    tok = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")], dropout=0.5))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tokenizer_shape(tok).path == FULL


def test_byte_level_and_metaspace_tokenizers_count_by_chunks(bpe_tokenizer_path, byte_level_tokenizer_path,
                                                             fixture_texts):
    for path in (bpe_tokenizer_path, byte_level_tokenizer_path):
        tok = Tokenizer.from_file(path)
        counter = TokenCounter(tok)
        assert counter.shape.path == CHUNKS
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


# texts that make a byte count small or the tokens many: byte fallback (emoji, CJK, rare letters: 1 token
# per byte), normalizations that grow the bytes (U+0958: NFC 6 bytes for 3; U+FDFA: NFKC 33 for 3),
# compositions, runs of spaces (each a "▁" of 3 bytes and one token), "▁" itself, controls
UPPER_TEXTS = ["\u0958" * 50, "\ufdfa" * 30, "ﬁ" * 40, " " * 100, "▁" * 40, "\x00\x01\x7f\x1b" * 20,
               "🙂👩‍👩‍👧" * 20, "日本語の文章" * 30, "e\u0301" * 40, "\u00a0" * 50, "\u3000" * 30, " \u0301" * 30,
               "각" * 10, "Ａ" * 30, "\r\n" * 30, "\t " * 30, "🙂", "鱻", "𝔘", "\x00", " 🙂 ", "  鱻  "]


def _assert_upper_bound_holds(tok, texts, name=""):
    """n <= upper_bound for every text but those holding an added token's content (which get none),
    and n == bound for some text (each term of the bound is needed)."""
    counter = TokenCounter(tok)
    assert counter.shape.upper is not None, (name, counter.shape.upper_why)
    pairs = [(text, counter.upper_bound(text), n) for text, n in zip(texts, full_counts(tok, texts))]
    assert [t for t, b, n in pairs if b is None] == [t for t in texts if counter._has_special(t)], name
    assert not [(t[:40], b, n) for t, b, n in pairs if b is not None and n > b], name
    assert any(n == b for _, b, n in pairs), name


@pytest.mark.parametrize("structure", real_tokenizers.STRUCTURES)
def test_the_upper_bound_is_never_below_the_true_count(real, structure, fixture_texts):
    """n(text) <= upper_bound(text) with the real vocabularies, on texts built to break it."""
    texts = adversarial_texts(fixture_texts, n=200, seed=14) + UPPER_TEXTS + [" ".join(UPPER_TEXTS)]
    _assert_upper_bound_holds(real[structure], texts, structure)


def test_the_upper_bound_holds_for_the_structures_it_covers(bpe_tokenizer_path, byte_level_tokenizer_path,
                                                             fixture_texts):
    """The variants the argument covers, on the test tokenizers: Metaspace's prepend schemes (a Llama
    BPE with byte fallback), a prefix space and NFKC + Lowercase (byte-level)."""
    texts = adversarial_texts(fixture_texts, n=100, seed=15) + UPPER_TEXTS
    for scheme, split in (("first", True), ("always", False), ("never", True)):
        tok = Tokenizer.from_file(bpe_tokenizer_path)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
        _assert_upper_bound_holds(tok, texts, scheme)
    tok = Tokenizer.from_file(byte_level_tokenizer_path)
    _assert_upper_bound_holds(tok, texts, "byte-level")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    _assert_upper_bound_holds(tok, texts, "byte-level, prefix space, NFKC")


def test_no_upper_bound_where_the_structure_is_not_covered(bpe_tokenizer_path, byte_level_tokenizer_path):
    """A structure the argument does not cover gets no upper bound (its texts are counted): what could
    add tokens beyond the bytes (a prefix space for every piece, "▁" that is not one token, a
    normalizer that may replace anything), or another model."""
    from beam_pipelines.tokens.shape import _upper_bound

    metaspace, byte_level = (json.loads(open(p).read()) for p in (bpe_tokenizer_path, byte_level_tokenizer_path))
    assert _upper_bound(metaspace)[0] is not None and _upper_bound(byte_level)[0] is not None

    def why(spec, **parts):
        upper, why = _upper_bound({**spec, **parts})
        assert upper is None
        return why

    split = {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": False}
    prefix_space = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    assert "after another step" in why(byte_level, pre_tokenizer={"type": "Sequence",
                                                                  "pretokenizers": [split, prefix_space]})
    always = {**metaspace["pre_tokenizer"], "prepend_scheme": "always"}
    assert "every piece" in why(metaspace, pre_tokenizer={"type": "Sequence", "pretokenizers": [split, always]})
    prepend = {"type": "Prepend", "prepend": "▁"}
    assert "not one token" in why(byte_level, normalizer=prepend)
    no_mark = {k: v for k, v in metaspace["model"]["vocab"].items() if k != "▁"}
    assert "not one token" in why(metaspace, model={**metaspace["model"], "vocab": no_mark})
    for normalizer in ({"type": "Replace", "pattern": {"String": " "}, "content": "▁▁"},
                       {"type": "Replace", "pattern": {"String": "a"}, "content": "▁"},
                       {"type": "Strip", "strip_left": True, "strip_right": True}, {"type": "Precompiled"}):
        assert "normalizer" in why(metaspace, normalizer=normalizer)
    normalized = [{**a, "normalized": True} for a in metaspace["added_tokens"]]
    assert "after normalization" in why(metaspace, pre_tokenizer=always, added_tokens=normalized)
    assert "prefix" in why(metaspace, model={**metaspace["model"], "continuing_subword_prefix": "##"})
    assert "WordPiece" in why(metaspace, model={"type": "WordPiece", "vocab": {}})


def test_lower_bound_is_off_for_a_tokenizer_it_cannot_prove(fixture_texts):
    from tokenizers import trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(fixture_texts[:50], trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    shape = tokenizer_shape(tok)
    assert shape == shape.__class__(path=PRETOKENS, why="", max_token_bytes=0, special_contents=("[UNK]",),
                                    upper_why="a WordPiece model")
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


# --- the switch between chunks and full tokenization, driven by a fake clock ----------------------

class PricedClock:
    """A fake clock for `TokenCounter(clock=...)`: time passes only with the work done, `full` per
    character tokenized in full and `chunks` per character counted by chunks (the counter adds to its
    `chars_full` / `chars_chunks` before it reads the clock at the end of each path)."""

    def __init__(self, full: float, chunks: float):
        self.full, self.chunks, self.counter, self.now, self.done = full, chunks, None, 0.0, (0, 0)

    def __call__(self) -> float:
        if self.counter is not None:
            done = (self.counter.chars_full, self.counter.chars_chunks)
            self.now += self.full * (done[0] - self.done[0]) + self.chunks * (done[1] - self.done[1])
            self.done = done
        return self.now


def _priced_counter(tok, full, chunks):
    clock = PricedClock(full, chunks)
    counter = clock.counter = TokenCounter(tok, clock=clock)
    return counter, clock


def _batches(fixture_texts, n, size=25, seed=8):
    """`n` batches of fixture texts mixed with texts built to break the counter."""
    texts = adversarial_texts(fixture_texts, n=n * size, seed=seed) + fixture_texts
    random.Random(seed).shuffle(texts)
    return [texts[i * size:(i + 1) * size] for i in range(n)]


@pytest.mark.parametrize("structure", ["llama2", "tekken"])
def test_the_counter_switches_to_full_tokenization_when_that_is_cheaper(real, structure, fixture_texts):
    """Chunks priced at three times full tokenization: the priors keep the first batch on chunks, the
    full cost is measured on a few texts of the second, which then switches; in full mode every text
    is tokenized whole, with a probe by chunks after 4 batches, then after 8 (the gap doubles while
    probes find chunks dearer). Every count stays exact."""
    tok = real[structure]
    counter, _ = _priced_counter(tok, full=1.0, chunks=3.0)
    batches = _batches(fixture_texts, 16)
    batches[0] = [t for t in batches[0] if not counter._has_special(t)]  # (they would measure the full cost)
    modes = []
    for batch in batches:
        assert counter.count(batch) == full_counts(tok, batch)
        modes.append(counter.switch.mode)
    assert counter.switch.full_cost == pytest.approx(1.0) and counter.switch.mode == FULL
    assert modes == [CHUNKS] + [FULL] * 15 and counter.switches_to_full == 1 and counter.switches_to_chunks == 0
    # batches 1 (the priors), 2 (the switch), 7 and 16 (the probes) by chunks; the 12 others in full
    assert counter.probes == 2 and counter.switch.gap == 16 and counter.switch.wait == 16
    by_chunks = [[t for t in batches[i] if not counter._has_special(t)] for i in (0, 1, 6, 15)]
    calibration = len(by_chunks[1][::16])  # 1 text in 16 of the second batch measured the full cost
    assert counter.full_to_calibrate == calibration > 0
    assert counter.counted_pieces == sum(map(len, by_chunks)) - calibration
    assert counter.full_by_switch == sum(map(len, batches)) - sum(len(batches[i]) for i in (0, 1, 6, 15))
    assert counter.counted_pieces + counter.counted_full == sum(map(len, batches))
    assert counter.chunk_lookups > counter.chunk_misses > 0 and 0 < counter.hit_rate < 1
    assert counter.seconds_chunks == pytest.approx(3.0 * counter.chars_chunks)
    assert counter.seconds_full == pytest.approx(1.0 * counter.chars_full)


@pytest.mark.parametrize("structure", ["llama2", "tekken"])
def test_the_counter_probes_back_to_chunks_when_they_turn_cheap(real, structure, fixture_texts):
    """Full mode while chunks are dear; once they cost a fifth of full tokenization (repetitive text),
    the next probe finds it and the counter stays on chunks, exact throughout."""
    tok = real[structure]
    counter, clock = _priced_counter(tok, full=1.0, chunks=3.0)
    batches = _batches(fixture_texts, 14, seed=9)
    batches[0] = [t for t in batches[0] if not counter._has_special(t)]
    for batch in batches[:3]:
        assert counter.count(batch) == full_counts(tok, batch)
    assert counter.switch.mode == FULL and counter.switch.wait == 3
    clock.chunks = 0.2
    pieces, calibrated = counter.counted_pieces, counter.full_to_calibrate
    modes = []
    for batch in batches[3:]:
        assert counter.count(batch) == full_counts(tok, batch)
        modes.append(counter.switch.mode)
    assert modes == [FULL, FULL, FULL] + [CHUNKS] * 8  # batch 7 is the probe, which succeeds
    assert counter.probes == 1 and counter.switches_to_chunks == 1 and counter.switch.gap == 4
    plain = sum(1 for b in batches[6:] for t in b if not counter._has_special(t))
    assert counter.counted_pieces - pieces == plain - (counter.full_to_calibrate - calibrated) > 0
    assert counter.switch.ratio == pytest.approx(0.2)


def test_text_the_cache_knows_again_brings_the_probe_forward(real, fixture_texts, monkeypatch):
    """Prose, then logs of unique tokens (hit rate ~0) where full tokenization is cheaper: full mode.
    When the prose comes back, the few texts looked up in each full batch find their chunks in the
    cache, and the next batch is a probe, 2 batches earlier than its turn; chunks now cheap, the
    counter stays there."""
    from beam_pipelines.tokens import chunk_cache

    monkeypatch.setattr(chunk_cache, "_ADMIT_CHARS", 1)  # every chunk of the prose cached
    rng = random.Random(14)
    logs = [[" ".join(f"{rng.getrandbits(48):x}" for _ in range(80)) for _ in range(32)] for _ in range(2)]
    tok = real["llama2"]
    counter, clock = _priced_counter(tok, full=1.0, chunks=3.0)
    prose = [t for t in fixture_texts[:64] if not counter._has_special(t)]
    modes = []
    for batch in [prose, logs[0], logs[1], prose, prose]:
        assert counter.count(batch) == full_counts(tok, batch)
        modes.append(counter.switch.mode)
        clock.chunks = 0.2 if len(modes) == 4 else clock.chunks
    # prose by chunks (the priors), logs by chunks (the switch), logs in full (its few texts looked
    # up: no hit), prose in full (its few texts looked up: all hits: the probe brought forward), prose
    # by chunks: the probe, which succeeds
    assert modes == [CHUNKS, FULL, FULL, FULL, CHUNKS]
    assert counter.switch.hit_rate > 0.9 and counter.early_probes == counter.probes == 1
    assert counter.full_by_switch == len(logs[1]) + len(prose) and counter.switches_to_chunks == 1


@pytest.mark.parametrize("price, calibrated", [(0.6, (1, 5)), (0.25, (1,))])
def test_the_switch_holds_on_chunks_when_they_are_cheaper(real, price, calibrated, fixture_texts):
    """Chunks cheaper than full tokenization: no switch; the full cost is measured on one text in 16
    of the second batch, then of every 4th batch while chunks cost over half of it, 4 times less often
    below; every other text is counted by chunks."""
    tok = real["llama2"]
    counter, _ = _priced_counter(tok, full=1.0, chunks=price)
    batches = [[t for t in b if not counter._has_special(t)] for b in _batches(fixture_texts, 9, size=32, seed=10)]
    for batch in batches:
        assert counter.count(batch) == full_counts(tok, batch)
    assert counter.switch.mode == CHUNKS and counter.switches_to_full == 0 and counter.full_by_switch == 0
    calibration = sum(len(batches[i][::16]) for i in calibrated)
    assert counter.full_to_calibrate == counter.counted_full == calibration > 0
    assert counter.counted_pieces == sum(map(len, batches)) - calibration
    assert counter.switch.ratio == pytest.approx(price, rel=0.01) and counter.switch.full_cost == pytest.approx(1.0)
    totals = counter.totals()
    assert set(totals) == set(TokenCounter.TOTALS) and totals["counted_pieces"] == counter.counted_pieces


def test_a_change_of_text_measures_the_full_cost_again(real, fixture_texts):
    """Prose, where chunks cost a quarter of full tokenization (the full cost is then measured every 16
    batches only), turns into text twice as cheap to tokenize per character and twice as dear by
    chunks: measured against the old full cost, chunks look still cheaper, but the jump in their ratio
    has the full cost measured again in the next batches, each measurement replacing the average, and
    the counter switches to full tokenization 3 batches after the change, exact throughout."""
    tok = real["llama2"]
    counter, clock = _priced_counter(tok, full=1.0, chunks=0.25)
    batches = [[t for t in b if not counter._has_special(t)] for b in _batches(fixture_texts, 14, size=32, seed=13)]
    for batch in batches[:6]:
        assert counter.count(batch) == full_counts(tok, batch)
    assert counter.switch.mode == CHUNKS and counter.full_to_calibrate == len(batches[1][::16])
    clock.full, clock.chunks = 0.4, 0.5
    calibrated, modes = [], []
    for batch in batches[6:]:
        before = counter.full_to_calibrate
        assert counter.count(batch) == full_counts(tok, batch)
        calibrated.append(counter.full_to_calibrate > before)
        modes.append(counter.switch.mode)
    assert modes == [CHUNKS] * 2 + [FULL] * 6 and calibrated[:3] == [False, True, True]
    assert counter.switch.full_cost == pytest.approx(0.4)


@pytest.mark.parametrize("structure", real_tokenizers.STRUCTURES)
@pytest.mark.parametrize("admit_chars", [1, 64, 10**9])
def test_remainders_and_cached_chunks_count_exactly(real, structure, admit_chars, fixture_texts, monkeypatch):
    """Every missed chunk cached (1), the default, and none (every miss counted in its text's remainder,
    first chunks included), with caches small enough to be trimmed and the admission record cleared
    along the way: the counts equal full tokenization, batch after batch, texts with a last chunk that
    ends otherwise than a cut character, empty, or alone included."""
    from beam_pipelines.tokens import chunk_cache, counter as counting

    monkeypatch.setattr(chunk_cache, "_ADMIT_CHARS", admit_chars)
    monkeypatch.setattr(counting, "_CACHE_LIMIT", 400)
    monkeypatch.setattr(counting, "_FIRST_LIMIT", 10)
    monkeypatch.setattr(chunk_cache, "_SEEN_LIMIT", 300)
    tok = real[structure]
    counter, _ = _priced_counter(tok, full=1.0, chunks=0.5)  # stays on chunks
    edges = ["end\n", "end ", "a b ", "x", "é é é", "a  b", " a b", "日本 語 日本", "a b\n c d\n", "a, b. c; d",
             "w" * 40 + " " + "w" * 40, "1 2 3 4 5 6 7 8 9 10", "<s> a", "a </s>"]
    batches = _batches(fixture_texts, 8, size=40, seed=11) + [edges, edges[::-1]]
    for batch in batches:
        encoded = counter.chunks_encoded
        assert counter.count(batch) == full_counts(tok, batch)
        # trimmed before each batch: at most the limits and this batch's newly cached chunks
        assert len(counter._words) + len(counter._first) <= 400 + 10 + counter.chunks_encoded - encoded
    assert counter.switch.mode == CHUNKS and (counter.remainder_texts == 0) == (admit_chars == 1)
    if admit_chars == 10**9:
        assert counter.chunks_encoded == 0 and not counter._words and counter.hit_rate == 0
    else:
        assert counter.chunks_encoded > 0 and counter.hit_rate > 0


def test_the_search_for_added_tokens_equals_a_test_per_token(real, fixture_texts):
    """tekken's 1000 added tokens, searched by one regex of their trie: the same answer as a substring
    test per token, on texts holding each token, its prefixes and its suffixes; a token that is a
    prefix of another ends that branch."""
    from beam_pipelines.tokens.shape import trie_regex

    counter = TokenCounter(real["tekken"])
    specials = [s for s in counter.shape.special_contents if s]
    assert len(specials) == 1000
    rng = random.Random(12)
    texts = adversarial_texts(fixture_texts, n=100, seed=12)
    texts += [t[:len(t) // 2] + rng.choice(specials) + t[len(t) // 2:] for t in texts[:100]]
    texts += specials + [s[:-1] for s in specials] + [s[1:] for s in specials] + ["[INST", "<SPECIAL_", "x<s>y"]
    for text in texts:
        assert counter._has_special(text) == any(s in text for s in specials), text[:80]
    nested = re.compile(trie_regex(["ab", "abc", "b.d", "x"]))
    assert [bool(nested.search(t)) for t in ["zab", "abc", "a", "b.d", "byd", "bd", "x"]] == \
        [True, True, False, True, False, False, True]


def test_judge_is_the_length_filter_in_one_call(bpe_tokenizer_path, fixture_texts):
    """judge: a text the bytes bound proves too long is dropped uncounted, one the upper bound
    proves within the limits is kept uncounted (never with exact=True); every other text gets its exact
    count and the verdict of length_verdict, in one count call for the batch. The verdicts are those
    of counting every text."""
    from beam_pipelines.tokens.judge import judge

    counter = TokenCounter(load_tokenizer(bpe_tokenizer_path))
    texts = fixture_texts + UPPER_TEXTS + ["a <s> b"]  # an added token's content: no upper bound
    exact = full_counts(counter.tokenizer, texts)
    high = sorted(exact)[-20]
    huge = "x" * 200_000   # over any limit by the bound alone
    kept_uncounted = []
    for low in (0, sorted(exact)[20]):
        judged = judge(counter, texts + [huge], low, high)
        assert [j.verdict for j in judged[:-1]] == [length_verdict(n, low, high) for n in exact]
        assert {j.verdict for j in judged} == ({None, "too_long", "too_short"} if low else {None, "too_long"})
        assert all(j.n_tokens in (n, None) for j, n in zip(judged, exact))
        uncounted = [j for j in judged[:-1] if j.n_tokens is None and j.verdict is None]
        assert all("upper bound" in j.detail for j in uncounted)
        assert all(j.verdict == "too_long" and ("first" in j.detail or "chunks" in j.detail)   # a prefix's
                   for j in judged[:-1] if j.n_tokens is None and j.verdict is not None)  # count, the caches, a share
        assert judged[-2].n_tokens == exact[-1] and judged[-1].n_tokens is None
        assert judged[-1].verdict == "too_long" and "bytes bound" in judged[-1].detail
        kept_uncounted.append(len(uncounted))
    # with no minimum many texts fit by their bound; with one, a lower bound must prove it too (the
    # bytes' rarely, the chunk caches' more often)
    assert kept_uncounted[0] > len(texts) // 3 and 0 < kept_uncounted[1] < kept_uncounted[0]
    # (kept uncounted: by the upper bound, the chunk caches, a share of the missed chunks, or a prefix)
    assert counter.rejected_by_bound == 2 and _kept_uncounted(counter) == sum(kept_uncounted)
    judged = judge(counter, texts, 0, high, exact=True)  # every kept text counted (a rejected one may not be)
    assert [j.n_tokens for j in judged if j.verdict is None] == [n for n in exact if n <= high]
    assert all(j.n_tokens in (n, None) for j, n in zip(judged, exact))
    assert _kept_uncounted(counter) == sum(kept_uncounted)
    # a long text is dropped by the count of its prefix at a cut; a sparse one (a long word a token:
    # more characters a token than the prefix is sized for) gets its rest counted from the cut
    vocab = json.loads(counter.tokenizer.to_str())["model"]["vocab"]
    word = min((p[1:] for p in vocab if p.startswith("▁") and p[1:].isalpha() and len(p) >= 8), key=len)
    long = next(t for t, n in zip(texts, exact) if n > 1.5 * high and not counter.bound_exceeds(t, high))
    sparse = (word + " ") * (high + 20)  # a token a word
    assert counter.cut_past(long, high) and counter.cut_past(sparse, high) and not counter.bound_exceeds(sparse, high)
    _tokenize_in_full(counter)   # the prefix path (while the switch tokenizes in full) alone:
    counter.chunk_bounds = lambda text, limit: (0, None)   # no chunk bounds (below)
    before = counter.rejected_by_prefix
    judged = judge(counter, [long, sparse], 0, high)
    assert [j.verdict for j in judged] == ["too_long", "too_long"] and counter.rejected_by_prefix == before + 1
    assert judged[0].n_tokens is None and "first" in judged[0].detail
    assert judged[1].n_tokens == full_counts(counter.tokenizer, [sparse])[0] > high


def _kept_uncounted(counter) -> int:
    return counter.kept_by_bound + counter.kept_by_prefix + counter.kept_by_chunks + counter.kept_by_share


def _tokenize_in_full(counter) -> None:
    """The cost switch set to tokenize in full (no probe by chunks for a long while): judge then counts a
    long text's prefix first, not its missed chunks (stepwise.py)."""
    counter.switch.mode, counter.switch.wait = FULL, 10**6


@pytest.mark.parametrize("structure", real_tokenizers.STRUCTURES)
def test_a_text_over_the_limit_in_bytes_is_kept_by_its_prefix_count_and_the_rests_bound(real, structure, fixture_texts):
    """While the cost switch tokenizes in full, judge keeps a text whose bytes exceed the limit
    uncounted when the count of a prefix at a proved cut plus the rest's upper bound fits (the package
    docstring, 4.); every decision is full tokenization's, and --exact-counts counts every kept text."""
    from beam_pipelines.tokens.judge import judge

    tok = real[structure]
    counter = TokenCounter(tok)
    _tokenize_in_full(counter)
    texts = [t for t in fixture_texts if 600 < len(t.encode()) < 3000]
    exact = full_counts(tok, texts)
    limit = sorted(exact)[len(exact) // 2]
    texts = [t for t, n in zip(texts, exact) if len(t.encode()) > limit + 1]   # no text fits by its bound
    exact = full_counts(tok, texts)
    judged = judge(counter, texts, 1, limit)
    assert [j.verdict for j in judged] == [length_verdict(n, 1, limit) for n in exact]
    assert all(j.n_tokens in (n, None) for j, n in zip(judged, exact))
    by_prefix = [j for j in judged if j.n_tokens is None and j.verdict is None]
    assert by_prefix and counter.kept_by_prefix == len(by_prefix) and counter.kept_by_bound == 0
    assert all("the rest's upper bound" in j.detail for j in by_prefix)
    judged = judge(counter, texts, 1, limit, exact=True)
    assert [j.n_tokens for j in judged if j.verdict is None] == [n for n in exact if n <= limit]
    assert counter.kept_by_prefix == len(by_prefix)


@pytest.mark.parametrize("structure", real_tokenizers.STRUCTURES)
def test_the_chunk_caches_bound_a_text_and_decide_without_tokenizing(real, structure, fixture_texts):
    """chunk_bounds: the cached chunks' counts (a lower bound) and, with each missed chunk's upper bound
    in context, an upper bound of the exact count, on real and adversarial texts (the package
    docstring, 5.); judge decides by them where they suffice, with full tokenization's decisions."""
    from beam_pipelines.tokens.judge import judge

    tok = real[structure]
    counter = TokenCounter(tok)
    for _ in range(4):                                      # the caches learn from counted texts
        counter.count(fixture_texts[:150])
    joined = [" ".join(fixture_texts[i:i + 4]) for i in range(0, 150, 4)]   # their chunks, longer texts
    texts = fixture_texts[:150] + joined + fixture_texts[150:] + adversarial_texts(fixture_texts, n=60, seed=5)
    exact = full_counts(tok, texts)
    for text, n in zip(texts, exact):
        lower, upper = counter.chunk_bounds(text, 10**9)
        assert lower <= n and (upper is None or n <= upper), (text[:80], lower, n, upper)
    limit = sorted(exact)[len(exact) // 2]
    judged = judge(counter, texts, 1, limit)
    assert [j.verdict for j in judged] == [length_verdict(n, 1, limit) for n in exact]
    assert all(j.n_tokens in (n, None) for j, n in zip(judged, exact))
    if counter.shape.path == "chunks":
        assert counter.kept_by_chunks > 0 and counter.rejected_by_chunks > 0
        assert all("cached chunks" in j.detail or "a share of its chunks" in j.detail for j in judged
                   if j.n_tokens is None and "bound" not in j.detail and "first" not in j.detail)


def test_a_missed_chunk_counts_no_token_where_unknown_symbols_are_dropped():
    """A BPE without unk or byte fallback drops what its vocabulary lacks: a missed chunk (" !") may be
    no token at all, so the caches' lower bound gives it 0, not 1 (else "ab ! ! ! ! !", 2 tokens, was
    judged too long for 3)."""
    import string

    from beam_pipelines.tokens.judge import judge

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(string.ascii_lowercase)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\s\w]+"), "isolated")
    counter = TokenCounter(tok)
    assert counter.shape.path == "chunks" and counter.shape.max_token_bytes == 0
    text = "ab ! ! ! ! !"
    assert full_counts(tok, [text]) == [2]
    assert counter.chunk_bounds(text, 3)[0] <= 2
    assert judge(counter, [text], 0, 3)[0].verdict is None


@pytest.mark.parametrize("structure", real_tokenizers.STRUCTURES)
def test_a_text_cut_at_a_proved_cut_counts_its_prefix_and_its_rest(real, structure, fixture_texts):
    """judge's prefix of a long text ends at a proved cut: the prefix's count plus the rest's counted
    from the cut is the text's (so the prefix's is at most the text's: the package docstring, 4.), on
    texts built to break the cuts."""
    tok = real[structure]
    counter = TokenCounter(tok)
    texts = [t for t in adversarial_texts(fixture_texts, n=150, seed=16) + fixture_texts[:60] if len(t) > 95]
    cuts = [counter.cut_past(t, 20) for t in texts]
    assert sum(map(bool, cuts)) > len(texts) // 2
    cut_texts = [(t, c) for t, c in zip(texts, cuts) if c]
    heads = full_counts(tok, [t[:c] for t, c in cut_texts])
    rests = counter.count_from_cuts([t[c:] for t, c in cut_texts])
    assert [h + r for h, r in zip(heads, rests)] == full_counts(tok, [t for t, _ in cut_texts])
    assert all(c >= int(4.5 * 21) and t[c] == " " for t, c in cut_texts)
    assert counter.cut_past("a " * 500 + "<s>", 20) == 0  # an added token's content: counted whole


def test_a_worker_refuses_a_tokenizer_changed_after_the_drivers_proof_and_never_serves_a_stale_one(
        tmp_path, bpe_tokenizer_path, byte_level_tokenizer_path):
    """load.shared_tokenizer: the process's copy is checked against the driver's proof (a file
    replaced in place between the driver and a worker is an error naming it, one line for the CLI),
    and a file replaced in place is loaded again, not served from the process's copy."""
    from beam_pipelines.tokens import load
    from schemas.errors import UserError

    path = str(tmp_path / "tokenizer.json")
    a, b = Tokenizer.from_file(bpe_tokenizer_path), Tokenizer.from_file(byte_level_tokenizer_path)
    a.save(path)
    proof = load.prove(path)
    text = "Hello, wörld: a short text\nwith two lines."
    assert load.shared_counter(path, proof).count([text]) == full_counts(a, [text])
    b.save(path)
    with pytest.raises(load.TokenizerChanged, match="tokenizer.json: the tokenizer's file changed after the driver"):
        load.shared_counter(path, proof)
    assert issubclass(load.TokenizerChanged, UserError)
    assert load.shared_counter(path).count([text]) == full_counts(b, [text]) != full_counts(a, [text])
    assert load.prove(path).file != proof.file


def test_threads_share_the_processs_tokenizer_and_each_counts_with_its_own_counter(bpe_tokenizer_path):
    """Every prepare step loaded and proved the tokenizer again, with an empty cache.
    A Beam step now keeps the process's SharedTokenizer and asks it for the running thread's counter,
    shared by the steps of that thread: two threads get two counters (caches and totals are not
    thread-safe) on one loaded tokenizer, proved once."""
    import threading

    from beam_pipelines.tokens import load

    shared = load.shared_tokenizer(bpe_tokenizer_path)
    assert load.shared_tokenizer(bpe_tokenizer_path, shared.proof) is shared
    mine = shared.counter()
    assert shared.counter() is mine and load.shared_counter(bpe_tokenizer_path) is mine
    mine.count(["a warm cache carries over to the next step"])
    other = []
    t = threading.Thread(target=lambda: other.append(shared.counter()))
    t.start()
    t.join()
    assert other[0] is not mine and other[0].tokenizer is mine.tokenizer is shared.tokenizer
    assert other[0].shape is mine.shape is shared.proof.shape
    assert other[0].count(["x y"]) == mine.count(["x y"])


@pytest.mark.parametrize("structure", real_tokenizers.STRUCTURES)
@pytest.mark.parametrize("safety", [1.3, 0.2])
def test_a_share_of_the_missed_chunks_counted_decides_as_full_tokenization(real, structure, fixture_texts,
                                                                           monkeypatch, safety):
    """The chunk path decides a text by counting only a share of its missed chunks (stepwise.py, the
    package docstring, 6.): kept when its known counts plus the rest's upper bound fit, dropped when
    they plus a token a missed chunk exceed the limit, else the rest counted too; the decisions and
    every count given are full tokenization's, on real and adversarial texts from a cold cache, at
    several limits, with and without --exact-counts. A share sized too small (`safety` 0.2) leaves
    texts to the second round, whose counts add up to the exact ones."""
    from beam_pipelines.tokens import stepwise

    monkeypatch.setattr(stepwise, "_SAFETY", safety)
    tok = real[structure]
    joined = [" ".join(fixture_texts[i:i + 6]) for i in range(0, 180, 6)]   # long texts of real words
    texts = joined + adversarial_texts(fixture_texts, n=80, seed=21) + fixture_texts[180:260]
    exact = full_counts(tok, texts)
    counter = TokenCounter(tok)
    for limit in sorted({sorted(exact)[len(exact) * q // 8] for q in (2, 4, 6, 7)}):
        for ex in (False, True):
            judged = judge(counter, texts, 0, limit, exact=ex)
            assert [j.verdict for j in judged] == [length_verdict(n, 0, limit) for n in exact], (limit, ex)
            assert all(j.n_tokens in (n, None) for j, n in zip(judged, exact)), (limit, ex)
            if ex:
                assert all(j.n_tokens is not None for j in judged if j.verdict is None)
    if counter.shape.path == CHUNKS:
        assert counter.kept_by_share > 0 and counter.rejected_by_share > 0 and counter.share_chars > 0
        assert counter.rest_chars > 0 if safety < 1 else counter.kept_by_share + counter.rejected_by_share > 10
        assert all("chunks" in j.detail for j in judge(counter, texts, 0, limit) if j.n_tokens is None
                   and "bytes bound" not in j.detail and "(upper bound)" not in j.detail)


def test_llama2_pieces_are_normalized_in_python_with_the_same_tokens(real, fixture_texts):
    """shape.pieces_encoder: for Llama-2's structure (Prepend("▁") + Replace(" ", "▁"), no
    pre-tokenizer) the remainders are normalized in Python and encoded by a copy without a normalizer:
    the same tokens as the tokenizer's on every text without an added token's content (empty, spaces
    only, "▁" itself, non-ASCII, control characters); any other structure, or an added token holding
    "▁", keeps the tokenizer's own encoding."""
    from tokenizers import AddedToken

    from beam_pipelines.tokens.shape import pieces_encoder

    tok = real["llama2"]
    encode, counter = pieces_encoder(tok), TokenCounter(tok)
    texts = [t for t in adversarial_texts(fixture_texts, n=200, seed=31) + fixture_texts[:50]
             + ["", " ", "  a", "a ", "▁", " ▁ x", "é  ü\t\n", "\x00 \x1f"] if not counter._has_special(t)]
    assert [e.ids for e in encode(texts)] == [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    assert encode.__code__ is not pieces_encoder(real["tekken"]).__code__   # byte-level BPE: its own encoding
    marked = Tokenizer.from_str(tok.to_str())
    marked.add_special_tokens([AddedToken("▁x", normalized=False)])
    assert pieces_encoder(marked).__code__ is pieces_encoder(real["tekken"]).__code__


def test_llama2s_bytes_lower_bound_needs_no_normalizer(real, fixture_texts):
    """Llama-2's structure: the bytes lower bound takes the normalized bytes as the text's plus 2 a
    space and 3 for the prepended "▁", exactly the normalizer's output, with no normalizer call."""
    tok = real["llama2"]
    counter = TokenCounter(tok)
    assert counter._llama2 and not TokenCounter(real["tekken"])._llama2
    b = counter.shape.max_token_bytes
    for text in adversarial_texts(fixture_texts, n=100, seed=41) + ["", " ", "▁", "  é 💡 "]:
        norm = tok.normalizer.normalize_str(text)
        assert counter.lower_bound(text) == -(-len(norm.encode()) // b) <= len(tok.encode(text).ids) or not text
