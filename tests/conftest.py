"""Shared fixtures: tiny tokenizers and models trained here, Dolma-layout files, a published release, a GCS
emulator and model-server stand-ins on loopback, evaluation sets, fault injection, the Flink cluster, and
the `unit` marker."""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each, or
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch's OpenMP threads of both spin against each other
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.corpus import TextMaker  # noqa: E402
from training.tiny import train_byte_fallback_bpe, train_byte_level_bpe  # noqa: E402

LOCAL = ["--runner=FnApiRunner"]


@pytest.fixture(scope="session")
def fixture_texts() -> list[str]:
    maker = TextMaker(seed=11)
    return [maker.text(int(maker.length(median=600, sigma=0.7, cap=5000))) for _ in range(200)]


def made_once(tmp_path_factory, name: str, make):
    """What `make(folder)` returns (JSON), made once per test run whatever the pytest-xdist worker
    asks first (the others wait on a file lock, then read the record; xdist's documented pattern for
    session fixtures): the generated tokenizer, models and roots that tests only read or copy. A
    test that changes such a file works on its own copy."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent   # shared by the workers of this run
    record = base / f"made-once-{name}.json"
    with open(base / f"made-once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            folder = base / f"made-once-{name}"
            folder.mkdir(exist_ok=True)   # left by a worker whose `make` failed: each reports its own error
            record.write_text(json.dumps(make(folder)))
        return json.loads(record.read_text())


@pytest.fixture(scope="session")
def bpe_tokenizer_path(tmp_path_factory, fixture_texts) -> str:
    def make(folder):
        path = str(folder / "tokenizer.json")
        train_byte_fallback_bpe(fixture_texts, 1200).save(path)
        return path
    return made_once(tmp_path_factory, "bpe-tokenizer", make)


@pytest.fixture(scope="session")
def byte_level_tokenizer_path(tmp_path_factory, fixture_texts) -> str:
    path = str(tmp_path_factory.mktemp("tokbl") / "tokenizer.json")
    train_byte_level_bpe(fixture_texts, 800).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, bpe_tokenizer_path):
    """Random-weight tiny Llama models: "chat" (Llama-2 chat template) and "plain" (none)."""
    from tokenizers import Tokenizer

    from training.tiny import make_tiny_llama

    def make(root):
        tok = Tokenizer.from_file(bpe_tokenizer_path)
        return {"chat": make_tiny_llama(str(root / "chat"), tok, context=1024),
                "plain": make_tiny_llama(str(root / "plain"), tok, chat_template=False, context=1024, seed=1)}
    return made_once(tmp_path_factory, "tiny-models", make)


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory, fixture_texts, bpe_tokenizer_path):
    """A run root with complete candidates: 12 short documents in 3 shards."""
    from beam_pipelines import prepare

    def make(root):
        lines = [dolma_line(f"d{i:02d}", fixture_texts[i][:300]) for i in range(12)]
        write_dolma_file(str(root / "in" / "cc_en_head" / "a.json.gz"), lines)
        prepare.run(prepare.PrepareConfig(input=[str(root / "in" / "*" / "*.json.gz")],
                                          root=str(root), tokenizer=bpe_tokenizer_path,
                                          max_tokens=1000, num_shards=3, reject_shards=1), LOCAL)
        return str(root)
    return made_once(tmp_path_factory, "prepared-root", make)


@pytest.fixture(scope="session")
def _published(tmp_path_factory, bpe_tokenizer_path):
    from tests.helpers.assemble import run, write_root

    def make(folder):
        root = write_root(str(folder / "run"), bpe_tokenizer_path)
        run(root, version="v1")
        return root
    return made_once(tmp_path_factory, "published", make)


@pytest.fixture
def published(_published, tmp_path):
    """A root of tests/helpers/assemble.py's generation shards holding release v1, assembled once per
    test run (made_once) and copied for each test that reads, edits or damages v1 without
    assembling again (a copy moved to another root is valid; assembling in it would build again,
    since a release's lineage names its root's files)."""
    import shutil

    root = str(tmp_path / "run")
    shutil.copytree(_published, root, symlinks=True)
    return root


def dolma_line(doc_id: str, text, **extra) -> bytes:
    rec = {"id": doc_id, "text": text, "source": "common-crawl", "metadata": {"url": f"https://x.org/{doc_id}"}}
    rec.update(extra)
    return json.dumps(rec, ensure_ascii=False).encode()


def write_dolma_file(path: str, lines: list[bytes]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = b"\n".join(lines) + b"\n"
    if path.endswith(".gz"):
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(data)
    elif path.endswith(".zst"):
        import zstandard

        with open(path, "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(data))
    else:
        with open(path, "wb") as f:
            f.write(data)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """The gcp-storage-emulator on loopback, with GCS's generation preconditions; yields a
    google-cloud-storage client using it."""
    port = _free_port()
    # tests/gcs_emulator.py: the emulator with GCS's generation preconditions (the stock one ignores them)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"), "start",
                             "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("gcp-storage-emulator did not start")
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    import storage

    storage.gcs_client.cache_clear()
    try:
        yield storage.gcs_client()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        storage.gcs_client.cache_clear()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture
def bucket(gcs_emulator, request):
    name = "b-" + request.node.name.lower().replace("_", "-")[:40]
    return gcs_emulator.create_bucket(name).name


# ---- model servers on loopback: stand-ins of OpenAI's API and of a vLLM server ---------------------

@pytest.fixture(scope="module")
def api_server():
    """One stand-in of OpenAI's API per test module (tests/openai_api_standin.py)."""
    from tests.openai_api_standin import OpenAIStandin

    s = OpenAIStandin(["gpt-standin"])
    yield s
    s.stop()


