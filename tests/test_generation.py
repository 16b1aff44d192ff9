"""The generation stages end to end on tiny models: hf engine, openai engine against a real
`transformers serve`, the vLLM adapter against a stand-in; resume, worker split, GCS."""
import dataclasses
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

import schemas
import storage
from generation.engines import EngineConfig
from generation.prompting import fit_prompt, n_tokens, render
from generation.job import GenerateConfig, GenerationError
from generation.runner import StageRunner
from lifecycle import provenance
from schemas.keys import row_seed
from schemas.layout import RunLayout
from generation.templates import DEFAULTS
from tests.conftest import _free_port
from tests.openai_api_standin import method_answer
from tests.helpers.generation import (NO_GATE, copy_root, gen, give_instructions, read_generation_rows, read_stage,
                                      reseal, write_scores)

STAGES = ["backtranslate", "score", "rewrite", "distill", "rate"]


def test_fit_prompt_cuts_the_document_to_the_budget(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["chat"])
    doc = " ".join(["word"] * 3000)
    prompt, msgs, cut = fit_prompt(tok, DEFAULTS["backtranslate"], {"response": doc}, "response", 300)
    assert cut and n_tokens(tok, prompt) <= 300 and prompt.startswith("<s>[INST] Below is a candidate")
    assert prompt.rstrip().endswith("Answer in the style of an AI Assistant. [/INST]")
    short, _, cut = fit_prompt(tok, DEFAULTS["backtranslate"], {"response": "short"}, "response", 300)
    assert not cut and msgs[0]["role"] == "user"
    plain = AutoTokenizer.from_pretrained(tiny_models["plain"])
    assert render(plain, None, "hi\n") == "[INST] hi\n[/INST]"


def test_token_counts_are_the_tokenizer_calls_whatever_its_state(tiny_models, monkeypatch):
    """prompting.token_counts (the prompts' exact counts) gives len(tokenizer(text)["input_ids"]) for
    each text, special tokens in the text included: by the Rust tokenizer's encode_batch_fast when it is
    in the state the call would set, else by the call itself (truncation or padding left on it, special
    tokens split, a tokenizer without a Rust one)."""
    from transformers import AutoTokenizer

    from generation.prompting import token_counts

    tok = AutoTokenizer.from_pretrained(tiny_models["chat"])
    texts = ["<s>[INST] Below is a candidate [/INST]", "word " * 700, "", "</s> x <unk>\n\t é ▁ 💡", "a" * 3000]

    def called():
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    backend, calls = tok.backend_tokenizer, []
    real = type(backend).encode_batch_fast

    class Spy:   # counts the fast path's use (a tokenizers.Tokenizer's methods cannot be patched)
        def __getattr__(self, name):
            return getattr(backend, name)

        def encode_batch_fast(self, *a, **k):
            calls.append(1)
            return real(backend, *a, **k)

    monkeypatch.setattr(type(tok), "backend_tokenizer", property(lambda self: Spy()))
    expected = called()
    assert expected[1] >= 700 and expected[2] == 0
    assert token_counts(tok, texts) == expected and calls == [1]
    backend.enable_truncation(16)   # left on the Rust tokenizer: the call (which turns it off) decides
    assert token_counts(tok, texts) == called() == expected and calls == [1]
    tok.split_special_tokens = True   # "<s>" as text: the call's own setting
    split = token_counts(tok, texts)
    assert split == called() and split[0] > expected[0] and calls == [1]
    tok.split_special_tokens = False   # the Rust tokenizer still splits them: the call, which resets it
    assert token_counts(tok, texts) == expected and calls == [1]
    assert token_counts(tok, texts) == expected and len(calls) == 2
    monkeypatch.undo()
    assert token_counts(type("Slow", (), {"__call__": lambda self, t, **k: tok(t, **k)})(), texts) == expected
    # a subclass that reads the text itself (as CodeLlama's "<FILL_ME>"): its own call counts
    import copy

    from generation.prompting import fast_backend

    custom = copy.copy(tok)
    custom.__class__ = type("Custom", (type(tok),), {"_encode_plus": lambda self, *a, **k: type(tok)._encode_plus(
        self, *a, **k)})
    assert fast_backend(tok) is not None and fast_backend(custom) is None
    assert token_counts(custom, texts) == expected and n_tokens(custom, texts[1]) == expected[1]


def test_all_five_stages_on_the_hf_engine(prepared_root, tmp_path, tiny_models):
    root = copy_root(prepared_root, tmp_path)
    for stage in STAGES:
        summary = gen(root, stage, tiny_models["chat"] if stage != "backtranslate" else tiny_models["plain"],
                      **NO_GATE.get(stage, {}))
        assert summary["shards_done"] == [0, 1, 2]
        if stage == "backtranslate":
            give_instructions(root)
        files, rows = read_stage(root, stage)
        assert files == [f"{stage}-0000{k}-of-00003.parquet" for k in range(3)]
        for k in range(3):
            cand = pd.read_parquet(os.path.join(root, "candidates", f"candidates-0000{k}-of-00003.parquet"))
            out = pd.read_parquet(os.path.join(root, "generations", stage, files[k]))
            assert list(out["id"]) == list(cand["id"])  # shard k holds exactly candidates shard k's ids
            metrics = json.load(open(os.path.join(root, "generations", stage, files[k].replace(".parquet", ".metrics.json"))))
            assert metrics["rows"] == len(out)
        assert (rows["stage"] == stage).all()
        sent = rows[rows["finish_reason"].notna()]
        assert len(sent) >= 9 and (sent["output_tokens"] <= 12).all() and (sent["prompt_tokens"] > 0).all()
        assert list(rows["seed"].dropna().astype(int)[:1]) == [row_seed(rows["id"][0], stage, 7)] or rows["seed"].isna()[0]
        if stage != "backtranslate":
            # rows whose instruction failed upstream are carried with the reason, never dropped
            bt = read_stage(root, "backtranslate")[1].set_index("id")
            failed = bt[bt["parse_error"].notna()].index
            carried = rows.set_index("id").loc[failed]
            assert carried["parse_error"].str.startswith("upstream_failed").all()


