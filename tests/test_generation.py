"""The generation stages end to end on tiny models: hf engine, openai engine against a real
`transformers serve`, the vLLM adapter against a stand-in; resume, worker split, GCS."""
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

import schemas
import storage
from generation.prompting import fit_prompt, n_tokens, render
from generation.runner import GenerateConfig, GenerationError, StageRunner
from schemas.keys import row_seed
from schemas.layout import RunLayout
from generation.templates import DEFAULTS
from tests.conftest import _free_port

STAGES = ["backtranslate", "score", "rewrite", "distill", "rate"]


def copy_root(src, dst):
    import shutil

    shutil.copytree(os.path.join(src, "candidates"), os.path.join(dst, "candidates"))
    return str(dst)


def gen(root, stage, model, engine="hf", **kw):
    cfg = GenerateConfig(stage=stage, root=root, engine=engine, model=model, max_new_tokens=kw.pop("max_new_tokens", 12),
                         batch_size=4, seed=7, **kw)
    with StageRunner(cfg) as runner:
        return runner.run()


def give_instructions(root):
    """Random tiny models seldom end an output, so backtranslation rows are mostly `truncated`; to
    drive the downstream stages, the backtranslate shards get a valid instruction per row (the
    files are rewritten through the schema, as the runner writes them)."""
    folder = os.path.join(root, "generations", "backtranslate")
    for name in os.listdir(folder):
        if name.endswith(".parquet"):
            path = os.path.join(folder, name)
            rows = schemas.validate(storage.read_parquet(path), schemas.GENERATION, path).to_pylist()
            for r in rows:
                r.update(instruction=f"Explain the text of {r['id']}.", parse_error=None)
            rows[0].update(instruction=None, parse_error="echo")  # one upstream failure per shard
            storage.write_parquet(schemas.to_table(rows, schemas.GENERATION, path), path)


def read_stage(root, stage):
    folder = os.path.join(root, "generations", stage)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
    return files, pd.concat([pd.read_parquet(os.path.join(folder, f)) for f in files], ignore_index=True)


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


def test_all_five_stages_on_the_hf_engine(prepared_root, tmp_path, tiny_models):
    root = copy_root(prepared_root, tmp_path)
    for stage in STAGES:
        summary = gen(root, stage, tiny_models["chat"] if stage != "backtranslate" else tiny_models["plain"])
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


def test_engine_errors_fail_the_shard_past_the_error_rate(prepared_root, tmp_path, tiny_models):
    from generation.engines import Completion, EngineConfig
    from generation.engines.hf import HFEngine

    class Failing(HFEngine):
        def generate(self, requests):
            return [Completion("", None, None, "error", error="boom") for _ in requests]

    root = copy_root(prepared_root, tmp_path)
    cfg = GenerateConfig(stage="backtranslate", root=root, engine="hf", model=tiny_models["plain"], max_new_tokens=4)
    with pytest.raises(GenerationError, match="requests failed, over --max-error-rate 0.02; not written. First: engine_error: boom"):
        StageRunner(cfg, engine=Failing(EngineConfig("hf", tiny_models["plain"]))).run()
    assert not os.path.exists(RunLayout(root).generation_shard("backtranslate", 0, 3))
    cfg.max_error_rate = 1.0
    StageRunner(cfg, engine=Failing(EngineConfig("hf", tiny_models["plain"]))).run()
    rows = read_stage(root, "backtranslate")[1]
    assert rows["parse_error"].eq("engine_error: boom").all()


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
            max_new_tokens=8)
        if stage == "backtranslate":
            give_instructions(root)
        rows = read_stage(root, stage)[1]
        sent = rows[rows["finish_reason"].notna()]
        assert len(sent) and not sent["parse_error"].fillna("").str.startswith("engine_error").any()
        assert (sent["output_tokens"] <= 8).all() and (sent["prompt_tokens"] > 0).all()


def test_openai_engine_retries_then_reports_errors(prepared_root, tmp_path, tiny_models):
    root = copy_root(prepared_root, tmp_path)
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    cfg = GenerateConfig(stage="backtranslate", root=root, engine="openai", model=tiny_models["chat"], base_url=url,
                         max_new_tokens=4, max_error_rate=1.0, max_retries=1)
    with StageRunner(cfg) as runner:
        runner.run()
    rows = read_stage(root, "backtranslate")[1]
    assert rows["parse_error"].str.startswith("engine_error: gave up after 1 retries").all()


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
