"""bft's Beam passes on engines other than the local runner, each giving the local runner's output file by
file:

- a real Flink session cluster (scripts/flink_local.py: Flink 1.19 from PyPI, a JobManager and two
  TaskManagers in their own JVMs, Beam's Flink job server built from Maven Central's jars, Python
  workers that each TaskManager starts in Beam's PROCESS environment), started once per test run by
  conftest.py; the cluster's REST API must show every job the pass submitted FINISHED;
- Beam's own job service as its own process (local_job_service_main) with an external worker pool
  (worker_pool_main, --environment_type EXTERNAL, --sdk_worker_parallelism 2).

`make test` runs one Flink end-to-end test (prepare with --near-dedup and --target-docs, assemble
filter+rewrite with decontamination); `make test-engines` (-m engines) runs the whole matrix.

The job service's pool starts each worker as `python` from its own PATH (Beam 2.77's worker_pool_main):
a pool whose PATH has no Python with Beam and bft makes every job wait five minutes and fail. So the
fixture puts this venv's bin first on the pool's PATH, prove that `python` there imports apache_beam and bft
before it starts anything, waits for each port a bounded time, and kills their process groups (the
services and the workers they started) at teardown.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

from beam_pipelines import prepare

from beam_pipelines.assemble import driver as assemble
from beam_pipelines.assemble.config import AssembleConfig
from beam_pipelines.prepare import PrepareConfig
from tests.conftest import LOCAL, ROOT, _free_port, flink_cluster
from tests.helpers.assemble import write_root, write_seed
from tests.helpers.corpora import bad_lines_corpus
from tests.helpers.decontamination import IN_INSTRUCTION, IN_RESPONSE, plant
from tests.helpers.near_duplicates import run_prepare, write_planted

START_TIMEOUT_S = 60
# what differs between two runs of one config in two roots: times, what hashes the root's name, and
# which way the length filter counted (tokens.cost.CostSwitch chooses by measured time; every way is exact)
# the times, and which way the length filter decided each text (by the caches' state and measured time:
# only the bounds on the text alone, rejected_by_bound and kept_by_bound, are the same in every run)
VOLATILE = {"finished_at", "created_at", "started_at", "timing", "config_hash", "counted_from_pieces",
            "tokenized_in_full", "in_full_by_switch", "chunk_lookups", "chunk_misses", "rejected_by_prefix",
            "kept_by_prefix", "kept_by_chunks", "rejected_by_chunks", "kept_by_share", "rejected_by_share",
            "share_chars", "rest_chars"}


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
    """SIGTERM then SIGKILL to the process group a fixture started (the service and its workers)."""
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


def _pool_env(**extra) -> dict:
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": ROOT, **extra}
    probe = subprocess.run(["python", "-c", "import sys, apache_beam, beam_pipelines; print(sys.prefix)"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == sys.prefix, (
        f"`python` on the worker pool's PATH is not this venv's: {probe.stdout} {probe.stderr[-2000:]}")
    return env


def _service(logs, name: str, module: str, flag: str, env: dict, procs: list) -> int:
    port, log = _free_port(), str(logs / f"{name}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, flag, str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=str(logs))
    procs.append(proc)
    _wait_for_port(port, proc, log)
    return port


@pytest.fixture(scope="module")
def job_service(tmp_path_factory):
    """Beam flags for PortableRunner -> Beam's Python job service process -> an external worker pool."""
    logs = tmp_path_factory.mktemp("beam_services")
    env = _pool_env()
    procs = []
    try:
        job = _service(logs, "job", "apache_beam.runners.portability.local_job_service_main", "--port", env, procs)
        pool = _service(logs, "pool", "apache_beam.runners.worker.worker_pool_main", "--service_port", env, procs)
        yield ["--runner=PortableRunner", f"--job_endpoint=localhost:{job}", "--environment_type=EXTERNAL",
               f"--environment_config=localhost:{pool}", "--sdk_worker_parallelism=2"]
    finally:
        for proc in reversed(procs):
            _stop(proc)


