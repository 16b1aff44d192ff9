"""Batch inference: a stage through OpenAI's Batch API (the Files and Batches
endpoints of tests/openai_api_standin.py) and through `vllm run-batch`'s files (played here by the
vLLM stand-in's engine), compared row by row with the online path for the same answers."""
import json
import os
import uuid

import pyarrow.parquet as pq
import pytest

from generation.batch import BatchesPending
from generation.batch_api import split
from tests.helpers.cli import run as bft
from tests.helpers.corpora import ten_documents
from tests.helpers.generation import copy_root, gen, read_stage
from tests.vllm_standin.openai_server import StandinServer

MODEL = "gpt-standin"


@pytest.fixture
def corpus(tmp_path, fixture_texts):
    return ten_documents(tmp_path, fixture_texts)


def kw(server, **more):
    return dict(engine="openai", base_url=server.url, api="chat", max_model_len=8192, max_new_tokens=64, **more)


def rows(root, stage):
    return read_stage(root, stage)[1].sort_values("id").reset_index(drop=True)


def batch_ids(server, batch_id):
    content = server.files[server.batches[batch_id]["input_file_id"]]["content"]
    return sorted(json.loads(line)["custom_id"] for line in content.splitlines())


def test_the_batch_path_writes_the_online_rows_across_two_invocations(prepared_root, tmp_path, hosted):
    online, batched = copy_root(prepared_root, tmp_path / "online"), copy_root(prepared_root, tmp_path / "batch")
    for stage in ("backtranslate", "score"):
        gen(online, stage, MODEL, **kw(hosted))
    hosted.requests.clear()
    for stage in ("backtranslate", "score"):
        hosted.hold = True
        with pytest.raises(BatchesPending, match="wait for their batches") as e:           # 1: submit
            gen(batched, stage, MODEL, **kw(hosted, batch="openai"))
        assert e.value.summary["pending_shards"] == [0, 1, 2] and e.value.exit_status == 75
        submitted = dict(hosted.batches)
        state_dir = os.path.join(batched, "generations", stage, "_batches")
        states = [json.load(open(os.path.join(state_dir, f))) for f in sorted(os.listdir(state_dir))]
        assert [len(s["batches"]) for s in states] == [1, 1, 1]
        with pytest.raises(BatchesPending):                   # while they run, nothing is submitted twice
            gen(batched, stage, MODEL, **kw(hosted, batch="openai"))
        assert hosted.batches.keys() == submitted.keys() and hosted.requests == []
        hosted.hold = False
        hosted.finish()
        summary = gen(batched, stage, MODEL, **kw(hosted, batch="openai"))                  # 2: collect
        assert summary["shards_done"] == [0, 1, 2] and not os.listdir(state_dir)
        assert rows(batched, stage).equals(rows(online, stage)), stage                     # row by row
        body = json.loads(hosted.files[next(iter(submitted.values()))["input_file_id"]]["content"].splitlines()[0])
        assert body["method"] == "POST" and body["url"] == "/v1/chat/completions" and "max_completion_tokens" in body["body"]
    assert hosted.requests == []                                                            # no online request
    assert gen(batched, "score", MODEL, **kw(hosted, batch="openai"))["shards_skipped"] == [0, 1, 2]


