"""Who holds a lock or owns a folder (host, pid, start, command), and whether that process still lives.

A holder's record is written by the process that holds (storage.lock) or owns (storage.claims); a
process on this machine, in this pid namespace (same boot id and pid namespace), can tell whether the
recorded process is gone, so its lock or folder is taken over at once; one elsewhere cannot.
"""
from __future__ import annotations

import datetime
import os
import secrets
import shlex
import socket
import sys


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _host_id() -> str:
    """This machine and pid namespace: two processes with the same host_id see each other's pids."""
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        return ""
    return " ".join(parts)


def holder_info() -> dict:
    """Who holds a lock: host, pid, start time (UTC), command line, and a random token."""
    command = shlex.join(sys.argv) if sys.argv else ""
    return {"host": socket.gethostname(), "host_id": _host_id(), "pid": os.getpid(), "started": iso(now()),
            "command": command.replace("\n", "\\n"), "token": secrets.token_hex(16)}


def describe(holder: dict) -> str:
    """`host H, pid P, since T, running: CMD` (or `an unknown holder`)."""
    if not holder.get("pid"):
        return "an unknown holder (its lock file holds no record yet)"
    return (f"host {holder.get('host', '?')}, pid {holder['pid']}, since {holder.get('started', '?')}, "
            f"running: {holder.get('command') or '?'}")


def same_machine(holder: dict) -> bool:
    """The holder ran on this machine, in this pid namespace (its pid means a process here)."""
    mine = _host_id()
    return bool(mine) and holder.get("host_id") == mine and holder.get("host") == socket.gethostname()


def process_gone(holder: dict) -> bool:
    """The holder ran on this machine, in this pid namespace, and its process no longer exists."""
    if not same_machine(holder):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError, TypeError):
        return False
    return False
