"""What a pair's text shares with other texts, for `bft assemble`: evaluation prompts (decontamination,
`--decontaminate`) and other pairs' instructions (near-duplicate instructions). Pure functions on
Arrow and numpy; assemble wires them into the pass.

Words. Both work on the same normalized words: NFKC, lower case, every run of characters other than
letters, digits and `_` is a word boundary (so case and punctuation never matter), computed with Arrow's
regex kernels (one Python hash per distinct word, xxh3_64). A word n-gram's hash combines its n word
hashes and n itself (a polynomial over uint64, then a finalizing mix), vectorized over every text at
once; `ngrams` and the evaluation sets compute it with the same code, so a match is a match of words.

Decontamination (GPT-3, Brown et al. 2020, appendix C; Llama 2, Touvron et al. 2023, appendix A.6): a
pair is contaminated by an evaluation set when its instruction or response holds a 13-word n-gram of
one of the set's prompts. The sets are small (AlpacaEval 805 prompts, MT-Bench 80 x 2 turns), so the
driver hashes every n-gram of them once (`read_eval_sets`) and the sets travel inside the DoFn. A
prompt shorter than n words is one n-gram: its whole word sequence (so a pair holding those words in a
row is contaminated by it); a prompt without any word is ignored, and so is one of fewer than
MIN_PROMPT_WORDS words (with a warning; counted and quoted in stats.json and the report), which would
drop nearly every pair. An evaluation file is read only when it is a regular file of at most
EVAL_SET_LIMIT bytes (storage.read_input).

Near-duplicate instructions: MinHash over the word 3-grams of the normalized instruction (an
instruction of fewer than 3 words: its whole word sequence), SIGNATURE_BANDS bands of BAND_ROWS hashes
(LSH): two instructions become candidates when a band is equal, and near-duplicates when the exact
Jaccard similarity of their 3-gram sets is at least the threshold (`dominated`). Instructions are
short (~70 tokens in the paper), so 3-grams, not prepare's 5-grams: one changed word in a 50-word
instruction leaves a 3-gram Jaccard of 0.88 (5-grams: 0.80). With 16 x 4, a pair at Jaccard 0.8 is
a candidate with probability 1 - (1 - 0.8^4)^16 > 0.9997, at 0.6 with 0.89.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

import storage
from beam_pipelines import minhash
from beam_pipelines.minhash import POLY, mix
from schemas.errors import UserError

PROMPT_FIELDS = ("instruction", "turns", "text", "prompt")   # tried in this order without --decontaminate-field
SHINGLE_WORDS = 3
SIGNATURE_BANDS, BAND_ROWS = 16, 4
# A band group of many members compares each with its COMPARE_WITH best-ranked members only, so a
# group of templated instructions costs O(members), not O(members^2) (see `dominated`).
COMPARE_WITH = 100
PROMPT_CHARS = 300           # an evaluation prompt as stats.json and the report quote it
EVAL_SET_LIMIT = 256 * storage.MiB   # an evaluation file is read whole (AlpacaEval's is under 1 MiB)
# A prompt of fewer words is ignored, with a warning, and counted and quoted in stats.json and the report:
# "the" (or "What is it?") would contaminate, and so drop, nearly every pair.
MIN_PROMPT_WORDS = 4
IGNORED_EXAMPLES = 5         # ignored prompts quoted in stats.json and the report, per set

_NOT_WORD = r"[^\p{L}\p{N}_]+"
log = logging.getLogger("bft.decontaminate")


class DecontaminationError(UserError):
    """An evaluation prompt file that cannot be read as one."""


def words(texts) -> tuple[pa.Array, np.ndarray]:
    """(every text's normalized words, flattened; the number of words of each text)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    elif not isinstance(texts, pa.Array):
        texts = pa.array(texts, pa.string())
    texts = pc.fill_null(texts.cast(pa.string()), "")
    norm = pc.utf8_lower(pc.utf8_normalize(texts, "NFKC"))
    spaced = pc.utf8_trim_whitespace(pc.replace_substring_regex(norm, _NOT_WORD, " "))
    tokens = pc.split_pattern(spaced, " ")
    tokens = pc.if_else(pc.equal(pc.utf8_length(spaced), 0), pa.scalar([], tokens.type), tokens)  # blank: none
    return pc.list_flatten(tokens), pc.list_value_length(tokens).to_numpy(zero_copy_only=False).astype(np.int64)


class NGrams(NamedTuple):
    """The word n-grams of a batch of texts: hash, the text each is in, the index of its first word in
    `words` (all texts' words, flattened), and n."""
    hashes: np.ndarray
    text: np.ndarray
    start: np.ndarray
    words: pa.Array
    n: int


def ngrams(texts, n: int, flat: tuple[pa.Array, np.ndarray] | None = None) -> NGrams:
    """Every word n-gram of each text (none spans two texts). `flat`: `words(texts)`, when known."""
    tokens, lengths = flat if flat is not None else words(texts)
    total = len(tokens)
    if total < n:
        return NGrams(np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.int64), tokens, n)
    encoded = pc.dictionary_encode(tokens)
    vocab = encoded.dictionary.to_pylist()
    word_hash = np.fromiter((xxhash.xxh3_64_intdigest(w.encode("utf-8")) for w in vocab), np.uint64, len(vocab))
    h = word_hash[encoded.indices.to_numpy(zero_copy_only=False)]
    count = total - n + 1
    g = np.full(count, n, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            g = g * POLY + h[j:j + count]
    text = np.repeat(np.arange(len(lengths)), lengths)
    whole = text[:count] == text[n - 1:]
    start = np.arange(count)[whole]
    return NGrams(mix(g)[whole], text[:count][whole], start, tokens, n)


def text_of(grams: NGrams, i: int) -> str:
    """The words of n-gram i, joined by single spaces."""
    return " ".join(grams.words.slice(int(grams.start[i]), grams.n).to_pylist())


def ngram_sets(texts, n: int) -> list[np.ndarray]:
    """Per text: the sorted unique hashes of its word n-grams; a text of fewer than n words (and at
    least one) has one, its whole word sequence; a text without words has none."""
    tokens, lengths = flat = words(texts)
    grams = ngrams(None, n, flat)
    hashes, rows = [grams.hashes], [grams.text]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for m in np.unique(lengths[(lengths > 0) & (lengths < n)]):
        idx = np.flatnonzero(lengths == m)
        short = pa.concat_arrays([tokens.slice(int(offsets[i]), int(m)) for i in idx])
        whole = ngrams(None, int(m), (short, np.full(len(idx), m, np.int64)))
        hashes.append(whole.hashes)
        rows.append(idx[whole.text])
    h, r = np.concatenate(hashes), np.concatenate(rows)
    order = np.lexsort((h, r))
    h, r = h[order], r[order]
    bounds = np.searchsorted(r, np.arange(len(lengths) + 1))
    return [np.unique(h[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


# ---- decontamination -----------------------------------------------------------------------------

@dataclass
class EvalSet:
    """One evaluation prompt file as assemble uses it: its n-gram hashes (sorted), the prompt each
    hash comes from (the first), and what the release's lineage and stats record of it."""

    name: str                    # the file's stem: the drop reason is contaminated:<name>
    path: str
    sha256: str
    bytes: int
    prompts: list[str]
    hashes: np.ndarray = field(repr=False)
    prompt_of: np.ndarray = field(repr=False)     # index into prompts, per hash
    lengths: tuple[int, ...] = ()                 # the n-gram lengths present: n, and shorter prompts' lengths
    short_prompts: int = 0
    ignored: list[str] = field(default_factory=list)   # prompts of fewer than MIN_PROMPT_WORDS words (cut)

    @property
    def content(self) -> dict:
        """The file as the release's lineage records an input (assemble.content_of's fields)."""
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}

    def summary(self) -> dict:
        return {"name": self.name, **self.content, "prompts": len(self.prompts), "ngrams": len(self.hashes),
                "short_prompts": self.short_prompts, "ignored_prompts": len(self.ignored),
                "ignored_examples": self.ignored[:IGNORED_EXAMPLES]}


def set_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1].split(".")[0]


def read_prompts(path: str, blob: bytes, text_field: str | None) -> list[str]:
    """The prompts of a JSON list or JSON-lines file of objects: `text_field`, else the first of
    PROMPT_FIELDS an object has; a list of strings (MT-Bench's `turns`) gives one prompt per string."""
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DecontaminationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DecontaminationError(f"{path}: not JSON ({e})") from e
        except RecursionError as e:
            raise DecontaminationError(f"{path}: nested too deeply; expected a JSON list of objects") from e
        where = [f"{path}: item {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DecontaminationError(f"{path}:{i}: not JSON ({e.msg}); expected a JSON list or JSON lines") from e
            except RecursionError as e:
                raise DecontaminationError(f"{path}:{i}: nested too deeply; expected one object per line") from e
            where.append(f"{path}:{i}")
    prompts = []
    for record, at in zip(records, where):
        if not isinstance(record, dict):
            raise DecontaminationError(f"{at}: expected an object with a prompt field")
        names = [text_field] if text_field else [f for f in PROMPT_FIELDS if f in record][:1]
        value = record.get(names[0]) if names else None
        if isinstance(value, str):
            prompts.append(value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            prompts += value
        else:
            wanted = f"field {text_field!r}" if text_field else f"one of the fields {', '.join(PROMPT_FIELDS)}"
            raise DecontaminationError(f"{at}: no {wanted} holding a string or a list of strings "
                                       "(--decontaminate-field names it)")
    if not prompts:
        raise DecontaminationError(f"{path}: no evaluation prompts in it")
    return prompts


def eval_set(path: str, text_field: str | None, n: int) -> EvalSet:
    """One evaluation file, read once: its prompts and the hashes of their word n-grams."""
    if not storage.exists(path):
        raise DecontaminationError(f"{path}: evaluation prompts not found (--decontaminate)")
    blob = storage.read_input(path, EVAL_SET_LIMIT, "--decontaminate")
    every = read_prompts(path, blob, text_field)
    n_words = words(pa.array(every, pa.string()))[1]
    few = (n_words > 0) & (n_words < MIN_PROMPT_WORDS)
    ignored = [p for p, f in zip(every, few) if f]
    if ignored:
        log.warning("%s: %d evaluation prompt(s) of fewer than %d words ignored (e.g. %r): a question of a few "
                    "common words would drop every pair that holds them", path, len(ignored), MIN_PROMPT_WORDS,
                    _cut(ignored[0])[:80])
    prompts, n_words = [p for p, f in zip(every, few) if not f], n_words[~few]
    sets = ngram_sets(pa.array(prompts, pa.string()), n)
    prompt_of = np.repeat(np.arange(len(prompts)), [len(s) for s in sets])
    hashes = np.concatenate(sets) if sets else np.empty(0, np.uint64)
    hashes, first = np.unique(hashes, return_index=True)
    short = n_words[(n_words > 0) & (n_words < n)]
    return EvalSet(set_name(path), path, hashlib.sha256(blob).hexdigest(), len(blob), prompts, hashes,
                   prompt_of[first], tuple(sorted({n, *map(int, short)})), len(short),
                   [_cut(p) for p in ignored])


def read_eval_sets(paths: list[str], text_field: str | None, n: int) -> list[EvalSet]:
    """--decontaminate's files, in the order given (a pair that several contaminate is dropped for the
    first); two files of the same stem would give one drop reason, so they are refused."""
    sets = [eval_set(p, text_field, n) for p in paths]
    names = [s.name for s in sets]
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise DecontaminationError(f"--decontaminate: two files are named {twice[0]!r} (the set name is the "
                                   "file's stem, in the drop reason); rename one")
    return sets


class Match(NamedTuple):
    row: int          # in the texts checked
    set: str
    field: str        # instruction | response
    ngram: str        # the shared words
    prompt: str       # the evaluation prompt they come from (cut to PROMPT_CHARS)


def contamination(instructions, responses, sets: list[EvalSet]) -> list[Match]:
    """The first match of each contaminated row: the first set (in --decontaminate's order), then the
    instruction before the response, then the first n-gram in the text."""
    best: dict[int, tuple] = {}
    lengths = sorted({m for s in sets for m in s.lengths})
    for f, (name, texts) in enumerate((("instruction", instructions), ("response", responses))):
        flat = words(texts)
        for m in lengths:
            grams = ngrams(texts, m, flat)
            for order, s in enumerate(sets):
                if m not in s.lengths or not len(grams.hashes) or not len(s.hashes):
                    continue
                pos = np.minimum(np.searchsorted(s.hashes, grams.hashes), len(s.hashes) - 1)
                hit = np.flatnonzero(s.hashes[pos] == grams.hashes)
                for i in hit:   # the n-grams of a text are in text order, so its first hit comes first
                    key = (order, f, int(grams.start[i]))
                    row = int(grams.text[i])
                    if row not in best or key < best[row][0]:
                        prompt = s.prompts[int(s.prompt_of[pos[i]])]
                        best[row] = (key, Match(row, s.name, name, text_of(grams, i), _cut(prompt)))
    return [best[r][1] for r in sorted(best)]


def _cut(text: str) -> str:
    return text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS] + " [...]"


# ---- near-duplicate instructions -------------------------------------------------------------------

def band_keys(shingles: list[np.ndarray]) -> np.ndarray:
    """(texts, SIGNATURE_BANDS) uint64: the LSH band keys of each text's MinHash (beam_pipelines/minhash.py,
    prepare's near-dedup: the same hash functions and band hashing) over its shingles' hashes (their top
    32 bits). A text without shingles has no bands (all zeros; the caller leaves it out)."""
    out = np.zeros((len(shingles), SIGNATURE_BANDS), np.uint64)
    for i, s in enumerate(shingles):
        if len(s):
            mins = minhash.minhash((s >> np.uint64(32)).astype(np.uint32), SIGNATURE_BANDS * BAND_ROWS)
            out[i] = minhash.band_hashes(mins, SIGNATURE_BANDS)
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two sorted unique hash arrays (0 when both are empty)."""
    both = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - both
    return both / union if union else 0.0


class Member(NamedTuple):
    """An instruction in a band group. rank: (-score, id), a missing score last: the better the smaller."""
    rank: tuple
    id: str
    shard: int
    shingles: bytes


def rank_of(doc_id: str, score: float | None) -> tuple:
    return (-score if score is not None else float("inf"), doc_id)


def dominated(members: list[Member], threshold: float):
    """Yields (member, the best-ranked member that dominates it) for each member of one band group
    with a better-ranked member among the group's COMPARE_WITH best whose Jaccard is >= threshold.

    A member is dropped when any band group dominates it, and that is a pure function of the set of
    (band key, member) pairs: the grouping order, the runner and the number of workers cannot change
    it. No two kept instructions sharing a band are near-duplicates (the worse would be dominated),
    and every dropped one has a near-duplicate with a better rank (not necessarily kept: in a chain
    a ~ b ~ c, ranked in that order, only a stays, as connected components would keep it)."""
    members = sorted(members)
    sets = [np.frombuffer(m.shingles, np.uint64) for m in members]
    for i in range(1, len(members)):
        for j in range(min(i, COMPARE_WITH)):
            if jaccard(sets[i], sets[j]) >= threshold:
                yield members[i], members[j]
                break
