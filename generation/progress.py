"""What a running generation stage shows: on a terminal a live bar (rows done of the stage's total,
output tokens per second, transient errors, final refusals, ETA); off a terminal one log line a
minute (LOG_EVERY_S); nothing when quiet. Rows that need no request (reused, not sent) count as done
at once, so the ETA is of the rows still to answer."""
from __future__ import annotations

import logging
import sys
import time

from lifecycle.progress import LOG_EVERY_S, duration, quiet

log = logging.getLogger("bft.generate")


class StageProgress:
    def __init__(self, stage: str, total: int, stream=None, clock=time.monotonic):
        self.stage, self.total = stage, total
        self.done = self.answered = self.tokens = self.errors = self.refused = 0
        self.clock, self.t0 = clock, clock()
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet()
        self._bar = None
        self._next_log = self.t0 + LOG_EVERY_S
        if not self.quiet and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="row", desc=f"generate {stage}", file=self.stream, dynamic_ncols=True)

    def skip(self, n: int) -> None:
        """`n` rows that needed no request (reused or not sent)."""
        self.done += n
        self._show(n)

    def answer(self, output_tokens: int, error: bool, refused: bool) -> None:
        self.done += 1
        self.answered += 1
        self.tokens += output_tokens
        self.errors += error
        self.refused += refused
        self._show(1)

    def line(self) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.answered / elapsed
        left = self.total - self.done
        eta = duration(left / rate) if rate > 0 and left > 0 else "-"
        return (f"generate {self.stage}: {self.done:,}/{self.total:,} rows ({100 * self.done / max(self.total, 1):.1f}%), "
                f"{rate:.1f} req/s, {self.tokens / elapsed:,.0f} tok/s, {self.errors} transient errors, "
                f"{self.refused} refused, elapsed {duration(elapsed)}, ETA {eta}")

    def _show(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)
            now = self.clock()
            if now - getattr(self, "_last_postfix", 0.0) > 0.5:
                self._last_postfix = now
                self._bar.set_postfix(tok_s=f"{self.tokens / max(now - self.t0, 1e-9):,.0f}", errors=self.errors,
                                      refused=self.refused, refresh=False)
        elif not self.quiet and self.clock() >= self._next_log:
            self._next_log = self.clock() + LOG_EVERY_S
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
