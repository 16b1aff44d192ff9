"""Prompt preparation (prompting.fit_prompts: the template, the exact token counts, the cut) in worker
processes beside the engine's dispatch, so that a client on several cores keeps up with a fast server.

Why processes: the tokenizer releases the GIL, but filling the template, rendering the chat template
and the rest of fit_prompts are Python, and on the thread beside the openai engine's event loop they
take the GIL from it (the client's ceiling was ~600 requests/s on one core, most of it preparation:
docs/BENCHMARKS.md). A `PreparePool` starts `workers` processes, each loading the tokenizer once
(pickled by the parent: the engine's own tokenizer object, with whatever the engine set on it), and
maps chunks of template values to fit_prompts' results IN ORDER, at most AHEAD chunks per worker
ahead of the reader. fit_prompts is a pure function of the tokenizer and its arguments, so the
prompts are those of the same call on the caller's thread, byte for byte, in the same order.

The workers are `python -m generation.preparing` subprocesses (the parent's sys.path as PYTHONPATH),
not multiprocessing's: a spawned multiprocessing child first re-imports the parent's main script,
which would rerun a script without an `if __name__ == "__main__"` guard (its engine, its stage) in
every worker, and a child that dies while starting hangs ProcessPoolExecutor. Each worker has one
thread of the parent that sends it a chunk and reads the answer (length-prefixed pickles on its stdin
and stdout), so neither side can block the other. A worker that cannot load the tokenizer (the pool's
start waits for each to answer an empty chunk) leaves preparation on the caller's thread, with a
warning; one that exits later is an error naming its exit code (its traceback is on stderr). Workers
ignore Ctrl-C: the parent ends them by closing their input, after the chunks in flight.

When: `pool_workers` decides, per stage run. A worker costs a start of ~1-2 s (an interpreter, the
transformers import, the tokenizer) and each chunk a pickled round trip, so the pool is used only with
at least MIN_POOL_CORES usable cores (os.sched_getaffinity: what taskset or a container grants; on 2 it
measured slower than the thread) and at least
POOL_MIN_ROWS rows to send; otherwise, and where there is no local tokenizer (the openai chat API
without --tokenizer: no counting to move) or it cannot be pickled, preparation stays on the caller's
thread as before. Workers: the usable cores less one, kept for the dispatch (at least one).
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Iterable, Iterator

from generation.prompting import fit_prompts
from generation.templates import Template

log = logging.getLogger("bft.prepare")

# Rows to send below which the pool's start costs more than it saves (measured with
# benchmarks/client_bench.py: docs/BENCHMARKS.md, "The client's own ceiling").
POOL_MIN_ROWS = 2000
# Usable cores below which the pool is not used: on 2 cores its one worker, the dispatch and a local
# server share them, and the client measured slower with it (sim server, 2 cores: 666 requests/s with
# the pool against 737 without at 12,800 requests, 708 against 893 at 3,200; docs/BENCHMARKS.md).
MIN_POOL_CORES = 3
AHEAD = 4               # chunks sent per worker ahead of the one being read
_HEADER = struct.Struct("<Q")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity: taskset, a container's cpuset), else os.cpu_count()."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pool_workers(rows: int) -> int:
    """Worker processes for preparing `rows` prompts: 0 (on the caller's thread) on fewer than
    MIN_POOL_CORES cores or for fewer than POOL_MIN_ROWS rows; else the usable cores less one, kept for
    the dispatch."""
    cores = usable_cores()
    if cores < MIN_POOL_CORES or rows < POOL_MIN_ROWS:
        return 0
    return max(1, cores - 1)


class PreparationError(RuntimeError):
    """A worker process ended or answered what is not a result."""


def _send(stream: BinaryIO, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: BinaryIO):
    """The next pickled object on `stream`; EOFError at its end."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


class _Worker:
    """One worker process and the lock of its pipes (one call at a time)."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                   TOKENIZERS_PARALLELISM="false")   # one thread per worker: the workers are the parallelism
        self.proc = subprocess.Popen([sys.executable, "-m", "generation.preparing"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self.lock = threading.Lock()

    def call(self, job: tuple, payload: bytes | None = None) -> list[tuple]:
        """`job`'s result; `payload` (the pickled tokenizer) goes first on the worker's first call."""
        with self.lock:
            try:
                if payload is not None:
                    self.proc.stdin.write(_HEADER.pack(len(payload)) + payload)
                _send(self.proc.stdin, job)
                return _receive(self.proc.stdout)
            except (EOFError, BrokenPipeError, OSError, pickle.UnpicklingError) as e:
                raise PreparationError(f"a prompt preparation worker (pid {self.proc.pid}) ended, exit code "
                                       f"{self.proc.wait()}: {type(e).__name__} (its traceback is above)") from None

    def close(self) -> None:
        try:
            self.proc.stdin.close()   # its end of input: it exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class PreparePool:
    """`workers` processes running fit_prompts with one tokenizer (module docstring). Close it."""

    def __init__(self, tokenizer, workers: int):
        payload = pickle.dumps(tokenizer, protocol=pickle.HIGHEST_PROTOCOL)   # raises where it cannot travel
        self.workers = workers
        self._procs = [_Worker() for _ in range(workers)]   # all started before any is waited for
        try:   # each loads the tokenizer and answers an empty chunk
            for worker in self._procs:
                worker.call((Template(""), [], None, 0, ""), payload)
        except PreparationError:
            for worker in self._procs:
                worker.close()
            raise
        self._free = list(self._procs)
        self._free_lock = threading.Lock()
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="bft-prepare-io")
        self._local = threading.local()

    @classmethod
    def start(cls, tokenizer, rows: int) -> "PreparePool | None":
        """A pool for preparing `rows` prompts with `tokenizer`, or None where preparing on the caller's
        thread is the better (or the only) way: `pool_workers`, no tokenizer, one that cannot be pickled."""
        workers = pool_workers(rows) if tokenizer is not None else 0
        if not workers:
            return None
        try:
            return cls(tokenizer, workers)
        except (pickle.PicklingError, TypeError, AttributeError, PreparationError) as e:
            log.warning("prompts are prepared on one thread: the tokenizer cannot be loaded in worker processes "
                        "(%s)", e)
            return None

    def _call(self, job: tuple) -> list[tuple]:
        """`job` on this I/O thread's own worker (each of the pool's threads takes one for good)."""
        worker = getattr(self._local, "worker", None)
        if worker is None:
            with self._free_lock:
                worker = self._local.worker = self._free.pop()
        return worker.call(job)

    def fit(self, template: Template, chunks: Iterable[list[dict]], doc_field: str | None, budget: int,
            prefix: str = "") -> Iterator[list[tuple]]:
        """fit_prompts(tokenizer, template, chunk, doc_field, budget, prefix) of each chunk, in order."""
        pending: list = []
        chunks = iter(chunks)
        try:
            while True:
                while len(pending) < AHEAD * self.workers:
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    pending.append(self._threads.submit(self._call, (template, chunk, doc_field, budget, prefix)))
                if not pending:
                    return
                yield pending.pop(0).result()
        finally:   # a reader that stops early (an interrupt): nothing it will not read is left to run
            for future in pending:
                future.cancel()

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        for worker in self._procs:
            worker.close()


def _serve() -> None:
    """A worker: the tokenizer, then (template, values, doc_field, budget, prefix) -> fit_prompts' result,
    until its input ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's: it ends the worker by closing its input
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # whatever a library prints must not corrupt the answers
    try:
        tokenizer = _receive(stdin)
        while True:
            template, values, doc_field, budget, prefix = _receive(stdin)
            _send(stdout, fit_prompts(tokenizer, template, values, doc_field, budget, prefix))
    except EOFError:   # the parent closed our input: done
        return


if __name__ == "__main__":
    _serve()