@pytest.fixture
def hosted(api_server):
    """The module's stand-in, as new: no scripted answers, requests, batches or files."""
    api_server.plan.clear()
    api_server.requests.clear()
    api_server.listings = 0
    api_server.answer = api_server.refuse = None
    api_server.fates.clear()
    api_server.batches.clear()
    api_server.files.clear()
    api_server.hold = False
    api_server.creates.clear()
    api_server.proxied.clear()
    return api_server


@pytest.fixture(scope="module")
def digit_model(tiny_models, tmp_path_factory):
    """The tiny chat model as Llama-2 is tokenized and scores: its tokenizer adds BOS (a post-processor
    "<s> $A", as Llama-2's), so a prompt whose template already wrote "<s>" gets a second BOS when it
    is tokenized with special tokens; and the digits' lm_head rows are made as likely as </s>, so the
    score digits are always among the top-20 logprobs and a logprob score that finds none is a real
    failure."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, LlamaForCausalLM

    from generation.engines.base import digit_token_ids

    folder = str(tmp_path_factory.mktemp("digits"))
    tok = AutoTokenizer.from_pretrained(tiny_models["chat"])
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                              special_tokens=[("<s>", tok.bos_token_id)])
    model = LlamaForCausalLM.from_pretrained(tiny_models["chat"])
    with __import__("torch").no_grad():
        w = model.lm_head.weight
        for k, ids in enumerate(digit_token_ids(tok).values()):
            for t in ids:
                w[t] = w[tok.eos_token_id] * (1.0 + 0.05 * k)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(digit_model):
    """The vLLM-server stand-in serving the digit model as "tiny-chat" (no local folder by that name)."""
    from tests.vllm_standin.openai_server import StandinServer

    s = StandinServer(digit_model, served_name="tiny-chat")
    yield s
    s.stop()


@pytest.fixture
def fresh(server):
    """The module's vLLM-server stand-in, as new: no scripted answers or requests, tokenizing on."""
    server.plan.clear()
    server.requests.clear()
    server.refuse = server.answer = None
    server.tokenize = True
    server.tokenize_calls.clear()
    return server


# ---- evaluation sets ------------------------------------------------------------------------------

@pytest.fixture
def eval_files(tmp_path):
    """AlpacaEval's and MT-Bench's question files as published (tests/helpers/decontamination.py)."""
    from tests.helpers.decontamination import ALPACA, MT_BENCH

    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps(ALPACA, indent=2))
    mt = tmp_path / "question.jsonl"
    mt.write_text("".join(json.dumps(q) + "\n" for q in MT_BENCH))
    return str(alpaca), str(mt)


# ---- fault injection: a process "killed" at a chosen write ----------------------------------------

class SimulatedKill(Exception):
    """Stands in for SIGKILL at a write: raised instead of writing, nothing of the file appears."""


@contextlib.contextmanager
def kill_at(monkeypatch, pattern: str):
    """Within the block, the first storage write (write_bytes/write_text or write_parquet) to a path
    matching the regex `pattern` raises SimulatedKill before anything is written: the run stops there,
    as a kill between the previous write and this one would stop it. Works with the in-process local
    runner (tests.conftest.LOCAL), where the Beam workers are threads of this process."""
    import storage

    fired = []

    def guard(real):
        def write(*args, **kwargs):
            path = args[1] if real is real_parquet else args[0]
            if not fired and re.search(pattern, path):
                fired.append(path)
                raise SimulatedKill(f"killed before writing {path}")
            return real(*args, **kwargs)
        return write

    real_bytes, real_parquet = storage.write_bytes, storage.write_parquet
    monkeypatch.setattr(storage, "write_bytes", guard(real_bytes))
    monkeypatch.setattr(storage, "write_parquet", guard(real_parquet))
    try:
        yield fired
    finally:
        monkeypatch.setattr(storage, "write_bytes", real_bytes)
        monkeypatch.setattr(storage, "write_parquet", real_parquet)
    assert fired, f"no write matched {pattern!r}: the kill point was never reached"


