"""The local runner's workers forked warm (beam_pipelines/runtime/warm.py): a worker command's request
runs its module in a child of the warm process, with the command's streams, environment, folder and
argv, and the command exits with the child's status; either side's death ends the other."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from beam_pipelines.runtime import warm
from beam_pipelines.runtime.driver_watch import alive
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Unix sockets, /proc, PR_SET_PDEATHSIG")
PROBE = "tests.helpers.warm_probe"
REQUEST = "import sys\nfrom beam_pipelines.runtime import warm\nwarm.exit_with(warm.request(sys.argv[1:]))\n"


@pytest.fixture
def warm_process():
    previous = os.environ.get(warm.ENV)
    w = warm.start(())   # no imports: the protocol alone
    try:
        yield w
    finally:
        w.close()
        if previous is not None:
            os.environ[warm.ENV] = previous


def command(tmp_path, **env):
    """A worker command as the runner starts one: its own process, streams and environment."""
    return subprocess.Popen([sys.executable, "-c", REQUEST, sys.executable, PROBE, "--id=7"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ROOT, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.time() + seconds
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_a_worker_is_forked_with_the_commands_streams_environment_folder_argv_and_status(warm_process, tmp_path):
    runs = [command(tmp_path, BFT_PROBE=f"run {i}", BFT_PROBE_STATUS=str(status)) for i, status in enumerate((0, 3))]
    for i, (run, status) in enumerate(zip(runs, (0, 3))):
        out, err = run.communicate(timeout=60)
        assert out, err
        said = json.loads(out)
        assert run.returncode == status   # the worker's exit status is the command's
        assert said["ppid"] == warm_process.process.pid and said["pid"] != run.pid   # forked by the warm process
        assert (said["cwd"], said["argv"], said["probe"]) == (str(tmp_path), ["--id=7"], f"run {i}")


def test_without_a_warm_process_the_command_starts_its_worker_itself(tmp_path):
    for path in (str(tmp_path / "none"), "0"):   # none listening; turned off (BFT_WARM_WORKERS=0)
        env = {**os.environ, warm.ENV: path, "PYTHONPATH": ROOT}
        out = subprocess.run([sys.executable, "-c", "import sys\nfrom beam_pipelines.runtime import warm\n"
                              "print(warm.request(['python', 'x']))"], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == "None", out.stderr
    # the worker command itself (warm.boot), with another module than Beam's worker main: run here, cold
    run = subprocess.run([sys.executable, "-m", "beam_pipelines.runtime.warm", PROBE, "--id=7"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ROOT, "BFT_PROBE_STATUS": "3"}, capture_output=True, text=True)
    assert run.returncode == 3 and json.loads(run.stdout)["argv"] == ["--id=7"], run.stderr


def test_a_worker_dies_with_its_command_and_with_the_warm_process(warm_process, tmp_path):
    run = command(tmp_path, BFT_PROBE="wait")
    worker = json.loads(run.stdout.readline())["pid"]
    run.kill()   # the runner (or the interrupted driver) ends the command: its worker goes with it
    run.wait()
    assert wait_gone(worker), "the worker outlived its command"

    run = command(tmp_path, BFT_PROBE="wait")
    worker = json.loads(run.stdout.readline())["pid"]
    os.kill(warm_process.process.pid, signal.SIGKILL)   # the warm process ends (with its driver)
    assert run.wait(timeout=30) == 1   # a worker lost: the command fails, as a killed worker would
    assert wait_gone(worker), "the worker outlived the warm process"


def test_the_warm_process_ignores_interrupts_and_is_one_of_the_drivers_local_workers(warm_process):
    from beam_pipelines.runtime import driver_watch

    pid = warm_process.process.pid
    deadline = time.time() + 10   # until `sh` has trapped and exec'd Python
    while not open(f"/proc/{pid}/cmdline", "rb").read().startswith(sys.executable.encode()):
        assert time.time() < deadline
        time.sleep(0.01)
    for sig in (signal.SIGINT, signal.SIGTERM):   # a terminal's Ctrl-C reaches the whole foreground group
        os.kill(pid, sig)
    time.sleep(0.2)
    assert alive(pid)
    assert pid in driver_watch.local_workers()   # an interrupted driver kills it with its workers
    warm_process.close()
    assert not alive(pid) and os.environ.get(warm.ENV) is None and not os.path.exists(warm_process.folder)


@pytest.mark.parametrize("argv, verb, started", [
    (["--input", "x"], "prepare", True), (["--runner=FlinkRunner"], "prepare", False), (["--help"], "assemble", False),
    ([], "rebuild", True), ([], "generate", False),
    (["--runner=FnApiRunner"], "prepare", False),   # its workers in this process: none to fork
    (["--direct_num_workers=1"], "prepare", False),
    (["--runner", "FnApiRunner", "--direct_running_mode", "multi_processing"], "assemble", True),
    (["--direct_num_workers=2", "--direct_running_mode=multi_processing"], "prepare", True)])
def test_which_commands_start_a_warm_process(argv, verb, started, monkeypatch):
    monkeypatch.delenv(warm.ENV, raising=False)
    assert warm.wanted(verb, [argv]) is started
    monkeypatch.setenv(warm.ENV, "0")
    assert not warm.wanted(verb, [argv])


def test_a_run_files_beam_args_decide_too(tmp_path, monkeypatch):
    """`bft rebuild --config FILE`: a warm process only where a pass's workers run in processes; an
    in-process runner in the run file (as the tests' run files say) starts none."""
    from bft.cli import pass_flags

    monkeypatch.delenv(warm.ENV, raising=False)
    run = tmp_path / "run.yaml"
    run.write_text("prepare: {beam_args: ['--runner=FnApiRunner']}\nassemble: {beam_args: ['--runner=FnApiRunner']}\n")
    assert pass_flags("rebuild", ["--config", str(run)]) == [["--runner=FnApiRunner", "--config", str(run)]] * 2
    assert not warm.wanted("rebuild", pass_flags("rebuild", ["--config", str(run)]))
    run.write_text("prepare: {beam_args: ['--runner=FnApiRunner']}\nassemble: {}\n")   # assemble: the default
    assert warm.wanted("rebuild", pass_flags("rebuild", [f"--config={run}"]))
    assert not warm.wanted("prepare", pass_flags("prepare", [f"--config={run}"]))
    assert warm.wanted("prepare", pass_flags("prepare", ["--config", str(tmp_path / "missing.yaml")]))


def test_a_drivers_own_warm_process_serves_its_verb_and_an_inherited_one_does_not(warm_process, monkeypatch):
    with warm.started("prepare", []) as w:   # started before the driver's imports (benchmarks/prepare_floor.py)
        assert w is warm_process
    assert warm_process.process.poll() is None   # the verb did not end what it did not start
    monkeypatch.setattr(warm, "_current", None)   # as in a bft started by a bft: its environment names the parent's
    monkeypatch.setattr(warm, "start", lambda modules: None)
    with warm.started("prepare", []):
        assert os.environ.get(warm.ENV) is None   # its workers will not ask the parent's warm process
    assert os.environ[warm.ENV] == warm_process.path


def test_a_worker_killed_by_a_signal_ends_its_command_with_that_signal(warm_process, tmp_path):
    run = command(tmp_path, BFT_PROBE="wait")
    worker = json.loads(run.stdout.readline())["pid"]
    os.kill(worker, signal.SIGKILL)   # the OOM killer, say: the runner sees the worker's own end
    assert run.wait(timeout=30) == -signal.SIGKILL


def test_a_failed_fork_sends_that_command_cold_and_the_other_workers_go_on(tmp_path):
    """Out of processes or memory for one fork: that command starts its worker itself; the warm
    process and the workers it forked before go on."""
    import socket

    serve = ("import os, sys\nfrom beam_pipelines.runtime import warm\nreal, n = os.fork, [0]\n"
             "def fork():\n    n[0] += 1\n    if n[0] == 2:\n        raise OSError(11, 'Resource temporarily unavailable')\n"
             "    return real()\nos.fork = fork\nwarm.serve(int(sys.argv[1]), [])\n")
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(8)
        server = subprocess.Popen([sys.executable, "-c", serve, str(listener.fileno())], pass_fds=[listener.fileno()],
                                  env={**os.environ, "PYTHONPATH": ROOT, "BFT_DRIVER_PID": str(os.getpid())})
    try:
        env = {warm.ENV: path, "BFT_PROBE": "wait"}
        first = command(tmp_path, **env)
        json.loads(first.stdout.readline())   # forked, waiting
        out = subprocess.run([sys.executable, "-c", "import sys\nfrom beam_pipelines.runtime import warm\n"
                              "print(warm.request(['python', 'x']))"], env={**os.environ, "PYTHONPATH": ROOT, **env},
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "None", out.stderr   # this one starts its worker cold
        time.sleep(0.2)
        assert server.poll() is None and first.poll() is None   # the others go on
        first.kill()
        first.wait()
    finally:
        server.kill()
        server.wait()


def test_a_closed_standard_stream_or_a_long_tmpdir_means_cold_workers(tmp_path):
    """A socket never takes fd 0-2 (a command run with stdin closed, `<&-`): the workers start cold;
    likewise where no socket path fits (a long TMPDIR), and nothing is left behind."""
    long = tmp_path / ("d" * 100)
    long.mkdir()
    script = ("import os, sys, tempfile\nfrom beam_pipelines.runtime import warm\n"
              "tempfile.tempdir = sys.argv[1]\n"
              "with warm.started('prepare', []) as w:\n    print('long tmpdir:', w, os.listdir(sys.argv[1]))\n"
              "tempfile.tempdir = None\nos.close(0)\n"
              "with warm.started('prepare', []) as w:\n    print('closed stdin:', w)\n"
              "os.environ[warm.ENV] = '/nowhere'\nprint('request:', warm.request(['python', 'x']))\n")
    out = subprocess.run([sys.executable, "-c", script, str(long)], env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["long tmpdir: None []", "closed stdin: None", "request: None"], out.stderr


def test_a_killed_drivers_socket_folder_is_removed_by_the_next_driver(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"bft-warm-{int(dead.stdout)}-x1"   # a driver SIGKILLed: no close
    orphan.mkdir()
    mine = warm.start(())
    try:
        assert not orphan.exists() and os.path.isdir(mine.folder)   # and a live driver's stays
    finally:
        mine.close()
