"""Where a raw text can be cut without changing its token count: before a space that follows one of a
set of ASCII characters, proved from the tokenizer's structure when it is loaded.

A Hugging Face tokenizer encodes a text (no added token in it) as normalizer -> pre-tokenizer -> model.
A cut at position i of the raw text, before a space (U+0020) that follows a character x, is *safe* when

    n(left + right) = n(left) + W(right)   for every left ending in an allowed x,

W(right) depending on `right` alone. Then a text's count is the count of its first chunk plus the
cached W of each following chunk (`TokenCounter`), and W(right) = n(ctx + right) - n(ctx) for any
fixed context `ctx` ending in an allowed character: the real tokenizer, with its own normalizer,
pre-tokenizer, prefix rules and model, counts each new chunk once. A cut is safe when each stage is
local at it:

- Normalizer. Allowed: NFC, NFD, NFKC, NFKD, Lowercase, Prepend(any) and Replace(" " -> "▁"), in any
  order (Llama-2, Gemma, sentencepiece NFKC conversions). An ASCII x is its own NFx form (lowercased
  under Lowercase); the space is a starter that no canonical composition takes as its second
  character and that reorders nothing, so the NFx forms of the two sides are independent; Replace
  maps the one space; Prepend touches only the text's start, which is the first chunk's (and ctx's).
  Anything else (Precompiled, Strip, a regex Replace, ...) is not proved: no cut.
- Pre-tokenizer steps (each must be local; the cut must be a piece boundary after some step, or the
  model must be proved not to merge across it):
  - Split(regex, Isolated) and ByteLevel(use_regex=True) (GPT-2's regex): the regex is parsed and its
    Glushkov follow relation computed (`_regex_left_chars`). x is allowed when no two consecutive
    consumed characters of any match can be x then " " (so no piece straddles the cut), no lookahead
    can be evaluated right after consuming x (so a chunk's end looks like the full text's to every
    lookahead) and every lookahead is at most one character wide; the pattern must not match the empty
    string, must have no lookbehind, anchor or backreference, and one of its top-level alternatives
    must be a run of a class containing " " (so a match starts at every cut: no gap straddles it).
    Only ASCII membership matters for these questions (x and " " are ASCII), and the ASCII members of
    every Unicode class are fixed by Unicode's stability policy, so the proof holds for any Unicode
    version of the regex engine.
  - Metaspace("▁", split=True): a piece starts at every "▁", and the cut is before one. Metaspace with
    split=False and ByteLevel(use_regex=False) split nothing (the latter maps bytes per piece).
- Model, when no step puts a boundary at the cut (Llama-2: the whole text is one BPE word): BPE without
  dropout, word prefix/suffix or ignore_merges, the space's model form ("▁", or "Ġ" under ByteLevel) in
  the vocabulary (no unknown-token fusion across the cut), and no vocabulary entry or merge holding x
  directly followed by it: merges only join adjacent symbols into a vocabulary entry, so the two sides
  merge independently, in the same rank order.
- Added tokens: none normalized, none containing a space (texts containing one are counted in full).

The proof is conservative: a tokenizer it cannot prove gets no cut (`SpaceCuts.left` empty, with why).
tests/test_length.py checks every path against full tokenization on texts built to break it.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from re import _constants as C  # noqa: N812  (the AST of Python's regex parser)
from re import _parser

MARK = "▁"
BYTE_SPACE = "Ġ"  # the space's character under ByteLevel's byte-to-unicode map
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CANDIDATES = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII but the space
ASCII = [chr(c) for c in range(128)]
_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Replace", "Sequence"}


@dataclass(frozen=True)
class SpaceCuts:
    """`left`: the characters after which a cut before a space is safe ('' when none, `why` says why)."""

    left: str
    why: str = ""


def space_cuts(spec: dict) -> SpaceCuts:
    """The safe cuts of the tokenizer whose parsed tokenizer.json is `spec`."""
    try:
        return SpaceCuts(left=_prove(spec))
    except _NoProof as e:
        return SpaceCuts(left="", why=str(e))


class _NoProof(Exception):
    pass


def _prove(spec: dict) -> str:
    for added in spec.get("added_tokens") or []:
        if added.get("normalized") or " " in added["content"]:
            raise _NoProof(f"the added token {added['content']!r} is normalized or holds a space")
    model = spec.get("model") or {}
    if model.get("dropout"):
        raise _NoProof("BPE dropout is random")
    lower, space = _normalizer(spec.get("normalizer"))
    left = set(CANDIDATES.lower() if lower else CANDIDATES)  # x as the pre-tokenizer sees it
    boundary, space = _pre_tokenizer(spec.get("pre_tokenizer"), left, space)
    if not boundary:
        _model(model, left, space)
    return "".join(x for x in CANDIDATES if (x.lower() if lower else x) in left)


def _normalizer(node) -> tuple[bool, str]:
    """(whether it lowercases, the space's normalized form); _NoProof when a step is not local."""
    lower, space = False, " "
    for step in _steps(node, "normalizers"):
        kind = step.get("type")
        if kind not in _NORMALIZERS:
            raise _NoProof(f"the normalizer {kind} is not proved local at a space")
        if kind == "Lowercase":
            lower = True
        elif kind == "Replace":
            if step.get("pattern") != {"String": " "} or step.get("content") != MARK:
                raise _NoProof(f"the normalizer Replace({step.get('pattern')} -> {step.get('content')!r}) "
                               "is not Replace(' ' -> '▁')")
            space = MARK
    return lower, space


def _pre_tokenizer(node, left: set[str], space: str) -> tuple[bool, str]:
    """Narrows `left` to the characters after which every step is local at the cut; returns (whether
    some step puts a piece boundary at the cut, the space's form as the model sees it)."""
    boundary = False
    for step in _steps(node, "pretokenizers"):
        kind = step.get("type")
        if kind == "Metaspace":
            if step.get("replacement") != MARK:
                raise _NoProof("Metaspace with a replacement other than '▁'")
            space = MARK
            boundary |= bool(step.get("split", True))
        elif kind == "ByteLevel":
            if step.get("use_regex", True):
                _space_unchanged(space, kind)
                left &= _regex_left_chars(GPT2_PATTERN)
                boundary = True
            space = BYTE_SPACE if space == " " else space
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise _NoProof(f"Split with behavior {step.get('behavior')} (invert {step.get('invert')})")
            _space_unchanged(space, kind)
            regex = pattern["Regex"] if "Regex" in pattern else re.escape(pattern.get("String", ""))
            left &= _regex_left_chars(regex)
            boundary = True
        else:
            raise _NoProof(f"the pre-tokenizer {kind} is not proved local at a space")
    return boundary, space


def _space_unchanged(space: str, kind: str) -> None:
    if space != " ":  # the regex proof is about x followed by " "
        raise _NoProof(f"{kind} splits a text whose spaces are already replaced by {space!r}")


def _model(model: dict, left: set[str], space: str) -> None:
    """The whole text reaches the model as one word: narrows `left` to the characters that no
    vocabulary entry or merge holds directly before `space`."""
    if model.get("type") != "BPE":
        raise _NoProof(f"{model.get('type')} model without a pre-tokenizer split at the space")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges"):
        raise _NoProof("BPE with a word prefix/suffix or ignore_merges and no pre-tokenizer split")
    vocab = model.get("vocab") or {}
    if space not in vocab:
        raise _NoProof(f"no pre-tokenizer split and {space!r} is not in the vocabulary")
    merged = [m.replace(" ", "", 1) if isinstance(m, str) else "".join(m) for m in model.get("merges") or []]
    for piece in list(vocab) + merged:
        i = piece.find(space, 1)
        while i > 0:
            left.discard(piece[i - 1])
            i = piece.find(space, i + 1)


def _steps(node, key: str) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get(key) or [] for s in _steps(child, key)]
    return [node]


