"""The length decision by chunks, a share of the missed chunks at a time (the package docstring, 6.):
each text is looked up once; its cached chunks are exact and its missed chunks bounded; only as many of
its missed chunks are counted as its bounds need to decide, the rest only when they did not.
`TokenCounter` inherits `StepwiseChunks`, which works on its caches, cut regexes and context."""
from __future__ import annotations

import itertools
import operator

from beam_pipelines.tokens.chunk_cache import trim_oldest, worth_caching
from beam_pipelines.tokens.cost import CALIBRATE_SHARE, PROBE
from beam_pipelines.tokens.shape import FULL, NON_ASCII, RAW

# Tokens a missed chunk's character (its space included) is guessed to cost before any is measured: rare
# words, numbers and names cost more than prose's ~0.25 with Llama-2's and tekken's vocabularies.
_PRIOR_RATE, _PRIOR_BYTES = 0.35, 4096
# A text whose guessed count is within this share of the limit is counted whole at once (a share would
# rarely decide it); otherwise its share is sized for a cost a character this many times the measured
# one (to keep) or this many times less (to drop), so that a guess off by as much still decides it in
# one round.
_CLOSE = 0.08
_SAFETY = 1.3
_MOST = 0.85       # a share of more than this of the missed characters: all of them (no second round)
# A long text is looked up in its first this many characters a token of the limit first: there its
# lower bound usually proves it too long before the rest is looked up.
_LOOKUP_CHARS = 8.0
_NONES = itertools.repeat(None)


class _Text:
    """One text: its cached chunks' counts and its counted chunks' summed (`known`), its missed chunks
    not counted yet in text order (`items`; the first chunk, when missed, first, with `head` set: it is
    counted alone, not after a cut), and its bounds (`lower`, `upper`) from them."""

    __slots__ = ("i", "known", "head", "items", "ascii", "partial", "lower", "upper", "alone", "alone_head",
                 "encoded")

    def __init__(self, i: int, known: int, head: bool, items: list[str], ascii: bool, partial: bool = False):
        self.i, self.known, self.head, self.items, self.ascii = i, known, head, items, ascii
        self.partial = partial   # looked up in a prefix only: its lower bound is all it has
        self.lower = self.upper = None
        self.alone: list[str] = []   # missed chunks set aside to be counted alone, into the cache
        self.alone_head: str | None = None
        self.encoded = False   # some of its missed chunks were counted in a remainder


