"""Exact token counts for the length filter, with the work cut where it provably is not needed.

`n_tokens` is the number of tokens of the text alone (no special tokens), exactly what
`tokenizer.encode(text, add_special_tokens=False)` gives. Every kept document needs its exact count
(the candidate schema carries it and the shard balancer uses it), so the savings are all exact:

0. Counting by chunks of the raw text ("chunks", the first choice). `space_cuts.py` proves from the
   tokenizer's structure that cutting the raw text before a space that follows a printable ASCII
   character changes no count (its normalizer is local at such a space, no piece of its split regex
   and no vocabulary entry can hold the two characters, no lookahead crosses). Then n(text) = the
   first chunk's count + the cached counts of the following chunks, each chunk counted once by the
   real tokenizer in a fixed context: no normalization, split or model call per document, a plain
   `str.split(" ")` and a dictionary look-up per chunk. Proved for Llama-2's structure, byte-level
   BPE with a split regex (Llama-3, Qwen, tekken, GPT-2) and NFKC sentencepiece conversions.
1. Counting by words, memoized, when no chunk cut is proved. A Hugging Face tokenizer encodes a
   text (without added tokens) as normalizer -> pre-tokenizer -> model, and the model encodes each
   pre-token on its own. So n(text) = sum of n_model(w) over the words w of normalize(text), where
   the words are

   - "pretokens": the pre-tokenizer's pieces, for any tokenizer that has a pre-tokenizer (byte-level
     BPE with a split regex: Llama-3, Qwen, tekken, GPT-2; Metaspace(split=True) sentencepiece
     conversions, NFKC-normalized ones included). The tokenizer's own normalizer (Rust) normalizes, so
     any normalizer is handled exactly; its pre-tokenizer (Rust) splits, except a lone Metaspace("▁"),
     whose few string operations (see `_metaspace`) are done in Python, several times faster than
     the Rust call that also builds offsets.
   - "cuts": Llama-2's structure (no pre-tokenizer: the whole normalized text is one BPE word; e.g.
     normalizer Prepend("▁") + Replace(" ", "▁"), byte fallback). The normalized text is cut before
     every "▁" that follows a character other than "▁" (a run of "▁" stays with the word after it).
     No BPE token can straddle such a cut when no vocabulary entry and no merge contains a character
     other than "▁" directly followed by "▁": merges only ever join adjacent symbols into a vocabulary
     entry, so the two sides are merged independently, and byte fallback is per character. This is
     proved by a scan of the vocabulary and merges when the counter is built; it also requires no
     dropout, no continuing-subword prefix or end-of-word suffix (they depend on the word start) and
     "▁" in the vocabulary (so an unknown-token fusion cannot cross a cut). A lone Metaspace("▁",
     split=False) pre-tokenizer (transformers' non-legacy Llama conversion) is cut the same way.

   Word counts are cached, so a document costs a normalization, a split and a few dictionary look-ups
   per word instead of a BPE pass; misses are encoded in one batch by the bare model. Texts that
   contain an added (special) token's content, raw or normalized, are counted in full.
2. A lower bound rejects texts that cannot fit without tokenizing them (computed only for texts
   long enough to reach the limit): every token of a BPE model
   with byte fallback (all 256 byte pieces) or a byte-level one covers at most B units of the model's
   input (UTF-8 bytes; bytes for byte-level), B being the longest vocabulary entry in those units, and
   the pre-tokenizers allowed (Metaspace, ByteLevel, Split without removal) never shorten it, so
   n >= ceil(bytes(normalize(text)) / B).

Any other tokenizer (BPE with dropout, or one word per text that no cut rule splits) is counted in full
with `encode_batch_fast`, exact by definition. tests/test_length.py proves each path against full
tokenization on texts built to break it, with converted real vocabularies (benchmarks/real_tokenizers.py).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import threading
from dataclasses import dataclass

from tokenizers import Tokenizer, pre_tokenizers

from beam_pipelines.space_cuts import space_cuts

_CACHE_LIMIT = 300_000  # words or chunks (~50 MB); cleared when full
_FIRST_LIMIT = 20_000   # first chunks of texts
MARK = "▁"
# Llama-2-structure words: a run of "▁" and the characters up to the next "▁" (or a trailing run).
_CUT_WORDS = re.compile(f"{MARK}*[^{MARK}]+|{MARK}+")
_STRADDLE = re.compile(f"[^{MARK}]{MARK}")
# Metaspace(split=True) words: each "▁" starts one (MergedWithNext), and a leading text without one.
_METASPACE_WORDS = re.compile(f"{MARK}[^{MARK}]*|[^{MARK}]+")
CHUNKS, PRETOKENS, CUTS, FULL = "chunks", "pretokens", "cuts", "full"


def load_tokenizer(path_or_id: str) -> Tokenizer:
    """A fast tokenizer from a tokenizer.json file, a folder holding one, a gs:// path or a hub id."""
    import storage

    if storage.is_gcs(path_or_id):
        target = path_or_id if path_or_id.endswith(".json") else storage.join(path_or_id, "tokenizer.json")
        return Tokenizer.from_str(storage.read_text(target))
    if os.path.isdir(path_or_id):
        path_or_id = os.path.join(path_or_id, "tokenizer.json")
        if not os.path.exists(path_or_id):
            raise FileNotFoundError(f"{path_or_id}: no tokenizer.json in the tokenizer folder "
                                    "(a fast tokenizer is required; save it with save_pretrained)")
    if os.path.isfile(path_or_id):
        return Tokenizer.from_file(path_or_id)
    if path_or_id.startswith((".", "/")) or path_or_id.endswith(".json"):
        raise FileNotFoundError(f"{path_or_id}: tokenizer file not found")
    from huggingface_hub import hf_hub_download

    return Tokenizer.from_file(hf_hub_download(path_or_id, "tokenizer.json"))


