"""CostSwitch: counting by chunks or tokenizing in full, chosen batch by batch from measured costs.
Every path is exact, so the choice moves time only, never a count (the package docstring, 0.)."""
from __future__ import annotations

from beam_pipelines.tokens.shape import CHUNKS, FULL

# Every path is exact, so these only move costs.
_PRIOR_RATIO = 0.5      # chunk-path seconds / full-tokenization seconds assumed before any measurement
_SWITCH_AT = 0.9        # the ratio above which full tokenization is chosen (a margin for the ~10% by which
                        # a few texts' full cost, measured amid the chunk work, misjudges whole batches')
_ALPHA = 0.5            # weight of a new measurement in the moving averages
_PROBE_FIRST = 4        # full-tokenized batches before the chunk path is tried again...
_PROBE_MAX = 16         # ...doubled after each probe that finds it still dearer, up to this
_CALIBRATE_EVERY = 4    # chunk batches between two measurements of the full-tokenization cost...
CALIBRATE_SHARE = 16    # ...for which one text in this many of the batch is tokenized in full
SNIFF_SHARE = 64        # in full mode, one text in this many is looked up (no more) for its hit rate...
_SNIFF_MARGIN = 0.25    # ...and a probe is brought forward when it beats the last chunk batch's by this
PROBE = "probe"  # a CostSwitch plan: one batch by chunks while full tokenization is the choice


class CostSwitch:
    """Chooses, batch by batch, between counting by chunks and tokenizing in full, from measured costs:
    chunks pay where they repeat (prose), full tokenization where they rarely do (tables, code, ids).
    Every path is exact: the choice moves time only, never a count.

    Two moving averages (weight `_ALPHA` for a new measurement): `full_cost`, seconds per character of
    `encode_batch_fast` on whole texts (every text tokenized in full is measured), and `ratio`, a chunk
    batch's seconds (split, look-ups, the misses' encoding) over what its characters cost in full. It
    starts at `_PRIOR_RATIO`, so a counter starts by chunks and fills its cache; above `_SWITCH_AT` the
    counter tokenizes in full, and probes the chunk path back (`plan`, `sniffed`, `chunks_measured`)."""

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
        """CHUNKS, FULL, or PROBE: in full mode (no look-up pass at all), one batch by chunks after `gap`
        full batches, its misses filling the cache as usual."""
        if self.mode == CHUNKS:
            return CHUNKS
        return PROBE if self.wait <= 0 else FULL

    def calibrating(self) -> bool:
        """Whether this chunk batch should tokenize a few texts in full to measure that cost: every
        `_CALIBRATE_EVERY` batches, 4 times less often while chunks cost under half of it (the full cost
        would have to be misjudged twice over to change the choice), and in the next batch after a jump
        of the ratio (`chunks_measured`). The counter tokenizes one text in `CALIBRATE_SHARE` in full."""
        every = _CALIBRATE_EVERY if self.full_cost is None or self.ratio > 0.5 else 4 * _CALIBRATE_EVERY
        return self.mode == CHUNKS and self.since_full >= every

    def full_measured(self, chars: int, seconds: float) -> None:
        """A full tokenization's cost, averaged in, or replacing the average after the text changed."""
        if chars:
            c = seconds / chars
            fresh = self.full_cost is None or self.remeasure
            self.full_cost = c if fresh else self.full_cost + _ALPHA * (c - self.full_cost)
            self.since_full, self.remeasure = 0, False

    def full_batch_done(self) -> None:
        self.wait -= 1

    def sniffed(self, hit_rate: float) -> None:
        """The hit rate of the few texts of a full batch looked up (one in `SNIFF_SHARE`, no more): when
        it beats the last chunk batch's by `_SNIFF_MARGIN`, the text has turned back to a shape the cache
        knows, and the next batch is a probe."""
        if self.wait > 0 and hit_rate > self.hit_rate + _SNIFF_MARGIN:
            self.wait = 0
            self.early_probes += 1

    def chunks_measured(self, chars: int, seconds: float, probe: bool, hit_rate: float) -> None:
        """A chunk batch's cost. A probe under `_SWITCH_AT` (ties go to full tokenization) returns to
        chunks, else the gap to the next doubles (`_PROBE_FIRST` to `_PROBE_MAX`): probes cost little
        where the text stays hard (at most their look-ups more than full tokenization, ~10-20% of one
        batch in `gap`). A ratio half again over its average means the text changed, and its full cost
        per character may have too (llama2's is 1.7 times as high on prose as on logs), hiding the
        change: the next batch measures it afresh."""
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
