"""bft rebuild: one run file, the whole flow, reuse of what is current, the hand-off to external
generation workers, one gate per run, and the night's record (the cost plan: tests/test_plan.py)."""
from __future__ import annotations

import json
import os
import re

import pytest
import yaml

import storage
from bft.config import SECTIONS, ConfigError
from schemas.layout import RunLayout
from tests.conftest import _free_port
from tests.helpers.cli import run as bft
from tests.helpers.corpora import ten_documents, write_corpus
from tests.helpers.rebuild import run_file


@pytest.fixture
def corpus(tmp_path, fixture_texts):
    return ten_documents(tmp_path, fixture_texts)


def test_rebuild_runs_the_flow_then_reuses_everything(tmp_path, tiny_models, bpe_tokenizer_path, corpus, capsys):
    root = str(tmp_path / "run")
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus])
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0, err
    assert "published release" in out and "shards generated [0, 1]" in out
    latest = storage.read_text(os.path.join(root, "sft", "LATEST")).strip()
    manifest = json.loads(open(os.path.join(root, "sft", latest, "manifest.json")).read())
    assert set(manifest["run"]["stages"]) == {"prepare", "backtranslate", "score", "assemble"}
    assert manifest["run"]["stages"]["prepare"]["reused"] is False
    stamps = {p: os.path.getmtime(p) for p in storage.list_files(os.path.join(root, "generations"))}

    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0, err
    assert "reused (config and input files unchanged)" in out
    assert out.count("shards generated none, reused 2; 0 requests sent") == 2  # no request to any model
    assert "nothing new published" in out
    assert storage.read_text(os.path.join(root, "sft", "LATEST")).strip() == latest
    assert {p: os.path.getmtime(p) for p in storage.list_files(os.path.join(root, "generations"))} == stamps
    assert sorted(set(os.listdir(os.path.join(root, "sft"))) - {"_tmp"}) == [latest, "LATEST"]


def pd_ids(root, version):
    import pandas as pd

    folder = os.path.join(root, "sft", version)
    files = [f for f in storage.list_files(folder) if f.endswith(".parquet")]
    return [i for f in files for i in pd.read_parquet(f, columns=["id"])["id"]]


def shard_of(root):
    import pandas as pd

    files = sorted((tmp for tmp in storage.list_files(os.path.join(root, "candidates"))
                    if os.path.basename(tmp).startswith("candidates-")))
    return {i: s for f in files for i, s in pd.read_parquet(f, columns=["id", "shard"]).itertuples(index=False)}


def generated(root, stage):
    import pandas as pd

    files = [f for f in storage.list_files(os.path.join(root, "generations", stage)) if f.endswith(".parquet")]
    return pd.concat([pd.read_parquet(f) for f in files]).set_index("id")


def test_a_new_input_file_generates_only_for_its_documents(tmp_path, tiny_models, bpe_tokenizer_path, corpus,
                                                           fixture_texts, capsys):
    root = str(tmp_path / "run")
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus])
    assert bft(capsys, "rebuild", "--config", cfg)[0] == 0
    before, rows_before, score_before = shard_of(root), generated(root, "backtranslate"), generated(root, "score")
    first_release = storage.read_text(os.path.join(root, "sft", "LATEST")).strip()

    write_corpus(tmp_path / "dolma", fixture_texts[20:23], ["b00", "b01", "b02"])  # a new file lands
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0, err
    assert "done: 13 input records -> 13 candidates" in out
    after = shard_of(root)
    assert {i: after[i] for i in before} == before          # documents already seen keep their shard
    sent = {stage: int(re.search(rf"== generate {stage} .*\n.*; (\d+) requests sent", out).group(1))
            for stage in ("backtranslate", "score")}
    new_parsed = generated(root, "backtranslate").loc[["b00", "b01", "b02"], "parse_error"].isna().sum()
    assert sent == {"backtranslate": 3, "score": new_parsed}  # requests for the new documents only
    for stage, old_rows in (("backtranslate", rows_before), ("score", score_before)):
        rows_after = generated(root, stage)  # the old rows are reused as they were
        assert rows_after.loc[list(before)].equals(old_rows.loc[list(before)]), stage
    latest = storage.read_text(os.path.join(root, "sft", "LATEST")).strip()
    assert latest != first_release
    # the night's summary says how the new release differs from the one LATEST named before
    old_ids, new_ids = set(pd_ids(root, first_release)), set(pd_ids(root, latest))
    if old_ids or new_ids:
        diff = re.search(rf"vs {first_release}: examples web: \+(\d+) -(\d+) =(\d+); kept share ", out)
        assert diff, out
        assert tuple(map(int, diff.groups())) == (len(new_ids - old_ids), len(old_ids - new_ids),
                                                  len(new_ids & old_ids))
    else:   # tiny random models: no pair kept in either release
        assert f"vs {first_release}: examples none in either; kept share 0.0% -> 0.0%" in out, out
    stats = json.loads(open(os.path.join(root, "sft", latest, "stats.json")).read())
    assert stats["funnel"]["candidates"] == 13               # the new release holds the old and the new pairs
    # the release records its parent; its report shows the diff and the alerts
    assert stats["parent"] == first_release and stats["changes"]["parent"] == first_release
    assert set(stats["changes"]["pass_rates"]) == {"backtranslate", "score"}
    scores = stats["changes"]["scores"]
    assert scores["now"] is None or (scores["now"]["stage"] == "score" and 0 <= scores["now"]["share_5"] <= 1)
    assert all(set(v) == {"instruction", "response"} for v in stats["changes"]["lengths"].values())
    page = open(os.path.join(root, "sft", latest, "report.html")).read()
    assert f"What changed since {first_release}" in page and "pass rate" in page
    assert [p["version"] for p in stats["trend"]] == [first_release, latest] and '<img src="plots/trend.png"' in page
    assert os.path.getsize(os.path.join(root, "sft", latest, "plots", "trend.png")) > 0
    validation = stats["funnel"]["final"]["validation"]
    assert (validation < 100) == any(a.startswith("validation split:") for a in stats["alerts"])
    assert all(f"ALERT: {a}" in out for a in stats["alerts"]) and ("<h2 class=warn>Alerts" in page) == bool(stats["alerts"])
    assert not os.path.exists(os.path.join(root, "candidates", "_prior"))

    os.remove(str(tmp_path / "dolma" / "documents" / "cc_en_head" / "a00.json.gz"))  # a file leaves
    write_corpus(tmp_path / "dolma", fixture_texts[:2], ["a00", "a01"])               # ... mostly
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0, err
    assert "done: 5 input records -> 5 candidates" in out and out.count("; 0 requests sent") == 2
    assert set(shard_of(root)) == {"a00", "a01", "b00", "b01", "b02"}  # the documents that left are gone


