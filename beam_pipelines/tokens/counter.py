"""TokenCounter: exact token counts of texts by the cheapest exact path the tokenizer's shape allows
(by chunks, by words, or in full: the package docstring argues each), and the bounds and the prefix cut
that `judge` decides by."""
from __future__ import annotations

import itertools
import json
import math
import re
import time

from tokenizers import Tokenizer

from beam_pipelines.tokens.chunk_cache import CountCache, trim_oldest, worth_caching
from beam_pipelines.tokens.cost import CALIBRATE_SHARE, PROBE, SNIFF_SHARE, CostSwitch
from beam_pipelines.tokens.stepwise import StepwiseChunks
from beam_pipelines.tokens.shape import (CHUNKS, CUTS, FULL, MARK, NON_ASCII, RAW, TokenizerProof, llama2_normalizer,
                                         metaspace, pieces_encoder, split_and_words, tokenizer_shape, trie_regex,
                                         utf8_bytes)

_CACHE_LIMIT = 300_000  # words or chunks (~50 MB); words: cleared when full, chunks: the oldest dropped
_FIRST_LIMIT = 20_000   # first chunks of texts
_PREFIX_CHARS = 4.5      # characters a token that judge's prefix of a long text is sized by: English web text
                        # has ~4, technical text ~3.3 (Llama-2); a sparser text's rest is counted after it
# judge's keep test (`cut_to_keep`): the prefix is sized for this many characters a token (English web
# text: ~4 with Llama-2's and tekken's vocabularies; a denser text just gets its rest counted too), for
# 97% of the limit, and only when it leaves at least a tenth of the text uncounted
_KEEP_CHARS = 4.0
# chunk_bounds looks a text up in its first this many characters a token of the limit at most: a lower
# bound over the limit needs the cached chunks of ~1.4x the limit's tokens at a 70% hit rate
_LOOKUP_CHARS = 8.0
_KEEP_MARGIN = 0.97
_KEEP_MOST = 0.9
# Llama-2-structure words: a run of "▁" and the characters up to the next "▁" (or a trailing run).
_CUT_WORDS = re.compile(f"{MARK}*[^{MARK}]+|{MARK}+")
# Metaspace(split=True) words: each "▁" starts one (MergedWithNext), and a leading text without one.
_METASPACE_WORDS = re.compile(f"{MARK}[^{MARK}]*|[^{MARK}]+")


