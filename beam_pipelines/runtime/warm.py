"""The local runner's workers started warm: forked from a process that imported Beam while the driver did.

A local pass (the FnApiRunner with workers in processes, bft's default) starts its workers when its first
stage runs, after the driver has imported Beam and built the pipeline (~1.9 s); each worker then imported
Beam and the pass's modules again (~1.4 s of CPU each) before its first bundle: measured on
`bft prepare` of 30,000 documents on 2 cores, the first stage started 1.9 s into the run and its workers
answered 1.2 s later. Now a bft verb that runs Beam passes (prepare, assemble, rebuild) starts, before
its own imports, one process (`serve`) that imports what a worker needs and waits; the runner's worker
command (`local_worker_command`: `boot`) asks it for a worker, and it forks one: the worker is ready
in milliseconds, its imports made on the other core while the driver made its own (the first stage
answered 0.14 s after it started, the whole command 1.2-1.5 s sooner).

The protocol, over a Unix socket the driver listens on before it starts the warm process (its path in
BFT_WARM_WORKERS, which the worker commands inherit):
* the worker command (`request`) sends its argv, environment and working folder, and its stdin, stdout
  and stderr with them (SCM_RIGHTS), then waits;
* the warm process forks; the child takes the command's streams, environment, folder and argv and runs
  Beam's worker main as a cold start would (driver_watch.worker_main); the warm process answers the
  child's pid at once, and its exit status when it is reaped;
* the command exits with that status: to the runner it is the worker.
The child dies with the warm process and with the command (its socket's end); the warm process dies with
its driver (PR_SET_PDEATHSIG) and ignores Ctrl-C and SIGTERM as the workers do (the interrupted driver
ends every process whose command line names Beam's worker main, these included:
driver_watch.end_workers). A command that reaches no warm process, or whose warm process ends before
answering, starts its worker cold (driver_watch.boot), as before (so does every command where a
standard stream is closed, or where no warm process could start: a socket path too long for TMPDIR);
BFT_WARM_WORKERS=0 turns warm workers off. The warm process imports modules only: no thread of its
own, no gRPC channel, no tokenizer (the threads libraries start at import, OpenBLAS's pool and
jemalloc's, are fork-aware: they mend themselves in the child), so a fork is safe. A worker killed by
a signal ends its command with the same signal: the runner sees what it would have seen.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile

from beam_pipelines.runtime import driver_watch

ENV = "BFT_WARM_WORKERS"   # the warm process's socket path, for the runner's worker commands
# what every local worker imports before its first bundle (Beam's worker main's own imports)
WORKER_IMPORTS = ("google.protobuf.text_format", "apache_beam.internal.pickler", "apache_beam.io.filesystems",
                  "apache_beam.options.pipeline_options", "apache_beam.runners.worker.sdk_worker",
                  "apache_beam.runners.worker.log_handler", "apache_beam.runners.worker.data_sampler",
                  "apache_beam.utils.profiler", "pyarrow")
# the modules of each verb's passes (their DoFns are unpickled in the workers)
PASS_MODULES = {"prepare": ("beam_pipelines.prepare.pipeline",),
                "assemble": ("beam_pipelines.assemble.pipeline",),
                "rebuild": ("beam_pipelines.prepare.pipeline", "beam_pipelines.assemble.pipeline")}
_HEADER = struct.Struct("!I")
_STATUS = struct.Struct("!i")
_JOB_TIMEOUT_S = 10.0
_PREFIX = "bft-warm-"   # the socket's folder under the temporary folder: bft-warm-<driver pid>-<random>
_current: "WarmWorkers | None" = None


class WarmWorkers:
    """The warm process of this driver: `close()` ends it and removes its socket."""

    def __init__(self, process: subprocess.Popen, folder: str):
        self.process, self.folder = process, folder
        self.path = os.path.join(folder, "s")

    def close(self) -> None:
        global _current
        if os.environ.get(ENV) == self.path:
            del os.environ[ENV]
        if _current is self:
            _current = None
        if self.process.poll() is None:
            self.process.kill()   # it ignores SIGTERM; its forked workers die with it
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def wanted(verb: str, passes: list[list[str]]) -> bool:
    """Whether `bft VERB` starts a warm process: a verb that runs passes, one of which (`passes`: each
    pass's Beam flags, its run file's then its command line's) runs on the FnApiRunner with workers in
    processes (bft's default, or asked for by its flags; a pass on another runner `discard`s it), not for
    --help, not with BFT_WARM_WORKERS=0."""
    from beam_pipelines.runtime.options import default_beam_args

    def in_processes(argv: list[str]) -> bool:
        flags: dict[str, str] = {}
        args = default_beam_args(argv)
        for i, a in enumerate(args):   # --flag=value or --flag value
            name, eq, value = a.partition("=")
            flags[name] = value if eq or i + 1 == len(args) else args[i + 1]
        return ("-h" not in flags and "--help" not in flags
                and flags.get("--runner", "").rsplit(".", 1)[-1] == "FnApiRunner"
                and flags.get("--direct_running_mode") == "multi_processing")

    return (verb in PASS_MODULES and any(map(in_processes, passes))
            and sys.platform.startswith("linux") and os.environ.get(ENV) != "0")


def _standard_streams_open() -> bool:
    """Whether fds 0-2 are open: a socket must not take one (a command run with stdin closed, `<&-`)."""
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return False
    return True


def _clear_orphans() -> None:
    """Removes the socket folders of drivers that are gone (SIGKILLed: no `close`); their pid is in the name."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            pid = name[len(_PREFIX):].split("-", 1)[0]
            if name.startswith(_PREFIX) and pid.isdigit() and not driver_watch.alive(int(pid)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def start(modules: tuple[str, ...]) -> WarmWorkers:
    """Starts a warm process importing `modules` and advertises it to the worker commands (ENV); an
    OSError (a closed standard stream, a socket path too long for a long TMPDIR) leaves nothing behind."""
    global _current
    from beam_pipelines.runtime.options import PROCESS_ENV

    if not _standard_streams_open():
        raise OSError("a standard stream is closed")
    _clear_orphans()
    # 0700: only this user's processes reach the socket
    folder = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    path = os.path.join(folder, "s")
    env = {**PROCESS_ENV, **os.environ, driver_watch.DRIVER_PID: str(os.getpid())}
    env.pop(ENV, None)
    try:
        # listening from here: a command's request waits in the backlog while the warm process imports
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(64)
            # as a local worker starts: Ctrl-C and SIGTERM ignored from before Python runs (local_worker_command)
            process = subprocess.Popen(["/bin/sh", "-c", 'trap "" INT TERM; exec "$0" "$@"', sys.executable, "-m",
                                        __name__, "--serve", str(listener.fileno()), ",".join(modules),
                                        driver_watch.WORKER_MAIN.decode()],   # for driver_watch.local_workers
                                       env=env, stdin=subprocess.DEVNULL, pass_fds=[listener.fileno()])
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _current = WarmWorkers(process, folder)
    os.environ[ENV] = path
    return _current


@contextlib.contextmanager
def started(verb: str, passes: list[list[str]]):
    """A warm process for the duration of `bft VERB` where `wanted`; nothing otherwise. One this
    process started already (before imports of its own) serves; one named by the environment only (a
    bft that started this one) is not this driver's: unset here."""
    if _current is not None and os.environ.get(ENV) == _current.path:
        yield _current
        return
    inherited = os.environ.get(ENV)
    if inherited is not None and inherited != "0":
        del os.environ[ENV]
    warm = None
    if wanted(verb, passes):
        with contextlib.suppress(OSError):   # then the workers start cold, as without one
            warm = start(WORKER_IMPORTS + PASS_MODULES[verb])
    try:
        yield warm
    finally:
        if warm is not None:
            warm.close()
        if inherited is not None:
            os.environ[ENV] = inherited


def discard() -> None:
    """Ends this driver's warm process now (a pass on another runner will not use it)."""
    if _current is not None:
        _current.close()


def local_worker_command(command: str) -> str:
    """The shell command that starts a local worker (the FnApiRunner runs it with `sh -c`). Its
    signals are its driver's to give: the terminal's Ctrl-C reaches every process of the foreground
    group, and a worker that took it raised KeyboardInterrupt wherever it was (often in its imports)
    and printed its traceback, while the driver's thread printed another for the worker's exit status;
    a scheduler's SIGTERM to the group (systemd, `timeout`) killed the workers under a driver still
    unwinding. Ignored signals survive `exec`, and Python leaves them ignored, so the worker sees
    neither; the driver ends its workers when it is interrupted (driver_watch.end_workers), and the
    kernel when the driver dies (driver_watch.die_with_driver, before anything else). The command
    (`boot`) asks this driver's warm process for the worker, and starts it cold where none answers;
    Beam's worker main stays on the command line (driver_watch.local_workers finds it there)."""
    main = driver_watch.WORKER_MAIN.decode()
    return f"trap '' INT TERM; exec {command.replace(f'-m {main}', f'-m {__name__} {main}', 1)}"


# ---- the worker command's side -------------------------------------------------------------------

def _send(conn: socket.socket, payload: dict, fds: list[int]) -> None:
    data = json.dumps(payload).encode()
    socket.send_fds(conn, [_HEADER.pack(len(data))], fds)
    conn.sendall(data)


def _receive_exactly(conn: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = conn.recv(n)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def boot(argv: list[str]) -> None:
    """`python -m beam_pipelines.runtime.warm MODULE [ARG...]` (local_worker_command): Beam's worker
    forked by this driver's warm process, this process then exiting with its status; else, as
    driver_watch.boot does, the worker started here, cold."""
    driver_watch.die_with_driver()
    status = request(argv) if argv[1].encode() == driver_watch.WORKER_MAIN else None
    if status is None:
        driver_watch.worker_main(argv)   # driver_watch.boot's work, its death with the driver asked above
    else:
        exit_with(status)


def exit_with(status: int) -> None:
    """Ends this process as its forked worker ended: with its exit status, or killed by its signal
    (`status` < 0), as the runner would have seen the worker end."""
    if status < 0:
        with contextlib.suppress(OSError, ValueError):   # SIGKILL's cannot be set: it needs no setting
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status if status >= 0 else 128 - status)


def request(argv: list[str]) -> int | None:
    """Runs Beam's worker main (`argv` as driver_watch.boot got it) in a child of the warm process and
    returns its exit status; None when no warm process answered (the caller starts the worker cold)."""
    path = os.environ.get(ENV)
    if not path or path == "0" or not _standard_streams_open():   # the socket must not be one of them
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        _send(conn, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}, [0, 1, 2])
        _receive_exactly(conn, _STATUS.size)   # the child's pid: from here the worker is the child's
    except (OSError, EOFError):
        conn.close()
        return None
    try:
        return _STATUS.unpack(_receive_exactly(conn, _STATUS.size))[0]
    except (OSError, EOFError):
        return 1   # the warm process ended under its child (the driver's interrupt): the worker is gone


# ---- the warm process ----------------------------------------------------------------------------

def _child(conn: socket.socket, closing: list, fds: list[int], job: dict, parent: int) -> None:
    """In the forked child: become the worker the command asked for; leaves by SystemExit (or the
    worker's own exception), as Beam's worker main started cold would, through the interpreter's exit."""
    import threading

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for other in closing:   # the listener, the wake-up pipe, the other workers' sockets
        other.close() if isinstance(other, socket.socket) else os.close(other)
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    driver_watch.die_with(parent)
    if "numpy" in sys.modules:   # its global generator's state is the warm process's (`random` reseeds itself)
        sys.modules["numpy"].random.seed()

    def orphaned():   # the command ended (killed): so does its worker
        with contextlib.suppress(OSError):
            while conn.recv(1):
                pass
        os._exit(1)

    threading.Thread(target=orphaned, name="bft-warm-command", daemon=True).start()
    driver_watch.worker_main(job["argv"])
    raise SystemExit(0)


def _read_job(conn: socket.socket) -> tuple[list[int], dict]:
    """The command's streams and job; a command that does not send them within seconds (stopped) is
    dropped, with what it sent, rather than holding up the others."""
    conn.settimeout(_JOB_TIMEOUT_S)
    head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    try:
        if not head or len(fds) != 3:
            raise EOFError
        head += _receive_exactly(conn, _HEADER.size - len(head))
        job = json.loads(_receive_exactly(conn, _HEADER.unpack(head)[0]))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return fds, job


def serve(listening: int, modules: list[str]) -> None:
    """The warm process: on the socket its driver listens on (fd `listening`), import `modules`, then
    fork a worker per request until the driver ends it."""
    import importlib

    me = os.getpid()
    driver_watch.die_with_driver()
    listener = socket.socket(fileno=listening)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # the worker imports it again and reports what fails
            pass
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([listener, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 512)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if not pid:
                    break
                conn = children.pop(pid, None)
                if conn is not None:
                    with contextlib.suppress(OSError):
                        conn.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
                    conn.close()
        if listener in ready:
            try:
                conn, _ = listener.accept()
            except OSError:   # out of fds for a moment: the command waits, or starts its worker cold
                continue
            try:
                fds, job = _read_job(conn)
            except (OSError, EOFError, ValueError):
                conn.close()
                continue
            try:
                pid = os.fork()
            except OSError:   # out of processes or memory: that command starts its worker cold, the others go on
                pid = None
            if pid == 0:
                _child(conn, [listener, wake_r, wake_w, *children.values()], fds, job, parent=me)
            for fd in fds:
                os.close(fd)
            if pid is None:
                conn.close()
                continue
            children[pid] = conn
            with contextlib.suppress(OSError):
                conn.sendall(_STATUS.pack(pid))

if __name__ == "__main__":
    if sys.argv[1] == "--serve":   # python -m beam_pipelines.runtime.warm --serve FD MODULES WORKER_MAIN
        serve(int(sys.argv[2]), [m for m in sys.argv[3].split(",") if m])
    else:
        boot(sys.argv)