def test_external_stages_hand_off_to_workers(tmp_path, tiny_models, bpe_tokenizer_path, corpus, capsys):
    root = str(tmp_path / "run")
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], generate__score__external=True,
                   generate__score__workers=2)
    rc, out, _ = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 75
    assert "0 of 2 shards complete" in out
    job = os.path.join(root, "_jobs", "score.json")   # the stage resolved once, for every worker
    assert f"bft generate score --job {job} --worker-index $I --num-workers 2" in out
    assert not os.path.exists(os.path.join(root, "sft"))
    os.remove(job)   # --wait writes tonight's job before it waits for the workers that run it
    rc, out, err = bft(capsys, "rebuild", "--config", cfg, "--wait", "--wait-timeout", "0", "--poll-s", "0")
    assert rc == 1 and "still missing after --wait-timeout 0 s" in err
    assert os.path.exists(job) and f"bft generate score --job {job}" in out
    # the job fixes the options: another option beside it, another stage's job, a run file's `job:` key
    # with other options, or a job file that is not there is one line
    rc, _, err = bft(capsys, "generate", "score", "--job", job, "--temperature", "0.5")
    assert rc == 1 and "give only --worker-index and --num-workers with it, not --temperature" in err
    rc, _, err = bft(capsys, "generate", "backtranslate", "--job", job)
    assert rc == 1 and "is a job of stage score, not backtranslate" in err
    other = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], generate__score__job=job,
                     generate__score__max_new_tokens=3)
    rc, _, err = bft(capsys, "generate", "score", "--config", other)
    assert rc == 1 and "runs the job's options as bft rebuild wrote them" in err and "Traceback" not in err
    rc, _, err = bft(capsys, "generate", "score", "--job", str(tmp_path / "nowhere.json"))
    assert rc == 1 and "cannot read the stage job" in err and "Traceback" not in err
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], generate__score__external=True,
                   generate__score__workers=2)   # (run_file rewrote the run file above)
    for i in range(2):  # what each worker runs on its GPU
        rc, out, err = bft(capsys, "generate", "score", "--job", job, "--worker-index", str(i), "--num-workers", "2")
        assert rc == 0, err
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0, err
    assert "published release" in out


