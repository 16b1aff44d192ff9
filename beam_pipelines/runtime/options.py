"""How a Beam pass runs: Beam's pipeline options from the flags bft does not know, with local defaults,
and the process settings every bft process (and Beam worker) runs with.

Measured on the prepare benchmark (docs/BENCHMARKS.md): with glibc's default arenas and pyarrow's
mimalloc pool, freed document text stays mapped, and the local runner's three processes peaked at
1.8 GB for 100K documents; with a single-digit arena count, an eager trim threshold and Arrow's
system pool the same run peaks at about 1.15 GB.
"""
from __future__ import annotations

import ctypes
import os

from beam_pipelines.runtime import driver_watch
from beam_pipelines.runtime.driver_watch import DRIVER_PID  # the pid of the process driving a pass, for its workers

_M_TRIM_THRESHOLD = -1
_M_ARENA_MAX = -8
PROCESS_ENV = {
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
    for key, value in PROCESS_ENV.items():
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
    driver_watch.watch()


def default_beam_args(beam_args: list[str]) -> list[str]:
    """Local defaults: the FnApiRunner on every core, unless the user names a runner."""
    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=FnApiRunner")
        if not any(a.startswith("--direct_num_workers") for a in args):
            args += ["--direct_num_workers=0", "--direct_running_mode=multi_processing"]
    return args


def unknown_beam_flags(beam_args: list[str]) -> list[str]:
    """The flags of `beam_args` that no PipelineOptions class knows (Beam itself would drop them with
    a log line): a typo such as --maxtokens must not run with the default."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)  # what PipelineOptions.get_all_options does
    _, unknown = parser.parse_known_args(beam_args)
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
    return flags or unknown  # a stray value is reported only when no unknown flag explains it


def pipeline_options(beam_args: list[str]):
    """Beam's options for a pass that this process drives; its worker processes learn its pid."""
    from apache_beam.options.pipeline_options import PipelineOptions

    os.environ[DRIVER_PID] = str(os.getpid())

    return PipelineOptions(default_beam_args(beam_args))