class Flink(list):
    """The Beam flags of this run's Flink cluster, and its REST API."""

    def __init__(self, record: dict):
        super().__init__(record["flags"])
        self.rest = record["rest"]

    def jobs(self) -> dict[str, str]:
        """Every job the cluster has seen: id -> state."""
        with urllib.request.urlopen(f"{self.rest}/jobs/overview", timeout=10) as r:
            return {j["jid"]: j["state"] for j in json.loads(r.read())["jobs"]}

    def with_env(self, **env: str) -> list[str]:
        """The flags with variables for the workers the TaskManagers start (Beam's PROCESS environment)."""
        def add(flag: str) -> str:
            if not flag.startswith("--environment_config="):
                return flag
            config = json.loads(flag.split("=", 1)[1])
            return "--environment_config=" + json.dumps({**config, "env": {**config.get("env", {}), **env}})
        return [add(a) for a in self]


@pytest.fixture(scope="session")
def flink():
    return Flink(flink_cluster())


@contextlib.contextmanager
def submitted(cluster: Flink):
    """The jobs submitted inside the block (each must have FINISHED)."""
    before = set(cluster.jobs())
    jobs: dict[str, str] = {}
    yield jobs
    jobs.update({j: s for j, s in cluster.jobs().items() if j not in before})


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


@pytest.fixture
def corpus(tmp_path, fixture_texts):
    return bad_lines_corpus(tmp_path, fixture_texts)


def _prepare(corpus, root, tok, beam_args, **kw):
    cfg = PrepareConfig(input=[corpus], root=str(root), tokenizer=tok, max_tokens=4000, num_shards=4,
                        reject_shards=2, **kw)
    cfg.check()
    return prepare.run(cfg, beam_args)


RUNNERS = ["job_service", "flink"]


def _assert_finished(jobs: dict[str, str], at_least: int) -> None:
    assert len(jobs) >= at_least and set(jobs.values()) == {"FINISHED"}, jobs


def test_prepare_and_assemble_on_a_flink_cluster_equal_the_local_runner(flink, tmp_path, fixture_texts,
                                                                        bpe_tokenizer_path, eval_files):
    """make test's Flink end-to-end test: prepare with --near-dedup and --target-docs, then assemble
    (filter+rewrite) with decontamination, on the cluster and on the local runner: the same files."""
    _, _, glob = write_planted(tmp_path, fixture_texts)
    runs = {}
    for name, args in (("local", LOCAL), ("flink", flink)):
        with submitted(flink) as jobs:
            runs[name] = run_prepare(glob, tmp_path / name, bpe_tokenizer_path, args, target_docs=40)
        if name == "flink":
            _assert_finished(jobs, 1)
    assert runs["flink"]["dropped"] == runs["local"]["dropped"] and runs["local"]["dropped"]["near_duplicate"] > 0
    assert runs["flink"]["kept"] == runs["local"]["kept"] == 40
    same_files(str(tmp_path / "local" / "candidates"), str(tmp_path / "flink" / "candidates"),
               str(tmp_path / "local"), str(tmp_path / "flink"))

    roots = {}
    for name, args in (("local", LOCAL), ("flink", flink)):
        roots[name] = write_root(str(tmp_path / f"gen-{name}"), bpe_tokenizer_path)
        plant(roots[name], instructions={"b4": IN_INSTRUCTION}, responses={"b2": IN_RESPONSE})
        with submitted(flink) as jobs:
            stats = assemble.run(AssembleConfig(root=roots[name], version="v1", decontaminate=list(eval_files)), args)
        if name == "flink":
            _assert_finished(jobs, 1)
        assert stats["decontamination"]["dropped"] == {"alpaca_eval": 1, "question": 1}
    files = same_files(os.path.join(roots["local"], "sft", "v1"), os.path.join(roots["flink"], "sft", "v1"),
                       roots["local"], roots["flink"])
    assert "stats.json" in files and any(f.startswith("data/split=train/part-") for f in files)