@pytest.mark.parametrize("changes, message", [
    ({"generate__score__temprature": 1.0}, "did you mean 'temperature'?)"),
    ({"prepare__num_shards": "four"}, "key 'num_shards' must be int"),
    ({"generate__score__workers": "two"}, "key 'workers' must be int"),
    ({"assemble__beam_args": ["--runnr=FnApiRunner"]}, "beam_args --runnr are not Beam pipeline options"),
    ({"assemble__recipe": "filter+rewrite"}, "recipe filter+rewrite needs stage rewrite"),
    ({"extra": {"a": 1}}, "unknown section 'extra' (known: root, prepare, generate, assemble,"),
    ({"asemble": {"recipe": "filter"}}, f"unknown section 'asemble' (known: {', '.join(SECTIONS)}; did you mean "
                                        "'assemble'?)"),
    # a stage's typo was "section generate.score: unknown key 'rewrtie'"
    ({"generate__rewrtie": {"model": "m"}}, ": generate: unknown stage 'rewrtie' (known: backtranslate, score, "
                                            "rewrite, distill, rate; did you mean 'rewrite'?)"),
    ({"generate__batch_siz": 4}, ": generate: unknown key 'batch_siz' (known: api, "),
    ({"generate__score__temprature": 1.0}, ": generate.score: unknown key 'temprature' (known: "),
    ({"generate__distill": {"temprature": 1.0}}, ": generate.distill: unknown key 'temprature'"),  # a stage not run
    ({"root": ""}, "no `root:`"),
    ({"prepare__root": "/elsewhere"}, "key 'root' in section prepare: a run has one root"),
    ({"generate__score__root": "/elsewhere"}, "key 'root' in section generate.score: a run has one root"),
    ({"assemble__recipe": "filter+rewrite", "generate__rewrite": {"model": "m", "min_score": 4}},
     "generate.rewrite.min_score 4 and assemble.min_score 0 differ: one threshold gates the rewrite requests"),
])
def test_run_file_errors_name_the_key_and_the_file(tmp_path, tiny_models, bpe_tokenizer_path, corpus, capsys,
                                                   changes, message):
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus], **changes)
    for verb in ("rebuild", "plan"):
        rc, _, err = bft(capsys, verb, "--config", cfg)
        assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, err
        if "key" in message or "section" in message or "stage" in message:
            assert cfg in err
    assert not os.path.exists(tmp_path / "run")  # nothing ran


def test_plan_and_rebuild_preflight_the_servers_the_run_sends_to(tmp_path, tiny_models, bpe_tokenizer_path, corpus,
                                                                hosted, monkeypatch, capsys):
    """With a model the server does not serve, or the server down, `bft plan` exited 0 and
    `bft rebuild` found it only at that stage, after prepare and the stages before. Both now stop
    first, in one line naming the run file, the stage and what is wrong; each server is asked once;
    an external stage's server (reached by its workers, elsewhere) is not asked from here."""
    from bft.run_file import check_servers, load_run
    from generation.engines.openai import transport

    monkeypatch.setattr(transport, "PREFLIGHT_S", 0.2)   # the server that is down is given up on at once
    served = {"engine": "openai", "model": "gpt-standin", "base_url": hosted.url, "api": "chat", "max_model_len": 8192}
    down = f"http://127.0.0.1:{_free_port()}/v1"
    for score, said in [({"model": "gpt-standim"}, f"model 'gpt-standim' is not served at {hosted.url}; it serves: "
                                                   "gpt-standin (did you mean 'gpt-standin'?)"),
                        ({"base_url": down}, f"cannot reach the server at {down}: ")]:
        cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus],
                       generate={"backtranslate": served, "score": {**served, **score}})
        for verb in ("plan", "rebuild"):
            rc, out, err = bft(capsys, verb, "--config", cfg)
            assert rc == 1 and err.startswith(f"bft {verb}: {cfg}: generate.score: {said}"), err
            assert len(err.strip().splitlines()) == 1 and not out
    assert not os.path.exists(tmp_path / "run")          # the night stopped before prepare
    hosted.listings = 0
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus],
                   generate={"backtranslate": served, "score": {**served, "base_url": down, "external": True},
                             "rewrite": served}, assemble__recipe="filter+rewrite")
    plan = load_run(cfg)
    assert [(sp.stage, sp.external) for sp in plan.stages] == [("backtranslate", False), ("score", True),
                                                               ("rewrite", False)]
    check_servers(plan)
    assert hosted.listings == 1


def test_the_recipes_threshold_gates_the_answering_stage(tmp_path, tiny_models, bpe_tokenizer_path, corpus):
    """assemble.min_score alone sets the rewrite gate too (one threshold, owned by the recipe)."""
    from bft.run_file import load_run

    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus],
                   assemble__recipe="filter+rewrite", assemble__min_score=4, generate__rewrite={"model": "m"})
    rewrite = [sp for sp in load_run(cfg).stages if sp.stage == "rewrite"][0]
    assert rewrite.cfg.gate_rule().threshold == 4.0
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus],
                   assemble__recipe="filter+rewrite", assemble__min_score=None, generate__rewrite={"model": "m"})
    plan = load_run(cfg)       # run_file's score stage is in logprob mode: expected scores, AlpaGasus's 4.5
    rewrite = [sp for sp in plan.stages if sp.stage == "rewrite"][0]
    assert rewrite.cfg.gate_rule().threshold == 4.5 and plan.gate.threshold == 4.5   # (issue 19 point 1)
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus],
                   assemble__recipe="filter+rewrite", assemble__min_score=None, generate__rewrite={"model": "m"},
                   generate__score={"model": "m", "score_mode": "generate"})
    plan = load_run(cfg)
    rewrite = [sp for sp in plan.stages if sp.stage == "rewrite"][0]
    assert rewrite.cfg.gate_rule().threshold == 5.0 and plan.gate.threshold == 5.0   # the paper's 5, in both
    # one RunLayout per run (issue 24 point 1): built by the loader, the same object in every step
    assert all(step.layout is plan.layout for step in (plan.prepare, plan.assemble, *(sp.cfg for sp in plan.stages)))