def test_outputs_are_deterministic_given_the_seed(prepared_root, tmp_path, tiny_models):
    a = copy_root(prepared_root, tmp_path / "a")
    b = copy_root(prepared_root, tmp_path / "b")
    gen(a, "backtranslate", tiny_models["plain"])
    gen(b, "backtranslate", tiny_models["plain"])
    assert read_stage(a, "backtranslate")[1]["raw_output"].equals(read_stage(b, "backtranslate")[1]["raw_output"])


def test_resume_and_worker_split(prepared_root, tmp_path, tiny_models):
    root = copy_root(prepared_root, tmp_path)
    w0 = gen(root, "backtranslate", tiny_models["plain"], worker_index=0, num_workers=2)
    w1 = gen(root, "backtranslate", tiny_models["plain"], worker_index=1, num_workers=2)
    assert (w0["shards_done"], w1["shards_done"]) == ([0, 2], [1])
    path = RunLayout(root).generation_shard("backtranslate", 1, 3)
    stamp = os.path.getmtime(path)
    again = gen(root, "backtranslate", tiny_models["plain"])
    assert again["shards_done"] == [] and again["shards_skipped"] == [0, 1, 2]
    assert os.path.getmtime(path) == stamp
    open(path, "wb").write(b"not parquet")  # a damaged output is regenerated
    assert gen(root, "backtranslate", tiny_models["plain"])["shards_done"] == [1]


def test_missing_upstream_shard_is_a_clear_error(prepared_root, tmp_path, tiny_models):
    root = copy_root(prepared_root, tmp_path)
    with pytest.raises(GenerationError, match=r"backtranslate-00000-of-00003.parquet: missing; run `bft generate backtranslate`"):
        gen(root, "score", tiny_models["chat"])


def test_logprob_score_mode_on_hf(prepared_root, tmp_path, tiny_models):
    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", tiny_models["plain"])
    give_instructions(root)
    gen(root, "score", tiny_models["chat"], score_mode="logprob")
    rows = read_stage(root, "score")[1]
    scored = rows[rows["finish_reason"].notna()]
    assert len(scored) == 9 and ((scored["score"] >= 1) & (scored["score"] <= 5)).all()
    assert (scored["output_tokens"] == 1).all() and scored["reasoning"].str.startswith("argmax=").all()


def test_transient_failures_over_the_budget_fail_the_stage_after_every_shard(prepared_root, tmp_path, tiny_models):
    """The error budget counts the stage's requests of this run, all shards together; each shard is
    still written (its answers were paid for), the stage fails naming the shards, flag and run-file key."""
    from generation.engines import Completion, EngineConfig
    from generation.engines.hf import HFEngine
    from generation.runner import ErrorBudgetExceeded

    class FailsShardOne(HFEngine):
        def generate(self, requests):
            out = super().generate(requests)
            return [Completion("", None, None, "error", error="boom") if r.seed in bad else c
                    for r, c in zip(requests, out)]

    root = copy_root(prepared_root, tmp_path)
    ids1 = read_candidates_ids(root, 1)
    bad = {row_seed(i, "backtranslate", 0) for i in ids1[:2]}
    cfg = GenerateConfig(stage="backtranslate", root=root, engine="hf", model=tiny_models["plain"], max_new_tokens=4)
    with pytest.raises(ErrorBudgetExceeded, match=r"backtranslate: 2 of the 12 rows sent in the shards this run wrote "
                       r"failed for a transient reason \(16.7%\), over --max-error-rate 0.02 \(run file: generate: "
                       r"max_error_rate\); shards with failures \(of the requests sent now\): 1 \(2 of 4\)\. .* "
                       r"First: engine_error: boom") as e:
        StageRunner(cfg, engine=FailsShardOne(EngineConfig("hf", tiny_models["plain"]))).run()
    assert e.value.summary["shards_done"] == [0, 1, 2]      # the shards after the failing one ran too
    rows = read_stage(root, "backtranslate")[1]
    assert rows["parse_error"].eq("engine_error: boom").sum() == 2 and len(rows) == 12
    # the rerun resends the 2 failures alone: 2 of the shard's 4 answered rows, not 2 of 2
    with pytest.raises(ErrorBudgetExceeded, match=r"2 of the 4 rows sent in the shards this run wrote .* \(50.0%\)"):
        StageRunner(cfg, engine=FailsShardOne(EngineConfig("hf", tiny_models["plain"]))).run()
    summary = StageRunner(dataclasses.replace(cfg, max_error_rate=1.0),
                          engine=FailsShardOne(EngineConfig("hf", tiny_models["plain"]))).run()
    assert summary["sent"] == 2 and summary["errors"] == 2 and summary["shards_skipped"] == [0, 2]


def read_candidates_ids(root, k):
    path = RunLayout(root).candidates_shard(k, 3)
    return storage.read_parquet(path, ["id"])["id"].to_pylist()