# ---- regex: the ASCII characters x such that no match of the pattern holds x followed by " " --------

_SPACE_CLASS = "\t\n\x0b\x0c\r "  # \s on ASCII, in Oniguruma (Unicode or Ruby syntax) alike
_NON_ASCII = "\U0010ffff"  # keeps a translated class non-empty without adding an ASCII member
_LONG = {"Letter": "L", "Uppercase_Letter": "Lu", "Lowercase_Letter": "Ll", "Titlecase_Letter": "Lt",
         "Modifier_Letter": "Lm", "Other_Letter": "Lo", "Mark": "M", "Number": "N", "Decimal_Number": "Nd",
         "Punctuation": "P", "Symbol": "S", "Separator": "Z", "Other": "C"}


def _property(name: str) -> str:
    """The ASCII members of the Unicode general category `name` (stable across Unicode versions)."""
    cat = _LONG.get(name, name)
    if not re.fullmatch(r"[LMNPSZC][a-z]?", cat):
        raise _NoProof(f"the regex class \\p{{{name}}} is not a general category")
    return "".join(c for c in ASCII if unicodedata.category(c).startswith(cat))


def _translate(pattern: str) -> str:
    """Oniguruma syntax -> Python `re` syntax with the same ASCII behaviour: \\p{..} and \\s become
    explicit ASCII classes (Python's \\s would add \\x1c-\\x1f, which Oniguruma's lacks)."""
    out, i, depth = [], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            if e in "pP":
                m = re.match(r"\{(\^?)([A-Za-z_]+)\}", pattern[i + 2:])
                if not m:
                    raise _NoProof(f"cannot read the class at {pattern[i:i + 12]!r}")
                negated = (e == "P") != bool(m.group(1))
                members = re.escape(_property(m.group(2))) + _NON_ASCII
                if depth and negated:
                    raise _NoProof("a negated property inside a bracket class")
                out.append(members if depth else f"[{'^' if negated else ''}{members}]")
                i += 2 + m.end()
                continue
            if e in "sS":
                if depth and e == "S":
                    raise _NoProof("\\S inside a bracket class")
                members = re.escape(_SPACE_CLASS)
                out.append(members if depth else f"[{'^' if e == 'S' else ''}{members}]")
                i += 2
                continue
            if e == "x" and pattern[i + 2:i + 3] == "{":
                end = pattern.index("}", i)
                out.append(f"\\U{int(pattern[i + 3:end], 16):08x}")
                i = end + 1
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        elif not depth and pattern.startswith("(?<", i) and pattern[i + 3:i + 4] not in ("=", "!"):
            out.append("(?P<")
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