def test_ended_batches_resubmit_only_their_missing_and_transient_rows(prepared_root, tmp_path, hosted):
    online, batched = copy_root(prepared_root, tmp_path / "online"), copy_root(prepared_root, tmp_path / "batch")
    gen(online, "backtranslate", MODEL, **kw(hosted))
    hosted.requests.clear()
    hosted.fates += ["expired", "missing", "server_error"]
    with pytest.raises(BatchesPending):
        gen(batched, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    first = sorted(hosted.batches)
    hosted.finish()
    hosted.fates += ["cancelled", "failed", "completed"]
    with pytest.raises(BatchesPending) as e:    # collects what they answered, resubmits the rest only
        gen(batched, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    assert [hosted.batches[b]["status"] for b in first] == ["expired", "completed", "completed"]
    second = sorted(set(hosted.batches) - set(first))
    resent = [batch_ids(hosted, b) for b in second]
    assert [len(r) for r in resent] == [2, 1, 1]                      # the expired half, the missing, the 500
    assert all(set(r) <= set(s) for r, s in zip(resent, [batch_ids(hosted, b) for b in first]))
    assert e.value.summary["pending_shards"] == [0, 1, 2]
    hosted.finish()
    with pytest.raises(BatchesPending) as e:
        gen(batched, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    assert e.value.summary["pending_shards"] == [0, 1]                  # shard 2 is written
    hosted.finish()
    summary = gen(batched, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    assert summary["shards_done"] == [0, 1] and summary["errors"] == 0
    assert rows(batched, "backtranslate").equals(rows(online, "backtranslate"))
    assert hosted.requests == []


def test_batch_files_are_split_to_the_limits_and_wait_polls_the_transitions(prepared_root, tmp_path, hosted,
                                                                            monkeypatch, capsys):
    from generation import batch_api

    assert [len(f) for f in split([b"x" * 10 + b"\n"] * 7, max_requests=3)] == [3, 3, 1]
    assert [len(f) for f in split([b"x" * 10 + b"\n"] * 7, max_bytes=25)] == [2, 2, 2, 1]
    monkeypatch.setattr(batch_api, "MAX_REQUESTS", 3)
    root = copy_root(prepared_root, tmp_path / "batch")
    summary = gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai", wait=True, poll_s=0.01))
    assert summary["shards_done"] == [0, 1, 2] and len(hosted.batches) == 6           # 4 rows a shard: 3 + 1
    assert all(b["history"] == ["validating", "in_progress", "finalizing", "completed"] for b in hosted.batches.values())
    online = copy_root(prepared_root, tmp_path / "online")
    gen(online, "backtranslate", MODEL, **kw(hosted))
    assert rows(root, "backtranslate").equals(rows(online, "backtranslate"))
    # the command line: exit 75 while the batches run, one line saying so
    hosted.hold = True
    other = copy_root(prepared_root, tmp_path / "cli")
    rc, out, err = bft(capsys, "generate", "backtranslate", "--root", other, "--engine", "openai", "--model", MODEL,
                       "--base-url", hosted.url, "--api", "chat", "--max-model-len", "8192", "--batch", "openai")
    assert rc == 75 and "wait for their batches" in err and "run this again later (or with --wait)" in err


def run_batch(server: StandinServer, inp: str, out: str) -> None:
    """`vllm run-batch -i INP -o OUT`, played by the vLLM server stand-in's engine: each line's body
    answered by its endpoint's code, written as vLLM's BatchRequestOutput lines."""
    lines = []
    for raw in open(inp):
        line = json.loads(raw)
        body = (server.chat if line["url"] == "/v1/chat/completions" else server.completions)(line["body"], {})
        lines.append({"id": f"vllm-{uuid.uuid4().hex}", "custom_id": line["custom_id"],
                      "response": {"status_code": 200, "request_id": f"vllm-batch-{uuid.uuid4().hex}", "body": body},
                      "error": None})
    with open(out, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_vllm_run_batch_files_give_the_served_rows(prepared_root, tmp_path, tiny_models, api):
    server = StandinServer(tiny_models["chat"], served_name="tiny-chat")
    try:
        online, batched = copy_root(prepared_root, tmp_path / "online"), copy_root(prepared_root, tmp_path / "rb")
        opts = dict(engine="openai", api=api, tokenizer=tiny_models["chat"], max_new_tokens=8)
        gen(online, "backtranslate", "tiny-chat", base_url=server.url, **opts)
        with pytest.raises(BatchesPending, match="vllm run-batch -i ") as e:
            gen(batched, "backtranslate", "tiny-chat", batch="vllm", **opts)
        commands = [line.strip() for line in str(e.value).splitlines() if line.strip().startswith("vllm run-batch")]
        assert len(commands) == 3
        for command in commands:
            args = command.split()
            assert args[-2:] == ["--model", "tiny-chat"]
            first = json.loads(open(args[3]).readline())
            assert first["method"] == "POST" and first["url"] == f"/v1/{'chat/' if api == 'chat' else ''}completions"
            if api == "completions":
                assert first["body"]["add_special_tokens"] is False       # vLLM's own fields: it is vLLM
            run_batch(server, args[3], args[5])
        summary = gen(batched, "backtranslate", "tiny-chat", batch="vllm", **opts)
        assert summary["shards_done"] == [0, 1, 2]
        assert rows(batched, "backtranslate").equals(rows(online, "backtranslate"))
        assert not os.listdir(os.path.join(batched, "generations", "backtranslate", "_batches"))
    finally:
        server.stop()


def test_bft_rebuild_exits_75_while_a_stages_batches_run(tmp_path, tiny_models, bpe_tokenizer_path, corpus, hosted,
                                                         capsys):
    """bft rebuild runs a batch stage as bft generate does: exit 75 with the batches submitted, then a
    later invocation collects them and goes on to the next stage. The night records a wait, not a
    failure."""
    from tests.helpers.rebuild import run_file

    stage = {"engine": "openai", "model": MODEL, "base_url": hosted.url, "api": "chat", "max_model_len": 8192,
             "max_new_tokens": 64, "batch": "openai"}
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus],
                   generate={"backtranslate": stage, "score": stage})
    hosted.hold = True
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 75 and "wait for their batches" in out and len(hosted.batches) == 2
    night = json.load(open(tmp_path / "run" / "_night.json"))
    assert night["invocations"][-1]["status"] == "waiting for backtranslate's batches", night["invocations"][-1]
    hosted.hold = False
    hosted.finish()
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)                  # collects, submits score's
    assert rc == 75 and "score: shards [0, 1] wait for their batches" in out and len(hosted.batches) == 4
    hosted.finish()
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)                  # collects, assembles, publishes
    assert rc == 0 and "published release" in out, err
    assert hosted.requests == []
    # the same night online, in another root: the same release data, row by row (the versions differ:
    # the release's lineage hashes the generation shards' bytes, which are not the same files)
    (tmp_path / "online").mkdir()
    online = {k: v for k, v in stage.items() if k != "batch"}
    cfg = run_file(tmp_path / "online", tiny_models, bpe_tokenizer_path, str(tmp_path / "run-online"), [corpus],
                   generate={"backtranslate": online, "score": online})
    rc, out, err = bft(capsys, "rebuild", "--config", cfg)
    assert rc == 0 and hosted.requests, err
    data = [tmp_path / r / "sft" / open(tmp_path / r / "sft" / "LATEST").read().strip() / "data"
            for r in ("run", "run-online")]
    assert sorted(os.listdir(data[0])) == sorted(os.listdir(data[1]))
    for name in os.listdir(data[0]):
        assert pq.read_table(data[0] / name).equals(pq.read_table(data[1] / name)), name


@pytest.mark.parametrize("killed", ["before_create", "before_saving_the_id"])
def test_a_run_killed_while_submitting_never_submits_the_rows_twice(prepared_root, tmp_path, hosted, monkeypatch,
                                                                   killed):
    """The shard's state records the uploaded input file before the batch is created: a run killed
    before the create makes it from that file on the next run; one killed after the create (before
    saving the batch's id) finds the batch by its input file in the listing: one batch per shard either
    way, and the rows answered as online."""
    from generation.batch_api import BatchAPI

    online, batched = copy_root(prepared_root, tmp_path / "online"), copy_root(prepared_root, tmp_path / "batch")
    gen(online, "backtranslate", MODEL, **kw(hosted))
    real_create = BatchAPI.create

    def create_then_die(self, *a, **k):
        if killed == "before_saving_the_id":
            real_create(self, *a, **k)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(BatchAPI, "create", create_then_die)
    with pytest.raises(KeyboardInterrupt):
        gen(batched, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    monkeypatch.setattr(BatchAPI, "create", real_create)
    uploads = len(hosted.files)
    hosted.hold = True
    with pytest.raises(BatchesPending):
        gen(batched, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    first_shard = [b for b in hosted.batches.values() if b["metadata"]["bft_shard"] == "0-of-3"]
    assert len(first_shard) == 1                      # the killed shard's batch: made once
    assert len(hosted.files) == uploads + 2           # its file was not uploaded again (shards 1 and 2 were)
    hosted.hold = False
    hosted.finish()
    summary = gen(batched, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    assert summary["shards_done"] == [0, 1, 2] and len(hosted.batches) == 3
    assert rows(batched, "backtranslate").equals(rows(online, "backtranslate"))


def submitted_ids(server) -> list[str]:
    """Every row id in every batch the server made (a row twice: a request paid twice)."""
    return sorted(i for b in server.batches for i in batch_ids(server, b))


def test_a_batch_create_that_times_out_is_adopted_never_made_twice(prepared_root, tmp_path, hosted):
    """POST /batches slower than --request-timeout: the batch is made anyway; the run finds it in the
    listing instead of creating another from the same input file."""
    root = copy_root(prepared_root, tmp_path / "batch")
    hosted.hold = True
    hosted.creates.append({"delay": 0.6})              # shard 0's create: answered after the client gave up
    with pytest.raises(BatchesPending):
        gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai", request_timeout=0.3))
    assert len(hosted.batches) == 3 and len({b["input_file_id"] for b in hosted.batches.values()}) == 3
    ids = submitted_ids(hosted)
    assert len(ids) == len(set(ids)) == 12                                    # no row in two batches
    hosted.hold = False
    hosted.finish()
    assert gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai"))["shards_done"] == [0, 1, 2]
    assert len(hosted.batches) == 3 and hosted.requests == []


def test_a_create_whose_fate_stays_unknown_is_looked_for_not_retried(prepared_root, tmp_path, hosted, monkeypatch):
    """A 5xx on POST /batches (made or not: the client cannot tell): no second create in that run;
    later invocations look for it in the listing, and create it only CREATE_SETTLE_S after the try."""
    from generation import batch as batch_mod, batch_api

    monkeypatch.setattr(batch_api, "TRIES", 1)          # one look after the failed try, not five
    root = copy_root(prepared_root, tmp_path / "batch")
    hosted.hold = True
    hosted.creates.append({"status": 500})             # this one made nothing
    with pytest.raises(BatchesPending) as e:
        gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    assert e.value.summary["pending_shards"] == [0, 1, 2] and len(hosted.batches) == 2
    state = json.load(open(os.path.join(root, "generations", "backtranslate", "_batches",
                                        "backtranslate-00000-of-00003.json")))
    assert state["batches"][0]["id"] is None and state["batches"][0]["create_tried"] > 0
    with pytest.raises(BatchesPending):                 # soon after: still only looked for
        gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    assert len(hosted.batches) == 2 and len(hosted.files) == 3
    monkeypatch.setattr(batch_mod, "CREATE_SETTLE_S", 0.0)
    with pytest.raises(BatchesPending):                 # settled and not listed: made now, from the same file
        gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    assert len(hosted.batches) == 3 and len(hosted.files) == 3
    hosted.hold = False
    hosted.finish()
    assert gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai"))["shards_done"] == [0, 1, 2]
    ids = submitted_ids(hosted)
    assert len(ids) == len(set(ids)) == 12


def test_online_generation_refuses_a_stage_whose_batches_run(prepared_root, tmp_path, hosted, capsys):
    """`bft generate STAGE` without --batch while the stage's batches run would pay for their rows
    twice: it refuses in one line naming the batches and the command that collects them;
    collected, the stage needs nothing online."""
    root = copy_root(prepared_root, tmp_path / "batch")
    hosted.hold = True
    with pytest.raises(BatchesPending):
        gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    rc, out, err = bft(capsys, "generate", "backtranslate", "--root", root, "--engine", "openai", "--model", MODEL,
                       "--base-url", hosted.url, "--api", "chat", "--max-model-len", "8192", "--max-new-tokens", "64",
                       "--seed", "7")                                  # the options gen() gives
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    for part in ("shards [0, 1, 2] have batches submitted", "batch_000000", "pay for them twice",
                 "bft generate backtranslate --batch openai"):
        assert part in err, (part, err)
    assert hosted.requests == []                                               # nothing sent online
    hosted.hold = False
    hosted.finish()
    assert gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai"))["shards_done"] == [0, 1, 2]
    assert gen(root, "backtranslate", MODEL, **kw(hosted))["shards_skipped"] == [0, 1, 2]
    assert hosted.requests == []


def test_a_batch_whose_output_file_is_gone_resubmits_its_rows_and_the_other_shards_proceed(prepared_root, tmp_path,
                                                                                          hosted, caplog):
    """An output file deleted (by hand, or past its retention) made every rerun exit 1,
    also for the healthy shards."""
    root = copy_root(prepared_root, tmp_path / "batch")
    hosted.hold = True
    with pytest.raises(BatchesPending):
        gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    hosted.hold = False
    hosted.finish()
    first = sorted(hosted.batches)
    gone = hosted.batches[first[1]]["output_file_id"]
    del hosted.files[gone]
    with pytest.raises(BatchesPending) as e:
        gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai"))
    assert e.value.summary["shards_done"] == [0, 2] and e.value.summary["pending_shards"] == [1]
    [again] = sorted(set(hosted.batches) - set(first))
    assert batch_ids(hosted, again) == batch_ids(hosted, first[1])       # that batch's rows, submitted again
    assert any(f"file {gone} of batch {first[1]} is gone" in r.getMessage() for r in caplog.records)
    hosted.finish()
    assert gen(root, "backtranslate", MODEL, **kw(hosted, batch="openai"))["shards_done"] == [1]