def tokenizer_fingerprint(path_or_id: str) -> dict:
    """The tokenizer as a run records it: the tokenizer.json that load_tokenizer reads, by content
    (storage.fingerprint: xxh3_128 of a local file, GCS's crc32c), so that a tokenizer replaced in
    place is a change; a hub id by its name (its revision is the hub's)."""
    import storage

    target = path_or_id
    if storage.is_gcs(path_or_id):
        target = path_or_id if path_or_id.endswith(".json") else storage.join(path_or_id, "tokenizer.json")
    elif os.path.isdir(path_or_id):
        target = os.path.join(path_or_id, "tokenizer.json")
    elif not os.path.isfile(path_or_id):
        return {"hub_id": path_or_id}
    return {"path": target, **storage.fingerprint(target)}


_SHARED = threading.local()


def shared_counter(path_or_id: str) -> "TokenCounter":
    """The TokenCounter of a tokenizer, loaded and proved once per worker thread and shared by every
    step that runs there (Beam's shared-model pattern, per thread: a counter's caches and totals are
    not thread-safe, and a Beam worker may run bundles in several threads); its chunk cache stays warm
    from one step to the next. Each step reads the totals around its own `count` call."""
    counters = getattr(_SHARED, "counters", None)
    if counters is None:
        counters = _SHARED.counters = {}
    if path_or_id not in counters:
        counters[path_or_id] = TokenCounter(load_tokenizer(path_or_id))
    return counters[path_or_id]


@dataclass(frozen=True)
class TokenizerShape:
    """What the tokenizer's structure allows: which way its texts are counted (`path`, one of
    PRETOKENS, CUTS, FULL, with `why` for FULL), and the bytes-per-token bound."""

    path: str
    why: str
    max_token_bytes: int  # 0 when no lower bound is sound for this tokenizer
    special_contents: tuple[str, ...]
    cut_after: str = ""   # CHUNKS: the characters after which a raw text is cut before a space