@dataclass
class _Frag:
    nullable: bool
    first: set[int]
    last: set[int]


class _Glushkov:
    """Positions (consumed characters, or zero-width lookaheads) of a parsed pattern and which can
    follow which in a match. A repeated sub-pattern shares its positions across repetitions, which
    only adds follow pairs: conservative."""

    def __init__(self):
        self.members: list[frozenset[str] | None] = []  # None: a lookahead
        self.follow: dict[int, set[int]] = {}

    def position(self, members) -> _Frag:
        self.members.append(frozenset(members) if members is not None else None)
        p = len(self.members) - 1
        self.follow[p] = set()
        return _Frag(members is None, {p}, {p})

    def seq(self, items, flags: int) -> _Frag:
        frag = _Frag(True, set(), set())
        for op, av in items:
            nxt = self.node(op, av, flags)
            for p in frag.last:
                self.follow[p] |= nxt.first
            frag = _Frag(frag.nullable and nxt.nullable, frag.first | (nxt.first if frag.nullable else set()),
                         nxt.last | (frag.last if nxt.nullable else set()))
        return frag

    def node(self, op, av, flags: int) -> _Frag:
        fold = bool(flags & re.IGNORECASE)
        if op is C.LITERAL:
            return self.position(_fold({chr(av)}, fold))
        if op is C.NOT_LITERAL:
            return self.position(set(ASCII) - _fold({chr(av)}, fold))
        if op is C.ANY:
            return self.position(ASCII if flags & re.DOTALL else set(ASCII) - {"\n"})
        if op is C.IN:
            return self.position(_fold(_members(av), fold))
        if op is C.BRANCH:
            frags = [self.seq(alt, flags) for alt in av[1]]
            return _Frag(any(f.nullable for f in frags), set().union(*(f.first for f in frags)),
                         set().union(*(f.last for f in frags)))
        if op is C.SUBPATTERN:
            _, add, remove, sub = av
            return self.seq(sub, (flags | add) & ~remove)
        if op is C.ATOMIC_GROUP:
            return self.seq(av, flags)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
            lo, hi, sub = av
            if hi == 0:
                return _Frag(True, set(), set())
            frag = self.seq(sub, flags)
            if hi > 1:
                for p in frag.last:
                    self.follow[p] |= frag.first
            return _Frag(frag.nullable or lo == 0, frag.first, frag.last)
        if op in (C.ASSERT, C.ASSERT_NOT):
            direction, sub = av
            if direction < 0:
                raise _NoProof("a lookbehind")
            if sub.getwidth()[1] > 1:
                raise _NoProof("a lookahead wider than one character")
            return self.position(None)
        raise _NoProof(f"the regex construct {op} (anchor, backreference, ...) is not proved")

    def adjacent(self, p: int) -> set[int]:
        """The consumed positions that can come right after position p (across lookaheads)."""
        seen, todo, out = set(), list(self.follow[p]), set()
        while todo:
            q = todo.pop()
            if q in seen:
                continue
            seen.add(q)
            if self.members[q] is None:
                todo.extend(self.follow[q])
            else:
                out.add(q)
        return out