@pytest.fixture(scope="module")
def served_model(tiny_models):
    """A real `transformers serve` on loopback serving the tiny chat model."""
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    proc = subprocess.Popen([exe, "serve", tiny_models["chat"], "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("transformers serve exited")
        time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("transformers serve did not start")
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=20)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_openai_engine_against_transformers_serve(prepared_root, tmp_path, tiny_models, served_model, api):
    root = copy_root(prepared_root, tmp_path)
    for stage in STAGES:
        gen(root, stage, tiny_models["chat"], engine="openai", base_url=served_model, api=api, concurrency=4,
            max_new_tokens=8, **NO_GATE.get(stage, {}))
        if stage == "backtranslate":
            give_instructions(root)
        rows = read_stage(root, stage)[1]
        sent = rows[rows["finish_reason"].notna()]
        assert len(sent) and not sent["parse_error"].fillna("").str.startswith("engine_error").any()
        assert (sent["output_tokens"] <= 8).all() and (sent["prompt_tokens"] > 0).all()


def test_a_server_that_is_down_fails_in_seconds_naming_the_url(prepared_root, tmp_path, tiny_models, capsys):
    """Preflight: nothing listens; one line naming the URL within seconds, before any shard, and the
    context length is not asked for (the server never answered)."""
    from bft.cli import main

    root = copy_root(prepared_root, tmp_path)
    url = f"http://user:secret@127.0.0.1:{_free_port()}/v1"  # nothing listens there
    t0 = time.monotonic()
    assert main(["generate", "backtranslate", "--root", root, "--engine", "openai", "--model", "served",
                 "--base-url", url, "--api", "chat"]) == 1
    err = capsys.readouterr().err.strip()
    assert time.monotonic() - t0 < 15 and len(err.splitlines()) == 1
    assert "cannot reach the server at http://***@127.0.0.1:" in err and "secret" not in err
    assert "max-model-len" not in err
    assert not os.path.exists(os.path.join(root, "generations"))


def test_generation_on_gcs(prepared_root, tiny_models, gcs_emulator, bucket):
    for name in os.listdir(os.path.join(prepared_root, "candidates")):
        path = os.path.join(prepared_root, "candidates", name)
        if os.path.isfile(path):
            storage.write_bytes(f"gs://{bucket}/run/candidates/{name}", open(path, "rb").read())
    root = f"gs://{bucket}/run"
    gen(root, "backtranslate", tiny_models["plain"])
    out = RunLayout(root).generation_shard("backtranslate", 2, 3)
    table = schemas.validate(storage.read_parquet(out), schemas.GENERATION, out)
    assert table.num_rows == 4 and storage.exists(out.replace(".parquet", ".metrics.json"))
    assert gen(root, "backtranslate", tiny_models["plain"])["shards_skipped"] == [0, 1, 2]


# ---- stages own their inputs and outputs; the runner names none ------------------------------------

def test_the_runner_names_no_stage_and_takes_metrics_from_shard_summary(prepared_root, tmp_path, tiny_models):
    import inspect

    from generation import dispatch, job, runner, shard
    from schemas.outcomes import shard_summary

    import re

    source = "".join(inspect.getsource(m) for m in (runner, job, shard, dispatch))
    assert not [s for s in STAGES if s != "score" and f'"{s}"' in source]   # "score" is also a column
    assert not re.search(r"stage\s*(==|!=|in)\s*\(?\"", source)     # no `cfg.stage in ("score", ...)`
    assert not [p for p in ('"engine_error:', '"upstream_failed', '"missing_') if p in source]
    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", tiny_models["plain"])
    layout = RunLayout(root)
    shard = storage.read_parquet(layout.generation_shard("backtranslate", 0, 3))
    metrics = json.loads(storage.read_text(layout.generation_metrics("backtranslate", 0, 3)))
    assert {k: metrics[k] for k in shard_summary(shard, False)} == shard_summary(shard, False)


def test_user_mistakes_are_one_clear_line(prepared_root, tmp_path, tiny_models, capsys):
    from bft import cli

    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--engine", "hf", "--model", tiny_models["plain"]]
    assert cli.main(["generate", "backtranslate", "--root", str(empty)] + args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run bft prepare first" in err
    root = copy_root(prepared_root, tmp_path / "r")
    assert cli.main(["generate", "score", "--root", root] + args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run `bft generate backtranslate` for shard 0 first" in err
    for bad in (["--gate", "none"], ["--score-mode", "logprob"]):
        assert cli.main(["generate", "backtranslate", "--root", root] + args + bad) == 1


# ---- the gate before rewrite and distill -----------------------------------------------------------

@pytest.mark.parametrize("stage", ["rewrite", "distill"])
def test_rewrite_and_distill_send_only_rows_past_the_gate(prepared_root, tmp_path, tiny_models, stage):
    from schemas.outcomes import BELOW_GATE

    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", tiny_models["plain"])
    give_instructions(root)
    ids = sorted(read_stage(root, "backtranslate")[1]["id"])
    write_scores(root, "score", {i: 5.0 if n % 3 == 0 else 4.0 for n, i in enumerate(ids[:-1])})
    gen(root, stage, tiny_models["chat"])
    rows = read_stage(root, stage)[1].set_index("id")
    bt = read_stage(root, "backtranslate")[1].set_index("id")
    ok = set(bt.index[bt["parse_error"].isna()])               # 3 upstream failures: never sent
    passed = [i for n, i in enumerate(ids[:-1]) if n % 3 == 0 and i in ok]
    assert passed and sorted(rows.index[rows["finish_reason"].notna()]) == passed
    below = rows[rows["parse_error"] == BELOW_GATE]
    assert sorted(below.index) == sorted(ok - set(passed))    # the last id has no score: below the gate too
    assert below["finish_reason"].isna().all() and below["instruction"].notna().all()
    shard0 = pd.read_parquet(RunLayout(root).generation_shard(stage, 0, 3))
    metrics = json.loads(storage.read_text(RunLayout(root).generation_metrics(stage, 0, 3)))
    assert metrics["finish_reasons"]["not_sent"] == shard0["finish_reason"].isna().sum()
    # a set threshold, and the gate off (the rewrite-only recipe): a changed gate redoes every shard
    assert gen(root, stage, tiny_models["chat"], min_score=4.0)["shards_done"] == [0, 1, 2]
    sent = set(read_stage(root, stage)[1].query("finish_reason.notna()")["id"])
    assert sent == ok - {ids[-1]}
    gen(root, stage, tiny_models["chat"], gate="none")
    assert set(read_stage(root, stage)[1].query("finish_reason.notna()")["id"]) == ok


def test_one_gate_lowered_sends_only_new_pairs_and_never_nan_or_cut_scores(prepared_root, tmp_path, tiny_models):
    """The gate (schemas.recipes.Gate) never passes a NaN score
    nor a score made from a cut document (assemble could not keep the pair); lowering the threshold
    sends only the pairs that pass now and did not before, the rewrites already made are kept."""
    import math

    from schemas.recipes import Gate

    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", tiny_models["plain"])
    give_instructions(root)
    bt = read_stage(root, "backtranslate")[1]
    ok = sorted(bt[bt["parse_error"].isna()]["id"])
    plan = {i: [5.0, 4.0, math.nan][n % 3] for n, i in enumerate(ok)}
    write_scores(root, "score", plan)
    cut = ok[0]                                     # a 5 made from a cut document
    layout = RunLayout(root)
    for k in range(3):
        path = layout.generation_shard("score", k, 3)
        rows = read_generation_rows(path)
        for r in rows:
            r["input_truncated"] = r["id"] == cut
        storage.write_parquet(schemas.to_table(rows, schemas.GENERATION, path), path)
        reseal(path)
    first = gen(root, "rewrite", tiny_models["chat"])
    fives = {i for i, v in plan.items() if v == 5.0} - {cut}
    assert first["sent"] == len(fives)
    assert set(read_stage(root, "rewrite")[1].query("finish_reason.notna()")["id"]) == fives
    before = read_stage(root, "rewrite")[1].set_index("id")
    second = gen(root, "rewrite", tiny_models["chat"], min_score=4.0)
    fours = {i for i, v in plan.items() if v == 4.0}
    assert second["sent"] == len(fours) and second["reused"] == 12 - len(fours)
    after = read_stage(root, "rewrite")[1].set_index("id")
    assert after.loc[sorted(fives), "raw_output"].equals(before.loc[sorted(fives), "raw_output"])
    assert set(after.query("finish_reason.notna()").index) == fives | fours   # NaN and the cut 5: never
    g = Gate("score", 4.0)
    assert not g.passes({"score": math.nan, "parse_error": None}) and not g.passes(
        {"score": 5.0, "parse_error": None, "input_truncated": True}) and g.passes({"score": 4.0, "parse_error": None})
    import pyarrow as pa
    assert g.passing(pa.array([None, None, None, "x"]), pa.array([False, True, None, False]),
                     pa.array([5.0, 5.0, math.nan, 5.0])).to_pylist() == [True, False, False, False]


def test_a_gate_on_logprob_scores_defaults_to_4_5(prepared_root, tmp_path, tiny_models):
    """Score shards made in logprob mode (their markers say so) gate at 4.5 by
    default: an expected score of 4.7 is sent, 4.2 is not (at 5, nothing would be)."""
    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", tiny_models["plain"])
    give_instructions(root)
    bt = read_stage(root, "backtranslate")[1]
    ok = sorted(bt[bt["parse_error"].isna()]["id"])
    plan = {i: [4.7, 4.2][n % 2] for n, i in enumerate(ok)}
    write_scores(root, "score", plan, config={"score_mode": "logprob"})
    summary = gen(root, "rewrite", tiny_models["chat"])
    assert summary["sent"] == sum(v == 4.7 for v in plan.values()) > 0


def test_a_stage_job_is_resolved_once_frozen_and_survives_json(tmp_path, monkeypatch):
    """`bft generate`'s options become one frozen StageJob: its gate by schemas.recipes.resolve_gate
    (4.5 on a root whose score shards were made in logprob mode, --min-score when given), and the job
    an external worker is handed reads back equal from its JSON."""
    from generation.job import StageJob, resolve_job
    from schemas import recipes

    layout = RunLayout(str(tmp_path))
    storage.write_text(layout.prepare_stats, "{}")
    storage.write_text(layout.candidates_shard(0, 1), "")
    storage.write_text(layout.generation_metrics("score", 0, 1), json.dumps({"config": {"score_mode": "logprob"}}))
    calls = []
    monkeypatch.setattr("generation.job.resolve_gate", lambda *a: calls.append(a) or recipes.resolve_gate(*a))
    cfg = GenerateConfig(stage="rewrite", root=str(tmp_path), engine="hf", model="m", top_p=0.5)
    job = resolve_job(cfg)
    assert calls == [("score", "logprob", None)] and job.gate == recipes.Gate("score", 4.5)
    assert (job.max_new_tokens, job.temperature, job.top_p, job.stop) == (2048, 1.0, 0.5, ("[/RES]",))
    assert resolve_job(dataclasses.replace(cfg, min_score=4.0)).gate == recipes.Gate("score", 4.0)
    for frozen in (job, cfg):
        with pytest.raises(dataclasses.FrozenInstanceError):
            frozen.gate = None
    assert StageJob.from_json(job.to_json()) == job
    with pytest.raises(GenerationError, match="job.json: not a stage job"):
        StageJob.from_json('{"options": {}}', "job.json")


def test_the_rate_gate_uses_alpagasus_threshold(prepared_root, tmp_path, tiny_models):
    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", tiny_models["plain"])
    give_instructions(root)
    ids = sorted(read_stage(root, "backtranslate")[1]["id"])
    write_scores(root, "rate", {i: 4.5 if n % 2 else 4.0 for n, i in enumerate(ids)})
    gen(root, "rewrite", tiny_models["chat"], gate="rate")
    rows = read_stage(root, "rewrite")[1].set_index("id")
    bt = read_stage(root, "backtranslate")[1].set_index("id")
    expected = [i for n, i in enumerate(ids) if n % 2 and pd.isna(bt.loc[i, "parse_error"])]
    assert sorted(rows.index[rows["finish_reason"].notna()]) == expected


# ---- a row is reused only when what it was made from is unchanged ---------------------------------

def hosted_stages(root, hosted, **backtranslate) -> dict:
    """backtranslate, score and rewrite (gated at score 4) on the hosted stand-in: {stage: requests sent}."""
    kw = dict(base_url=hosted.url, **HOSTED)
    return {"backtranslate": gen(root, "backtranslate", "gpt-standin", **kw, **backtranslate)["sent"],
            "score": gen(root, "score", "gpt-standin", **kw)["sent"],
            "rewrite": gen(root, "rewrite", "gpt-standin", min_score=4.0, **kw)["sent"]}


def assemble_check(root):
    """What assemble checks of the rows the stages carry: each carries its backtranslate row's instruction."""
    from beam_pipelines.assemble import recipes
    from beam_pipelines.assemble.join import check_carried_instructions

    layout = RunLayout(root)
    for k, n, path in layout.candidate_shards():
        paths = {s: layout.generation_shard(s, k, n) for s in ("backtranslate", "score", "rewrite")}
        stages = {s: storage.read_parquet(p) for s, p in paths.items()}
        check_carried_instructions(recipes.join_stages(storage.read_parquet(path), stages), paths)


def test_edited_documents_and_a_changed_template_resend_only_the_rows_they_change(prepared_root, tmp_path, hosted):
    """3 documents keep their ids with edited text, then the backtranslate template
    changes. Each stage sends exactly the rows whose input changed; a rewrite row kept below the gate
    is remade (never sent) with its backtranslate row's new instruction: it was reused with the old one,
    as its input_hash (why it was not sent) does not hold it, and assemble refused every night after."""
    root = copy_root(prepared_root, tmp_path)
    first = hosted_stages(root, hosted)
    assert first["backtranslate"] == first["score"] == 12 and 0 < first["rewrite"] < 12
    before = {s: read_stage(root, s)[1].set_index("id") for s in ("backtranslate", "score", "rewrite")}

    edited = ["d03", "d05", "d07"]   # past the gate before and after the edit, below both times, past it after
    for k, n, path in RunLayout(root).candidate_shards():
        rows = storage.read_parquet(path).to_pylist()
        for r in rows:
            if r["id"] in edited:
                r["text"] += " Edited."
        storage.write_parquet(schemas.to_table(rows, schemas.CANDIDATE, path), path)
    sent = hosted_stages(root, hosted)
    after = {s: read_stage(root, s)[1].set_index("id") for s in ("backtranslate", "score", "rewrite")}
    rewrite = after["rewrite"]
    passing = set(rewrite.index[rewrite["finish_reason"].notna()])
    assert sent == {"backtranslate": 3, "score": 3, "rewrite": 2} and passing & set(edited) == {"d03", "d07"}
    assert rewrite.loc["d05", "parse_error"] == "not_sent: below_gate"
    assert rewrite.loc["d05", "instruction"] == after["backtranslate"].loc["d05", "instruction"] != \
        before["rewrite"].loc["d05", "instruction"]
    kept = [i for i in rewrite.index if i not in edited]
    for stage, rows in after.items():                 # the rows of the other documents: reused as they were
        assert rows.loc[kept].equals(before[stage].loc[kept]), stage
    assemble_check(root)

    template = tmp_path / "backtranslate.txt"
    template.write_text("Write the most likely question that the text below answers.\n\n<response>\n")
    sent = hosted_stages(root, hosted, template=str(template))
    rewrite = read_stage(root, "rewrite")[1]
    assert sent == {"backtranslate": 12, "score": 12, "rewrite": rewrite["finish_reason"].notna().sum()}
    assert (rewrite["parse_error"] == "not_sent: below_gate").any()
    assemble_check(root)


def test_rerunning_a_stage_as_assemble_advises_remakes_its_stale_rows_only(prepared_root, tmp_path, hosted):
    """A rewrite shard whose row below the gate carries an older instruction while its
    inputs are current (as written before such rows were keyed by it) is refused by assemble, which
    tells to rerun bft generate rewrite: that rerun remakes that row, sends nothing, and writes the
    shard as a run from scratch would (it skipped the shard as complete)."""
    from beam_pipelines.assemble.config import AssembleError

    root = copy_root(prepared_root, tmp_path)
    hosted_stages(root, hosted)
    path = RunLayout(root).generation_shard("rewrite", 1, 3)
    good = open(path, "rb").read()
    rows = read_generation_rows(path)
    stale = next(r for r in rows if r["parse_error"] == "not_sent: below_gate")
    stale["instruction"] = "An older instruction?"
    storage.write_parquet(schemas.to_table(rows, schemas.GENERATION, path), path)
    reseal(path)
    with pytest.raises(AssembleError, match=rf"row {stale['id']} carries another instruction .*rerun bft generate "
                                            "rewrite"):
        assemble_check(root)
    summary = gen(root, "rewrite", "gpt-standin", min_score=4.0, base_url=hosted.url, **HOSTED)
    assert summary["shards_done"] == [1] and summary["sent"] == 0
    assert open(path, "rb").read() == good
    assemble_check(root)


# ---- provenance, integrity, retries ----------------------------------------------------------------

def test_a_shard_made_from_an_older_upstream_or_config_is_redone(prepared_root, tmp_path, tiny_models):
    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", tiny_models["plain"])
    give_instructions(root)
    gen(root, "score", tiny_models["chat"])
    assert gen(root, "score", tiny_models["chat"])["shards_skipped"] == [0, 1, 2]
    path = RunLayout(root).generation_shard("backtranslate", 1, 3)
    rows = read_generation_rows(path)
    rows[1]["instruction"] = "Another instruction entirely?"
    storage.write_parquet(schemas.to_table(rows, schemas.GENERATION, path), path)
    reseal(path)                                     # backtranslate shard 1 was redone
    assert gen(root, "score", tiny_models["chat"])["shards_done"] == [1]
    score = read_generation_rows(RunLayout(root).generation_shard("score", 1, 3))
    assert score[1]["instruction"] == "Another instruction entirely?"
    # another model or sampling config: every shard is redone
    assert gen(root, "score", tiny_models["plain"])["shards_done"] == [0, 1, 2]
    assert gen(root, "score", tiny_models["plain"], temperature=0.5)["shards_done"] == [0, 1, 2]
    assert gen(root, "score", tiny_models["plain"], temperature=0.5, concurrency=3)["shards_skipped"] == [0, 1, 2]


def test_a_flipped_byte_is_detected_and_the_shard_redone(prepared_root, tmp_path, tiny_models):
    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", tiny_models["plain"])
    give_instructions(root)
    path = RunLayout(root).generation_shard("backtranslate", 0, 3)
    good = open(path, "rb").read()
    # the column statistics of the footer hold "Explain ..." uncompressed: Arrow reads the file
    # either way, so only a checksum sees this flip; the others may break the file
    at = good.find(b"Explain")
    assert at > 0
    for pos in (at, len(good) // 2, len(good) - 20):
        blob = bytearray(good)
        blob[pos] ^= 0x01
        open(path, "wb").write(bytes(blob))
        with pytest.raises(GenerationError, match=r"backtranslate-00000-of-00003.parquet: its bytes differ"):
            gen(root, "score", tiny_models["chat"])
        assert gen(root, "backtranslate", tiny_models["plain"])["shards_done"] == [0]
        give_instructions(root)
        good = open(path, "rb").read()


def test_a_rerun_resends_only_engine_error_rows(prepared_root, tmp_path, tiny_models):
    from generation.engines import Completion
    from generation.engines.hf import HFEngine

    class Flaky(HFEngine):
        """Fails the requests of every other document id."""
        def generate(self, requests):
            out = super().generate(requests)
            self.sent = getattr(self, "sent", 0) + len(requests)
            return [Completion("", None, None, "error", error="overloaded") if r.seed % 2 else c
                    for r, c in zip(requests, out)]

    root = copy_root(prepared_root, tmp_path)
    cfg = GenerateConfig(stage="backtranslate", root=root, engine="hf", model=tiny_models["plain"], max_new_tokens=12,
                         batch_size=4, seed=7, max_error_rate=1.0)
    StageRunner(cfg, engine=Flaky(EngineConfig("hf", tiny_models["plain"], batch_size=4, seed=7))).run()
    first = read_stage(root, "backtranslate")[1]
    failed = first["parse_error"].fillna("").str.startswith("engine_error")
    assert failed.any() and (~failed).any()
    engine = HFEngine(EngineConfig("hf", tiny_models["plain"], batch_size=4, seed=7))
    calls = []
    engine_generate = engine.generate
    engine.generate = lambda reqs: calls.append(len(reqs)) or engine_generate(reqs)
    summary = StageRunner(GenerateConfig(stage="backtranslate", root=root, engine="hf", model=tiny_models["plain"],
                                         max_new_tokens=12, batch_size=4, seed=7), engine=engine).run()
    assert summary["shards_done"] == [0, 1, 2] and sum(calls) == int(failed.sum())
    second = read_stage(root, "backtranslate")[1]
    assert not second["parse_error"].fillna("").str.startswith("engine_error").any()
    assert second[~failed]["raw_output"].equals(first[~failed]["raw_output"])
    assert gen(root, "backtranslate", tiny_models["plain"])["shards_skipped"] == [0, 1, 2]


@pytest.fixture(scope="module")
def uninterrupted(prepared_root, tmp_path_factory, tiny_models):
    """backtranslate run once without a kill."""
    clean = copy_root(prepared_root, tmp_path_factory.mktemp("clean"))
    gen(clean, "backtranslate", tiny_models["plain"])
    return clean


class Killed(BaseException):
    """A kill: nothing in the runner catches it."""


@pytest.mark.parametrize("kill_at", range(7))
def test_a_generate_killed_anywhere_then_rerun_equals_an_uninterrupted_run(prepared_root, tmp_path, tiny_models,
                                                                             uninterrupted, monkeypatch, kill_at):
    """Writes in order: shard 0 data, shard 0 marker, shard 1 data, ... The kill comes instead of write
    `kill_at` (so between a shard's data and its marker for odd ones); 6 leaves half of shard 1's data."""
    clean = uninterrupted
    root = copy_root(prepared_root, tmp_path / "killed")
    writes = []
    real = {"write_parquet": storage.write_parquet, "write_text": storage.write_text}

    def fake(name):
        def write(data, path=None):
            target = path if name == "write_parquet" else data
            if len(writes) == (2 if kill_at == 6 else kill_at):
                if kill_at == 6:                       # a torn data file (as a non-atomic store could leave)
                    real["write_parquet"](data, target)
                    blob = open(target, "rb").read()
                    open(target, "wb").write(blob[: len(blob) // 2])
                raise Killed(target)
            writes.append(target)
            return real[name](data, path)
        return write

    monkeypatch.setattr(storage, "write_parquet", fake("write_parquet"))
    monkeypatch.setattr(storage, "write_text", fake("write_text"))
    with pytest.raises(Killed):
        gen(root, "backtranslate", tiny_models["plain"])
    monkeypatch.undo()
    gen(root, "backtranslate", tiny_models["plain"])
    layout_a, layout_b = RunLayout(clean), RunLayout(root)
    for k in range(3):
        a, b = layout_a.generation_shard("backtranslate", k, 3), layout_b.generation_shard("backtranslate", k, 3)
        assert open(a, "rb").read() == open(b, "rb").read()
        ma = json.loads(storage.read_text(layout_a.generation_metrics("backtranslate", k, 3)))[provenance.KEY]
        mb = json.loads(storage.read_text(layout_b.generation_metrics("backtranslate", k, 3)))[provenance.KEY]
        assert ma["sha256"] == mb["sha256"] and ma["config"] == mb["config"]
        assert {n: i["sha256"] for n, i in ma["inputs"].items()} == {n: i["sha256"] for n, i in mb["inputs"].items()}
    assert gen(root, "backtranslate", tiny_models["plain"])["shards_skipped"] == [0, 1, 2]


@pytest.fixture(scope="module")
def uninterrupted_row_by_row(prepared_root, tmp_path_factory, tiny_models):
    """backtranslate run once without a kill, one request per engine call, a checkpoint per row."""
    clean = copy_root(prepared_root, tmp_path_factory.mktemp("clean1"))
    gen(clean, "backtranslate", tiny_models["plain"], chunk_rows=1, checkpoint_rows=1)
    return clean


@pytest.mark.parametrize("kill_at", [0, 2, 5, 8])
def test_a_kill_between_checkpoints_loses_only_the_rows_after_the_last(prepared_root, tmp_path, tiny_models,
                                                                       uninterrupted_row_by_row, monkeypatch, kill_at):
    """With a checkpoint per row, a shard of 4 rows writes parts 1..4, then its data and marker. A
    kill instead of Parquet write `kill_at` (0: before any checkpoint; 2: after two rows of shard 0;
    5: before shard 1's first part; 8: after three rows of shard 1): the rerun sends only the rows not
    checkpointed or written, every shard is byte-identical to the uninterrupted run's, and no
    checkpoint is left."""
    root = copy_root(prepared_root, tmp_path / "killed")
    writes = []
    real = storage.write_parquet

    def write(table, path, *a, **kw):
        if len(writes) == kill_at:
            raise Killed(path)
        writes.append(path)
        return real(table, path, *a, **kw)

    monkeypatch.setattr(storage, "write_parquet", write)
    with pytest.raises(Killed):
        gen(root, "backtranslate", tiny_models["plain"], chunk_rows=1, checkpoint_rows=1)
    monkeypatch.undo()
    summary = gen(root, "backtranslate", tiny_models["plain"], chunk_rows=1, checkpoint_rows=1)
    # (requests sent, rows reused from checkpoints): 5 and 8 find shard 0 complete (skipped whole)
    assert (summary["sent"], summary["reused"]) == {0: (12, 0), 2: (10, 2), 5: (8, 0), 8: (5, 3)}[kill_at]
    for k in range(3):
        a = RunLayout(uninterrupted_row_by_row).generation_shard("backtranslate", k, 3)
        assert open(a, "rb").read() == open(RunLayout(root).generation_shard("backtranslate", k, 3), "rb").read()
    assert storage.list_files(os.path.join(root, "generations", "backtranslate", "_checkpoints")) == []


def killed_before_the_first_shard(root, tiny_models, monkeypatch):
    """backtranslate with a checkpoint per row, killed at the first write that is not a checkpoint
    (shard 0's data): shard 0's rows are all in checkpoints, nothing else is written."""
    real = storage.write_parquet

    def write(table, path, *a, **kw):
        if "/_checkpoints/" not in path:
            raise Killed(path)
        return real(table, path, *a, **kw)

    monkeypatch.setattr(storage, "write_parquet", write)
    with pytest.raises(Killed):
        gen(root, "backtranslate", tiny_models["plain"], chunk_rows=1, checkpoint_rows=1)
    monkeypatch.undo()


def test_checkpoints_of_another_config_are_not_used(prepared_root, tmp_path, tiny_models, monkeypatch):
    root = copy_root(prepared_root, tmp_path)
    killed_before_the_first_shard(root, tiny_models, monkeypatch)
    summary = gen(root, "backtranslate", tiny_models["plain"], chunk_rows=1, checkpoint_rows=1, max_new_tokens=5)
    assert summary["sent"] == 12 and summary["reused"] == 0


def test_the_whole_document_limit_is_what_the_runner_keeps_whole(tiny_models):
    """generation.budget's --max-tokens advice agrees with fit_prompt: a document at the limit is sent
    whole by every stage, one a few tokens longer is cut by at least one."""
    from transformers import AutoTokenizer

    from generation import budget
    from generation.stages import STAGES as SPECS
    from generation.templates import load_template

    tok = AutoTokenizer.from_pretrained(tiny_models["chat"])
    limits = budget.document_limits(tok, 3072, instruction_tokens=40)
    assert set(limits) == {"backtranslate", "score", "rewrite", "rate"}   # distill's prompt has no document
    limit = budget.whole_document_limit(tok, 3072, instruction_tokens=40)
    assert limit == limits["rewrite"]["max_document_tokens"] and limits["rewrite"]["cap"] == SPECS["distill"].max_new_tokens
    words = tok.decode(tok(" ".join(["weather"] * 4000), add_special_tokens=False)["input_ids"][:limit + 8])

    def cut(stage, n):
        doc = tok.decode(tok(words, add_special_tokens=False)["input_ids"][:n])
        spec = SPECS[stage]
        return fit_prompt(tok, load_template(stage, None), spec.prompt(doc, budget.placeholder_instruction(40)),
                          spec.doc_field, 3072 - spec.max_new_tokens)[2]

    assert not any(cut(stage, limit) for stage in limits)
    assert any(cut(stage, limit + 8) for stage in limits)


def test_a_checkpoint_write_killed_midway_is_ignored(prepared_root, tmp_path, tiny_models, monkeypatch):
    """A kill during a checkpoint part's write leaves storage's temporary file beside the parts: the
    rerun removes it and resumes from the whole parts."""
    root = copy_root(prepared_root, tmp_path)
    killed_before_the_first_shard(root, tiny_models, monkeypatch)
    parts = [p for p in storage.list_files(os.path.join(root, "generations")) if "/_checkpoints/" in p]
    open(os.path.join(os.path.dirname(parts[0]), ".tmp-part-00009.parquet.x1y2"), "wb").write(b"PAR1 torn")
    summary = gen(root, "backtranslate", tiny_models["plain"], chunk_rows=1, checkpoint_rows=1)
    assert summary["reused"] == len(parts) and summary["sent"] == 12 - len(parts)


def test_a_user_error_raised_while_answers_arrive_is_one_line(prepared_root, tmp_path, tiny_models, monkeypatch):
    """An error raised in the openai engine's stream (here: a checkpoint write refused) reaches the
    caller as itself, not wrapped in an ExceptionGroup that the CLI would print as a traceback."""
    from generation.engines.openai import OpenAIEngine
    from schemas.errors import UserError

    class Refused(UserError):
        pass

    seen = []

    async def fake_one(self, r):
        from generation.engines.base import finished
        return finished("An instruction?", 3, 2, "stop")

    monkeypatch.setattr(OpenAIEngine, "_one", fake_one)
    eng = OpenAIEngine.__new__(OpenAIEngine)
    from generation.engines.openai.transport import Endpoint, Transport
    eng.transport = Transport(Endpoint("http://x/v1", "http://x/v1", "OPENAI_API_KEY", 1.0), 4)
    from generation.engines.base import Request

    def emit(key, comp):
        seen.append(key)
        raise Refused("no room on the bucket")

    with pytest.raises(Refused, match="no room"):
        eng.stream(((i, Request("p", [], 2)) for i in range(10)), emit)
    eng.close()
    assert seen


# ---- one stream across a stage's shards -----------------------------------------------------------

HOSTED = dict(engine="openai", api="chat", max_model_len=8192, max_new_tokens=64, concurrency=4)


def documents(root) -> dict[str, tuple[int, str]]:
    """{document text: (shard, id)} of the root's candidates."""
    out = {}
    for k, n, path in RunLayout(root).candidate_shards():
        for r in storage.read_parquet(path, ["id", "text"]).to_pylist():
            out[r["text"]] = (k, r["id"])
    return out


def asked(docs: dict, whole: str) -> tuple[int, str]:
    """(shard, id) of the document a prompt carries."""
    return next(v for text, v in docs.items() if text in whole)


def chat_text(body: dict) -> str:
    return "\n".join(str(m.get("content")) for m in body["messages"])


def slow_first_rows(server, docs: dict, shards, seconds: float) -> list:
    """The stand-in answers the first row of each of `shards` after `seconds` (the others at once);
    returns the list it fills with (shard, id, time answered)."""
    first: dict[int, str] = {}
    for k, doc_id in docs.values():   # in candidates order
        first.setdefault(k, doc_id)
    first = {k: first[k] for k in shards}
    done = []

    def answer(whole):
        k, doc_id = asked(docs, whole)
        if first.get(k) == doc_id:
            time.sleep(seconds)
        done.append((k, doc_id, time.monotonic()))
        return method_answer(whole)
    server.answer = answer
    return done


def test_no_slot_drains_at_a_shard_boundary(prepared_root, tmp_path, hosted):
    """4 requests in flight, shards of 4 rows, shard 0's first row answered after 1 s: the slots that
    shard 0's other rows free take shard 1's (and 2's) rows at once, long before shard 0's slowest
    answer (one stream per shard sent shard 1's first request only after it); each shard is written
    whole when its own last answer comes, so shards 1 and 2 are written before shard 0."""
    root = copy_root(prepared_root, tmp_path)
    docs = documents(root)
    done = slow_first_rows(hosted, docs, [0], 1.0)
    summary = gen(root, "backtranslate", "gpt-standin", base_url=hosted.url, **HOSTED)
    assert summary["shards_done"] == [0, 1, 2] and summary["sent"] == 12
    slowest = max(t for k, _, t in done if k == 0)
    arrivals = {}
    for r in hosted.requests:
        arrivals.setdefault(asked(docs, chat_text(r["body"]))[0], r["time"])
    assert arrivals[1] < slowest - 0.5 and arrivals[2] < slowest - 0.5
    layout = RunLayout(root)
    written = {k: os.stat(layout.generation_metrics("backtranslate", k, 3)).st_mtime_ns for k in range(3)}
    assert written[1] < written[0] and written[2] < written[0]
    for k in range(3):   # whole, in candidates order, whatever the order of the answers
        out = pd.read_parquet(layout.generation_shard("backtranslate", k, 3))
        assert list(out["id"]) == read_candidates_ids(root, k) and out["finish_reason"].eq("stop").all()


@pytest.mark.parametrize("answers", [3, 5, 8, 10])
def test_a_stream_across_shards_killed_after_n_answers_reruns_to_the_same_bytes(prepared_root, tmp_path, hosted,
                                                                               monkeypatch, answers):
    """The first row of each shard is answered after 0.6 s, the others at once, 4 in flight, a checkpoint
    per answer; the run is killed at the checkpoint of answer `answers` + 1, while two or more shards
    are in flight (3: shards 0 and 1; 8: all three; 10: shard 0 written, 1 and 2 in flight). The rerun
    sends exactly the rows neither checkpointed nor written (no answered row is paid twice), and every
    shard and marker equals an uninterrupted run's, with no checkpoint left."""
    clean = copy_root(prepared_root, tmp_path / "clean")
    docs = documents(clean)
    slow_first_rows(hosted, docs, [0, 1, 2], 0.6)
    kw = dict(base_url=hosted.url, checkpoint_rows=1, **HOSTED)
    gen(clean, "backtranslate", "gpt-standin", **kw)

    root = copy_root(prepared_root, tmp_path / "killed")
    layout = RunLayout(root)
    hosted.requests.clear()
    real = storage.write_parquet
    parts, in_flight = [], []

    def write(table, path, *a, **k):
        if "/_checkpoints/" in path:
            if in_flight or len(parts) == answers:   # a killed process writes nothing more
                if not in_flight:
                    sent = {asked(docs, chat_text(r["body"]))[0] for r in hosted.requests}
                    in_flight.append(sorted(s for s in sent if not os.path.exists(
                        layout.generation_shard("backtranslate", s, 3))))
                raise Killed(path)
            parts.append(path)
        return real(table, path, *a, **k)

    monkeypatch.setattr(storage, "write_parquet", write)
    with pytest.raises(Killed):
        gen(root, "backtranslate", "gpt-standin", **kw)
    monkeypatch.undo()
    assert len(in_flight[0]) >= 2, in_flight
    kept = {r["id"] for p in storage.list_files(os.path.join(root, "generations"))
            if p.endswith(".parquet") for r in storage.read_parquet(p, ["id"]).to_pylist()}
    assert len(kept) == answers                     # every answer before the kill is checkpointed or written

    hosted.requests.clear()
    summary = gen(root, "backtranslate", "gpt-standin", **kw)
    resent = {asked(docs, chat_text(r["body"]))[1] for r in hosted.requests}
    assert summary["sent"] == len(hosted.requests) == 12 - answers and not resent & kept
    for k in range(3):
        a, b = RunLayout(clean), layout
        assert open(a.generation_shard("backtranslate", k, 3), "rb").read() == \
            open(b.generation_shard("backtranslate", k, 3), "rb").read()
        ma = json.loads(storage.read_text(a.generation_metrics("backtranslate", k, 3)))[provenance.KEY]
        mb = json.loads(storage.read_text(b.generation_metrics("backtranslate", k, 3)))[provenance.KEY]
        assert ma["sha256"] == mb["sha256"] and ma["config"] == mb["config"]
    assert storage.list_files(os.path.join(root, "generations", "backtranslate", "_checkpoints")) == []
