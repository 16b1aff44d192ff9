"""The one error type for a user's mistake, and how any failure is told: one line and an exit status.

A `UserError` (or a subclass: a missing input, an inconsistent run root, a bad config value) is what
the user can fix; `bft` prints its message as one line and exits 1. Anything else is a bug and keeps
its traceback. Messages name the file, record or option at fault and say what to do. An interrupt
(Ctrl-C, or SIGTERM as `Terminated`: lifecycle.signals) is told as `interrupted...` and exits 128 + the
signal's number, as a shell reports a process the signal ended: 130 for SIGINT, 143 for SIGTERM.
"""
from __future__ import annotations

import re
import signal

import storage


class UserError(Exception):
    """A mistake the user can fix; `bft` prints the message alone and exits 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the handler lifecycle.signals.take_sigterm installs."""


def interrupt_status(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def interrupted_text(interrupt: KeyboardInterrupt) -> str:
    """The one line an interrupt ends with: which signal, and the answered rows kept (`kept_rows`,
    which a generation stage sets on the interrupt it lets through)."""
    text = "interrupted by SIGTERM" if isinstance(interrupt, Terminated) else "interrupted"
    kept = getattr(interrupt, "kept_rows", None)
    return text if kept is None else f"{text}: {kept:,} answered rows kept; rerun to resume"


def _user_error_names() -> set[str]:
    names, todo = set(), [UserError, storage.StorageError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def user_error_message(exc: BaseException) -> str | None:
    """The message of a UserError, also when a Beam runner re-raised it from a worker (as the text
    of another exception, whose last line is `<ErrorClass>: <message>`)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, (UserError, storage.StorageError)):  # a bucket's error names its gs:// path
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return user_error_in_text(str(exc))


def user_error_in_text(text: str) -> str | None:
    """The message of the last UserError a text names as `<ErrorClass>: <message>` (a Beam runner's
    traceback of a worker's error, or its log line of it), or None."""
    names = "|".join(sorted(_user_error_names()))
    found = re.findall(rf"\b(?:{names}): (.+)", text)
    if not found:
        return None
    return re.sub(r"\s*\[while running '[^']*'\]\s*$", "", found[-1]).strip()


def chain(exc: BaseException):
    """`exc` and the exceptions it was raised from or while handling, once each."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# sysexits.h's "temporary failure: try again later": a state to wait out (external workers, Batch API batches)
EX_TEMPFAIL = 75


def exit_status(exc: BaseException) -> int:
    """The exit status of a command that ended with `exc`: its `exit_status` where an exception of
    its chain has one (generation.batch.BatchesPending: 75, EX_TEMPFAIL, a state to wait out), 130 for
    Ctrl-C and 143 for SIGTERM, else 1 (a user's mistake, or a bug)."""
    found = next((c.exit_status for c in chain(exc) if isinstance(getattr(c, "exit_status", None), int)), None)
    if found is not None:
        return found
    return interrupt_status(exc) if isinstance(exc, KeyboardInterrupt) else 1


def one_line(exc: BaseException, limit: int = 300) -> str:
    """What a record of a failure keeps (the night's record, `bft status`, a JSON answer): the user
    error's message, `interrupted`, or for a bug `<Type>: <its last line>` (a Beam runner's
    exception holds the worker's whole traceback; its last line names the error)."""
    message = user_error_message(exc)
    if message is None and isinstance(exc, KeyboardInterrupt):
        message = interrupted_text(exc)
    if message is None:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        message = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit - 3] + "..."


# A verb with `--format json` that printed its own JSON answer for a failure (the error in it) marks
# the exception with this attribute, so that `bft` does not print a second document (bft.cli).
JSON_ANSWERED = "json_answered"