def snapshot(folder: str, clean=lambda rel, data: data) -> dict:
    """{path relative to folder: clean(path, bytes)} for every file under `folder`."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, folder)
            out[rel] = clean(rel, open(full, "rb").read())
    return out


# ---- a real Flink session cluster, once per test run ---------------------------------------------
# scripts/flink_local.py starts it (a JobManager, two TaskManagers, Beam's Flink job server; Python
# workers in the PROCESS environment) in the background when the run starts, in pytest's controller process (with xdist, before
# the workers exist, so they inherit BFT_FLINK_DIR); the `flink` fixture waits for it; the run's end
# stops it. BFT_FLINK_DIR naming a cluster already started (`scripts/flink_local.sh start --dir D`)
# reuses that one and leaves it running; BFT_FLINK=0 skips the Flink tests.
FLINK_DIR = "BFT_FLINK_DIR"
FLINK_WAIT_S = 300


def _selects_runner_tests(config) -> bool:
    """Whether the run's paths include tests/test_runners.py (the tests folder, the repo, or the file)."""
    paths = [os.path.abspath(str(a).split("::")[0]) for a in config.args] or [os.getcwd()]
    tests = os.path.join(ROOT, "tests")
    return any(p in (ROOT, tests) or p.endswith("test_runners.py") for p in paths)


def pytest_configure(config):
    config.addinivalue_line("markers", "engines: the whole engine matrix (make test-engines), beside make test's "
                                       "one Flink end-to-end test")
    config.addinivalue_line("markers", "unit: a fast test (no Beam pass, model, server, process or cluster); "
                                       "set by this conftest from what the test calls, see SLOW")
    if (hasattr(config, "workerinput") or os.environ.get("BFT_FLINK") == "0" or os.environ.get(FLINK_DIR)
            or not _selects_runner_tests(config) or _selects_unit_tests_only(config)):
        return
    import tempfile

    state = tempfile.mkdtemp(prefix="bft-flink-")
    os.environ[FLINK_DIR] = os.path.join(state, "cluster")
    script = os.path.join(ROOT, "scripts", "flink_local.py")
    with open(os.path.join(state, "start.log"), "wb") as log:
        config._bft_flink = subprocess.Popen(
            ["sh", "-c", f'"$0" "{script}" start --dir "$1" --taskmanagers "$3" --slots "$4"; echo $? > "$2"',
             sys.executable, os.environ[FLINK_DIR], os.path.join(state, "start.rc"), *_cluster_shape(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _cluster_shape(config) -> tuple[str, str]:
    """(TaskManagers, slots each): the engine matrix (make test-engines) on two TaskManagers, so its
    shuffles cross JVMs; make test's one end-to-end test on one TaskManager of two slots (a JVM and its
    Python workers less to start in a run that is short of cores)."""
    return ("2", "2") if "engines" in (config.getoption("markexpr") or "").replace("not engines", "") else ("1", "2")


def pytest_unconfigure(config):
    proc = getattr(config, "_bft_flink", None)
    if proc is None:
        return
    try:
        proc.wait(timeout=FLINK_WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "flink_local.py"), "stop", "--dir",
                    os.environ[FLINK_DIR]], capture_output=True, timeout=120)
    import shutil

    shutil.rmtree(os.path.dirname(os.environ[FLINK_DIR]), ignore_errors=True)   # its logs and spilled shuffles


@pytest.hookimpl(tryfirst=True)   # before pytest's own hook deselects by marker (-m unit)
def pytest_collection_modifyitems(config, items):
    """Marks the fast tests `unit`. Puts the Flink end-to-end test first: it waits for the cluster (started
    above, in the background) while the other workers run, instead of running last and alone at the end."""
    for item in items:
        if not item.get_closest_marker("engines") and not _is_slow(item):
            item.add_marker(pytest.mark.unit)
    items.sort(key=lambda item: "flink_cluster_equal_the_local_runner" not in item.nodeid)


def flink_cluster() -> dict:
    """The record of this run's Flink cluster (scripts/flink_local.py), once it is up: its REST address
    and the Beam flags that run a pass on it. Fails with the start's own error when it could not start."""
    if os.environ.get("BFT_FLINK") == "0":
        pytest.skip("BFT_FLINK=0: the Flink cluster is not started")
    state = os.environ.get(FLINK_DIR)
    if not state:
        pytest.fail("no Flink cluster for this run: run pytest on tests/ or tests/test_runners.py, or start one "
                    "(scripts/flink_local.sh start --dir D) and set BFT_FLINK_DIR=D")
    record, rc = os.path.join(state, "cluster.json"), os.path.join(os.path.dirname(state), "start.rc")
    deadline = time.time() + FLINK_WAIT_S
    while time.time() < deadline:
        if os.path.exists(rc) and open(rc).read().strip() not in ("", "0"):
            log = open(os.path.join(os.path.dirname(state), "start.log"), errors="replace").read()
            pytest.fail(f"the Flink cluster did not start: {log.strip()[-2000:]}")
        if os.path.exists(record):
            data = json.loads(open(record).read())
            if "flags" in data:
                return data
        time.sleep(0.5)
    pytest.fail(f"the Flink cluster was not up after {FLINK_WAIT_S}s (see {state}/log)")


# ---- the `unit` marker: the fast tests (`pytest -m unit`, make test-unit) -------------------------
# A test is slow when it, or a fixture it uses, names one of SLOW, directly or through the test code's
# own functions (tests/ only): what runs a Beam pass, a `bft` command, a generation stage or a model,
# starts a server, a process or the cluster. Classified by what it calls, so a new test needs no mark.
SLOW = frozenset({
    "tiny_models", "prepared_root", "published", "gcs_emulator", "api_server", "server", "flink",   # fixtures
    "run", "main", "Pipeline", "TestPipeline", "gen", "StageRunner", "load_engine", "from_pretrained",
    "subprocess", "fork", "CliForks", "StandinServer", "OpenAIStandin", "answering", "flink_cluster",
    "real_tokenizers",   # real vocabularies (benchmarks/real_tokenizers.py): exactness proofs over them
})
TESTS = os.path.join(ROOT, "tests") + os.sep


def _selects_unit_tests_only(config) -> bool:
    """Whether the run is `-m unit`: no test of it needs the Flink cluster."""
    expr = (config.getoption("markexpr") or "").replace(" ", "")
    return expr == "unit"


def _is_slow(item) -> bool:
    func = getattr(item, "function", None)
    if hasattr(func, "hypothesis"):   # property-based: its body runs a hundred times
        return True
    seen: set = set()
    if _reaches_slow(func, seen):
        return True
    fixtures = dict(item._fixtureinfo.name2fixturedefs)
    for name in _strings(getattr(func, "__code__", None)):   # what it may ask by request.getfixturevalue
        fixtures[name] = item.session._fixturemanager.getfixturedefs(name, item) or ()
    return any(name in SLOW or any(_reaches_slow(d.func, seen) for d in defs) for name, defs in fixtures.items())


def _codes(code):
    """`code` and the code of the functions nested in it."""
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        yield c
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))


