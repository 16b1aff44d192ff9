"""How a bft process takes the signals that stop it: SIGTERM as Ctrl-C.

Ctrl-C (SIGINT) raises KeyboardInterrupt, as Python does. SIGTERM (what Kubernetes, systemd, Airflow
and `timeout` send) raises `Terminated` (schemas.errors), a KeyboardInterrupt, once `take_sigterm`
installed its handler (bft's CLI does, for every verb): every path that keeps work on Ctrl-C keeps it
on SIGTERM too (a generation stage's answered rows checkpointed, a Beam pass's workers ended and its
temporary files removed, the night's record written), and the CLI prints one line
(schemas.errors.interrupted_text) and exits 128 + the signal's number (schemas.errors.interrupt_status):
130 for SIGINT, 143 for SIGTERM.

Code that must not be cut anywhere (an event loop whose answers are paid for) holds the signals for a
while (`deferred`): it is told of them, finishes what it must, and the interrupt is raised after.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

from schemas.errors import Terminated


def _on_sigterm(signum, frame):
    # `timeout` sends SIGTERM to the command and then to its process group, so it comes twice: the
    # second must not cut the unwinding of the first (a scheduler escalates with SIGKILL, not SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def take_sigterm():
    """Makes SIGTERM raise Terminated in this process (main thread only; an ignored SIGTERM stays
    ignored, as Python leaves an ignored SIGINT); returns the handler it replaced, None when it did
    not replace one."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        return None
    signal.signal(signal.SIGTERM, _on_sigterm)
    return signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python


@contextlib.contextmanager
def taken(handler: Callable, take: Callable[[int, object], bool] = lambda signum, current: callable(current)):
    """While the block runs, `handler` takes SIGINT and SIGTERM where `take(signum, the current
    handler)` says (by default: where a Python handler is set), in the main thread only; yields
    {signum: the handler it replaced}, each put back when the block ends."""
    previous: dict[int, Callable] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(sig)
            if take(sig, current):
                previous[sig] = current
                signal.signal(sig, handler)
    try:
        yield previous
    finally:
        for sig, current in previous.items():
            signal.signal(sig, current)


@contextlib.contextmanager
def deferred(notify: Callable[[int], None]):
    """While the block runs, SIGINT and SIGTERM call `notify(signum)` instead of raising wherever the
    main thread is (`notify` runs in the main thread between two bytecodes: it may only schedule); when
    the block has ended, the first signal caught is raised as its own handler raises it
    (KeyboardInterrupt, Terminated). A signal that no Python handler takes (ignored, or SIGTERM at its
    default) is left alone, and so is every signal off the main thread."""
    caught: list[int] = []

    def held(signum, frame):
        caught.append(signum)
        notify(signum)

    with taken(held) as previous:
        yield
    if caught:
        previous[caught[0]](caught[0], None)
        raise KeyboardInterrupt  # a handler that did not raise: the block still ended early
