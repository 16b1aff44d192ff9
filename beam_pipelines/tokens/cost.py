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
    """Chooses, batch by batch, between counting by chunks and tokenizing in full, from measured costs.
    Every path is exact: the choice moves time only, never a count.

    Two costs are smoothed (exponential moving averages, weight `_ALPHA` for a new measurement):
    `full_cost`, seconds per character of `encode_batch_fast` on whole texts (measured on every text
    tokenized in full: texts with an added token's content, batches in full mode, and, in chunk mode,
    one text in `CALIBRATE_SHARE` of some batches), and `ratio`, the seconds the
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

    In full mode a few texts of each batch are looked up, no more (`SNIFF_SHARE`): when their hit
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