def _fold(chars: set[str], fold: bool) -> set[str]:
    return chars | {c.swapcase() for c in chars if c.isascii()} if fold else set(chars)


def _members(items) -> set[str]:
    """The ASCII members of a parsed bracket class."""
    chars: set[str] = set()
    negate = False
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            chars.add(chr(av))
        elif op is C.RANGE:
            chars.update(chr(c) for c in range(av[0], min(av[1], 127) + 1))
        elif op is C.CATEGORY:
            probe = {C.CATEGORY_DIGIT: r"\d", C.CATEGORY_NOT_DIGIT: r"\D", C.CATEGORY_WORD: r"\w",
                     C.CATEGORY_NOT_WORD: r"\W"}.get(av)
            if probe is None:
                raise _NoProof(f"the class category {av}")
            chars.update(c for c in ASCII if re.fullmatch(probe, c, re.ASCII))
        else:
            raise _NoProof(f"the bracket class item {op}")
    chars &= set(ASCII)
    return set(ASCII) - chars if negate else chars


def _regex_left_chars(pattern: str) -> set[str]:
    """The candidates x after which a cut before " " is safe for Split(pattern, Isolated)."""
    try:
        tree = _parser.parse(_translate(pattern))
    except re.error as e:
        raise _NoProof(f"cannot parse the split regex ({e})") from e
    g = _Glushkov()
    top = g.seq(tree.data, tree.state.flags)
    if top.nullable:
        raise _NoProof("the split regex matches the empty string")
    if not _always_matches_space(tree):
        raise _NoProof("no top-level alternative of the split regex is a run of spaces: a gap could span a cut")
    left = set(CANDIDATES)
    for p, members in enumerate(g.members):
        if members is None:
            continue
        after = g.adjacent(p)
        if any(" " in g.members[q] for q in after) or any(g.members[q] is None for q in g.follow[p]):
            left -= members
    # a lookahead reached before anything is consumed is evaluated where a match attempt starts: inside
    # the chunk or at its end, where only an empty match could succeed (excluded above)
    return left


def _always_matches_space(tree) -> bool:
    """Some top-level alternative is one class holding " ", or a run (min >= 1) of one."""
    items = list(tree.data)
    alternatives = items[0][1][1] if len(items) == 1 and items[0][0] is C.BRANCH else [items]
    for alt in alternatives:
        alt = list(alt)
        if len(alt) != 1:
            continue
        op, av = alt[0]
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT) and av[0] >= 1 and len(av[2]) == 1:
            op, av = list(av[2])[0]
        if (op is C.LITERAL and av == 32) or (op is C.IN and " " in _members(av)):
            return True
    return False
