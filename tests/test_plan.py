"""bft plan: requests, tokens, pass rates and GPU-hours per stage before any GPU is spent, tonight's
work beside the whole corpus's, and the pilot (`--pilot N`) with its intervals, whose answers the
night reuses."""
from __future__ import annotations

import json
import math
import os
import re

import storage
from tests.conftest import dolma_line, write_dolma_file
import pytest

from tests.helpers.cli import run as bft
from tests.helpers.corpora import ten_documents
from tests.helpers.rebuild import run_file


@pytest.fixture
def corpus(tmp_path, fixture_texts):
    return ten_documents(tmp_path, fixture_texts)


def test_plan_counts_requests_tokens_and_gpu_hours(tmp_path, tiny_models, bpe_tokenizer_path, corpus, capsys):
    root = str(tmp_path / "run")
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], generate__score__tokens_per_s=100.0,
                   generate__backtranslate__tokens_per_s=50.0)
    rc, out, err = bft(capsys, "plan", "--config", cfg, "--format", "json", "--target-examples", "68")
    assert rc == 0, err
    before = json.loads(out)
    assert before["candidates"]["rows"] == 10 and before["candidates"]["source"].startswith("estimated from 10 lines")
    bt, score = before["stages"]["backtranslate"], before["stages"]["score"]
    assert bt["requests"] == 10 and bt["output_tokens"] == 60 and bt["output_tokens_source"].startswith("new-token cap")
    assert score["output_tokens"] == 10  # logprob mode: one token per request
    # issue 37 point 1: no prior for a logprob gate (the paper's 13.6% is of generated scores at 5) nor for
    # a parse rate: unknown, not 13.6% and 100%; the requests past an unknown rate are upper bounds
    assert score["gate_pass_rate"] is None and score["passing_gate"] is None
    assert score["gate_source"] == bt["parse_ok_source"] == "unknown: run --pilot N" and bt["parse_ok_rate"] is None
    assert score["requests"] == 10 and score["requests_upper_bound"] and not bt["requests_upper_bound"]
    assert before["examples_expected"] is None and before["candidates_needed"] is None
    assert bt["gpu_hours"] == round(60 / 50 / 3600, 3)
    # the tiny models' 1024-token context: the score prompt (its rubric alone ~900 tiny-vocabulary tokens)
    # holds few documents whole, and assemble drops the pairs of the cut ones (issue 19 point 10)
    assert score["whole_document_limit"] < bt["whole_document_limit"] and score["documents_cut"] > 0
    assert before["max_tokens_keeping_all_whole"] == score["whole_document_limit"]
    rc, out, _ = bft(capsys, "plan", "--config", cfg, "--target-examples", "68")
    assert rc == 0 and "expected examples: unknown: the score gate's pass rate is unknown: run --pilot N" in out
    assert "candidates needed for 68 examples: unknown (run --pilot N)" in out
    assert f"working length limit: {score['whole_document_limit']:,} document tokens" in out
    # at the paper's one point (generated scores, threshold 5): its figure, an upper bound (parse rates unknown)
    paper = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], generate__score__score_mode="generate",
                     assemble__min_score=5)
    rc, out, err = bft(capsys, "plan", "--config", paper, "--format", "json", "--target-examples", "68")
    assert rc == 0, err
    at_paper = json.loads(out)
    score = at_paper["stages"]["score"]
    assert score["gate_pass_rate"] == 0.136 and "70B forward model, Dolma's head split" in score["gate_source"]
    assert at_paper["examples_expected_upper_bound"] and at_paper["yield_source"].startswith("at most")
    assert at_paper["yield_per_candidate"] == round(0.136 * (1 - score["documents_cut"] / score["requests"]), 5)
    assert {"requests", "prompt_tokens", "output_tokens", "gpu_hours"} <= set(bt)
    assert bt["prompt_tokens"] > before["candidates"]["doc_tokens"]  # the template's tokens are counted too
    # what a row pays and what a prefix cache saves of it (issue 33 point 3): the score rubric comes first
    logprob_score = before["stages"]["score"]
    assert bt["output_tokens_per_row"] == 6.0 and logprob_score["output_tokens_per_row"] == 1.0
    assert 0 < bt["prefix_share"] < logprob_score["prefix_share"] < 1

    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [corpus], generate__score__tokens_per_s=100.0,
                   generate__backtranslate__tokens_per_s=50.0)   # the run file again (the paper's replaced it)
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0, err
    night = [line for line in out.splitlines() if line.startswith("   score: ")][-1]   # the night's summary
    assert "1.0 output tokens per row" in night and "of prompt tokens in the shared prefix" in night
    rc, out, err = bft(capsys, "plan", "--config", cfg, "--format", "json")
    after = json.loads(out)
    assert after["candidates"]["source"] == "candidates" and after["candidates"]["rows"] == 10
    measured = after["stages"]["backtranslate"]
    assert measured["output_tokens_source"] == "measured" and measured["output_tokens"] <= 60
    assert measured["output_tokens_per_row"] == round(measured["output_tokens"] / measured["requests"], 1)
    assert 0 < measured["prefix_share"] < after["stages"]["score"]["prefix_share"] < 1   # from the shards
    assert after["stages"]["score"]["gate_source"] == "measured"
    # after a run the plan says what the next rebuild makes: requests and examples (issue 19 point 12;
    # the gate's share was applied twice: "16 expected" for a release of 38)
    stats = json.load(open(os.path.join(root, "sft", open(os.path.join(root, "sft", "LATEST")).read().strip(),
                                        "stats.json")))
    web = stats["funnel"]["web_examples"]
    assert abs(after["examples_expected"] - web) <= max(1, 0.1 * web), (after["examples_expected"], web)
    assert after["stages"]["score"]["requests"] == stats["stages"]["score"]["sent"]
    rc, out, _ = bft(capsys, "plan", "--config", cfg)
    assert rc == 0 and "backtranslate" in out and "GPU-hours in all" in out
    assert "score: 1.0 output tokens per row; " in out and "of its prompt tokens are the prefix every prompt" in out


