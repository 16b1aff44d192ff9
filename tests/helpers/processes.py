"""`bft` commands as real processes that a test signals (os.kill), without an interpreter's start-up
and imports per command: one process imports bft's CLI once and forks a child per command (it runs
no thread, so a fork is safe). Each child runs `bft.cli.main` with its stderr in a file and ends with
its exit status, as `python -m bft.cli` would."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.conftest import ROOT

FORKER = r"""
import json, os, signal, sys, time, traceback
from bft import cli
import generation.runner, generation.engines.openai  # what a generate command imports, once,
import pyarrow.dataset                                # and its first Parquet read (pandas)
for line in sys.stdin:
    verb, arg = json.loads(line)
    if verb == "wait":   # at most a minute, then the child is killed (a hang fails the test, not the suite)
        deadline = time.monotonic() + 60
        while not (done := os.waitpid(arg, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        if not done[0]:
            os.kill(arg, signal.SIGKILL)
            done = os.waitpid(arg, 0)
        print(os.waitstatus_to_exitcode(done[1]), flush=True)
        continue
    argv, err = arg
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.stdin.close()
        try:
            status = cli.main(argv)
        except BaseException:   # what `python -m bft.cli` would print
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    print(pid, flush=True)
"""


class CliForks:
    """`start(argv, stderr_path) -> pid` starts `bft ARGV` (a child of the forking process, not of the
    test's); `wait(pid) -> exit status`, as Python's `returncode` says it (-15: ended by a SIGTERM it
    did not handle, -9: killed after a minute). Use as a context manager."""

    def __init__(self, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORKER], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            # Ctrl-C at its default, even when the suite runs where SIGINT is ignored (`make test &`)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def _ask(self, verb: str, arg) -> int:
        self.proc.stdin.write(json.dumps([verb, arg]) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, argv: list[str], stderr_path: str) -> int:
        return self._ask("run", [argv, str(stderr_path)])

    def wait(self, pid: int) -> int:
        return self._ask("wait", pid)

    def __enter__(self) -> "CliForks":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
