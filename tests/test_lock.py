"""One writer per root: the root's lock refuses a second writer at once, naming the holder; a dead
holder's lock is taken over (locally by the kernel, on gs:// by its heartbeat's age or its gone pid);
generate workers lock only their own names; the command line takes the lock for the writing verbs."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import storage
from bft import cli
from lifecycle.lock import LockHeld, LockLost, RootLock
from schemas.errors import UserError
from schemas.layout import RunLayout, lock_name
from storage import fencing, gcs
from storage import lock as storage_lock
from storage.holder import holder_info
from tests.conftest import ROOT
from tests.helpers.generation import copy_root, gen

_HOLD = """
import sys, time
root, name = sys.argv[1], sys.argv[2]
sys.argv = ["holder-of", root]
from lifecycle.lock import RootLock
RootLock(root, name).acquire()
print("locked", flush=True)
time.sleep(600)
"""


class Holder:
    """A separate process that takes RootLock(root, name) and sleeps until killed."""

    def __init__(self, root: str, name: str = "root"):
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD, root, name], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": ROOT})
        line = self.proc.stdout.readline()
        assert line == "locked\n", self.proc.stderr.read()
        self.pid = self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def refused(root, name="root", **kw) -> str:
    t = time.monotonic()
    with pytest.raises(LockHeld) as e:
        RootLock(root, name, **kw).acquire()
    assert time.monotonic() - t < 5, "a second writer must fail at once, not wait"
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    return str(e.value)


# ---- local roots -------------------------------------------------------------------------------

def test_a_second_writer_on_a_local_root_fails_at_once_naming_the_holder(tmp_path):
    root = str(tmp_path / "run")
    path = RunLayout(root).lock()
    assert path == os.path.join(root, "_lock", "root")
    with RootLock(root) as held:
        assert held.path == path
        record = json.loads(open(path).read())
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["command"] == shlex.join(sys.argv) and len(record["token"]) == 32
        assert record["started"].endswith("Z")
        message = refused(root)
        for part in (path, f"host {socket.gethostname()}", f"pid {os.getpid()}", record["started"],
                     record["command"], "wait", f"remove {path}"):
            assert part in message, (part, message)
    with RootLock(root):  # released: the next writer takes it
        pass
    assert os.path.exists(path) and open(path).read() == ""  # kept, naming no one


def test_a_lock_held_by_a_killed_process_is_taken_over(tmp_path):
    root = str(tmp_path / "run")
    holder = Holder(root)
    try:
        message = refused(root)
        assert f"pid {holder.pid}" in message and f"holder-of {root}" in message
    finally:
        holder.kill()  # kill -9: the kernel frees its lock
    with RootLock(root) as mine:
        assert json.loads(open(mine.path).read())["pid"] == os.getpid()


def test_generate_workers_lock_only_their_own_names(tmp_path):
    root = str(tmp_path / "run")
    assert lock_name() == lock_name("score", 0, 1) == "root"
    names = [lock_name("score", i, 2) for i in range(2)]
    assert names == ["generate-score-0-of-2", "generate-score-1-of-2"]
    with RootLock(root, names[0]), RootLock(root, names[1]), RootLock(root):
        assert "generate-score-0-of-2" in refused(root, names[0])
    with pytest.raises(ValueError):
        RunLayout(root).lock("../x")


def test_a_lock_file_removed_while_held_is_reported_lost(tmp_path):
    root = str(tmp_path / "run")
    with pytest.raises(LockLost, match="removed"):
        with RootLock(root) as held:
            os.unlink(held.path)
            with RootLock(root):  # a second writer now gets a lock of its own
                pass
            with pytest.raises(LockLost):
                held.check()


# ---- gs:// roots -------------------------------------------------------------------------------

def test_gcs_emulator_checks_generations(bucket):
    from google.api_core.exceptions import PreconditionFailed

    blob = gcs.blob(f"gs://{bucket}/x")
    blob.upload_from_string(b"1", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        gcs.blob(f"gs://{bucket}/x").upload_from_string(b"2", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        gcs.blob(f"gs://{bucket}/x").delete(if_generation_match=blob.generation + 1)
    assert storage.read_bytes(f"gs://{bucket}/x") == b"1"


def test_gcs_second_writer_refused(bucket):
    """A second writer is refused at once; release deletes the lock object."""
    root = f"gs://{bucket}/run"
    with RootLock(root) as held:
        assert held.path == f"gs://{bucket}/run/_lock/root"
        record = json.loads(storage.read_bytes(held.path))
        assert record["pid"] == os.getpid() and record["token"] == held.holder["token"] and record["heartbeat"]
        message = refused(root)
        for part in (held.path, f"pid {os.getpid()}", record["started"], "taken over automatically",
                     f"delete {held.path}"):
            assert part in message, (part, message)
    assert not storage.exists(held.path)
    with RootLock(root):  # free again
        pass


def test_gcs_stale_lock_taken_over(bucket):
    """A lock not rewritten for stale_s is taken over; its old holder learns it at release."""
    root = f"gs://{bucket}/run"
    old = RootLock(root, heartbeat_s=3600).acquire()  # its heartbeat never beats: a holder that hung
    time.sleep(0.3)
    assert "pid" in refused(root)  # 0.3 s is not stale by the default 10 minutes
    new = RootLock(root, stale_s=0.2).acquire()
    assert json.loads(storage.read_bytes(new.path))["token"] == new.holder["token"]
    with pytest.raises(LockLost, match="took it over"):
        old.release()  # its delete's precondition fails: the new holder's object stays
    assert json.loads(storage.read_bytes(new.path))["token"] == new.holder["token"]
    new.release()
    assert not storage.exists(new.path)


def test_gcs_heartbeat_notices_takeover(bucket):
    root = f"gs://{bucket}/run"
    first = RootLock(root, heartbeat_s=0.1).acquire()
    generation = first.generation
    deadline = time.monotonic() + 10
    while first.generation == generation and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.generation != generation, "the heartbeat rewrites the lock"
    first.check()
    second = RootLock(root, stale_s=0.0).acquire()  # anything is stale to it
    while first.lost is None and time.monotonic() < deadline + 10:
        time.sleep(0.02)
    with pytest.raises(LockLost):
        first.check()
    with pytest.raises(LockLost):
        first.release()
    assert json.loads(storage.read_bytes(second.path))["token"] == second.holder["token"]
    second.release()


def test_gcs_race_dead_holder_one_winner(bucket, monkeypatch):
    for order in ("together", "late"):
        race_takeover(bucket, monkeypatch, "process gone", order)


def test_gcs_race_stale_holder_one_winner(bucket, monkeypatch):
    for order in ("together", "late"):
        race_takeover(bucket, monkeypatch, "stale", order)


def race_takeover(bucket, monkeypatch, why, order):
    """Two contenders read the same lock, gone (its process ended on this machine) or stale, and
    both try to take it over: exactly one wins, the other is refused by the winner. `together`: two
    threads, both read the old lock before either deletes it; `late`: one contender reads the old
    lock, then the other takes it over completely before the first goes on (its delete of the
    generation it read must not remove the winner's lock)."""
    root = f"gs://{bucket}/run-{order}"
    path = RunLayout(root).lock()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {**holder_info(), "pid": dead.pid}  # this machine, a process that has ended
    stale_s = 600.0
    if why == "stale":  # a holder elsewhere that stopped beating
        record, stale_s = {**record, "host": "elsewhere", "host_id": "elsewhere"}, 2.0
    gcs.blob(path).upload_from_string(json.dumps(record).encode(), if_generation_match=0)
    if why == "stale":
        assert "pid" in refused(root)  # not stale by the default 10 minutes
        time.sleep(stale_s + 0.2)
    real_read = storage_lock.Lock._read
    results = [None, None]

    def contend(i):
        try:
            results[i] = RootLock(root, stale_s=stale_s).acquire()
        except LockHeld as e:
            results[i] = e

    if order == "together":
        barrier, first_read = threading.Barrier(2), threading.local()

        def read(self):
            seen = real_read(self)
            if not getattr(first_read, "done", False):
                first_read.done = True
                barrier.wait(timeout=30)
            return seen

        monkeypatch.setattr(storage_lock.Lock, "_read", read)
        threads = [threading.Thread(target=contend, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    else:
        def read(self):
            seen = real_read(self)
            if results[1] is None:
                results[1] = "running"
                contend(1)  # the other contender takes it over between our read and our delete
            return seen

        monkeypatch.setattr(storage_lock.Lock, "_read", read)
        contend(0)
    monkeypatch.setattr(storage_lock.Lock, "_read", real_read)
    winners = [r for r in results if isinstance(r, RootLock)]
    losers = [r for r in results if isinstance(r, LockHeld)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert order == "together" or winners[0] is results[1]
    assert json.loads(storage.read_bytes(path))["token"] == winners[0].holder["token"]
    assert f"pid {os.getpid()}" in str(losers[0])  # refused by the winner, not by the dead holder
    winners[0].release()
    assert not storage.exists(path)


# ---- the command line --------------------------------------------------------------------------

def bft(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_writer_verbs_refuse_a_root_held_by_another_process(tmp_path, capsys):
    root = str(tmp_path / "run")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(json.dumps({
        "root": root, "prepare": {"input": [str(tmp_path / "in" / "*.gz")], "tokenizer": "t"},
        "generate": {"engine": "hf", "backtranslate": {"model": "m"}, "score": {"model": "m"}},
        "assemble": {"recipe": "filter"}}))
    path = RunLayout(root).lock()
    with Holder(root) as holder:
        for argv in (["prepare", "--input", str(tmp_path / "in" / "*.gz"), "--root", root, "--tokenizer", "t"],
                     ["assemble", "--root", root],
                     ["generate", "score", "--root", root, "--engine", "hf", "--model", "m"],
                     ["rebuild", "--config", str(run_file)]):
            rc, out, err = bft(capsys, *argv)
            assert rc == 1 and len(err.strip().splitlines()) == 1, (argv, err)
            assert err.startswith(f"bft {argv[0]}: {path} is held by another run: "), err
            for part in (f"host {socket.gethostname()}", f"pid {holder.pid}", f"holder-of {root}", "wait"):
                assert part in err, (part, err)
        # a generate worker of several locks its own name: the root's lock does not stop it
        rc, _, err = bft(capsys, "generate", "score", "--root", root, "--engine", "hf", "--model", "m",
                         "--num-workers", "2", "--worker-index", "1")
        assert rc == 1 and "held by another run" not in err and "run bft prepare first" in err, err
    rc, _, err = bft(capsys, "assemble", "--root", root)  # the holder was killed: the lock is free
    assert rc == 1 and "held by another run" not in err and len(err.strip().splitlines()) == 1, err


def test_a_generate_worker_is_refused_only_by_its_own_name(tmp_path, capsys):
    root = str(tmp_path / "run")
    args = ["generate", "score", "--root", root, "--engine", "hf", "--model", "m", "--num-workers", "2"]
    with Holder(root, "generate-score-0-of-2") as holder:
        rc, _, err = bft(capsys, *args, "--worker-index", "0")
        assert rc == 1 and "generate-score-0-of-2 is held by another run" in err and f"pid {holder.pid}" in err
        rc, _, err = bft(capsys, *args, "--worker-index", "1")
        assert rc == 1 and "run bft prepare first" in err, err


# ---- fencing: a holder that lost its lock writes and sends nothing more --------------------------

def raw_write(path: str, data: bytes) -> None:
    """A write by another process's holder (this process's fences do not see it)."""
    if storage.is_gcs(path):
        gcs.blob(path).upload_from_string(data)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def raw_read(path: str) -> bytes:
    return gcs.blob(path).download_as_bytes() if storage.is_gcs(path) else open(path, "rb").read()


def woken_holder(root: str, takeover) -> tuple[RootLock, dict[str, bytes]]:
    """A holder of `root`'s lock that pauses while `takeover()` gives the lock to another holder, which
    writes shard 0 of backtranslate and its marker; returns the old lock and the new holder's files."""
    old = RootLock(root, heartbeat_s=3600).acquire()   # its heartbeat never beats: a process paused
    takeover(old)
    layout = RunLayout(root)
    new_files = {layout.generation_shard("backtranslate", 0, 3): b"the new holder's shard",
                 layout.generation_metrics("backtranslate", 0, 3): b'{"the new holder": "marker"}'}
    for path, data in new_files.items():
        raw_write(path, data)
    return old, new_files


def woken_holder_stops(root, takeover, hosted) -> RootLock:
    old, new_files = woken_holder(root, takeover)
    opts = dict(engine="openai", base_url=hosted.url, api="chat", max_model_len=8192, max_new_tokens=16)
    with pytest.raises(LockLost, match="stopped, writing nothing more"):
        gen(root, "backtranslate", "gpt-standin", **opts)                        # it wakes and runs on
    assert hosted.requests == []                                                  # nothing sent
    for path, data in new_files.items():
        with pytest.raises(LockLost):
            storage.write_bytes(path, b"the old holder's")
        with pytest.raises(LockLost):
            storage.delete(path)
        assert raw_read(path) == data                                            # nothing overwritten
    with pytest.raises(LockLost):
        old.release()
    storage.write_bytes(RunLayout(root).generation_shard("x", 0, 1), b"")       # released: no fence left
    return old


def test_a_woken_local_holder_writes_and_sends_nothing(prepared_root, tmp_path, hosted):
    root = copy_root(prepared_root, tmp_path / "run")
    taken = []

    def takeover(old):   # locally a live holder's flock is never stale: its file removed, the next locks anew
        os.unlink(old.path)
        taken.append(storage_lock.Lock(old.path).acquire())

    woken_holder_stops(root, takeover, hosted)
    taken[0].release()


def test_a_local_holder_stops_sending_as_soon_as_it_learns_it_lost_the_lock(prepared_root, tmp_path, hosted):
    root = copy_root(prepared_root, tmp_path / "run")
    lock = RootLock(root).acquire()
    taken = []

    def answer(text):   # the lock changes hands while the third request is answered
        if len(hosted.requests) == 3:
            os.unlink(lock.path)
            taken.append(storage_lock.Lock(lock.path).acquire())
        return "What does the text explain?"

    hosted.answer = answer
    with pytest.raises(LockLost):
        gen(root, "backtranslate", "gpt-standin", engine="openai", base_url=hosted.url, api="chat",
            max_model_len=8192, max_new_tokens=16, concurrency=1, checkpoint_rows=1)
    assert len(hosted.requests) == 3                                 # not one more once it knew
    folder = RunLayout(root).generations("backtranslate")
    assert not [f for f in storage.list_files(folder) if f.endswith((".parquet", ".json"))
                and "_checkpoints" not in f], storage.list_files(folder)
    parts = [f for f in storage.list_files(folder) if "_checkpoints" in f]
    assert len(parts) == 2, parts                                    # the answers before the takeover only
    with pytest.raises(LockLost):
        lock.release()
    taken[0].release()


def test_a_woken_gcs_holder_writes_and_sends_nothing(prepared_root, bucket, hosted):
    root = f"gs://{bucket}/run"
    for name in os.listdir(os.path.join(prepared_root, "candidates")):
        path = os.path.join(prepared_root, "candidates", name)
        if os.path.isfile(path):
            storage.write_bytes(f"{root}/candidates/{name}", open(path, "rb").read())
    taken = []

    def takeover(old):   # paused past the stale time: the next writer takes the lock over
        taken.append(storage_lock.Lock(old.path, stale_s=0.0).acquire())

    woken_holder_stops(root, takeover, hosted)
    taken[0].release()


def test_gcs_writes_are_conditioned_on_the_generation_read_before_the_fence(bucket, monkeypatch):
    """The fence's last window: the lock checked as ours, then taken over and the object written by the
    new holder before our upload lands. The upload's generation precondition fails it: the new
    holder's object stays."""
    root = f"gs://{bucket}/run"
    path = f"{root}/sft/LATEST"
    with RootLock(root):
        storage.write_bytes(path, b"v1")
        real = fencing.check

        def then_another_writer(where, max_age_s=0.0):
            real(where, max_age_s)
            raw_write(path, b"v2 (the new holder's)")

        monkeypatch.setattr(fencing, "check", then_another_writer)
        with pytest.raises(storage.StorageError, match="another writer replaced it"):
            storage.write_bytes(path, b"v1 again")
    assert raw_read(path) == b"v2 (the new holder's)"