def test_plan_shows_tonights_work_beside_the_whole_corpus(nightly, fixture_texts, capsys):
    """`bft plan` showed the whole corpus's cost, not what tonight sends: the input files new since the
    last prepare, their documents, the shards pending, and each stage's requests tonight."""
    root, cfg, _ = nightly
    write_dolma_file(os.path.join(root, "in", "cc_en_head", "b.json.gz"),
                     [dolma_line(f"n{i}", fixture_texts[50 + i][:300]) for i in range(3)])
    rc, out, err = bft(capsys, "plan", "--config", cfg, "--format", "json")
    assert rc == 0, err
    t = json.loads(out)["tonight"]
    assert t["files"] == {"new": 1, "changed": 0, "removed": 0, "unchanged": 1} and t["documents"] == 3
    bt = t["stages"]["backtranslate"]
    assert bt["pending_shards"] == [0, 1, 2] and bt["pending_rows"] == 12 and bt["requests"] == 15
    rc, out, err = bft(capsys, "plan", "--config", cfg)
    assert rc == 0, err
    assert "tonight (since the last prepare): input files 1 new, 0 changed, 0 removed, 1 unchanged; ~3 new" in out
    assert re.search(r"\nbacktranslate\s+3 \(12 rows\)\s+15\s+12\n", out), out


