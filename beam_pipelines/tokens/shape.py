"""What a tokenizer's structure allows, read once from its JSON: the way its texts are counted
(`TokenizerShape.path`), the bytes-per-token lower bound and the upper bound (the package docstring,
2. and 3., argues each), and what a driver proved of a tokenizer for its workers (`TokenizerProof`)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tokenizers import Tokenizer, pre_tokenizers

from beam_pipelines.tokens.space_cuts import space_cuts

MARK = "▁"
_STRADDLE = re.compile(f"[^{MARK}]{MARK}")
CHUNKS, PRETOKENS, CUTS, FULL = "chunks", "pretokens", "cuts", "full"


def utf8_bytes(text: str) -> int:
    """The UTF-8 length of `text` (an ASCII text's is its length: no encoding)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


@dataclass(frozen=True)
class TokenizerProof:
    """What the driver proved of a tokenizer (`prove`), handed to every worker step: the file it read
    (tokenizer_fingerprint), the structure's shape (the scan of the vocabulary and merges that picks
    the counting path: the costly part of building a counter, ~1 s for a 131K vocabulary) and the
    pre-tokenizer's JSON (what a counter needs of the spec besides the shape). A worker loads the
    tokenizer's file once per process, checks it is the proved one, and builds its counters on the
    proof without parsing the spec again."""

    source: str
    file: dict
    shape: "TokenizerShape"
    pre: dict | None

    @property
    def checkable(self) -> bool:
        """Whether a worker can check its copy against this proof: a file's content, not a hub id
        (whose revision the hub chooses at each download)."""
        return "checksum" in self.file


@dataclass(frozen=True)
class TokenizerShape:
    """What the tokenizer's structure allows: which way its texts are counted (`path`, one of
    PRETOKENS, CUTS, FULL, with `why` for FULL), the bytes-per-token lower bound and the upper bound
    (`upper`, with `upper_why` when there is none)."""

    path: str
    why: str
    max_token_bytes: int  # 0 when no lower bound is sound for this tokenizer
    special_contents: tuple[str, ...]
    cut_after: str = ""   # CHUNKS: the characters after which a raw text is cut before a space
    upper: "UpperBound | None" = None
    upper_why: str = ""


def tokenizer_shape(tok: Tokenizer, spec: dict | None = None) -> TokenizerShape:
    """The shape of `tok` (`spec`: its parsed JSON, when the caller has it already)."""
    spec = json.loads(tok.to_str()) if spec is None else spec
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    specials = tuple(a["content"] for a in spec.get("added_tokens", []))
    cuts = space_cuts(spec)
    path, why = (CHUNKS, "") if cuts.left else _counting_path(model, pre)
    upper, upper_why = _upper_bound(spec)
    return TokenizerShape(path=path, why=why, max_token_bytes=_max_token_bytes(spec), special_contents=specials,
                          cut_after=cuts.left, upper=upper, upper_why=upper_why)


def _counting_path(model: dict, pre) -> tuple[str, str]:
    kind = model.get("type")
    if kind == "BPE" and model.get("dropout"):
        return FULL, "BPE dropout is random"
    if pre is not None and not metaspace(pre, split=False):
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


def metaspace(pre, split: bool | None = None) -> tuple[str, bool, bool] | None:
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
    """B of the lower bound (the package docstring, 2.), or 0 when the bound is not sound."""
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


RAW, NON_ASCII, NORMALIZED = "raw", "non_ascii", "normalized"  # UpperBound.text: which text its bytes are taken of
_ASCII_STABLE = ("NFC", "NFD", "NFKC", "NFKD", "Lowercase")  # normalizers that map an ASCII text to itself or
                                                             # (Lowercase) to as many ASCII characters


@dataclass(frozen=True)
class UpperBound:
    """The upper bound of a tokenizer's counts (the package docstring, 3.):
    n(text) <= bytes(T) + extra, where T is the raw text (`text` RAW, or NON_ASCII and the text is
    ASCII) with `raw_extra`, else the normalized text with `norm_extra`, each "▁" of it counted 1 byte,
    not 3, when `mark_one`."""

    text: str
    raw_extra: int
    norm_extra: int
    mark_one: bool


def _upper_bound(spec: dict) -> tuple[UpperBound | None, str]:
    """The upper bound's terms for a tokenizer (the package docstring, 3., argues each), or (None, why
    not) when its structure is not one the argument covers."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    if model.get("type") != "BPE":
        return None, f"a {model.get('type')} model"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None, "BPE with a word-position prefix or suffix"
    vocab = model.get("vocab") or {}
    steps = _flatten(pre)
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    if byte_level and model.get("byte_fallback") and not all(c in vocab for c in pre_tokenizers.ByteLevel.alphabet()):
        return None, "byte-level BPE with byte fallback and a byte missing from the vocabulary"
    marks = False       # some step turns a character into "▁" or adds one
    pre_extra, first_only = 0, True
    for i, s in enumerate(steps):
        kind = s.get("type")
        if kind == "ByteLevel":
            if s.get("add_prefix_space"):
                if i:  # after a split, every piece gets its space
                    return None, "a ByteLevel pre-tokenizer that adds a prefix space after another step"
                pre_extra, first_only = pre_extra + 1, False
        elif kind == "Metaspace":
            if s.get("replacement") != MARK:
                return None, f"a Metaspace pre-tokenizer with replacement {s.get('replacement')!r}"
            scheme = s.get("prepend_scheme") or ("always" if s.get("add_prefix_space", True) else "never")
            marks = True
            if scheme == "always":
                if i:
                    return None, "a Metaspace pre-tokenizer that prepends to every piece after another step"
                pre_extra, first_only = pre_extra + 1, False
            elif scheme == "first":
                pre_extra += 1
        elif kind not in ("Split", "Digits", "Punctuation"):
            return None, f"a {kind} pre-tokenizer"
    if not first_only and any(a.get("normalized") for a in spec.get("added_tokens", [])):
        return None, "a pre-tokenizer that prepends to each piece and added tokens matched after normalization"
    text, norm_extra = RAW, 0
    for s in _flatten(spec.get("normalizer")):
        kind = s.get("type")
        if kind in _ASCII_STABLE:
            text = NON_ASCII
        elif kind == "Prepend" and s.get("prepend") == MARK:
            norm_extra, marks = norm_extra + 1, True
        elif kind == "Replace" and s.get("pattern") == {"String": " "} and s.get("content") == MARK:
            marks = True
        else:
            return None, f"a {kind} normalizer"
    mark_one = not byte_level and MARK in vocab
    if marks and not mark_one:
        return None, f"{MARK!r} is not one token (byte-level, or not in the vocabulary)"
    return UpperBound(text, norm_extra + pre_extra, pre_extra, mark_one), ""


def _flatten(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        out = []
        for child in node.get("pretokenizers") or node.get("normalizers") or []:
            out.extend(_flatten(child))
        return out
    return [node]


def split_and_words(tok: Tokenizer, spec: dict):
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


def trie_regex(words: list[str]) -> str:
    """A regex that finds any of `words` (non-empty) in a text: their trie as nested alternations, so
    that the engine scans for the first characters and walks one branch, whatever the number of words.
    A word that another one extends ends the branch (the text holds the shorter one either way)."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def alternation(node: dict) -> str:
        if "" in node:
            return ""
        alts = [re.escape(ch) + alternation(child) for ch, child in sorted(node.items())]
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return alternation(trie)


def llama2_normalizer(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer is in Llama-2's structure: normalizer Prepend("▁") then Replace(" ", "▁"),
    no pre-tokenizer, no added token holding "▁" (Python then normalizes exactly as it does)."""
    steps = json.loads(tokenizer.normalizer.__getstate__()) if tokenizer.normalizer is not None else None
    return (tokenizer.pre_tokenizer is None and steps == {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": MARK}, {"type": "Replace", "pattern": {"String": " "}, "content": MARK}]}
            and not any(MARK in a.content for a in tokenizer.get_added_tokens_decoder().values()))


def pieces_encoder(tokenizer: Tokenizer):
    """`encode_batch_fast` for texts that hold no added token's content (the chunk path's remainders and
    chunks). For Llama-2's structure (normalizer Prepend("▁") then Replace(" ", "▁"), no
    pre-tokenizer, no added token holding "▁") the normalization is done in Python and a copy of the
    tokenizer without a normalizer encodes: the same tokens (Prepend prepends to a non-empty text only,
    Replace maps every space), without the alignments the Rust normalizer keeps (~15% of the time)."""
    if not llama2_normalizer(tokenizer):
        return lambda texts: tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    bare = Tokenizer.from_str(tokenizer.to_str())
    bare.normalizer = None
    bare.no_truncation()
    bare.no_padding()
    return lambda texts: bare.encode_batch_fast([(MARK + t).replace(" ", MARK) if t else "" for t in texts],
                                                add_special_tokens=False)