def _strings(code) -> set[str]:
    return {k for c in _codes(code) for k in c.co_consts if isinstance(k, str) and k.isidentifier()}


def _reaches_slow(obj, seen: set) -> bool:
    """Whether `obj`, a function or class of tests/, names one of SLOW, itself, in a nested function or a
    method, or through a function or class of tests/ it names as a global."""
    if isinstance(obj, type):
        return (getattr(sys.modules.get(obj.__module__), "__file__", "") or "").startswith(TESTS) and \
            any(_reaches_slow(v, seen) for v in vars(obj).values())
    code = getattr(obj, "__code__", None)
    if code is None or code in seen or not code.co_filename.startswith(TESTS):
        return False
    seen.add(code)
    names = {n for c in _codes(code) for n in c.co_names}
    if names & SLOW:
        return True
    scope = getattr(obj, "__globals__", {})
    return any(_reaches_slow(scope.get(n), seen) for n in names)


# ---- fixtures of the rebuild and plan tests ----

@pytest.fixture(scope="module")
def chat_server(tiny_models):
    """The vLLM-server stand-in serving the tiny chat model as "tiny-chat" (tests/vllm_standin)."""
    from tests.vllm_standin.openai_server import StandinServer

    s = StandinServer(tiny_models["chat"], served_name="tiny-chat", max_model_len=8192)  # no document is cut
    yield s
    s.stop()


@pytest.fixture
def nightly(tmp_path, prepared_root, tiny_models, bpe_tokenizer_path):
    """A copy of the prepared root (12 candidates in 3 shards) whose run file's prepare is reused (no Beam
    pass), score external (the night stops before assemble): (root, run file, input glob)."""
    import shutil

    from tests.helpers.rebuild import run_file

    root = str(tmp_path / "run")
    shutil.copytree(prepared_root, root)
    stats_path = os.path.join(root, "candidates", "stats.json")
    stats = json.loads(open(stats_path).read())
    inputs = os.path.join(root, "in", "*", "*.json.gz")
    for entry in stats["inputs"]:   # the copy's input files are the ones recorded
        entry["path"] = entry["path"].replace(prepared_root, root)
    stats["config"]["input"] = [inputs]
    open(stats_path, "w").write(json.dumps(stats))
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [inputs], prepare__max_tokens=1000,
                   prepare__num_shards=3, prepare__reject_shards=1, generate__score__external=True)
    return root, cfg, inputs