def test_a_pilot_measures_with_intervals_and_the_night_pays_for_none_of_its_rows_again(
        nightly, tmp_path, tiny_models, bpe_tokenizer_path, fixture_texts, chat_server, capsys):
    """`bft plan --pilot 6` sends 6 of the 12 candidates (the smallest sample keys, not a shard's first
    rows) through backtranslate and score as the night would; its answers stay as checkpoints, so the
    night sends each of those requests no second time; the plan's interval holds the release's web
    examples, and it gives the pilot size for +-20% and +-10%."""
    from schemas.keys import sample_key

    root, _, inputs = nightly
    ids = [f"d{i:02d}" for i in range(12)]
    marks = {i: fixture_texts[n][:40] for n, i in enumerate(ids)}
    unparsed, passing = {"d01", "d07"}, {"d00", "d02", "d03", "d05", "d08", "d10"}

    def scripted(body):
        text = body.get("prompt") or "\n".join(m["content"] for m in body["messages"])
        doc = next(i for i in ids if marks[i] in text)
        if "5-point scale" in text:
            return "Brief reasoning.\nScore: " + ("5" if doc in passing else "3")
        return "" if doc in unparsed else f"What does page {doc} explain?"

    def asked(start):
        out = []
        for r in chat_server.requests[start:]:
            text = r["body"].get("prompt") or "\n".join(m["content"] for m in r["body"]["messages"])
            out.append(("score" if "5-point scale" in text else "backtranslate",
                        next(i for i in ids if marks[i] in text)))
        return out

    chat_server.answer = scripted
    served = {"engine": "openai", "model": "tiny-chat", "base_url": chat_server.url, "tokenizer": tiny_models["chat"]}
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, root, [inputs], prepare__max_tokens=1000,
                   prepare__num_shards=3, prepare__reject_shards=1, generate__backtranslate=served,
                   generate__score=served, assemble__min_score=5)
    try:
        start = len(chat_server.requests)
        rc, out, err = bft(capsys, "plan", "--config", cfg, "--pilot", "6", "--format", "json")
        assert rc == 0, err
        plan = json.loads(out)
        pilot_requests = asked(start)
        drawn = set(sorted(ids, key=lambda i: sample_key(i, 0))[:6])
        assert {doc for _, doc in pilot_requests} == drawn
        p = plan["pilot"]
        bt, score = p["stages"]["backtranslate"], p["stages"]["score"]
        assert p["n"] == 6 and bt["sent"] == 6 and bt["parsed"] == 6 - len(drawn & unparsed)
        assert score["sent"] == bt["parsed"] and score["passed"] == len(drawn & passing - unparsed)
        assert p["kept"] == len(drawn & passing - unparsed) and p["yield"] == round(p["kept"] / 6, 5)
        lo, hi = p["yield_ci"]
        assert 0 <= lo < p["kept"] / 6 < hi <= 1
        assert p["examples_expected_ci"] == [int(12 * lo), math.ceil(12 * hi)]
        assert plan["examples_expected"] == int(12 * p["kept"] / 6) and not plan["examples_expected_upper_bound"]
        assert set(p["pilot_size_for"]) == {"0.2", "0.1"} and p["pilot_size_for"]["0.1"] > p["pilot_size_for"]["0.2"]
        assert plan["stages"]["score"]["parse_ok_source"].startswith("measured (pilot of 6)")
        tonight = plan["tonight"]["stages"]                            # what is left for the night: the rest
        assert tonight["backtranslate"]["requests"] == 12 - 6
        assert tonight["score"]["requests"] == plan["stages"]["score"]["requests"] - score["sent"]
        assert not any(f.endswith(".parquet") for f in storage.list_files(os.path.join(root, "generations"))
                       if "_checkpoints" not in f)                     # no shard written: checkpoints only

        start = len(chat_server.requests)
        rc, out, err = bft(capsys, "rebuild", "--config", cfg)
        assert rc == 0 and "published release" in out, err
        night = asked(start)
        assert not set(night) & set(pilot_requests)                   # no pilot row sent again
        assert sorted(night + pilot_requests) == sorted(
            [("backtranslate", i) for i in ids] + [("score", i) for i in ids if i not in unparsed])
        stats = json.loads(storage.read_text(os.path.join(root, "sft", storage.read_text(
            os.path.join(root, "sft", "LATEST")).strip(), "stats.json")))
        web = stats["funnel"]["web_examples"]
        assert web == len(passing - unparsed)
        assert p["examples_expected_ci"][0] <= web <= p["examples_expected_ci"][1], (p, web)
    finally:
        chat_server.answer = None


def test_pilot_statistics():
    """Wilson's interval and the pilot size for a relative precision (issue 37: ~600 pairs for +-20%,
    ~2,400 for +-10% at p = 0.14)."""
    from bft.pilot import pairs_for_precision, wilson

    assert pairs_for_precision(0.14, 0.2) == 590 and pairs_for_precision(0.14, 0.1) == 2360
    assert pairs_for_precision(0.0, 0.2) is None
    lo, hi = wilson(0, 10)
    assert lo == 0 and 0.27 < hi < 0.28            # not empty at k = 0, where the normal interval is
    lo, hi = wilson(14, 100)
    assert abs(lo - 0.0852) < 1e-3 and abs(hi - 0.2215) < 1e-3
    assert wilson(5, 0) == (0.0, 1.0)