@pytest.mark.parametrize("changes, threshold", [
    ({}, 4.5),                                                  # run_file's score stage scores in logprob mode
    ({"assemble__min_score": 4}, 4.0),
    ({"generate__score__score_mode": "generate"}, 5.0),        # the paper's
])
def test_one_gate_decision_filters_the_rewrite_requests_and_keeps_the_pairs(tmp_path, tiny_models, bpe_tokenizer_path,
                                                                            corpus, monkeypatch, changes, threshold):
    """The threshold followed from the run file to where it acts: the gate the rewrite stage's requests
    are filtered by (in this process and in an external worker's job) and the gate assemble keeps
    pairs at are the one Gate that one resolve_gate call decided when the run was loaded."""
    from beam_pipelines.assemble.config import resolve
    from bft import run_file as loader
    from bft.rebuild import write_worker_job
    from generation.job import read_job
    from generation.runner import StageRunner
    from schemas.recipes import resolve_gate

    decided = []

    def counted(*args, **kw):
        decided.append(resolve_gate(*args, **kw))
        return decided[-1]

    monkeypatch.setattr(loader, "resolve_gate", counted)
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus],
                   **{"assemble__recipe": "filter+rewrite", "assemble__min_score": None,
                      "generate__rewrite": {"model": "m"}, **changes})
    plan = loader.load_run(cfg)
    assert len(decided) == 1 and decided[0].threshold == threshold and plan.gate is decided[0]
    rewrite = [sp for sp in plan.stages if sp.stage == "rewrite"][0]
    assert rewrite.gate is plan.gate and StageRunner(rewrite.cfg).gate == plan.gate             # (a) the requests
    assert read_job(write_worker_job(rewrite)).gate == plan.gate
    # (b) assemble's job, resolved from the config the run file gave it (no score shard records a mode here)
    assert resolve(plan.assemble, plan.layout, {"config": {"tokenizer": "t"}}).rules.gate == plan.gate


def test_the_rewrite_recipe_sends_every_parsed_pair_to_rewrite_and_publishes(tmp_path, tiny_models, bpe_tokenizer_path,
                                                                            corpus, capsys):
    """The rewrite recipe has no gate (schemas.recipes), but the rewrite stage's own default gate is
    score: `bft rebuild` with `recipe: rewrite` sent nothing and failed asking for score shards the
    recipe never makes. The recipe owns the gate: its answering stage is sent every parsed pair
    (`--gate none`, also in an external worker's command), and a gate named for it is refused."""
    from bft.rebuild import write_worker_job
    from bft.run_file import load_run
    from generation.job import read_job

    root = str(tmp_path / "run")
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], assemble__recipe="rewrite",
                   generate__rewrite={"model": tiny_models["chat"]})
    plan = load_run(cfg)
    assert [sp.stage for sp in plan.stages] == ["backtranslate", "rewrite"]
    rewrite = plan.stages[1]
    assert rewrite.cfg.gate_rule() is None and read_job(write_worker_job(rewrite)).gate is None
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0, err
    assert "published release" in out
    parsed = generated(root, "backtranslate")["parse_error"].isna()
    sent = generated(root, "rewrite")["finish_reason"].notna()
    assert parsed.sum() > 0 and sent.equals(parsed.reindex(sent.index)), (parsed, sent)
    for gate in ({"gate": "score"}, {"min_score": 4}):
        bad = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], assemble__recipe="rewrite",
                       generate__rewrite={"model": tiny_models["chat"], **gate})
        with pytest.raises(ConfigError, match=r"generate\.rewrite\.(gate|min_score): .* the rewrite recipe has no gate"):
            load_run(bad)


def test_rebuild_on_gcs(tmp_path, tiny_models, bpe_tokenizer_path, corpus, gcs_emulator, bucket, capsys):
    for path in (tmp_path / "dolma").rglob("*.json.gz"):
        storage.write_bytes(f"gs://{bucket}/{path.relative_to(tmp_path)}", path.read_bytes())
    storage.write_bytes(f"gs://{bucket}/tok/tokenizer.json", open(bpe_tokenizer_path, "rb").read())
    root = f"gs://{bucket}/runs/nightly"
    cfg = run_file(tmp_path, tiny_models, f"gs://{bucket}/tok", root,
                   [f"gs://{bucket}/dolma/documents/*/*.json.gz"])
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0, err
    latest = storage.read_text(f"{root}/sft/LATEST").strip()
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0, err
    assert "reused (config and input files unchanged)" in out and "nothing new published" in out
    assert storage.read_text(f"{root}/sft/LATEST").strip() == latest