class StepwiseChunks:
    """`decide_chunks` for TokenCounter on the CHUNKS path."""

    def _stepwise_init(self) -> None:
        self.kept_by_share = 0       # texts proved to fit after counting a share of their missed chunks
        self.rejected_by_share = 0   # texts proved too long likewise
        self.share_chars = 0         # characters of the missed chunks (each with its space) counted in shares
        self.rest_chars = 0          # ...and after them, for the texts a share did not decide
        self._rate = [_PRIOR_RATE * _PRIOR_BYTES, _PRIOR_BYTES]  # tokens, characters of the missed chunks counted

    def decide_chunks(self, texts: list[str], todo: list[int], min_tokens: int, max_tokens: int,
                      exact: bool) -> list[tuple[int, int | None, str | None, str]]:
        """(text index, exact count or None, verdict or None, detail) for each of `todo`: decided by
        its bounds after the look-ups, or after a share of its missed chunks is counted, or counted in
        full by its chunks. The decisions are those of counting every text (the package docstring, 6.)."""
        trim_oldest(self._words, self.CACHE_LIMIT)
        trim_oldest(self._first, self.FIRST_LIMIT)
        out, pending = [], []
        for i in todo:
            s = self._look_up(i, texts[i], max_tokens)
            if not self._settle(s, min_tokens, max_tokens, exact, out, "its cached chunks"):
                pending.append(s)
        if not pending:
            return out
        shares = self._admit_and_plan(pending, min_tokens, max_tokens, exact)
        self._count([(s, s.items[:n]) for s, n in zip(pending, shares)], share=True)
        rest = []
        for s, n in zip(pending, shares):
            s.items = s.items[n:]
            s.head = s.head and n == 0
            if not self._settle(s, min_tokens, max_tokens, exact, out, "a share of its chunks counted", share=True):
                rest.append(s)
        if rest:   # what a share did not decide: the rest of its missed chunks counted (no work lost)
            self._count([(s, s.items) for s in rest], share=False)
            for s in rest:
                s.items, s.head = [], False
                self._settle(s, min_tokens, max_tokens, exact, out, "")
        return out

    def _look_up(self, i: int, text: str, limit: int) -> _Text:
        """The text's chunks looked up: a long one in a prefix first (split alone: its chunks are the
        text's, the last perhaps cut short and left out), the rest only when the prefix's lower bound (its
        cached counts and a token per missed following chunk) does not exceed `limit`."""
        plain = self._unsafe_cut.search(text) is None   # the chunk path's split, chosen on the whole text
        reach = int(_LOOKUP_CHARS * limit)
        if len(text) > reach:
            chunks = text[:reach].split(" ") if plain else self._cut.split(text[:reach])
            chunks.pop()
            if len(chunks) > 1:
                known, missed = self._found(chunks)
                if known + len(missed) * bool(self.shape.max_token_bytes) > limit:  # the rest: >= 0 each
                    self.chunk_lookups += len(chunks)
                    self.chunk_misses += len(missed) + (chunks[0] not in self._first)
                    return _Text(i, known + self._first.get(chunks[0], 0), False, missed, True, partial=True)
        chunks = text.split(" ") if plain else self._cut.split(text)
        known, missed = self._found(chunks)
        head_n = self._first.get(chunks[0])
        self.chunk_lookups += len(chunks)
        self.chunk_misses += len(missed) + (head_n is None)
        if head_n is None:
            return _Text(i, known, True, [chunks[0]] + missed, text.isascii())
        return _Text(i, known + head_n, False, missed, text.isascii())

    def _found(self, chunks: list[str]) -> tuple[int, list[str]]:
        """The cached counts of the following chunks summed, and the missed ones in text order."""
        found = list(map(self._words.get, itertools.islice(chunks, 1, None)))
        known = sum(filter(None, found))
        if None not in found:
            return known, []
        return known, list(itertools.compress(itertools.islice(chunks, 1, None), map(operator.is_, found, _NONES)))

    def _bounds(self, s: _Text) -> None:
        """s.lower, s.upper: its known count plus, for each missed chunk not counted yet, at least 1 (a
        following chunk, where every byte is some token's; the head 0) and at most its upper bound in
        context (the package docstring, 5.); upper None when none is proved."""
        follow = s.items[1:] if s.head else s.items
        s.lower = s.known + (len(follow) if self.shape.max_token_bytes else 0)
        ub = self.shape.upper
        if ub is None or s.partial:
            s.upper = None
            return
        if ub.text == RAW or (ub.text == NON_ASCII and s.ascii and self._ctx.isascii()):
            # upper_bound(ctx + " " + k) - n(ctx) = bytes(k) + the same constant for every chunk k
            chars = sum(map(len, follow)) if s.ascii or not follow else len(" ".join(follow).encode()) - len(follow) + 1
            upper = s.known + chars + len(follow) * self._miss_extra
        else:
            bounds = [self.upper_bound(self._ctx + " " + k) for k in follow]
            upper = None if None in bounds else s.known + sum(bounds) - len(bounds) * self._ctx_tokens
        if upper is not None and s.head:
            head = self.upper_bound(s.items[0])
            upper = None if head is None else upper + head
        s.upper = upper

    def _settle(self, s: _Text, min_tokens: int, max_tokens: int, exact: bool, out: list, how: str,
                share: bool = False) -> bool:
        """Whether the text is decided: counted whole (no missed chunk left), or by its bounds; if so,
        its judgment is appended to `out`."""
        if not s.items and not s.partial:
            n = s.known
            self.counted_pieces += 1
            out.append((s.i, *counted_judgment(n, min_tokens, max_tokens)))
            return True
        self._bounds(s)
        if s.lower > max_tokens:
            if share:
                self.rejected_by_share += 1
            else:
                self.rejected_by_chunks += 1
            out.append((s.i, None, "too_long", f">= {s.lower} tokens ({how}) > {max_tokens}"))
            return True
        if not exact and s.upper is not None and s.upper <= max_tokens and s.lower >= min_tokens:
            if share:
                self.kept_by_share += 1
            else:
                self.kept_by_chunks += 1
            out.append((s.i, None, None, f"<= {s.upper} tokens ({how}, the others' upper bound), "
                                         f"allowed {min_tokens}..{max_tokens}"))
            return True
        return False

    def _admit_and_plan(self, pending: list[_Text], min_tokens: int, max_tokens: int, exact: bool) -> list[int]:
        """Sets aside the missed chunks worth caching (`alone`: counted alone into the cache by the next
        `_count`, which adds their counts to `known`; `chunk_cache.worth_caching`), and sizes each
        text's share: how many of its other missed chunks, in text order, to count now. A text likely
        to fit counts enough for its upper bound to fit, one likely too long enough for its lower bound
        to pass the limit, with `_SAFETY`, by the tokens a missed character has cost so far; one near the
        limit (or any that may fit with --exact-counts, or near a minimum) counts all."""
        admit = worth_caching([k for s in pending for k in (s.items[1:] if s.head else s.items)], self._seen)
        admit_first = worth_caching([s.items[0] for s in pending if s.head], self._seen_first)
        rate = self._rate[0] / self._rate[1]
        extra = self._miss_extra if self.shape.upper is not None else 0
        lower_one = int(bool(self.shape.max_token_bytes))
        shares = []
        for s in pending:
            head = s.items[0] if s.head else None
            s.alone_head = head if head is not None and head in admit_first else None
            follow = s.items[1:] if s.head else s.items
            s.alone = [k for k in follow if k in admit]
            if s.alone or s.alone_head is not None:
                s.items = ([head] if head is not None and s.alone_head is None else []) + [k for k in follow if k not in admit]
                s.head = head is not None and s.alone_head is None
            items = s.items
            known = s.known + rate * (sum(len(k) + 1 for k in s.alone) + len(s.alone_head or ''))  # after the call
            guess = known + rate * sum(len(k) + 1 for k in items)
            n, need = len(items), None
            if not items or guess < 2 * min_tokens:   # a minimum to prove too: counted whole
                pass
            elif guess > max_tokens * (1 + _CLOSE):   # likely too long: its lower bound past the limit
                low = rate / _SAFETY   # what a counted chunk raises it by, guessed low
                need = max_tokens + 1 - known - lower_one * len(items)
                gains = [low * (len(k) + 1) - lower_one for k in items]
            elif not exact and guess < max_tokens * (1 - _CLOSE) and self.shape.upper is not None:
                high = rate * _SAFETY  # what a counted chunk lowers it by, guessed low
                need = known + sum(len(k) + extra for k in items) - max_tokens
                gains = [(1 - high) * len(k) + extra - high for k in items]
            if need is not None:
                total, chars, most = 0.0, 0, _MOST * sum(map(len, items))
                for j, (k, g) in enumerate(zip(items, gains), 1):
                    total, chars = total + g, chars + len(k)
                    if chars > most:
                        break
                    if total >= need:
                        n = j
                        break
            shares.append(n)
        return shares

    def _count(self, work: list[tuple[_Text, list[str]]], share: bool) -> None:
        """Counts, in one batch of the real tokenizer, the chunks set aside to be cached (alone, into the
        cache, once each) and each text's given missed chunks in one input, its remainder (the package
        docstring, 0.: the counts add up), and adds both to the texts' `known`."""
        ctx, base = self._ctx + " ", self._ctx_tokens
        alone = {k for s, _ in work for k in s.alone} if share else set()
        alone_first = {s.alone_head for s, _ in work if s.alone_head is not None} if share else set()
        rests = []
        for s, chunks in work:
            if not chunks:
                continue
            if s.head:   # the head first, counted from the text's start; the others after a cut
                rests.append((s, chunks[0] + " " + " ".join(chunks[1:]) if len(chunks) > 1 else chunks[0], 0))
            else:
                rests.append((s, ctx + " ".join(chunks), base))
        alone, alone_first = list(alone), list(alone_first)
        encs = self.encode_pieces([ctx + k for k in alone] + alone_first + [r for _, r, _ in rests])
        self._words.update(zip(alone, (len(e) - base for e in encs[:len(alone)])))
        self._first.update(zip(alone_first, (len(e) for e in encs[len(alone):len(alone) + len(alone_first)])))
        tokens = chars = 0
        for (s, r, b), e in zip(rests, encs[len(alone) + len(alone_first):]):
            s.known += len(e) - b
            # the missed chunks' characters, each with its space (the context and its space left out)
            tokens, chars = tokens + len(e) - b, chars + (len(r) - len(self._ctx) if b else len(r) + 1)
            self.remainder_texts += not s.encoded   # a text once, whatever the rounds
            s.encoded = True
        self._rate[0] += tokens
        self._rate[1] += chars
        self.chunks_encoded += len(alone) + len(alone_first)
        self.remainder_chars += sum(len(r) for _, r, _ in rests)
        if share:
            self.share_chars += chars
            for s, _ in work:
                s.known += sum(map(self._words.__getitem__, s.alone))
                if s.alone_head is not None:
                    s.known += self._first[s.alone_head]
                s.alone, s.alone_head = [], None
        else:
            self.rest_chars += chars

    def decide(self, texts: list[str], todo: list[int], min_tokens: int, max_tokens: int,
               exact: bool) -> tuple[list[tuple[int, int | None, str | None, str]], list[int]]:
        """The CHUNKS path's length decisions for `todo` while the cost switch counts by chunks:
        (judgments, the indices left to judge's other paths: all of them when the switch tokenizes in
        full, else the texts holding an added token's content). A few texts are tokenized in full to
        measure that cost when the switch asks (`CostSwitch.calibrating`); the pass's time is measured
        for it as a chunk batch's."""
        plan = self.switch.plan()
        if plan == FULL or not todo:
            return [], todo
        left = [i for i in todo if self._has_special(texts[i])]
        held = set(left)
        rest = [i for i in todo if i not in held]
        out = []
        if self.switch.calibrating() and rest:   # not a long text: its prefix would decide it
            reach = _LOOKUP_CHARS * max_tokens
            sample = [i for i in rest[::CALIBRATE_SHARE] if len(texts[i]) <= reach]
            held |= set(sample)
            rest = [i for i in rest if i not in held]
            self.full_to_calibrate += len(sample)
            for i, n in zip(sample, self.count_full([texts[i] for i in sample])):
                out.append((i, *counted_judgment(n, min_tokens, max_tokens)))
        chars = sum(len(texts[i]) for i in rest)
        lookups, misses, t0 = self.chunk_lookups, self.chunk_misses, self._clock()
        out += self.decide_chunks(texts, rest, min_tokens, max_tokens, exact)
        self.chars_chunks += chars
        seconds = self._clock() - t0
        self.seconds_chunks += seconds
        lookups, misses = self.chunk_lookups - lookups, self.chunk_misses - misses
        self.switch.chunks_measured(chars, seconds, plan == PROBE, 1 - misses / lookups if lookups else 0.0)
        return out, left


def length_verdict(n_tokens: int, min_tokens: int, max_tokens: int) -> str | None:
    """None when the document is kept, else the reason it is dropped."""
    if n_tokens > max_tokens:
        return "too_long"
    if n_tokens < min_tokens:
        return "too_short"
    return None


def counted_judgment(n_tokens: int, min_tokens: int, max_tokens: int) -> tuple[int, str | None, str]:
    """A counted text's (count, verdict, detail)."""
    return n_tokens, length_verdict(n_tokens, min_tokens, max_tokens), f"{n_tokens} tokens, allowed {min_tokens}..{max_tokens}"
