"""The floor of `bft prepare` for benchmarks/prepare_bench.py: the same command and pipeline with no
token counting at all. Read, decompress, parse, select, hash, dedup, balance and write run as in
prepare; the length filter's decisions are taken from a file of the ids a prepare run kept by length
(`FLOOR_KEEP`: one id a line), so that the floor writes the same candidates, without any tokenizer work
(their n_tokens null). What prepare costs above this is the price of its length decisions.

    FLOOR_KEEP=ids.txt .venv/bin/python -m benchmarks.prepare_floor prepare --input ... (bft prepare's flags)

The read step is swapped in the driver before the pipeline is built; the workers unpickle the class
from this module (PYTHONPATH must hold the repository, as prepare_bench sets it). Its local workers
are forked warm, as bft prepare's are (beam_pipelines/runtime/warm.py), from a process started before
this module's imports.
"""
from __future__ import annotations

import atexit
import os
import sys

if __name__ == "__main__":   # as bft's CLI does: the warm workers' process before this driver's imports
    from beam_pipelines.runtime import warm

    atexit.register(warm.start(warm.WORKER_IMPORTS + warm.PASS_MODULES["prepare"]).close)

from beam_pipelines.tokens.shape import utf8_bytes
from beam_pipelines.runtime.options import configure_process
from beam_pipelines.prepare import pipeline
from beam_pipelines.prepare.read import ReadAndMeasure
from beam_pipelines.prepare.records import Doc, dropped, reject
from schemas.keys import text_hash

KEEP_ENV = "FLOOR_KEEP"


class ReadWithoutCounting(ReadAndMeasure):
    """ReadAndMeasure whose length filter is a look-up of the ids to keep: no tokenizer call."""

    def setup(self):  # _Measurer.setup without the tokenizer (the driver still proves it, once)
        configure_process()
        self._file_index = {f: i for i, f in enumerate(self.files)}
        self._stash, self._stashed_chars = [], 0
        with open(os.environ[KEEP_ENV]) as f:
            self._kept = set(f.read().split())

    def _measure(self, path, batch, tallies):
        file_index = self._file_index[path]
        tallies["length/measured"] += len(batch)
        for line_no, doc in batch:
            if doc.id in self._kept:
                self._keep(path, line_no, doc)
                yield Doc(doc.id, text_hash(doc.text), None, len(doc.text), file_index, line_no, utf8_bytes(doc.text))
            else:
                tallies[dropped("too_long")] += 1
                yield reject(path, line_no, "too_long", "floor: not kept by the prepare run", doc.id)


def main(argv: list[str] | None = None) -> int:
    from bft import cli

    if not os.environ.get(KEEP_ENV):
        raise SystemExit(f"{KEEP_ENV}: name the file of the ids to keep (one a line)")
    pipeline.ReadAndMeasure = ReadWithoutCounting
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
