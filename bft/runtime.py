"""Process settings every bft process (and Beam worker) runs with.

Measured on the prepare benchmark (docs/BENCHMARKS.md): with glibc's default arenas and pyarrow's
mimalloc pool, freed document text stays mapped, and the local runner's three processes peaked at
1.8 GB for 100K documents; with a single-digit arena count, an eager trim threshold and Arrow's
system pool the same run peaks at about 1.15 GB.
"""
from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1
_M_ARENA_MAX = -8
_ENV = {
    "TOKENIZERS_PARALLELISM": "false",   # a fast tokenizer used before a fork deadlocks the children
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 20),
}
_done = False


def configure_process() -> None:
    """Applies the settings to this process and exports them to the processes it starts."""
    global _done
    if _done:
        return
    _done = True
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, int(os.environ["MALLOC_ARENA_MAX"]))
        libc.mallopt(_M_TRIM_THRESHOLD, int(os.environ["MALLOC_TRIM_THRESHOLD_"]))
    except (OSError, AttributeError, ValueError):
        pass  # not glibc: nothing to tune
    import pyarrow as pa

    if os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system":
        pa.set_memory_pool(pa.system_memory_pool())
