"""prepare and assemble with workers in separate processes, as on Flink and Dataflow: Beam's job server
as its own process (local_job_service_main) and an external worker pool (worker_pool_main,
--environment_type EXTERNAL, --sdk_worker_parallelism 2). The output equals the local runner's, file
by file.

The pool starts each worker as `python` from its own PATH (Beam 2.77's worker_pool_main): a pool whose
PATH has no Python with Beam and bft makes every job wait five minutes and fail. So the fixture puts
this venv's bin first on the pool's PATH, proves that `python` there imports apache_beam and bft
before it starts anything, waits for each port a bounded time, and kills its process groups (the
services and the workers they started) at teardown.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from beam_pipelines import assemble, prepare
from beam_pipelines.assemble import AssembleConfig
from beam_pipelines.prepare import PrepareConfig
from tests.conftest import LOCAL, ROOT, _free_port
from tests.test_assemble import write_root, write_seed
from tests.test_prepare_pipeline import corpus  # noqa: F401  (the fixture)

START_TIMEOUT_S = 60
# what differs between two runs of one config in two roots: times, what hashes the root's name, and
# which way the length filter counted (length.CostSwitch chooses by measured time; every way is exact)
VOLATILE = {"finished_at", "created_at", "started_at", "timing", "config_hash", "counted_from_pieces",
            "tokenized_in_full", "in_full_by_switch", "chunk_lookups", "chunk_misses"}


def _wait_for_port(port: int, proc: subprocess.Popen, log: str) -> None:
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}:\n{_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"not listening on {port} after {START_TIMEOUT_S}s:\n{_tail(log)}")


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-3000:]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL to the process group this fixture started (the service and its workers)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def external_workers(tmp_path_factory):
    """Beam flags for PortableRunner -> a job server process -> an external worker pool process."""
    logs = tmp_path_factory.mktemp("beam_services")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": ROOT}
    probe = subprocess.run(["python", "-c", "import sys, apache_beam, beam_pipelines; print(sys.prefix)"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == sys.prefix, (
        f"`python` on the worker pool's PATH is not this venv's: {probe.stdout} {probe.stderr[-2000:]}")
    procs = []
    try:
        ports = {}
        for name, module, flag in (("job", "apache_beam.runners.portability.local_job_service_main", "--port"),
                                   ("pool", "apache_beam.runners.worker.worker_pool_main", "--service_port")):
            port, log = _free_port(), str(logs / f"{name}.log")
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", module, flag, str(port)], env=env, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True, cwd=str(logs))
            procs.append(proc)
            _wait_for_port(port, proc, log)
            ports[name] = port
        yield ["--runner=PortableRunner", f"--job_endpoint=localhost:{ports['job']}", "--environment_type=EXTERNAL",
               f"--environment_config=localhost:{ports['pool']}", "--sdk_worker_parallelism=2"]
    finally:
        for proc in reversed(procs):
            _stop(proc)


def same_files(a: str, b: str, root_a: str, root_b: str) -> list[str]:
    """Compares two output trees: the same file names; parquet files with equal tables; JSON with equal
    content once the runs' own roots and times are taken out. Returns the files compared."""
    def names(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

    assert names(a) == names(b)
    for rel in names(a):
        pa_, pb = os.path.join(a, rel), os.path.join(b, rel)
        if rel.endswith(".parquet"):
            assert pq.read_table(pa_).equals(pq.read_table(pb)), rel
        elif rel.endswith(".json"):
            assert _stable(json.load(open(pa_)), root_a) == _stable(json.load(open(pb)), root_b), rel
    return names(a)


def _stable(value, root):
    if isinstance(value, dict):
        # a manifest's checksum of a file that names the root or the finish time (JSON, the report): the
        # JSON itself is compared instead; the report is rendered from that JSON
        named_root = str(value.get("path", "")).endswith((".json", ".html")) and "sha256" in value
        return {k: _stable(v, root) for k, v in value.items()
                if k not in VOLATILE and not (named_root and k in ("sha256", "bytes"))}
    if isinstance(value, list):
        return [_stable(v, root) for v in value]
    return value.replace(root, "<root>") if isinstance(value, str) else value


def _prepare(corpus, root, tok, beam_args, **kw):
    cfg = PrepareConfig(input=[corpus], root=str(root), tokenizer=tok, max_tokens=4000, num_shards=4,
                        reject_shards=2, **kw)
    cfg.check()
    return prepare.run(cfg, beam_args)


@pytest.mark.parametrize("target_docs", [None, 30])
def test_prepare_with_a_job_server_and_an_external_worker_pool(external_workers, corpus, tmp_path,  # noqa: F811
                                                               bpe_tokenizer_path, target_docs):
    local = _prepare(corpus, tmp_path / "local", bpe_tokenizer_path, LOCAL, target_docs=target_docs)
    ext = _prepare(corpus, tmp_path / "ext", bpe_tokenizer_path, external_workers, target_docs=target_docs)
    assert ext["kept"] == local["kept"] > 0
    files = same_files(str(tmp_path / "local" / "candidates"), str(tmp_path / "ext" / "candidates"),
                       str(tmp_path / "local"), str(tmp_path / "ext"))
    assert "stats.json" in files and sum(f.startswith("candidates-") for f in files) == 4


def test_assemble_with_a_job_server_and_an_external_worker_pool(external_workers, tmp_path, bpe_tokenizer_path):
    seed = write_seed(str(tmp_path / "seed.jsonl"))
    roots = {}
    for name, args in (("local", LOCAL), ("ext", external_workers)):
        roots[name] = write_root(str(tmp_path / name), bpe_tokenizer_path)
        assemble.run(AssembleConfig(root=roots[name], seed_data=seed, validation_fraction=0.3, version="v1"), args)
    files = same_files(os.path.join(roots["local"], "sft", "v1"), os.path.join(roots["ext"], "sft", "v1"),
                       roots["local"], roots["ext"])
    assert {"data/train-00000-of-00002.parquet", "stats.json"} <= set(files)
    assert any(f.startswith("data/validation-00000-of-") for f in files)


def test_near_dedup_with_a_job_server_and_an_external_worker_pool(external_workers, tmp_path, fixture_texts,
                                                                  bpe_tokenizer_path):
    """Issue 22: the survivors of --near-dedup do not depend on the runner: on the planted corpus the
    job server with an external worker pool writes the local runner's candidates and rejects."""
    from tests.test_near_dedup import run_prepare, write_planted

    _, _, glob = write_planted(tmp_path, fixture_texts)
    local = run_prepare(glob, tmp_path / "local", bpe_tokenizer_path)
    ext = run_prepare(glob, tmp_path / "ext", bpe_tokenizer_path, external_workers)
    assert ext["dropped"] == local["dropped"] and local["dropped"]["near_duplicate"] > 0
    same_files(str(tmp_path / "local" / "candidates"), str(tmp_path / "ext" / "candidates"),
               str(tmp_path / "local"), str(tmp_path / "ext"))
