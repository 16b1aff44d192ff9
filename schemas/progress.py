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
