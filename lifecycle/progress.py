"""Whether a verb may show progress: `--quiet` (bft/cli.py) sets it for the process and its children
(through the environment, so Beam's local workers and helper processes see the same), and every
progress display (generation/progress.py, the Beam passes) asks `quiet()`."""
from __future__ import annotations

import os

ENV = "BFT_QUIET"


def set_quiet(value: bool) -> None:
    if value:
        os.environ[ENV] = "1"
    else:
        os.environ.pop(ENV, None)


def quiet() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


LOG_EVERY_S = 60.0      # off a terminal, a progress line at most this often


def duration(seconds: float) -> str:
    """42 -> "0m42s", 3725 -> "1h02m": how progress lines show a time."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
