"""The one error type for a user's mistake.

A `UserError` (or a subclass: a missing input, an inconsistent run root, a bad config value) is what
the user can fix; `bft` prints its message as one line and exits 1. Anything else is a bug and keeps
its traceback. Messages name the file, record or option at fault and say what to do.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; `bft` prints the message alone and exits 1."""