def test_a_night_with_content_filter_refusals_publishes_and_the_next_sends_nothing(
        tmp_path, tiny_models, bpe_tokenizer_path, corpus, fixture_texts, chat_server, capsys):
    """A server that refuses ~10% of the rewrites (finish_reason content_filter, the same
    prompt every time). With default settings the night publishes; the refused rows are final: counted
    in the summary, the release's stats and report, dropped as rewrite:content_filter, and never sent
    again: the next night with nothing changed sends no request at all."""
    marker = fixture_texts[3][:60]

    def text(body):
        return body.get("prompt") or json.dumps(body.get("messages"), ensure_ascii=False)

    chat_server.answer = lambda body: ("[RES] A rewritten answer. [/RES]" if "[RES]" in text(body) else
                                       "Describe the topic of this page in a few sentences.")
    chat_server.refuse = lambda body: "[RES]" in text(body) and marker in text(body)   # 1 rewrite of 10
    chat_server.requests.clear()
    root = str(tmp_path / "run")
    served = {"engine": "openai", "model": "tiny-chat", "base_url": chat_server.url, "tokenizer": tiny_models["chat"]}
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], generate__backtranslate=served,
                   generate__rewrite={**served, "min_score": 0}, assemble__recipe="filter+rewrite",
                   generate__score__max_model_len=8192)       # no score made from a cut document: all pass
    try:
        rc, out, err = bft(capsys, "rebuild", "--config", cfg)
        assert rc == 0, err
        assert re.search(r"== generate rewrite .*\n.*; 10 requests sent, 0 engine errors \(transient\), 1 refused "
                         r"\(content_filter 1\)", out), out
        assert "rewrite: 10 sent, 0 reused, 1 refused (content_filter 1), 0 transient failures" in out
        latest = storage.read_text(os.path.join(root, "sft", "LATEST")).strip()
        folder = os.path.join(root, "sft", latest)
        stats = json.loads(open(os.path.join(folder, "stats.json")).read())
        assert stats["funnel"]["dropped"]["rewrite:content_filter"] == 1
        assert stats["stages"]["rewrite"]["sent_failures"] == {"content_filter": 1}
        assert "rewrite:content_filter" in open(os.path.join(folder, "report.html")).read()
        manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())
        assert manifest["run"]["stages"]["rewrite"]["refusals"] == {"content_filter": 1}
        assert not os.path.exists(os.path.join(root, "_night.json"))
        sent_first = len(chat_server.requests)

        rc, out, err = bft(capsys, "rebuild", "--config", cfg, "--format", "json")
        assert rc == 0, err
        assert len(chat_server.requests) == sent_first          # not one request the second night
        night = json.loads(out)
        assert {s: r.get("requests_sent") for s, r in night["night"]["stages"].items()
                if s not in ("prepare", "assemble")} == {"backtranslate": 0, "score": 0, "rewrite": 0}
        assert night["release"] == {**night["release"], "version": latest, "published": False}
        assert night["changes"] == {"previous": latest, "same_release": True}
    finally:
        chat_server.refuse = chat_server.answer = None


def test_the_nights_record_sums_work_and_keeps_the_last_state(tmp_path):
    """Two invocations of one night (an exit 75, then the rest): requests and seconds add up, the
    candidates and shards reused are the last invocation's, the record survives between them."""
    from bft.night import Night

    night = Night(RunLayout(str(tmp_path)), "run.yaml")
    night.add("prepare", {"reused": False, "candidates": 120, "seconds": 3.0})
    night.add("score", {"requests_sent": 40, "reused_shards": 0, "generated_shards": 2,
                        "refusals": {"content_filter": 1}, "seconds": 2.0})
    night.save("waiting for external workers")
    again = Night(RunLayout(str(tmp_path)), "run.yaml")
    again.add("prepare", {"reused": True, "candidates": 120, "seconds": 0.5})
    again.add("score", {"requests_sent": 3, "reused_shards": 2, "generated_shards": 0,
                        "refusals": {"content_filter": 1, "refusal": 2}, "seconds": 1.0})
    stages = again.record["stages"]
    assert stages["prepare"] == {"reused": True, "candidates": 120, "seconds": 3.5}
    assert stages["score"] == {"requests_sent": 43, "reused_shards": 2, "generated_shards": 2,
                               "refusals": {"content_filter": 2, "refusal": 2}, "seconds": 3.0}
    assert [i["status"] for i in again.record["invocations"]] == ["waiting for external workers", "running"]
    again.finish("published")
    assert not os.path.exists(tmp_path / "_night.json")
    last = json.loads((tmp_path / "_last_night.json").read_text())     # what bft status shows
    assert last["outcome"] == "published" and last["stages"]["score"]["requests_sent"] == 43


