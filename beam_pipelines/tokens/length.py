"""Exact length decisions, with token counts, and the work cut where it provably is not needed.

`n_tokens` is the number of tokens of the text alone (no special tokens: no BOS, no EOS), exactly what
`tokenizer.encode(text, add_special_tokens=False)` gives. The length filter's decisions are always
those of counting every text. A count is exact wherever one is given; a text that an upper bound (3.)
proves kept is not counted at all unless prepare runs with --exact-counts (its `n_tokens` is then
null in the candidates, and balancing and statistics say what they use instead). The counting
shortcuts are all exact:

0. Counting by chunks of the raw text ("chunks", the first choice). `space_cuts.py` proves from the
   tokenizer's structure that cutting the raw text before a space that follows a printable ASCII
   character changes no count (its normalizer is local at such a space, no piece of its split regex
   and no vocabulary entry can hold the two characters, no lookahead crosses). Then n(text) = the
   first chunk's count + the cached counts of the following chunks, each chunk counted once by the
   real tokenizer in a fixed context: no normalization, split or model call per document, a plain
   `str.split(" ")` and a dictionary look-up per chunk. Proved for Llama-2's structure, byte-level
   BPE with a split regex (Llama-3, Qwen, tekken, GPT-2) and NFKC sentencepiece conversions.
   The chunks a text misses in the cache are counted in one input per text, its "remainder" (its
   missed chunks joined at cuts: never more characters than the text), except those missed often
   enough to be worth caching, counted alone (`TokenCounter._finish`). On text whose chunks rarely
   repeat (tables, code, identifiers) the look-ups are then mostly wasted: the counter measures both
   paths as it goes and tokenizes whole batches in full while that is cheaper, probing back from
   time to time (`CostSwitch`). Every path is exact; the choice moves only time.
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

3. An upper bound keeps texts that cannot exceed the limit without tokenizing them (`upper_bound`,
   `UpperBound`; `judge` uses it unless told to count every kept text). For a BPE model without a
   subword prefix or suffix, each character of a pre-tokenized word is one initial symbol when the
   vocabulary holds it, else, with byte fallback, one token per UTF-8 byte of it (all bytes in the
   vocabulary), else one unknown token (or none); merges only join symbols. So a word's count is at
   most the sum of w(c) over its characters, w(c) <= bytes(c), and w("▁") = 1 when "▁" is in the
   vocabulary. A byte-level pre-tokenizer maps each byte of its input to one character, so there
   w = 1 per byte of the normalized text (with byte fallback only when all 256 byte characters are in
   the vocabulary: else a missing one would fall back to its 2 UTF-8 bytes). Splits (Split, Digits,
   Punctuation, the split of Metaspace and ByteLevel) add no character, and whatever they remove only
   lowers the count. What adds: Metaspace's " " -> "▁" (1 byte for a token: free), its prepended "▁"
   (+1, once per text: "always" only as the first step, else it would prepend to every piece), and
   ByteLevel's prefix space (+1, likewise only as the first step). An added token's content in the text
   is one token, but it cuts the text into pieces that are normalized and pre-tokenized apart (each
   with its own prepend), so a text holding one (`_has_special`, raw) gets no bound and is counted;
   tokens matched after normalization do not restart normalization, and are allowed unless a
   pre-tokenizer prepends to every piece. Hence, per structure:

   - byte-level BPE (Llama-3, Qwen, tekken, GPT-2): n <= bytes(normalize(text)) (+1 with a prefix space);
   - sentencepiece BPE with byte fallback in Llama-2's structure (Prepend("▁") + Replace(" ", "▁"), no
     pre-tokenizer): n <= bytes(text) + 1: the prepended "▁" is one token, each space becomes a "▁" of
     one token, every other character is at most its bytes; the normalized text's own bytes are no
     bound here (a space becomes 3 bytes);
   - Metaspace conversions: the same, + 1 for a prepending scheme.

   The normalized text is never computed when the normalizer leaves the text's bytes as they are or
   the bound covers its change: none; Prepend("▁") (+1) and Replace(" ", "▁") (free: the "▁" is one
   token); NFC, NFD, NFKC, NFKD and Lowercase on an ASCII text (each maps it to itself, Lowercase to
   as many ASCII characters). Otherwise (such a normalizer and a non-ASCII text) the bound is taken of
   the normalized text, whose bytes may exceed the original's (NFC of U+0958 is 6 bytes for 3, NFKC
   of U+FDFA 33 for 3), each "▁" of it counted once. Any other normalizer, pre-tokenizer or model
   (Unigram, WordPiece, a Precompiled sentencepiece normalizer, a Replace of anything else) has no
   upper bound (`TokenizerShape.upper_why` says why): its texts are counted. The bound is sound
   whatever the tokenizer's merges; tests/test_length.py checks it against full tokenization with
   the real vocabularies on emoji, CJK, combining marks, runs of spaces, control characters and "▁".

4. A long text is counted a prefix first (`cut_past`, CHUNKS only): at a proved cut i (a space after
   a character of `cut_after`), n(text) = n(text[:i]) + the counts of the following chunks after a cut
   (0.), each the number of tokens of that chunk in context, never negative; so n(text[:i]) > limit
   proves the text too long without counting the rest. When it does not (a text sparser in tokens
   than the prefix was sized for), the rest is counted from the cut, n(ctx + text[i:]) - n(ctx) (as a
   remainder is: `_finish`), and the two add up to n(text): no work is lost. `judge` cuts a text of
   more than 4.5 characters a token of the limit; one that holds an added token's content is counted
   whole, as on the chunk path.

Any other tokenizer (BPE with dropout, or one word per text that no cut rule splits) is counted in full
with `encode_batch_fast`, exact by definition. tests/test_length.py proves each path against full
tokenization on texts built to break it, with converted real vocabularies (benchmarks/real_tokenizers.py).
"""
from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

