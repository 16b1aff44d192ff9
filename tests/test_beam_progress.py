"""A Beam pass's progress (beam_pipelines/runtime/progress.py), --quiet, and Ctrl-C in a real `bft prepare`."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from beam_pipelines.runtime import driver_watch, progress
from beam_pipelines.runtime.warm import local_worker_command
from bft import cli
from lifecycle.signals import take_sigterm
from schemas.errors import Terminated
from lifecycle.progress import ENV, quiet
from tests.conftest import ROOT

SAMPLE = os.path.join(ROOT, "samples", "dolma", "documents", "*", "*.json.gz")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def not_quiet(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_off_a_terminal_one_line_a_minute_at_most(not_quiet):
    clock, out = Clock(), io.StringIO()
    status = progress.PassStatus("prepare", out, clock=clock)
    assert not status.tty
    for _ in range(59):  # a pass shorter than a minute says nothing
        clock.t += 1
        status.tick()
    assert out.getvalue() == ""
    status.stage("ReadAndMeasure")
    status.count({("bft.prepare", "input_records"): 1200, ("bft.prepare", "dropped/too_long"): 30,
                  ("bft.prepare", "dropped/duplicate"): 5, ("bft.prepare", "length/measured"): 1200})
    clock.t += 1
    status.tick()
    for _ in range(119):  # ticks every half second: still one line a minute
        clock.t += 0.5
        status.tick()
    status.count({("bft.prepare", "input_records"): 800, ("bft.prepare", "kept"): 1900})
    clock.t += 0.5
    status.tick()
    status.close()
    assert out.getvalue().splitlines() == [
        "bft prepare: 1m00s; 1,200 read, 35 dropped; stage ReadAndMeasure",
        "bft prepare: 2m00s; 2,000 read, 1,900 kept, 35 dropped; stage ReadAndMeasure",
    ]


def test_on_a_terminal_one_line_redrawn_in_place_and_cleared(not_quiet):
    clock, out = Clock(), io.StringIO()
    status = progress.PassStatus("assemble", out, clock=clock, tty=True)
    status.tick()
    clock.t += 75
    status.stage("Recipe")
    status.count({("bft.assemble", "candidates"): 5000})
    status.tick()
    status.close()
    assert out.getvalue() == ("\r\x1b[Kbft assemble: 0m00s"
                              "\r\x1b[Kbft assemble: 1m15s; 5,000 candidates; stage Recipe"
                              "\r\x1b[K")


def test_quiet_shows_nothing_on_a_terminal_or_off_it(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    for tty in (True, False):
        clock, out = Clock(), io.StringIO()
        status = progress.PassStatus("prepare", out, clock=clock, tty=tty)
        for _ in range(5):
            clock.t += 61
            status.tick()
        status.close()
        assert out.getvalue() == ""


def test_the_quiet_flag_is_one_setting_for_every_verb(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(ENV, raising=False)
    assert not quiet()
    assert cli.main(["validate", str(tmp_path / "nothing"), "--quiet"]) == 1  # cheap: fails after parsing
    assert quiet() and os.environ[ENV] == "1"  # in the environment: the Beam workers and helpers see it too
    for verb in ("prepare", "assemble", "generate"):
        with pytest.raises(SystemExit):
            cli.main([verb, "--help"])
        assert "--quiet" in capsys.readouterr().out


def _transform(name, urn="beam:transform:pardo:v1"):
    return SimpleNamespace(unique_name=name, spec=SimpleNamespace(urn=urn))


def test_a_fused_stage_is_named_by_the_transforms_doing_its_work():
    stage = SimpleNamespace(name="((ref_AppliedPTransform_...))", transforms=[
        _transform("HeadSplitFiles/MaybeReshuffle/Reshuffle/ReshufflePerKey/GroupByKey/Read", "beam:runner:source:v1"),
        _transform("HeadSplitFiles/MaybeReshuffle/Reshuffle/RemoveRandomKeys"),
        _transform("HeadSplitFiles/Map(decode)"),
        _transform("ReadAndMeasure/ParDo(ReadAndMeasure)"),
        _transform("AllTallies/Transcode/0", "beam:transform:flatten:v1"),
        _transform("Deduplicate/KeyById"),
        _transform("Deduplicate/GroupById/Write", "beam:runner:sink:v1")])
    assert progress.stage_label(stage) == "ReadAndMeasure+Deduplicate"
    create = SimpleNamespace(name="x", transforms=[
        _transform("ShardNumbers/Impulse", "beam:runner:source:v1"),
        _transform("ShardNumbers/FlatMap(<lambda at core.py:4094>)"), _transform("ShardNumbers/Map(decode)")])
    assert progress.stage_label(create) == "ShardNumbers"
    shuffle = SimpleNamespace(name="x", transforms=[
        _transform("AllShards/Read", "beam:runner:source:v1"), _transform("GroupByShard/Write", "beam:runner:sink:v1")])
    assert progress.stage_label(shuffle) == "AllShards+GroupByShard"


def test_user_counters_come_from_a_bundles_monitoring_infos():
    from apache_beam.metrics import monitoring_infos as mi

    infos = [mi.int64_user_counter("bft.prepare", "input_records", 7),
             mi.int64_user_counter("bft.prepare", "input_records", 5),
             mi.int64_counter(mi.ELEMENT_COUNT_URN, 99, pcollection="p")]
    assert progress.user_counters(infos) == {("bft.prepare", "input_records"): 12}


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != b"Z":
                found.append(int(name))
    return found


def _forked_warm(pids: list[int]) -> list[int]:
    """The local workers of `pids` forked by a warm process (runtime/warm.py): its command line, its child."""
    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""

    def parent(pid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return int(f.read().rsplit(b")", 1)[1].split()[1])
        except OSError:
            return 0

    warm = b"beam_pipelines.runtime.warm"
    return [pid for pid in pids if warm in cmdline(pid) and warm in cmdline(parent(pid))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_in_prepare_is_one_line_exit_143_and_leaves_no_process(tmp_path, bpe_tokenizer_path):
    """What systemd, `timeout` and Airflow do: SIGTERM to the whole process group (the driver and the
    local runner's worker processes), here while the workers run. A terminal's Ctrl-C (SIGINT to the
    foreground group) takes the same path, 130 (test_an_interrupt_ends_the_local_workers_that_ignore_it)."""
    root = tmp_path / "run"
    big = tmp_path / "in" / "cc_en_head" / "big.jsonl"  # long enough to be running at the Ctrl-C (the
    big.parent.mkdir(parents=True)                      # bundled sample can finish within the second)
    with open(big, "wb") as f:
        for i in range(300_000):
            f.write(b'{"id": "d%d", "text": "document number %d of many"}\n' % (i, i))
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "BFT_DRIVER_PID")}
    proc = subprocess.Popen(  # the default runner: the FnApiRunner with workers in processes
        [sys.executable, "-m", "bft.cli", "prepare", "--input", SAMPLE, "--input", str(big), "--tokenizer",
         bpe_tokenizer_path, "--root", str(root), "--max-tokens", "1024", "--num-shards", "4"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        # a terminal's foreground job: SIGINT at its default, even when the suite itself runs where it
        # is ignored (a background job of a non-interactive shell, `make test &`: every child inherits
        # the ignore, and then bft rightly leaves Ctrl-C alone; that, not the timing, made this flaky)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 12
        # the workers, forked by the warm process the command started (runtime/warm.py)
        while time.time() < deadline and proc.poll() is None and not _forked_warm(driver_watch.local_workers(proc.pid)):
            time.sleep(0.1)
        assert proc.poll() is None and _forked_warm(driver_watch.local_workers(proc.pid)), "no local worker started"
        time.sleep(1.0)  # past the workers' start-up, well inside the pass (300K lines: over 10 s of work)
        assert proc.poll() is None, "the pass ended before the interrupt"
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=90)  # a loaded machine (the suite's other workers) is slow to stop
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err.decode()
    assert err.decode().splitlines() == ["bft prepare: interrupted by SIGTERM"]
    deadline = time.time() + 10
    while _group(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert _group(proc.pid) == []
    candidates = root / "candidates"
    assert not (candidates / "stats.json").exists()  # visibly incomplete: the next run redoes it
    assert not (candidates / "_tmp").exists()  # the run's document texts are gone with it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_an_interrupt_ends_the_local_workers_that_ignore_it(sig, raised):
    """A local worker (started as warm.local_worker_command starts Beam's) ignores Ctrl-C and
    SIGTERM; its driver, interrupted while a pass runs (progress.interrupts), kills it and raises the
    interrupt, KeyboardInterrupt or (with bft's CLI handler) Terminated."""
    command = local_worker_command(f"{sys.executable} -c 'import time; time.sleep(60)' -m "
                                   f"{driver_watch.WORKER_MAIN.decode()}")
    worker = subprocess.Popen(command, shell=True)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.time() + 10   # until `sh` has trapped and exec'd the worker
        while not open(f"/proc/{worker.pid}/cmdline", "rb").read().startswith(sys.executable.encode()):
            assert time.time() < deadline and worker.poll() is None
            time.sleep(0.01)
        os.kill(worker.pid, sig)
        time.sleep(0.1)
        assert worker.poll() is None and worker.pid in driver_watch.local_workers()
        signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal's foreground job
        take_sigterm()
        with pytest.raises(raised):
            with progress.interrupts():
                os.kill(os.getpid(), sig)
                time.sleep(10)
        assert worker.wait(timeout=10) == -signal.SIGKILL
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if worker.poll() is None:
            worker.kill()


def test_a_job_the_runner_failed_is_its_first_error_line():
    """A Flink job that failed (here: a TaskManager out of direct memory, as at 1M documents with too
    little task off-heap memory) is one line with the runner's error, not the SDK's traceback."""
    from beam_pipelines.runtime.progress import job_failure

    message = ("Pipeline BeamApp-root-1205114700-ae98556e_f8107588-df68 failed in state FAILED: "
               "java.lang.OutOfMemoryError: Direct buffer memory. The direct out-of-memory error has occurred.\n"
               "\tat java.base/java.nio.Bits.reserveMemory(Bits.java:175)\n")
    assert job_failure(message) == ("java.lang.OutOfMemoryError: Direct buffer memory. The direct out-of-memory "
                                    "error has occurred.")
    assert job_failure("Pipeline P failed in state CANCELLED: ") == "CANCELLED"
    assert job_failure("division by zero") is None
    assert len(job_failure("Pipeline P failed in state FAILED: " + "x" * 1000)) == 300


def test_a_workers_user_error_is_not_printed_whole_but_a_bug_is():
    """A stale shard found inside a Beam worker printed ~65 lines (the worker's traceback,
    printed and logged) before the command's one line. The worker's stderr and its sdk_worker logger
    drop a traceback of one of our UserErrors; any other error (a bug) still prints whole."""
    import io
    import logging

    import beam_pipelines.assemble.config  # noqa: F401  (AssembleError is known as a UserError once imported, as in a worker)
    from beam_pipelines.runtime.driver_watch import WorkerStderr, _not_a_user_error

    ours = ("Traceback (most recent call last):\n  File \"assemble.py\", line 287\n"
            "beam_pipelines.assemble.config.AssembleError: score-00000-of-00002.parquet: row a0 carries another "
            "instruction than its backtranslate row; rerun bft generate score [while running 'JoinShard']\n")
    bug = "Traceback (most recent call last):\n  File \"x.py\", line 1\nZeroDivisionError: division by zero\n"
    out = io.StringIO()
    err = WorkerStderr(out)
    for text in (ours, "\n", bug, "a warning line\n"):
        err.write(text)
    assert out.getvalue() == "\n" + bug + "a warning line\n"
    record = logging.LogRecord("apache_beam.runners.worker.sdk_worker", logging.ERROR, "", 0,
                               "Error processing instruction %s. Original traceback is\n%s\n", ("1", ours), None)
    assert not _not_a_user_error(record)
    record.args = ("1", bug)
    assert _not_a_user_error(record)
