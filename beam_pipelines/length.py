"""Exact token counts for the length filter, with the work cut where it provably is not needed.

`n_tokens` is the number of tokens of the text alone (no special tokens), exactly what
`tokenizer.encode(text, add_special_tokens=False)` gives. Every kept document needs its exact count
(the candidate schema carries it and the shard balancer uses it), so the savings come from two
places, both exact:

1. Piecewise counting (memoized). For a BPE model without normalizer whose pre-tokenizer is
   `Metaspace(split=True)` (sentencepiece's split-by-whitespace; our benchmark tokenizer and many
   sentencepiece conversions), the pre-tokenizer cuts the text before every space and the model
   encodes each piece on its own. Cutting the text at each " " therefore gives
   n(text) = n(seg_0) + sum_i n(" " + seg_i): a piece " seg" starts with the replacement character,
   so no prefix is prepended to it alone, exactly as inside the text. Counts of segments are
   cached, so a document costs a few dictionary look-ups per word instead of a BPE pass.
   Texts that contain an added (special) token's content are counted in full.
2. A lower bound rejects texts that cannot fit without tokenizing them: every token of a BPE model
   with byte fallback (or a byte-level one) covers at most B bytes of the text, B being the longest
   vocabulary entry in bytes, so n >= ceil(bytes / B).

Any other tokenizer is counted in full with `encode_batch_fast` (exact by definition). The tests
prove both shortcuts against full tokenization on texts with runs of spaces, newlines, leading and
trailing spaces, byte-fallback characters and special tokens.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from tokenizers import Tokenizer

_CACHE_LIMIT = 500_000  # segments (~80 MB); cleared when full


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


@dataclass(frozen=True)
class TokenizerShape:
    """What the tokenizer's structure allows: piecewise counting, and the bytes-per-token bound."""

    piecewise: bool
    max_token_bytes: int  # 0 when no lower bound is sound for this tokenizer
    special_contents: tuple[str, ...]


def tokenizer_shape(tok: Tokenizer) -> TokenizerShape:
    spec = json.loads(tok.to_str())
    model, normalizer, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")
    pre_types = _types(pre)
    is_bpe = model.get("type") == "BPE" and not model.get("dropout")
    metaspace = [p for p in _flatten(pre) if p.get("type") == "Metaspace"]
    piecewise = (is_bpe and normalizer is None and pre is not None and pre.get("type") == "Metaspace"
                 and bool(pre.get("split", True)))
    byte_level = "ByteLevel" in pre_types
    covered = (is_bpe and (model.get("byte_fallback") or byte_level)
               and (normalizer is None or _is_llama_normalizer(normalizer))
               and pre_types <= {"Metaspace", "ByteLevel", "Sequence"})
    max_bytes = 0
    if covered:
        repl = metaspace[0].get("replacement", "▁") if metaspace else "▁"
        vocab = list(model.get("vocab", {})) + [a["content"] for a in spec.get("added_tokens", [])]
        for piece in vocab:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                n = 1
            elif byte_level:
                n = len(piece)
            else:
                n = len(piece.replace(repl, " ").replace("▁", " ").encode("utf-8"))
            max_bytes = max(max_bytes, n)
    specials = tuple(a["content"] for a in spec.get("added_tokens", []))
    return TokenizerShape(piecewise=piecewise, max_token_bytes=max_bytes, special_contents=specials)


def _flatten(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        out = []
        for child in node.get("pretokenizers") or node.get("normalizers") or []:
            out.extend(_flatten(child))
        return out
    return [node]


def _types(node) -> set[str]:
    return {n.get("type") for n in _flatten(node)}


def _is_llama_normalizer(node) -> bool:
    """Llama-2's legacy normalizer: prepend "▁", replace " " by "▁" (never shortens the text)."""
    for n in _flatten(node):
        if n.get("type") == "Prepend":
            continue
        if n.get("type") == "Replace" and n.get("pattern", {}).get("String") == " ":
            continue
        return False
    return True


class TokenCounter:
    """Exact `n_tokens` for texts; see the module docstring for why each path is exact."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.shape = tokenizer_shape(tokenizer)
        self._segments: dict[str, int] = {}
        self.counted_full = 0       # texts tokenized in full
        self.counted_pieces = 0     # texts counted from cached pieces
        self.rejected_by_bound = 0  # texts proved too long without tokenizing

    def lower_bound(self, text: str) -> int:
        """A number of tokens the text is sure to reach (0 when no bound is sound)."""
        b = self.shape.max_token_bytes
        return math.ceil(len(text.encode("utf-8")) / b) if b else 0

    def count(self, texts: list[str]) -> list[int]:
        """Exact token counts (no special tokens added) of `texts`."""
        counts = [0] * len(texts)
        pieces = [i for i, t in enumerate(texts) if self.shape.piecewise and not self._has_special(t)]
        if pieces:
            for i, n in zip(pieces, self._count_pieces([texts[i] for i in pieces])):
                counts[i] = n
            self.counted_pieces += len(pieces)
        full = sorted(set(range(len(texts))).difference(pieces))
        if full:
            encs = self.tokenizer.encode_batch_fast([texts[i] for i in full], add_special_tokens=False)
            for i, enc in zip(full, encs):
                counts[i] = len(enc.ids)
            self.counted_full += len(full)
        return counts

    def clear_cache(self) -> None:
        self._segments.clear()

    def _has_special(self, text: str) -> bool:
        return any(s in text for s in self.shape.special_contents)

    def _count_pieces(self, texts: list[str]) -> list[int]:
        """n(seg_0) + sum n(" " + seg_i) per text; segment counts cached, misses encoded in one batch."""
        cache = self._segments
        seg_lists = [t.split(" ") for t in texts]
        missing: set[str] = set()
        for segs in seg_lists:
            missing.update(segs)
        missing.difference_update(cache)
        if len(cache) + len(missing) > _CACHE_LIMIT:
            cache.clear()
            missing = set().union(*seg_lists)
        if missing:
            todo = list(missing)
            encs = self.tokenizer.encode_batch_fast([" " + s for s in todo], add_special_tokens=False)
            cache.update(zip(todo, (len(e.ids) for e in encs)))
        heads = self.tokenizer.encode_batch_fast([segs[0] for segs in seg_lists], add_special_tokens=False)
        get = cache.__getitem__
        # the first segment is counted as itself, not as " " + itself
        return [len(h.ids) + sum(map(get, segs)) - get(segs[0]) for h, segs in zip(heads, seg_lists)]


def length_verdict(n_tokens: int, min_tokens: int, max_tokens: int) -> str | None:
    """None when the document is kept, else the reason it is dropped."""
    if n_tokens > max_tokens:
        return "too_long"
    if n_tokens < min_tokens:
        return "too_short"
    return None