from tokenizers import Tokenizer, pre_tokenizers

from beam_pipelines.tokens.space_cuts import space_cuts
from schemas.errors import UserError

_CACHE_LIMIT = 300_000  # words or chunks (~50 MB); words: cleared when full, chunks: the oldest dropped
_FIRST_LIMIT = 20_000   # first chunks of texts
_SEEN_LIMIT = 200_000   # chunks missed but not cached yet (`_admit`); cleared when full
_ADMIT_CHARS = 48       # a missed chunk is cached once its misses add up to this many characters
# The switch between the chunk path and full tokenization (`CostSwitch`): every path is exact, so these
# only move costs.
_PRIOR_RATIO = 0.5      # chunk-path seconds / full-tokenization seconds assumed before any measurement
_SWITCH_AT = 0.9        # the ratio above which full tokenization is chosen (a margin for the ~10% by which
                        # a few texts' full cost, measured amid the chunk work, misjudges whole batches')
_ALPHA = 0.5            # weight of a new measurement in the moving averages
_PROBE_FIRST = 4        # full-tokenized batches before the chunk path is tried again...
_PROBE_MAX = 16         # ...doubled after each probe that finds it still dearer, up to this
_CALIBRATE_EVERY = 4    # chunk batches between two measurements of the full-tokenization cost...
_CALIBRATE_SHARE = 16   # ...for which one text in this many of the batch is tokenized in full
_SNIFF_SHARE = 64       # in full mode, one text in this many is looked up (no more) for its hit rate...
_SNIFF_MARGIN = 0.25    # ...and a probe is brought forward when it beats the last chunk batch's by this
_PREFIX_CHARS = 4.5      # characters a token that judge's prefix of a long text is sized by: English web text
                        # has ~4, technical text ~3.3 (Llama-2); a sparser text's rest is counted after it
MARK = "▁"
# Llama-2-structure words: a run of "▁" and the characters up to the next "▁" (or a trailing run).
_CUT_WORDS = re.compile(f"{MARK}*[^{MARK}]+|{MARK}+")
_STRADDLE = re.compile(f"[^{MARK}]{MARK}")
# Metaspace(split=True) words: each "▁" starts one (MergedWithNext), and a leading text without one.
_METASPACE_WORDS = re.compile(f"{MARK}[^{MARK}]*|[^{MARK}]+")
CHUNKS, PRETOKENS, CUTS, FULL = "chunks", "pretokens", "cuts", "full"
PROBE = "probe"  # a CostSwitch plan: one batch by chunks while full tokenization is the choice


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


def utf8_bytes(text: str) -> int:
    """The UTF-8 length of `text` (an ASCII text's is its length: no encoding)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class TokenizerChanged(UserError):
    """The tokenizer's file a worker loads is not the one the driver proved."""


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