def test_rebuild_wait_lets_a_single_external_worker_take_the_root(tmp_path, tiny_models, bpe_tokenizer_path,
                                                                   corpus, capsys):
    """`bft rebuild --wait` holds the root's lock, but lets it go while it waits for external workers:
    a single worker (`bft generate score --config FILE`, which locks the root) runs meanwhile, and the
    rebuild then publishes."""
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    root = str(tmp_path / "run")
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], generate__score__external=True)
    proc = subprocess.Popen([sys.executable, "-m", "bft.cli", "rebuild", "--config", cfg, "--wait", "--poll-s", "0.2",
                             "--wait-timeout", "120"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(root, "generations", "backtranslate",
                                              "backtranslate-00001-of-00002.metrics.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)                                        # the rebuild now waits for the score workers
        rc, out, err = bft(capsys, "generate", "score", "--config", cfg)
        assert rc == 0, err
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "waiting for workers: 0 of 2 shards complete" in out and "published release" in out, (out, err)


# ---- empty input, and what the on-call engineer sees -------------------------------------------------


def test_an_empty_input_folder_is_nothing_new_tonight(tmp_path, tiny_models, bpe_tokenizer_path, capsys):
    """An input folder still empty failed the whole night (prepare: matches no file, exit 1): it is
    one line, nothing is published, LATEST is untouched, exit 0 or --empty-exit-code."""
    root = tmp_path / "run"
    (root / "sft").mkdir(parents=True)
    (root / "sft" / "LATEST").write_text("v0\n")
    (tmp_path / "dolma").mkdir()
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(root), [str(tmp_path / "dolma" / "*" / "*.json.gz")])
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0, err
    assert out.strip().splitlines() == [f"nothing new tonight: {tmp_path / 'dolma'} has no input files (input "
                                        f"'{tmp_path / 'dolma' / '*' / '*.json.gz'}'); nothing published, LATEST "
                                        "unchanged"], out
    assert (root / "sft" / "LATEST").read_text() == "v0\n" and os.listdir(root / "sft") == ["LATEST"]
    assert json.loads((root / "_last_night.json").read_text())["outcome"] == "nothing new"
    rc, out, _ = bft(capsys, "rebuild", "--config", cfg, "--empty-exit-code", "3", "--format", "json")
    assert rc == 3 and json.loads(out)["outcome"] == "nothing new" and json.loads(out)["exit_code"] == 3
    assert not os.path.exists(root / "candidates")


def test_a_failed_night_is_summed_up_in_one_line_and_one_json_document(nightly, monkeypatch, capsys):
    """A failing night printed nothing on stdout with --format json, no summary, and recorded a cut
    Beam traceback: now the summary (text or one JSON document, the error's one line and exit status
    in it), and the one line in the night's record. Also for a verb that fails before it runs."""
    from beam_pipelines import prepare

    root, cfg, _ = nightly
    beam_error = ("Pipeline failed: Traceback (most recent call last):\n  File x\n  File y\n"
                  "beam_pipelines.prepare.UnreadableFileError: /d/a.json.gz: unreadable after 3 lines "
                  "(EOFError: eof) [while running 'ReadAndMeasure']\n")

    def failing(*args):
        raise RuntimeError(beam_error)

    monkeypatch.setattr(prepare, "run", failing)
    line = "/d/a.json.gz: unreadable after 3 lines (EOFError: eof)"
    rc, out, err = bft(capsys, "rebuild", "--config", cfg, "--format", "json")
    assert rc == 1 and err.strip().splitlines()[-1] == f"bft rebuild: {line}"   # after the progress lines
    answer = json.loads(out)   # exactly one document
    assert (answer["outcome"], answer["error"], answer["exit_code"]) == ("failed", line, 1)
    assert answer["night"]["invocations"][-1]["status"] == f"failed: {line}"
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 1 and "== the night (2 invocation(s) since" in out and f"FAILED (exit 1): {line}" in out
    record = json.loads(open(os.path.join(root, "_night.json")).read())
    assert [i["status"] for i in record["invocations"]] == [f"failed: {line}"] * 2
    bad = os.path.join(root, "bad.yaml")
    open(bad, "w").write("prepare: {}\n")
    rc, out, err = bft(capsys, "plan", "--config", bad, "--format", "json")
    assert rc == 1 and json.loads(out) == {"verb": "plan", "error": f"{bad}: no `root:` (the run root, local or gs://)",
                                           "exit_code": 1}


def test_every_paid_request_counts_also_those_of_an_interrupted_invocation(nightly, chat_server, tiny_models,
                                                                          monkeypatch, capsys):
    """The summary said 1,215 backtranslate requests when 2,124 were paid: an interrupted invocation's
    answers were not counted. Interrupted after 4 answers, then resumed: the night counts what the
    server was sent. And "prepare: reused" was shown when prepare ran earlier that night."""
    from beam_pipelines import prepare
    from generation.runner import StageRunner

    root, cfg, _ = nightly
    doc = yaml.safe_load(open(cfg))   # one request at a time: an interrupt leaves none unanswered
    doc["generate"]["backtranslate"] = {"engine": "openai", "model": "tiny-chat", "base_url": chat_server.url,
                                        "tokenizer": tiny_models["chat"], "concurrency": 1, "checkpoint_rows": 1}
    open(cfg, "w").write(yaml.safe_dump(doc))
    chat_server.answer = lambda body: "Describe the topic of this page in a few sentences."
    chat_server.requests.clear()
    take, run_prepare, answers = StageRunner._take, prepare.run, []

    def interrupted(self, *args):
        done = take(self, *args)
        answers.append(1)
        if len(answers) == 4:
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(StageRunner, "_take", interrupted)
    monkeypatch.setattr(prepare, "run", lambda *a: {**run_prepare(*a), "reused": False})  # as if it ran now
    try:
        rc, out, err = bft(capsys, "rebuild", "--config", cfg)
        assert rc == 130 and err.strip() == "bft rebuild: interrupted: 4 answered rows kept; rerun to resume", (out, err)
        assert "backtranslate: 4 sent" in out and "INTERRUPTED (exit 130): interrupted: 4 answered rows kept" in out
        monkeypatch.setattr(StageRunner, "_take", take)
        monkeypatch.setattr(prepare, "run", run_prepare)
        rc, out, err = bft(capsys, "rebuild", "--config", cfg, "--format", "json")
    finally:
        chat_server.answer = None
    assert rc == 75, err
    answer = json.loads(out)
    assert answer["outcome"] == "waiting" and answer["exit_code"] == 75
    paid = [r for r in chat_server.requests if r["path"].endswith("/completions")]
    assert len(paid) == 12 and answer["night"]["stages"]["backtranslate"]["requests_sent"] == len(paid)
    assert [i["status"] for i in answer["night"]["invocations"]] == ["interrupted: 4 answered rows kept; rerun to resume",
                                                                  "waiting for external workers"]
    from bft.night import night_text

    assert "prepare: done earlier tonight, 12 candidates" in night_text(answer)
    assert "   done earlier tonight (config and input files unchanged): 12 input records" in err


def test_a_killed_invocations_running_count_is_the_nights(tmp_path):
    """kill -9 leaves no word: what its stage had paid, saved as it went (Night.live), is counted by the
    next invocation, which marks it as ended without closing its record."""
    from bft.night import UNCLOSED, Night

    night = Night(RunLayout(str(tmp_path)), "run.yaml")
    night.add("backtranslate", {"requests_sent": 5, "seconds": 1.0})
    night.live("score", {"requests_sent": 7, "transient_errors": 1, "refusals": {"content_filter": 1}})
    # (killed here: no save, no finish)
    again = Night(RunLayout(str(tmp_path)), "run.yaml")
    assert again.record["stages"]["score"] == {"requests_sent": 7, "transient_errors": 1,
                                               "refusals": {"content_filter": 1}}
    assert [i["status"] for i in again.record["invocations"]] == [UNCLOSED, "running"]
    assert again.record["stages"]["backtranslate"]["requests_sent"] == 5   # saved with the running count


def test_bft_status_shows_the_nights_the_pending_work_the_lock_and_latest(nightly, capsys):
    """`bft status ROOT` (or --config FILE): the last night and the one unfinished with each invocation's
    one-line result, the shards pending (in flight with checkpoints), the lock's holder and whether
    it is stale, LATEST and its alerts; read without taking the lock."""
    import subprocess

    from bft.night import Night
    from storage.holder import holder_info

    root, cfg, _ = nightly
    layout = RunLayout(root)
    night = Night(layout, cfg)
    night.add("backtranslate", {"requests_sent": 12})
    night.finish("published")
    night = Night(layout, cfg)
    night.add("backtranslate", {"requests_sent": 3})
    night.save("failed: score: the server at http://gpu-3:8000/v1 does not answer")
    gone = subprocess.Popen(["true"])
    gone.wait()
    storage.write_text(layout.lock(), json.dumps({**holder_info(), "pid": gone.pid, "command": "bft rebuild"}))
    storage.write_bytes(os.path.join(layout.generation_checkpoints("backtranslate", 1, 3), "c", "part-00001.parquet"), b"x")
    storage.write_text(layout.latest, "v1\n")
    storage.write_text(os.path.join(layout.release("v1"), "manifest.json"),
                       json.dumps({"created_at": "2026-11-30T03:09:00Z", "counts": {"train": 49, "validation": 1}}))
    storage.write_text(os.path.join(layout.release("v1"), "stats.json"), json.dumps({"alerts": ["validation split: 1"]}))

    rc, out, err = bft(capsys, "status", root)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1].startswith("last night: published, ended ") and "requests paid: backtranslate 12)" in lines[1]
    assert any(line.startswith("night unfinished (started ") and "requests paid so far: backtranslate 3)" in line
               for line in lines)
    assert any(line.endswith("failed: score: the server at http://gpu-3:8000/v1 does not answer") for line in lines)
    assert "pending: prepare complete (12 candidates, " in out
    assert f"lock root: STALE (its process is gone): the next writer takes it over: host " in out
    assert f"pid {gone.pid}, since " in out
    assert ("LATEST: v1 (NOT published: no _SUCCESS, 2026-11-30T03:09:00Z, 49 train, 1 validation)" in out
            and "   ALERT: validation split: 1" in out)
    rc, out, err = bft(capsys, "status", "--config", cfg, "--format", "json")
    assert rc == 0, err
    answer = json.loads(out)
    assert answer["pending"]["stages"] == {
        stage: {"shards": 3, "written": 0, "pending": [0, 1, 2], "in_flight": [1] if stage == "backtranslate" else [],
                "in_batches": []} for stage in ("backtranslate", "score")}
    assert [lock["stale"] for lock in answer["locks"]] == [True] and answer["latest"]["alerts"] == ["validation split: 1"]
    assert answer["night"]["invocations"][-1]["status"].startswith("failed: score:")
    rc, out, err = bft(capsys, "status", root + "-typo")
    assert rc == 1 and err == f"bft status: {root}-typo: no run root there (no file under it)\n" and not out
    rc, _, err = bft(capsys, "status")
    assert rc == 1 and err.startswith("bft status: needs a run root")


def test_edited_documents_and_a_changed_template_resend_only_the_affected_rows_and_publish(
        tmp_path, tiny_models, bpe_tokenizer_path, corpus, fixture_texts, chat_server, capsys):
    """A night in which 3 documents keep their ids with edited text, then a night with
    another backtranslate template, both publish; each stage sends exactly the rows whose input changed,
    and a rewrite row kept below the gate carries its backtranslate row's new instruction (it was reused
    with the old one, and assemble failed every night after)."""
    import xxhash

    ids = [f"a{i:02d}" for i in range(10)]
    marks = {i: fixture_texts[n][:40] for n, i in enumerate(ids)}
    reviewed = "Reviewed by an editor."       # a document made to pass the gate by its edit

    def body_text(body):
        return body.get("prompt") or "\n".join(m["content"] for m in body["messages"])

    def scripted(body):
        text = body_text(body)
        if "[RES]" in text:
            return "[RES] A rewritten answer. [/RES]"
        if "5-point scale" in text:
            passes = reviewed in text or any(marks[i] in text for i in ("a00", "a01", "a04"))
            return "Brief reasoning.\nScore: " + ("5" if passes else "2")
        return f"What does page {xxhash.xxh3_64_hexdigest(text.encode())[:8]} explain?"   # new prompt, new instruction

    def asked(start):
        out = {}
        for r in chat_server.requests[start:]:
            text = body_text(r["body"])
            stage = "rewrite" if "[RES]" in text else "score" if "5-point scale" in text else "backtranslate"
            out.setdefault(stage, set()).update(i for i in ids if marks[i] in text)
        return out

    chat_server.answer = scripted
    root = str(tmp_path / "run")
    served = {"engine": "openai", "model": "tiny-chat", "base_url": chat_server.url, "tokenizer": tiny_models["chat"]}
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], generate__backtranslate=served,
                   generate__score=served, generate__rewrite=served, assemble__recipe="filter+rewrite",
                   assemble__min_score=5)
    try:
        rc, out, err = bft(capsys, "rebuild", "--config", cfg)
        assert rc == 0 and "published release" in out, err
        rewrite = generated(root, "rewrite")
        assert sorted(rewrite.index[rewrite["finish_reason"].notna()]) == ["a00", "a01", "a04"]

        edited = {"a01": 1, "a02": 2, "a03": 3}   # a01 passes before and after, a02 never, a03 after its edit
        texts = [(reviewed + " " if i == "a03" else "") + t + (" Edited." if i in edited else "")
                 for i, t in zip(ids, fixture_texts[:10])]
        write_corpus(tmp_path / "dolma", texts, ids)
        start = len(chat_server.requests)
        rc, out, err = bft(capsys, "rebuild", "--config", cfg)
        assert rc == 0 and "published release" in out, err
        assert asked(start) == {"backtranslate": set(edited), "score": set(edited), "rewrite": {"a01", "a03"}}
        bt, rewrite = generated(root, "backtranslate"), generated(root, "rewrite")
        assert rewrite.loc["a02", "parse_error"] == "not_sent: below_gate"
        assert rewrite["instruction"].equals(bt.loc[rewrite.index, "instruction"])

        template = tmp_path / "backtranslate.txt"
        template.write_text("Write the question that the text below answers.\n\n<response>\n")
        cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus],
                       generate__backtranslate={**served, "template": str(template)}, generate__score=served,
                       generate__rewrite=served, assemble__recipe="filter+rewrite", assemble__min_score=5)
        start = len(chat_server.requests)
        rc, out, err = bft(capsys, "rebuild", "--config", cfg)
        assert rc == 0 and "published release" in out, err
        assert asked(start) == {"backtranslate": set(ids), "score": set(ids), "rewrite": {"a00", "a01", "a03", "a04"}}
        bt, rewrite = generated(root, "backtranslate"), generated(root, "rewrite")
        assert rewrite["instruction"].equals(bt.loc[rewrite.index, "instruction"])
    finally:
        chat_server.answer = None


# ---- issue 37 point 1: a plan that measures before it promises --------------------------------------