class TokenCounter(StepwiseChunks):
    """Exact `n_tokens` for texts; see the package docstring for why each path is exact.

    `clock` times the paths for the CHUNKS switch (`CostSwitch`): by default the thread's CPU time
    (time.thread_time), which other threads and processes on the machine do not inflate, and which is
    the whole cost here since the tokenizer runs in the calling thread (TOKENIZERS_PARALLELISM=false, as
    the pipelines set it); a test passes a fake one. The attributes of `TOTALS` count what was done, for
    a step's tallies and the benchmarks."""

    TOTALS = ("counted_full", "counted_pieces", "rejected_by_bound", "kept_by_bound", "rejected_by_prefix", "kept_by_prefix", "kept_by_chunks", "rejected_by_chunks", "full_by_switch", "full_to_calibrate",
              "chunk_lookups", "chunk_misses", "chunks_encoded", "remainder_texts", "remainder_chars",
              "chars_full", "chars_chunks", "seconds_full", "seconds_chunks", "probes", "early_probes",
              "switches_to_full", "switches_to_chunks", "kept_by_share", "rejected_by_share", "share_chars",
              "rest_chars")
    CACHE_LIMIT, FIRST_LIMIT = _CACHE_LIMIT, _FIRST_LIMIT

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
        self._llama2 = llama2_normalizer(tokenizer)
        self._pre, self._model = split_and_words(tokenizer, spec)
        self._metaspace = metaspace(spec.get("pre_tokenizer"))
        self._words: dict[str, int] = {}
        # one search for any added token's content: a regex of their trie (tekken has 1000, 984 of them
        # "<SPECIAL_n>": one substring test each cost ~0.5 ms for every text with a "<"), run only on
        # the texts that hold one of their first characters (an `in` test, much faster than the regex)
        specials = [s for s in self.shape.special_contents if s]
        self._special = re.compile(trie_regex(specials)).search if specials else None
        self._special_firsts = tuple(sorted({s[0] for s in specials}))
        self.counted_full = 0       # texts tokenized in full
        self.counted_pieces = 0     # texts counted from cached words or chunks
        self.rejected_by_bound = 0  # texts proved too long without tokenizing
        self.kept_by_bound = 0      # texts proved to fit without tokenizing (`judge`, exact=False)
        self.rejected_by_prefix = 0  # texts proved too long by the count of a prefix (`judge`)
        self.kept_by_prefix = 0     # texts proved to fit by a prefix's count and the rest's upper bound (`judge`)
        self.kept_by_chunks = 0     # texts proved to fit by the chunk caches' bounds, nothing tokenized (`judge`)
        self.rejected_by_chunks = 0  # texts proved too long by their cached chunks' counts (`judge`)
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
        self._stepwise_init()
        if self.shape.path == CHUNKS:
            # the space first, then a look back at it and the character before it: the regex engine
            # then finds candidates by its literal-prefix scan (twice as fast as a lookbehind first)
            left = "[" + re.escape(self.shape.cut_after) + "]"
            self._unsafe_cut = re.compile(f" (?<!{left} )")  # a space no cut may precede
            self._cut = re.compile(f" (?<={left} )")
            self._ctx = self.shape.cut_after[0] if "a" not in self.shape.cut_after else "a"
            self._ctx_tokens = len(tokenizer.encode(self._ctx, add_special_tokens=False).ids)
            # a missed following chunk's upper bound in context is its bytes plus this: the space before it,
            # one token at most (the package docstring, 5.); a prepended "▁" or prefix space is the text's
            self._miss_extra = 1
            self._words, self._first = CountCache(), CountCache()  # following chunk / first chunk -> count
            self.encode_pieces = pieces_encoder(tokenizer)   # remainders and chunks (no added token in them)
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
        """A number of tokens the text is sure to reach (0 when no bound is sound). Llama-2's normalized
        text's bytes are the text's plus 2 a space ("▁" is 3 bytes) and 3 for the prepended "▁" (a
        non-empty text): no normalizer call."""
        b = self.shape.max_token_bytes
        if not b:
            return 0
        if self._llama2:
            return math.ceil((utf8_bytes(text) + 2 * text.count(" ") + (3 if text else 0)) / b)
        return math.ceil(len(self.normalize(text).encode("utf-8")) / b)

    def upper_bound(self, text: str) -> int | None:
        """A number of tokens the text cannot exceed (the package docstring, 3.), or None when none is
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
        that holds an added token's content): judge counts text[:cut] first (the package docstring, 4.)."""
        start = int(_PREFIX_CHARS * (limit + 1))
        if self.shape.path != CHUNKS or len(text) <= start or self._has_special(text):
            return 0
        cut = self._cut.search(text, start)
        return cut.start() if cut else 0

    def chunk_bounds(self, text: str, limit: int) -> tuple[int, int | None]:
        """(lower, upper) bounds of n(text) from the chunk caches alone, with no tokenizer call (the
        package docstring, 5.): the cached chunks' counts, exact, and for each chunk not cached 1 (a
        following chunk; 0 a first one) or its upper bound in context (upper). A text of more than _LOOKUP_CHARS characters a
        token of `limit` is looked up in its first that many characters only (upper None: only a
        lower bound over the limit can decide it). (0, None) on another path or for a text with an
        added token's content."""
        if self.shape.path != CHUNKS or self._has_special(text):
            return 0, None
        whole = len(text) <= _LOOKUP_CHARS * limit
        # the chunks are the chunk path's own: its split is chosen on the whole text
        part = text if whole else text[:int(_LOOKUP_CHARS * limit)]
        chunks = part.split(" ") if self._unsafe_cut.search(text) is None else self._cut.split(part)
        if not whole:
            chunks.pop()   # perhaps a part of a chunk: left out (a chunk counts >= 0)
        if not chunks:
            return 0, None
        head = dict.get(self._first, chunks[0]) if whole else None
        found = list(map(self._words.get, itertools.islice(chunks, 1, None)))
        # a missed following chunk is " " + its text between two proved cuts: a token at least where every
        # byte is some token's (the bytes lower bound is sound: max_token_bytes), else 0
        cached = (head or 0) + sum(n for n in found if n is not None)
        lower = cached + (found.count(None) if self.shape.max_token_bytes else 0)
        ub = self.shape.upper
        if not whole or ub is None or lower > limit:
            return lower, None
        missed = [k for k, n in zip(itertools.islice(chunks, 1, None), found) if n is None]
        if ub.text == RAW or (ub.text == NON_ASCII and text.isascii() and self._ctx.isascii()):
            # upper_bound(ctx + " " + k) - n(ctx) = bytes(k) + the same constant for every chunk k
            upper = cached + sum(map(utf8_bytes, missed)) + len(missed) * self._miss_extra
            if head is None:
                upper += utf8_bytes(chunks[0]) + ub.raw_extra
        else:
            bounds = [self.upper_bound(self._ctx + " " + k) for k in missed]
            first = self.upper_bound(chunks[0]) if head is None else 0
            if first is None or None in bounds:
                return lower, None
            upper = cached + sum(bounds) - len(bounds) * self._ctx_tokens + first
        return lower, upper

    def cut_to_keep(self, text: str, limit: int) -> int:
        """The index of the first proved cut at or after the point where a prefix counted at
        _KEEP_CHARS characters a token plus the rest's upper bound (about a token a byte) would fit
        `limit`, or 0 (none: the text is short enough to be counted whole, another path, no upper
        bound, or an added token's content): judge counts text[:cut] first and keeps the text
        uncounted when that count plus `tail_bound` of the rest fits (the package docstring, 4.)."""
        start = int((len(text) - _KEEP_MARGIN * limit) / (1 - 1 / _KEEP_CHARS))
        if (start <= 0 or start >= _KEEP_MOST * len(text) or self.shape.path != CHUNKS
                or self.shape.upper is None or self._has_special(text)):
            return 0
        cut = self._cut.search(text, start)
        return cut.start() if cut else 0

    def tail_bound(self, tail: str) -> int | None:
        """An upper bound of n(text) - n(text[:i]) for a text cut at a proved cut i, given text[i:]:
        n(ctx + tail) - n(ctx) <= upper_bound(ctx + tail) - n(ctx) (`count_from_cuts` counts the same
        difference). None when no upper bound is proved for it."""
        bound = self.upper_bound(self._ctx + tail)
        return None if bound is None else bound - self._ctx_tokens

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
            for i, n in zip(full, self.count_full([texts[i] for i in full])):
                counts[i] = n
        if self._chunk_batch is not None and self._chunk_batch[0]:  # judged after the full cost is known (a
            # batch of texts all holding an added token's content looked nothing up: nothing to judge)
            self.switch.chunks_measured(*self._chunk_batch)
        return counts

    def count_full(self, texts: list[str]) -> list[int]:
        """Exact counts of `texts` tokenized whole, the cost measured for the switch."""
        chars, t0 = sum(map(len, texts)), self._clock()
        counts = [len(e) for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        self.counted_full += len(texts)
        self.chars_full += chars
        seconds = self._clock() - t0
        self.seconds_full += seconds
        self.switch.full_measured(chars, seconds)
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
                switch.sniffed(self._sniff(texts[::SNIFF_SHARE]))
            return list(range(len(texts)))
        full, todo = [], []
        for i, text in enumerate(texts):
            (full if self._has_special(text) else todo).append(i)
        if switch.calibrating() and todo:
            sample = todo[::CALIBRATE_SHARE]
            del todo[::CALIBRATE_SHARE]
            self.full_to_calibrate += len(sample)
            full += sample
        chars = sum(len(texts[i]) for i in todo)
        t0 = self._clock()
        inner, first = self._words, self._first
        trim_oldest(inner, _CACHE_LIMIT)
        trim_oldest(first, _FIRST_LIMIT)  # a text's start rarely repeats: a small cache
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
        `counts`: a chunk `worth_caching` alone, into the cache (a first chunk as it is, a following
        chunk k as n(ctx + " " + k) - n(ctx), its count after any cut), each text's other missed chunks
        in one input, its remainder (the package docstring, 0., argues that the counts add up). A text
        never costs more than tokenizing it whole, so none is sent there after its look-ups."""
        inner, first = self._words, self._first
        inner_missed, first_missed = inner.missed, first.missed
        admit, admit_first = worth_caching(inner_missed, self._seen), worth_caching(first_missed, self._seen_first)
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
        encs = self.encode_pieces([ctx + k for k in alone] + heads + [r for _, r, _ in rests])
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