def prove(path_or_id: str) -> TokenizerProof:
    """Loads the tokenizer and proves its shape, in the driver of prepare and assemble: a bad
    --tokenizer is one clear error there (a UserError), not a worker traceback. The process's shared
    copy is this one, so the driver's own counters reuse it."""
    try:
        return shared_tokenizer(path_or_id).proof
    except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise UserError(f"--tokenizer {path_or_id!r}: cannot load it as a Hugging Face tokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


_LOCK = threading.Lock()
_LOADED: dict[str, "SharedTokenizer"] = {}  # per process: source -> its loaded copy and proof
_THREAD = threading.local()                 # per thread: {id of a SharedTokenizer: (it, its TokenCounter)}


@dataclass(frozen=True, eq=False)
class SharedTokenizer:
    """A process's one loaded copy of a tokenizer with its proof (Beam's shared-model pattern). Steps
    get it in `setup` and ask for `counter()` per bundle or per call, never keeping a counter: a
    DoFn set up in one thread may run its later bundles in another, and a counter's caches and totals
    belong to one thread."""

    tokenizer: Tokenizer
    proof: TokenizerProof

    def counter(self) -> "TokenCounter":
        """The calling thread's TokenCounter on this tokenizer (built on the proof: no spec parsed and
        no shape proved again), shared by every step the thread runs, its chunk cache warm across them."""
        counters = getattr(_THREAD, "counters", None)
        if counters is None:
            counters = _THREAD.counters = {}
        hit = counters.get(id(self))
        if hit is None or hit[0] is not self:
            hit = counters[id(self)] = (self, TokenCounter(self.tokenizer, proof=self.proof))
        return hit[1]


def shared_tokenizer(path_or_id: str, proof: TokenizerProof | None = None) -> SharedTokenizer:
    """The process's copy of a tokenizer, loaded once (under a lock) and proved once: by the driver
    when it passes its `proof` (checked against the file: a file replaced in place after the driver
    read it is TokenizerChanged), else here. The file is fingerprinted at each call (a step's setup:
    ~5 ms for a 17 MB tokenizer.json), so a file replaced in place is loaded again, never served
    stale, and fingerprinted again after loading, so a file replaced while it loads is not taken for
    the one fingerprinted before. Truncation and padding are switched off once, here: the copy is
    shared by threads, which only encode with it. A hub id has no content to check (the hub picks
    the revision): each process proves the copy it downloaded, once."""
    file = tokenizer_fingerprint(path_or_id)
    if proof is not None and proof.checkable and proof.file != file:
        raise TokenizerChanged(f"{path_or_id}: the tokenizer's file changed after the driver loaded it "
                               f"({proof.file['checksum']} then {file.get('checksum')}); run again")
    with _LOCK:
        hit = _LOADED.get(path_or_id)
        if hit is None or hit.proof.file != file:
            tok = load_tokenizer(path_or_id)
            if tokenizer_fingerprint(path_or_id) != file:
                raise TokenizerChanged(f"{path_or_id}: the tokenizer's file changed while it was loaded; run again")
            # a tokenizer.json saved with truncation or padding on would cap or pad every count
            tok.no_truncation()
            tok.no_padding()
            if proof is None or not proof.checkable:
                spec = json.loads(tok.to_str())
                proof = TokenizerProof(path_or_id, file, tokenizer_shape(tok, spec), spec.get("pre_tokenizer"))
            hit = _LOADED[path_or_id] = SharedTokenizer(tok, proof)
        return hit


def shared_counter(path_or_id: str, proof: TokenizerProof | None = None) -> "TokenCounter":
    """The calling thread's counter on the process's copy of a tokenizer (shared_tokenizer): for a
    caller that counts in one thread (`bft plan`); a Beam step takes the SharedTokenizer in setup and
    asks it for the counter in each bundle."""
    return shared_tokenizer(path_or_id, proof).counter()


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


RAW, NON_ASCII, NORMALIZED = "raw", "non_ascii", "normalized"  # UpperBound.text: which text its bytes are taken of
_ASCII_STABLE = ("NFC", "NFD", "NFKC", "NFKD", "Lowercase")  # normalizers that map an ASCII text to itself or
                                                             # (Lowercase) to as many ASCII characters


@dataclass(frozen=True)
class UpperBound:
    """The upper bound of a tokenizer's counts (see the module docstring, 3.):
    n(text) <= bytes(T) + extra, where T is the raw text (`text` RAW, or NON_ASCII and the text is
    ASCII) with `raw_extra`, else the normalized text with `norm_extra`, each "▁" of it counted 1 byte,
    not 3, when `mark_one`."""

    text: str
    raw_extra: int
    norm_extra: int
    mark_one: bool


def _upper_bound(spec: dict) -> tuple[UpperBound | None, str]:
    """The upper bound's terms for a tokenizer (the module docstring, 3., argues each), or (None, why
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


class CostSwitch:
    """Chooses, batch by batch, between counting by chunks and tokenizing in full, from measured costs.
    Every path is exact: the choice moves time only, never a count.

    Two costs are smoothed (exponential moving averages, weight `_ALPHA` for a new measurement):
    `full_cost`, seconds per character of `encode_batch_fast` on whole texts (measured on every text
    tokenized in full: texts with an added token's content, batches in full mode, and, in chunk mode,
    one text in `_CALIBRATE_SHARE` of some batches), and `ratio`, the seconds the
    chunk path took for a batch (split, look-ups, the misses' encoding) over what tokenizing the same
    characters in full would have cost at `full_cost`. Before any measurement the chunk path is assumed
    twice as cheap (`_PRIOR_RATIO`), so that a counter starts by chunks and fills its cache.

    Chunk mode: when `ratio` rises above `_SWITCH_AT` (0.9: ties go to full tokenization) the counter
    switches to full mode, where it skips the look-up pass altogether. Full mode: after `gap` batches
    one batch is a probe, counted by chunks again (its misses fill the cache as usual); the counter
    returns to chunks when the probe's own ratio is below `_SWITCH_AT`, else `gap` doubles (from
    `_PROBE_FIRST` to `_PROBE_MAX` batches), so that probes cost little where the text stays hard and
    the cheap path comes back where it turns repetitive. A probe costs at most its look-ups more than
    full tokenization (see `TokenCounter._finish`), ~10-20% of one batch in `gap`.

    In full mode a few texts of each batch are looked up, no more (`_SNIFF_SHARE`): when their hit
    rate beats that of the last batch counted by chunks by `_SNIFF_MARGIN`, the text has turned back
    to a shape the cache knows, and the next batch is a probe (`sniffed`).

    The full cost of a few texts is measured every `_CALIBRATE_EVERY` chunk batches, 4 times less
    often while chunks cost under half (see `calibrating`), and in the next batch when a batch's ratio
    exceeds its average by half or more: the text changed, and its full cost per character (for
    llama2 1.7 times as high on prose as on logs) may have changed too, hiding the change; that
    measurement then replaces the average."""

    def __init__(self):
        self.full_cost: float | None = None  # seconds per character of full tokenization
        self.ratio = _PRIOR_RATIO            # chunk-path seconds / full-tokenization seconds
        self.mode = CHUNKS
        self.gap = _PROBE_FIRST  # full batches between probes
        self.wait = 0            # full batches left before the next probe
        self.since_full = _CALIBRATE_EVERY - 1  # chunk batches since the full cost was last measured
        self.hit_rate = 0.0      # of the last batch counted by chunks
        self.remeasure = False   # the next full cost measured replaces the average (the text changed)
        self.probes = 0
        self.early_probes = 0    # of which brought forward by `sniffed`
        self.switches_to_full = 0
        self.switches_to_chunks = 0

    def plan(self) -> str:
        """CHUNKS, FULL, or PROBE (one batch by chunks in full mode)."""
        if self.mode == CHUNKS:
            return CHUNKS
        return PROBE if self.wait <= 0 else FULL

    def calibrating(self) -> bool:
        """Whether this chunk batch should tokenize a few texts in full to measure that cost: every
        `_CALIBRATE_EVERY` batches, 4 times less often while chunks cost under half of it (the full cost
        would have to be misjudged twice over to change the choice)."""
        every = _CALIBRATE_EVERY if self.full_cost is None or self.ratio > 0.5 else 4 * _CALIBRATE_EVERY
        return self.mode == CHUNKS and self.since_full >= every

    def full_measured(self, chars: int, seconds: float) -> None:
        if chars:
            c = seconds / chars
            fresh = self.full_cost is None or self.remeasure
            self.full_cost = c if fresh else self.full_cost + _ALPHA * (c - self.full_cost)
            self.since_full, self.remeasure = 0, False

    def full_batch_done(self) -> None:
        self.wait -= 1

    def sniffed(self, hit_rate: float) -> None:
        """The hit rate of a few texts of a batch tokenized in full: a probe next when it is high."""
        if self.wait > 0 and hit_rate > self.hit_rate + _SNIFF_MARGIN:
            self.wait = 0
            self.early_probes += 1

    def chunks_measured(self, chars: int, seconds: float, probe: bool, hit_rate: float) -> None:
        self.since_full += 1
        self.hit_rate = hit_rate
        if probe:
            self.probes += 1
        if not chars or self.full_cost is None:
            if probe:  # nothing to judge by (no measured full cost or an empty batch): probe later
                self.wait = self.gap
            return
        r = seconds / max(self.full_cost * chars, 1e-12)
        if probe:
            if r < _SWITCH_AT:
                self.mode, self.ratio, self.gap = CHUNKS, r, _PROBE_FIRST
                self.switches_to_chunks += 1
            else:
                self.gap = min(2 * self.gap, _PROBE_MAX)
                self.wait = self.gap
            return
        if r > 1.5 * self.ratio:  # the text changed: its full cost may have too
            self.since_full, self.remeasure = 4 * _CALIBRATE_EVERY, True
        self.ratio += _ALPHA * (r - self.ratio)
        if self.ratio > _SWITCH_AT:
            self.mode, self.wait = FULL, self.gap
            self.switches_to_full += 1


class TokenCounter:
    """Exact `n_tokens` for texts; see the module docstring for why each path is exact.

    `clock` times the paths for the CHUNKS switch (`CostSwitch`): by default the thread's CPU time
    (time.thread_time), which other threads and processes on the machine do not inflate, and which is
    the whole cost here since the tokenizer runs in the calling thread (TOKENIZERS_PARALLELISM=false, as
    the pipelines set it); a test passes a fake one. The attributes of `TOTALS` count what was done, for
    a step's tallies and the benchmarks."""

    TOTALS = ("counted_full", "counted_pieces", "rejected_by_bound", "kept_by_bound", "rejected_by_prefix", "full_by_switch", "full_to_calibrate",
              "chunk_lookups", "chunk_misses", "chunks_encoded", "remainder_texts", "remainder_chars",
              "chars_full", "chars_chunks", "seconds_full", "seconds_chunks", "probes", "early_probes",
              "switches_to_full", "switches_to_chunks")

    def __init__(self, tokenizer: Tokenizer, clock=time.thread_time, proof: TokenizerProof | None = None):
        """`proof`: the tokenizer's shape proved already (shared_counter), else proved here."""
        # a tokenizer.json saved with truncation or padding on would cap or pad every count (changed
        # only when set: a tokenizer shared by threads is never written to while another encodes)
        if tokenizer.truncation is not None:
            tokenizer.no_truncation()
        if tokenizer.padding is not None:
            tokenizer.no_padding()
        self.tokenizer = tokenizer
        self._clock = clock
        if proof is None:
            spec = json.loads(tokenizer.to_str())
            self.shape = tokenizer_shape(tokenizer, spec)
        else:
            spec, self.shape = {"pre_tokenizer": proof.pre}, proof.shape
        self._normalizer = tokenizer.normalizer
        self._pre, self._model = _split_and_words(tokenizer, spec)
        self._metaspace = _metaspace(spec.get("pre_tokenizer"))
        self._words: dict[str, int] = {}
        # one search for any added token's content: a regex of their trie (tekken has 1000, 984 of them
        # "<SPECIAL_n>": one substring test each cost ~0.5 ms for every text with a "<"), run only on
        # the texts that hold one of their first characters (an `in` test, much faster than the regex)
        specials = [s for s in self.shape.special_contents if s]
        self._special = re.compile(_trie_regex(specials)).search if specials else None
        self._special_firsts = tuple(sorted({s[0] for s in specials}))
        self.counted_full = 0       # texts tokenized in full
        self.counted_pieces = 0     # texts counted from cached words or chunks
        self.rejected_by_bound = 0  # texts proved too long without tokenizing
        self.kept_by_bound = 0      # texts proved to fit without tokenizing (`judge`, exact=False)
        self.rejected_by_prefix = 0  # texts proved too long by the count of a prefix (`judge`)
        self.full_by_switch = 0     # CHUNKS texts tokenized in full because that was cheaper (CostSwitch)
        self.full_to_calibrate = 0  # CHUNKS texts tokenized in full to measure that cost
        self.chunk_lookups = 0      # chunks looked up in the caches
        self.chunk_misses = 0       # of which missed
        self.chunks_encoded = 0     # missed chunks encoded alone, into the caches
        self.remainder_texts = 0    # texts whose other missed chunks were encoded together, in one input
        self.remainder_chars = 0    # characters of those inputs
        self.chars_full = self.chars_chunks = 0          # characters of the texts counted each way
        self.seconds_full = self.seconds_chunks = 0.0    # and the time they took (by `clock`)
        self.switch = CostSwitch()
        self._chunk_batch: tuple | None = None  # (chars, seconds, probe, hit rate) of the last chunk pass
        if self.shape.path == CHUNKS:
            # the space first, then a look back at it and the character before it: the regex engine
            # then finds candidates by its literal-prefix scan (twice as fast as a lookbehind first)
            left = "[" + re.escape(self.shape.cut_after) + "]"
            self._unsafe_cut = re.compile(f" (?<!{left} )")  # a space no cut may precede
            self._cut = re.compile(f" (?<={left} )")
            self._ctx = self.shape.cut_after[0] if "a" not in self.shape.cut_after else "a"
            self._ctx_tokens = len(tokenizer.encode(self._ctx, add_special_tokens=False).ids)
            self._words, self._first = _Counts(), _Counts()  # following chunk / first chunk -> count
            self._seen: dict[str, int] = {}        # following chunk missed, not cached yet -> times missed
            self._seen_first: dict[str, int] = {}  # first chunks likewise

    @property
    def probes(self) -> int:
        return self.switch.probes

    @property
    def early_probes(self) -> int:
        return self.switch.early_probes

    @property
    def switches_to_full(self) -> int:
        return self.switch.switches_to_full

    @property
    def switches_to_chunks(self) -> int:
        return self.switch.switches_to_chunks

    @property
    def hit_rate(self) -> float:
        """The share of chunk look-ups found in the caches."""
        return 1 - self.chunk_misses / self.chunk_lookups if self.chunk_lookups else 0.0

    def totals(self) -> dict:
        """Every counter of `TOTALS` (a step diffs two of these around its `count` call)."""
        return {name: getattr(self, name) for name in self.TOTALS}

    def normalize(self, text: str) -> str:
        return self._normalizer.normalize_str(text) if self._normalizer is not None else text

    def lower_bound(self, text: str) -> int:
        """A number of tokens the text is sure to reach (0 when no bound is sound)."""
        b = self.shape.max_token_bytes
        return math.ceil(len(self.normalize(text).encode("utf-8")) / b) if b else 0

    def upper_bound(self, text: str) -> int | None:
        """A number of tokens the text cannot exceed (the module docstring, 3.), or None when none is
        proved: the tokenizer's structure has no upper bound, or the text holds an added token's
        content."""
        ub = self.shape.upper
        if ub is None or self._has_special(text):
            return None
        if ub.text == RAW or (ub.text == NON_ASCII and text.isascii()):
            return utf8_bytes(text) + ub.raw_extra
        norm = self.normalize(text)
        marks = 2 * norm.count(MARK) if ub.mark_one else 0  # "▁" is 3 bytes and one token
        return utf8_bytes(norm) - marks + ub.norm_extra

    def bound_fits(self, text: str, min_tokens: int, max_tokens: int) -> int:
        """The upper bound when it proves the text kept (<= max_tokens, and the lower bound >=
        min_tokens), else 0. Texts of more than max_tokens characters are not tried: their raw bound
        cannot fit (a character is a byte or more), and a normalized one would have to shrink below its
        character count, which is rare, while normalizing costs."""
        ub = self.shape.upper
        if ub is None or len(text) > max_tokens:
            return 0
        bound = self.upper_bound(text)
        if bound is None or bound > max_tokens or (min_tokens > 0 and self.lower_bound(text) < min_tokens):
            return 0
        return bound  # 0 for an empty text: counted, as "not proved"

    def cut_past(self, text: str, limit: int) -> int:
        """The index of the first proved cut (CHUNKS: a space after a character of `cut_after`) at or
        after _PREFIX_CHARS x (limit + 1) characters of `text`, or 0 (none, another path, or a text
        that holds an added token's content): judge counts text[:cut] first (the module docstring, 4.)."""
        start = int(_PREFIX_CHARS * (limit + 1))
        if self.shape.path != CHUNKS or len(text) <= start or self._has_special(text):
            return 0
        cut = self._cut.search(text, start)
        return cut.start() if cut else 0

    def count_from_cuts(self, tails: list[str]) -> list[int]:
        """n(text) - n(text[:i]) for texts cut at a proved cut i (`cut_past`), given their text[i:]:
        n(ctx + text[i:]) - n(ctx), as the chunk path counts a remainder (`_finish`)."""
        return [n - self._ctx_tokens for n in self.count([self._ctx + t for t in tails])]

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
        self._chunk_batch = None
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
            batch = [texts[i] for i in full]
            chars = sum(map(len, batch))
            t0 = self._clock()
            encs = self.tokenizer.encode_batch_fast(batch, add_special_tokens=False)
            for i, enc in zip(full, encs):
                counts[i] = len(enc)
            self.counted_full += len(full)
            self.chars_full += chars
            seconds = self._clock() - t0
            self.seconds_full += seconds
            self.switch.full_measured(chars, seconds)
        if self._chunk_batch is not None:  # judged after the full cost of this call is known
            self.switch.chunks_measured(*self._chunk_batch)
        return counts

    def _count_chunks(self, texts: list[str], counts: list[int]) -> list[int]:
        """CHUNKS: fills `counts` for the texts it counts by chunks; returns the indices of the others,
        to be tokenized in full: those with an added token's content, and those the switch sends there
        (all of them in full mode; a few to measure that cost otherwise).

        A text's chunks are its first chunk, then each following chunk without its leading space; cuts
        are before the spaces that follow a character of `cut_after`. When every space does (none at
        the start, after another space or after another character), that is a plain split, several
        times faster than the regex one. A chunk missing from the cache counts 0 and is recorded. Then
        (`_finish`) the missed chunks that are worth caching are counted alone, and each text's other
        missed chunks together, in one batch of the real tokenizer."""
        switch = self.switch
        plan = switch.plan()
        if plan == FULL:  # no look-up, no test for added tokens: full tokenization handles them
            switch.full_batch_done()
            self.full_by_switch += len(texts)
            if texts:
                switch.sniffed(self._sniff(texts[::_SNIFF_SHARE]))
            return list(range(len(texts)))
        full, todo = [], []
        for i, text in enumerate(texts):
            (full if self._has_special(text) else todo).append(i)
        if switch.calibrating() and todo:
            sample = todo[::_CALIBRATE_SHARE]
            del todo[::_CALIBRATE_SHARE]
            self.full_to_calibrate += len(sample)
            full += sample
        chars = sum(len(texts[i]) for i in todo)
        t0 = self._clock()
        inner, first = self._words, self._first
        _trim(inner, _CACHE_LIMIT)
        _trim(first, _FIRST_LIMIT)  # a text's start rarely repeats: a small cache
        inner.missed.clear()
        first.missed.clear()
        get, unsafe, cut, islice = inner.__getitem__, self._unsafe_cut.search, self._cut.split, itertools.islice
        missed, lookups = [], 0
        for i in todo:
            text = texts[i]
            chunks = text.split(" ") if unsafe(text) is None else cut(text)
            lookups += len(chunks)
            m0, f0 = len(inner.missed), len(first.missed)
            counts[i] = first[chunks[0]] + sum(map(get, islice(chunks, 1, None)))
            if len(inner.missed) != m0 or len(first.missed) != f0:
                missed.append((i, m0, len(inner.missed), f0 != len(first.missed)))
        if missed:
            self._finish(missed, counts)
        self.chunk_lookups += lookups
        self.chunk_misses += len(inner.missed) + len(first.missed)
        self.counted_pieces += len(todo)
        self.chars_chunks += chars
        seconds = self._clock() - t0
        self.seconds_chunks += seconds
        misses = len(inner.missed) + len(first.missed)
        self._chunk_batch = (chars, seconds, plan == PROBE, 1 - misses / lookups if lookups else 0.0)
        return full

    def _sniff(self, texts: list[str]) -> float:
        """The share of the chunks of `texts` in the caches (an estimate: nothing is counted, nothing
        recorded)."""
        inner, first, islice = self._words, self._first, itertools.islice
        unsafe, cut, hits, lookups = self._unsafe_cut.search, self._cut.split, 0, 0
        for text in texts:
            chunks = text.split(" ") if unsafe(text) is None else cut(text)
            lookups += len(chunks)
            hits += (chunks[0] in first) + sum(map(inner.__contains__, islice(chunks, 1, None)))
        return hits / lookups if lookups else 0.0

    def _finish(self, missed: list[tuple[int, int, int, bool]], counts: list[int]) -> None:
        """Counts the missed chunks of `missed` ((text index, its slice of the missed following chunks,
        whether its first chunk was missed)) in one batch of the real tokenizer, and adds them to
        `counts`.

        A missed chunk that `_admit` finds worth caching (missed often enough for its length) is encoded
        alone and cached: a first chunk as it is, a following chunk k as n(ctx + " " + k) - n(ctx), its
        count after any cut. The others (numbers, names, URLs: most never come back) are not, and each
        text's such chunks are counted together in one input, its "remainder"
        R = x + " " + k1 + " " + k2 ... + " " + km, the ki in text order, x the text's first chunk when
        that one is among them, else ctx. Every ki but the last is followed by a cut in the text, so it
        ends with a character of `cut_after`, and so does x (ctx is one; a first chunk followed by
        others is); R's spaces after x..k(m-1) are then cuts, and n(R) = n(x) + the sum of the ki's
        counts after a cut, exactly as the text's own chunks add up (the text's last chunk, the only one
        that may end otherwise or be empty, stays last). So, after its look-ups, a text with misses
        costs the encoding of fewer characters than it has, in one input: never more than tokenizing
        it whole, whatever its miss rate; that is why no text is sent to full tokenization after its
        look-ups (the per-text choice is this one: cache a chunk or leave it in the remainder)."""
        inner, first = self._words, self._first
        inner_missed, first_missed = inner.missed, first.missed
        admit, admit_first = _admit(inner_missed, self._seen), _admit(first_missed, self._seen_first)
        ctx, base = self._ctx + " ", self._ctx_tokens
        rests, f = [], 0
        for i, m0, m1, head_missed in missed:
            rest = [k for k in inner_missed[m0:m1] if k not in admit]
            head = None
            if head_missed:
                head = first_missed[f]
                f += 1
                if head in admit_first:
                    head = None
            if head is not None:
                rests.append((i, head + " " + " ".join(rest) if rest else head, 0))
            elif rest:
                rests.append((i, ctx + " ".join(rest), base))
        alone, heads = list(admit), list(admit_first)
        encs = self.tokenizer.encode_batch_fast([ctx + k for k in alone] + heads + [r for _, r, _ in rests],
                                                add_special_tokens=False)
        inner.update(zip(alone, (len(e) - base for e in encs[:len(alone)])))
        first.update(zip(heads, (len(e) for e in encs[len(alone):len(alone) + len(heads)])))
        for (i, _, b), e in zip(rests, encs[len(alone) + len(heads):]):
            counts[i] += len(e) - b
        self.chunks_encoded += len(alone) + len(heads)
        self.remainder_texts += len(rests)
        self.remainder_chars += sum(len(r) for _, r, _ in rests)
        if alone or heads:  # the admitted chunks' counts (a chunk not admitted is not in the cache)
            get, get_first, zeros, f = inner.get, first.get, itertools.repeat(0), 0
            for i, m0, m1, head_missed in missed:
                counts[i] += sum(map(get, inner_missed[m0:m1], zeros))
                if head_missed:
                    counts[i] += get_first(first_missed[f], 0)
                    f += 1

    def _has_special(self, text: str) -> bool:
        return any(c in text for c in self._special_firsts) and self._special(text) is not None

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


def _admit(missed, seen: dict) -> set[str]:
    """The missed chunks worth caching. Encoding a chunk alone (one input of `encode_batch_fast`) has
    a fixed cost of ~15-20 us, what tokenizing 50-70 characters costs (measured on the llama2 and
    tekken structures), while a chunk left in its text's remainder costs only its characters, each time
    it is missed. So, as in ski rental, a chunk is bought (cached) once the characters paid for it in
    remainders reach `_ADMIT_CHARS`: the times it was missed (in earlier batches, recorded in `seen`,
    cleared at _SEEN_LIMIT, and in this one) times its length with its space. A frequent word is cached
    in its first batch, a number or a name never. 48 measured best on real documentation (32 to 96
    within 5%; 16 costs 20% more), synthetic prose prefers 16 to 32 (5% less than 48)."""
    if len(seen) > _SEEN_LIMIT:
        seen.clear()
    admit, get = set(), seen.get
    for k, n in collections.Counter(missed).items():
        n += get(k, 0)
        if n * (len(k) + 1) >= _ADMIT_CHARS:
            admit.add(k)
        else:
            seen[k] = n
    return admit


def _trim(cache: dict, limit: int) -> None:
    """Brings a chunk cache over `limit` down to half of it, dropping the oldest entries (a dict keeps
    insertion order): the chunks cached last are the ones the text in hand needs."""
    if len(cache) > limit:
        for key in list(itertools.islice(cache, len(cache) - limit // 2)):
            del cache[key]


def _trie_regex(words: list[str]) -> str:
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


class Judgment(NamedTuple):
    """What the length filter decided of one text: its exact token count (None when a bound decided
    without counting: the bytes bound proved it too long, or the upper bound proved it kept), the
    reason it is dropped (None: kept), and why, in words."""

    n_tokens: int | None
    verdict: str | None
    detail: str


def judge(counter: "TokenCounter", texts: list[str], min_tokens: int, max_tokens: int,
          exact: bool = False) -> list[Judgment]:
    """The length filter on a batch, in one call: texts the upper bound proves kept are kept uncounted
    (`kept_by_bound`; never with `exact`, which counts every kept text), texts the bytes bound proves
    too long are dropped uncounted (`rejected_by_bound`); a long text's prefix at a proved cut is
    counted first, and the text dropped when that is over the limit (`rejected_by_prefix`), else its
    rest counted from the cut; the others are counted exactly. Three `count` calls at most; the
    decisions are those of counting every text."""
    out: list[Judgment | None] = [None] * len(texts)
    todo: list[int] = []
    heads: list[tuple[int, int]] = []
    for i, text in enumerate(texts):
        fits = 0 if exact else counter.bound_fits(text, min_tokens, max_tokens)
        too_long = 0 if fits else counter.bound_exceeds(text, max_tokens)
        if fits:
            counter.kept_by_bound += 1
            out[i] = Judgment(None, None, f"<= {fits} tokens (upper bound), allowed {min_tokens}..{max_tokens}")
        elif too_long:
            counter.rejected_by_bound += 1
            out[i] = Judgment(None, "too_long", f">= {too_long} tokens (bytes bound) > {max_tokens}")
        else:
            cut = counter.cut_past(text, max_tokens)
            if cut:
                heads.append((i, cut))
            else:
                todo.append(i)
    counted: list[tuple[int, int]] = []   # (text, its count) of the cut texts whose prefix did not decide
    rests: list[tuple[int, int, int]] = []  # (text, cut, the prefix's count)
    for (i, cut), n in zip(heads, counter.count([texts[i][:cut] for i, cut in heads]) if heads else []):
        if n > max_tokens:
            counter.rejected_by_prefix += 1
            out[i] = Judgment(None, "too_long", f">= {n} tokens (its first {cut} characters) > {max_tokens}")
        else:  # sparser in tokens than the prefix was sized for: its rest, counted from the cut, adds up
            rests.append((i, cut, n))
    if rests:
        for (i, _, n), rest in zip(rests, counter.count_from_cuts([texts[i][cut:] for i, cut, _ in rests])):
            counted.append((i, n + rest))
    for i, n in counted + list(zip(todo, counter.count([texts[i] for i in todo]) if todo else [])):
        out[i] = Judgment(n, length_verdict(n, min_tokens, max_tokens), f"{n} tokens, allowed {min_tokens}..{max_tokens}")
    return out


def length_verdict(n_tokens: int, min_tokens: int, max_tokens: int) -> str | None:
    """None when the document is kept, else the reason it is dropped."""
    if n_tokens > max_tokens:
        return "too_long"
    if n_tokens < min_tokens:
        return "too_short"
    return None
