"""A worker process of the local runner ends with the driver process that started it.

The FnApiRunner starts its workers through `sh -c`; when the driver is killed (SIGKILL, the OOM
killer) they are reparented and stay: busy ones finish their bundle (writing files into an output
the next run is cleaning), then all wait for a driver that never answers, and print gRPC tracebacks
when it is gone. Measured with `bft prepare` killed 3 s after its workers started: both workers were
still there 20 s later. Two guards:
- `boot` (`python -m beam_pipelines.runtime.driver_watch MODULE`; the local worker's command,
  warm.local_worker_command, calls it when no warm process forks the worker, which does the same)
  asks the kernel to SIGKILL the worker when its driver ends (PR_SET_PDEATHSIG, Linux), before Beam's
  worker starts: every worker, busy or idle, ends with the driver however the driver ends.
- elsewhere, and for the workers of other runners, the driver exports its pid (BFT_DRIVER_PID, see
  options.pipeline_options) and `watch`, started by options.configure_process in the setup of every
  bft DoFn, polls it from a daemon thread every 0.5 s.

The other way round, on Ctrl-C or SIGTERM: the workers ignore both (warm.local_worker_command) and
the interrupted driver ends them itself (`end_workers`, called by progress.interrupts), at once,
instead of waiting for each busy worker's bundle.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

DRIVER_PID = "BFT_DRIVER_PID"  # the pid of the process driving a pass, for its workers (options sets it)


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (Linux /proc; elsewhere: assumed alive)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError):   # gone, or going while read
        return False
    except OSError:
        return True


def _exit_with(driver: int, interval_s: float) -> None:
    while alive(driver):
        time.sleep(interval_s)
    os._exit(1)  # no cleanup: whatever this worker was writing is whole-or-nothing


def watch(interval_s: float = 0.5) -> None:
    """Starts the watch in a worker process (not in the driver itself, which runs in-process runners),
    and makes the worker's clean exit quick."""
    driver = int(os.environ.get(DRIVER_PID, "0") or 0)
    if driver and driver != os.getpid():
        threading.Thread(target=_exit_with, args=(driver, interval_s), name="bft-driver-watch", daemon=True).start()
        _quick_clean_exit()


_failed = []


def _quick_clean_exit() -> None:
    """A local worker exits when the runner closes its control channel, every bundle answered; the
    interpreter's teardown then took ~0.7 s per worker (module finalization, garbage collection,
    gRPC threads), and the runner waits for its workers one after the other: ~1.4 s of every local
    pass. At a clean exit (Beam's worker has closed its log handler, which sends what is left), the
    streams are flushed and the process ends at once. An exit by an uncaught exception keeps its
    status: the runner reports a worker's non-zero exit."""
    import atexit
    import logging
    import sys

    hook = sys.excepthook

    def note_failure(*exc):
        _failed.append(exc[0])
        hook(*exc)

    def leave():
        if _failed:
            return
        for handler in logging.getLogger().handlers:  # Beam's own handler is closed (flushed) by then
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    sys.excepthook = note_failure
    atexit.register(leave)



WORKER_MAIN = b"apache_beam.runners.worker.sdk_worker_main"


def local_workers(driver: int | None = None) -> list[int]:
    """The pids of the local runner's worker processes under `driver` (default: this process), from
    /proc (elsewhere: none): its descendants whose command line runs Beam's worker main."""
    driver = os.getpid() if driver is None else driver
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], list(children.get(driver, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if WORKER_MAIN in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def end_workers(driver: int | None = None) -> list[int]:
    """Ends the local workers of an interrupted driver at once (SIGKILL: they ignore SIGINT and SIGTERM,
    and a kill prints nothing): a busy worker would otherwise finish its bundle before the runner's
    shutdown, which waits for every worker, lets the driver go. What a worker was writing is
    whole-or-nothing."""
    pids = local_workers(driver)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return pids


PR_SET_PDEATHSIG = 1
BOOT = "beam_pipelines.runtime.driver_watch"


def die_with_driver() -> None:
    """SIGKILL for this process when its parent, the driver, ends (Linux; elsewhere `watch` alone),
    and an exit now when the driver has ended already (before the request could be made)."""
    die_with(int(os.environ.get(DRIVER_PID, "0") or 0) or os.getppid())


def die_with(parent: int) -> None:
    """SIGKILL for this process when its parent (pid `parent`) ends; an exit now if it has already."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _not_a_user_error(record) -> bool:
    """False for a worker's log record of a UserError it raised (its whole traceback, ~65 lines on the
    command's stderr): the driver gets the error with the bundle's failure and the command says it in
    one line. Every other record passes."""
    import logging

    if record.levelno < logging.ERROR:
        return True
    from schemas.errors import user_error_in_text

    return user_error_in_text(record.getMessage()) is None


class WorkerStderr:
    """The worker's stderr without the traceback Beam's worker prints of a bundle that failed with one of
    our UserErrors (sdk_worker._execute prints it whole before logging it): the driver gets the error
    with the bundle's failure and the command says it in one line. Everything else is written through."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if text.startswith("Traceback (most recent call last)") and not _not_a_user_error(_ErrorText(text)):
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class _ErrorText:
    """A printed text as the log record `_not_a_user_error` reads."""

    levelno = 40   # logging.ERROR

    def __init__(self, text: str):
        self.text = text

    def getMessage(self) -> str:
        return self.text


def boot(argv: list[str]) -> None:
    """`python -m beam_pipelines.runtime.driver_watch MODULE [ARG...]`: MODULE run as __main__ (with ARG...),
    in a process that ends with its driver (a local worker started cold: warm.boot)."""
    die_with_driver()
    worker_main(argv)


def worker_main(argv: list[str]) -> None:
    """MODULE (`argv[1]`) run as __main__ with `argv[2:]`; Beam's worker without its log of our UserErrors."""
    import logging
    import runpy

    if argv[1].encode() == WORKER_MAIN:
        logging.getLogger("apache_beam.runners.worker.sdk_worker").addFilter(_not_a_user_error)
        sys.stderr = WorkerStderr(sys.stderr)
    sys.argv = [argv[0], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    boot(sys.argv)