@pytest.mark.engines
@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("target_docs", [None, 30])
def test_prepare_on_other_engines(request, runner, corpus, tmp_path, bpe_tokenizer_path, target_docs):
    engine = request.getfixturevalue(runner)
    local = _prepare(corpus, tmp_path / "local", bpe_tokenizer_path, LOCAL, target_docs=target_docs)
    other = _prepare(corpus, tmp_path / "other", bpe_tokenizer_path, engine, target_docs=target_docs)
    assert other["kept"] == local["kept"] > 0
    files = same_files(str(tmp_path / "local" / "candidates"), str(tmp_path / "other" / "candidates"),
                       str(tmp_path / "local"), str(tmp_path / "other"))
    assert "stats.json" in files and sum(f.startswith("candidates-") for f in files) == 4


@pytest.mark.engines
@pytest.mark.parametrize("runner", RUNNERS)
def test_assemble_on_other_engines(request, runner, tmp_path, bpe_tokenizer_path):
    engine = request.getfixturevalue(runner)
    seed = write_seed(str(tmp_path / "seed.jsonl"))
    roots = {}
    for name, args in (("local", LOCAL), ("other", engine)):
        roots[name] = write_root(str(tmp_path / name), bpe_tokenizer_path)
        assemble.run(AssembleConfig(root=roots[name], seed_data=seed, validation_fraction=0.3, version="v1"), args)
    files = same_files(os.path.join(roots["local"], "sft", "v1"), os.path.join(roots["other"], "sft", "v1"),
                       roots["local"], roots["other"])
    assert {"data/split=train/part-00000-of-00002.parquet", "stats.json"} <= set(files)
    assert any(f.startswith("data/split=validation/part-00000-of-") for f in files)


@pytest.mark.engines
@pytest.mark.parametrize("runner", RUNNERS)
def test_near_dedup_on_other_engines(request, runner, tmp_path, fixture_texts, bpe_tokenizer_path):
    """The survivors of --near-dedup do not depend on the runner: on the planted corpus the other engine
    writes the local runner's candidates and rejects."""
    engine = request.getfixturevalue(runner)
    _, _, glob = write_planted(tmp_path, fixture_texts)
    local = run_prepare(glob, tmp_path / "local", bpe_tokenizer_path)
    other = run_prepare(glob, tmp_path / "other", bpe_tokenizer_path, engine)
    assert other["dropped"] == local["dropped"] and local["dropped"]["near_duplicate"] > 0
    same_files(str(tmp_path / "local" / "candidates"), str(tmp_path / "other" / "candidates"),
               str(tmp_path / "local"), str(tmp_path / "other"))


@pytest.mark.engines
def test_a_gcs_root_on_flink(flink, gcs_emulator, bucket, corpus, tmp_path, bpe_tokenizer_path):
    """A gs:// root on the cluster: its workers (started with the emulator's address) read the input and
    write the candidates to the bucket, the same files as the local runner's local root."""
    with submitted(flink) as jobs:
        on_gcs = _prepare(corpus, f"gs://{bucket}/run", bpe_tokenizer_path,
                          flink.with_env(STORAGE_EMULATOR_HOST=os.environ["STORAGE_EMULATOR_HOST"]))
    _assert_finished(jobs, 1)
    local = _prepare(corpus, tmp_path / "local", bpe_tokenizer_path, LOCAL)
    assert on_gcs["kept"] == local["kept"] > 0
    fetched = tmp_path / "fetched"
    for blob in gcs_emulator.list_blobs(bucket, prefix="run/candidates/"):
        dest = fetched / os.path.relpath(blob.name, "run/candidates")
        dest.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(dest))
    same_files(str(tmp_path / "local" / "candidates"), str(fetched), str(tmp_path / "local"), f"gs://{bucket}/run")