def tokenizer_shape(tok: Tokenizer, spec: dict | None = None) -> TokenizerShape:
    """The shape of `tok` (`spec`: its parsed JSON, when the caller has it already)."""
    spec = json.loads(tok.to_str()) if spec is None else spec
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    specials = tuple(a["content"] for a in spec.get("added_tokens", []))
    cuts = space_cuts(spec)
    path, why = (CHUNKS, "") if cuts.left else _counting_path(model, pre)
    return TokenizerShape(path=path, why=why, max_token_bytes=_max_token_bytes(spec), special_contents=specials,
                          cut_after=cuts.left)


def _counting_path(model: dict, pre) -> tuple[str, str]:
    kind = model.get("type")
    if kind == "BPE" and model.get("dropout"):
        return FULL, "BPE dropout is random"
    if pre is not None and not _metaspace(pre, split=False):
        return PRETOKENS, ""
    if kind != "BPE":
        return FULL, f"{kind} model without a pre-tokenizer"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return FULL, "BPE with a word-position prefix or suffix and no pre-tokenizer"
    vocab = model.get("vocab") or {}
    if MARK not in vocab:
        return FULL, f"no pre-tokenizer and {MARK!r} is not in the vocabulary"
    for piece in vocab:
        if _STRADDLE.search(piece):
            return FULL, f"no pre-tokenizer and the vocabulary entry {piece!r} spans a cut before {MARK!r}"
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if _STRADDLE.search(left + right):
            return FULL, f"no pre-tokenizer and the merge {left!r} + {right!r} spans a cut before {MARK!r}"
    return CUTS, ""


def _metaspace(pre, split: bool | None = None) -> tuple[str, bool, bool] | None:
    """(replacement, prepends, splits) of a lone Metaspace("▁") pre-tokenizer (with `split` as given,
    when given), else None. Its work is emulated in Python, as tokenizers 0.2x's metaspace.rs does it:
    " " -> "▁", "▁" prepended unless the text starts with one (schemes always/first: the whole text is
    the first split), then, with split, a cut before every "▁" (MergedWithNext)."""
    if not pre or pre.get("type") != "Metaspace" or pre.get("replacement") != MARK or "prepend_scheme" not in pre:
        return None
    splits = bool(pre.get("split", True))
    if split is not None and splits != split:
        return None
    return MARK, pre["prepend_scheme"] in ("always", "first"), splits


def _max_token_bytes(spec: dict) -> int:
    """B of the lower bound (see the module docstring), or 0 when the bound is not sound."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return 0
    steps = _flatten(pre)
    if any(s.get("type") not in ("Metaspace", "ByteLevel", "Split") or s.get("behavior") == "Removed"
           for s in steps):
        return 0
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    vocab = model.get("vocab") or {}
    if not byte_level and not (model.get("byte_fallback") and all(f"<0x{i:02X}>" in vocab for i in range(256))):
        return 0  # an unknown token could stand for any number of bytes
    best = 0
    for piece in list(vocab) + [a["content"] for a in spec.get("added_tokens", [])]:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            n = 1
        elif byte_level:
            n = len(piece)  # one character per byte
        else:
            n = len(piece.encode("utf-8"))
        best = max(best, n)
    return best


def _flatten(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        out = []
        for child in node.get("pretokenizers") or node.get("normalizers") or []:
            out.extend(_flatten(child))
        return out
    return [node]


def _split_and_words(tok: Tokenizer, spec: dict):
    """(the pre-tokenizer steps that split, a tokenizer that counts one word), from the tokenizer and
    its parsed JSON `spec`.

    The word counter is the bare model, with the pre-tokenizer's trailing ByteLevel(use_regex=False)
    step when it has one: that step only maps each piece's bytes to characters, piece by piece, so it
    gives the same pieces whether applied before the cache or inside it, and the Rust split alone is
    much cheaper than splitting and mapping with offsets (Llama-3's and tekken's structure). The
    steps are taken from the live pre-tokenizer (no re-serialization of a 131K vocabulary)."""
    pre = spec.get("pre_tokenizer")
    words = Tokenizer(tok.model)
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if len(steps) > 1 and steps[-1].get("type") == "ByteLevel" and not steps[-1].get("use_regex", True):
            live = [tok.pre_tokenizer[i] for i in range(len(steps))]
            words.pre_tokenizer = live[-1]
            return (live[0] if len(live) == 2 else pre_tokenizers.Sequence(live[:-1])), words
    return tok.pre_tokenizer, words


class _Counts(dict):
    """A cache of counts that records the keys it lacks, counting them 0, instead of raising."""

    def __init__(self):
        super().__init__()
        self.missed: list[str] = []

    def __missing__(self, key: str) -> int:
        self.missed.append(key)
        return 0


class TokenCounter:
    """Exact `n_tokens` for texts; see the module docstring for why each path is exact."""

    def __init__(self, tokenizer: Tokenizer):
        # a tokenizer.json saved with truncation or padding on would cap or pad every count
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        spec = json.loads(tokenizer.to_str())
        self.shape = tokenizer_shape(tokenizer, spec)
        self._normalizer = tokenizer.normalizer
        self._pre, self._model = _split_and_words(tokenizer, spec)
        self._metaspace = _metaspace(spec.get("pre_tokenizer"))
        self._words: dict[str, int] = {}
        self._specials: dict[str, list[str]] = {}
        for special in self.shape.special_contents:
            if special:
                self._specials.setdefault(special[0], []).append(special)
        self.counted_full = 0       # texts tokenized in full
        self.counted_pieces = 0     # texts counted from cached words or chunks
        self.rejected_by_bound = 0  # texts proved too long without tokenizing
        if self.shape.path == CHUNKS:
            # the space first, then a look back at it and the character before it: the regex engine
            # then finds candidates by its literal-prefix scan (twice as fast as a lookbehind first)
            left = "[" + re.escape(self.shape.cut_after) + "]"
            self._unsafe_cut = re.compile(f" (?<!{left} )")  # a space no cut may precede
            self._cut = re.compile(f" (?<={left} )")
            self._ctx = self.shape.cut_after[0] if "a" not in self.shape.cut_after else "a"
            self._ctx_tokens = len(tokenizer.encode(self._ctx, add_special_tokens=False).ids)
            self._words, self._first = _Counts(), _Counts()  # following chunk / first chunk -> count

    def normalize(self, text: str) -> str:
        return self._normalizer.normalize_str(text) if self._normalizer is not None else text

    def lower_bound(self, text: str) -> int:
        """A number of tokens the text is sure to reach (0 when no bound is sound)."""
        b = self.shape.max_token_bytes
        return math.ceil(len(self.normalize(text).encode("utf-8")) / b) if b else 0

    def bound_exceeds(self, text: str, limit: int) -> int:
        """The lower bound when it exceeds `limit`, else 0. The bound is computed only for texts long
        enough to reach it (4 bytes per character at most before normalization): normalizing every
        text in full would cost more than counting it by chunks."""
        b = self.shape.max_token_bytes
        if not b or len(text) * 4 <= limit * b:
            return 0
        bound = self.lower_bound(text)
        return bound if bound > limit else 0

    def count(self, texts: list[str]) -> list[int]:
        """Exact token counts (no special tokens added) of `texts`."""
        counts = [0] * len(texts)
        full: list[int] = []
        if self.shape.path == CHUNKS:
            full = self._count_chunks(texts, counts)
        else:
            by_words: list[tuple[int, list[str]]] = []
            for i, text in enumerate(texts):
                words = None if self.shape.path == FULL or self._has_special(text) else self._split(text)
                if words is None:
                    full.append(i)
                else:
                    by_words.append((i, words))
            if by_words:
                self._learn(by_words)
                get = self._words.__getitem__
                for i, words in by_words:
                    counts[i] = sum(map(get, words))
                self.counted_pieces += len(by_words)
        if full:
            encs = self.tokenizer.encode_batch_fast([texts[i] for i in full], add_special_tokens=False)
            for i, enc in zip(full, encs):
                counts[i] = len(enc)
            self.counted_full += len(full)
        return counts

    def _count_chunks(self, texts: list[str], counts: list[int]) -> list[int]:
        """CHUNKS: fills `counts` for the texts without an added token's content; returns the indices of
        the others. A text's chunks are its first chunk, then each following chunk without its leading
        space; cuts are before the spaces that follow a character of `cut_after`. When every space
        does (none at the start, after another space or after another character), that is a plain
        split, several times faster than the regex one. A chunk missing from the cache counts 0 and
        is recorded; the misses are counted in one batch of the real tokenizer (a first chunk alone, a
        following chunk k as n(ctx + " " + k) - n(ctx): its count after any cut) and added back."""
        inner, first = self._words, self._first
        if len(inner) > _CACHE_LIMIT:
            inner.clear()
        if len(first) > _FIRST_LIMIT:  # a text's start rarely repeats: a small cache
            first.clear()
        inner.missed.clear()
        first.missed.clear()
        get, unsafe, cut, islice = inner.__getitem__, self._unsafe_cut.search, self._cut.split, itertools.islice
        full, missed = [], []
        for i, text in enumerate(texts):
            if self._has_special(text):
                full.append(i)
                continue
            chunks = text.split(" ") if unsafe(text) is None else cut(text)
            m0, f0 = len(inner.missed), len(first.missed)
            counts[i] = first[chunks[0]] + sum(map(get, islice(chunks, 1, None)))
            if len(inner.missed) != m0 or len(first.missed) != f0:
                missed.append((i, m0, len(inner.missed), f0 != len(first.missed)))
        self.counted_pieces += len(texts) - len(full)
        if missed:
            todo, heads = list(set(inner.missed)), list(set(first.missed))
            ctx, base = self._ctx + " ", self._ctx_tokens
            encs = self.tokenizer.encode_batch_fast([ctx + k for k in todo] + heads, add_special_tokens=False)
            inner.update(zip(todo, (len(e) - base for e in encs[:len(todo)])))
            first.update(zip(heads, (len(e) for e in encs[len(todo):])))
            inner_missed, first_missed, f = inner.missed, first.missed, 0
            for i, m0, m1, head in missed:
                counts[i] += sum(map(get, inner_missed[m0:m1]))
                if head:
                    counts[i] += first[first_missed[f]]
                    f += 1
        return full

    def _has_special(self, text: str) -> bool:
        # grouped by first character: one substring test per group for the usual text (tekken has 1000)
        return any(c in text and any(s in text for s in group) for c, group in self._specials.items())

    def _split(self, text: str) -> list[str] | None:
        """The model's words of `text`, or None when the text must be counted in full."""
        norm = self.normalize(text)
        if norm is not text and self._has_special(norm):  # normalized added tokens match here
            return None
        if self._metaspace:
            if not norm:
                return []
            mark, prepend, split = self._metaspace
            norm = norm.replace(" ", mark)
            if prepend and not norm.startswith(mark):
                norm = mark + norm
            if split:
                return _METASPACE_WORDS.findall(norm)
        if self.shape.path == CUTS:
            return _CUT_WORDS.findall(norm)
        return [w for w, _ in self._pre.pre_tokenize_str(norm)]

    def _learn(self, by_words: list[tuple[int, list[str]]]) -> None:
        """Counts the words not in the cache yet, in one batch of the bare model."""
        cache = self._words
        missing = {w for _, words in by_words for w in words if w not in cache}
        if len(cache) + len(missing) > _CACHE_LIMIT:
            cache.clear()
            missing = {w for _, words in by_words for w in words}
        if missing:
            todo = list(missing)
            encs = self._model.encode_batch_fast(todo, add_special_tokens=False)
            cache.update(zip(todo, (len(e.ids) for e in encs)))


def length_verdict(n_tokens: int, min_tokens: int, max_tokens: int) -> str | None:
    """None when the document is kept, else the reason it is dropped."""
    if n_tokens > max_tokens:
        return "too_long"
    if n_tokens < min_tokens:
        return "too_short"
    return None
