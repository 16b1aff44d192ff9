"""training/: seed selection on the fixture, the loss mask token by token, a few real training steps
on a tiny model, the saved folder in the hf engine, SFT on a release, and the evaluation verbs."""
import gzip
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch

import schemas
from bft import cli
from schemas.errors import UserError
from generation.engines import EngineConfig
from generation.engines.hf import HFEngine
from generation.prompting import render
from generation.templates import DEFAULTS, EVAL_TAG, JUDGE_SYSTEM, llama2_format
from generation import evaluate
from training import data, seed, train

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "samples", "oasst", "oasst1-sample.jsonl")
PAIRS = ["t01", "t02", "t07", "t09", "t11", "t12", "t13", "t14"]


# ---- bft seed ---------------------------------------------------------------------------------------

def test_seed_selects_first_turn_english_rank0_reviewed_pairs():
    pairs, counts = seed.select_pairs(seed.read_messages(FIXTURE))
    assert pairs["tree"].to_pylist() == PAIRS
    # rank 0 even where rank 1/2 come first in the file; the root's first reply only, not deeper turns
    assert pairs["reply_id"].to_pylist() == [f"{t}-a0" for t in PAIRS]
    assert counts == {"trees": 14, "root_not_english_deleted_or_unreviewed": 4, "no_usable_rank0_reply": 2,
                      "pairs": 8}


def test_seed_sample_is_deterministic_and_complete_when_small(tmp_path):
    out = str(tmp_path / "seed.parquet")
    assert seed.run(seed.SeedConfig(oasst=FIXTURE, output=out, n=5, seed=3))["selected"] == 5
    first = pq.read_table(out)
    assert seed.run(seed.SeedConfig(oasst=FIXTURE, output=out, n=5, seed=3))["selected"] == 5
    assert pq.read_table(out).equals(first)
    assert first.schema.metadata[b"bft.kind"] == b"sft"
    assert set(first["id"].to_pylist()) < {f"oasst1/{t}" for t in PAIRS}
    seed.run(seed.SeedConfig(oasst=FIXTURE, output=out, n=3200))
    table = schemas.validate(pq.read_table(out), schemas.SFT, out)
    assert table["id"].to_pylist() == [f"oasst1/{t}" for t in PAIRS]
    row = table.to_pylist()[6]
    assert row["instruction"] == "What does HTTP stand for?" and row["response"].startswith("HTTP stands for")
    assert row["messages"] == [{"role": "user", "content": row["instruction"]},
                               {"role": "assistant", "content": row["response"]}]


def test_seed_reads_gzip_and_parquet_and_names_a_bad_file(tmp_path):
    gz = tmp_path / "m.jsonl.gz"
    gz.write_bytes(gzip.compress(open(FIXTURE, "rb").read()))
    pq.write_table(seed.read_messages(FIXTURE), str(tmp_path / "m.parquet"))
    for path in (str(gz), str(tmp_path / "m.parquet")):
        assert seed.select_pairs(seed.read_messages(path))[0]["tree"].to_pylist() == PAIRS
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"message_id": "x", "text": "hi"}\n')
    with pytest.raises(seed.SeedError, match=r"bad\.jsonl: not an oasst1 messages export"):
        seed.read_messages(str(bad))


# ---- the loss mask --------------------------------------------------------------------------------

def test_mask_covers_exactly_the_generation_prompt(tiny_models):
    tok = train.load_tokenizer(tiny_models["chat"])
    row = {"instruction": "Why is the sky blue?", "response": "Rayleigh scattering of sunlight."}
    ex = data.encode(tok, data.conversation("forward", row))
    prompt_ids = tok(render(tok, None, row["instruction"]), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids                          # what the engine sends, token for token
    assert ex["labels"][:n] == [data.IGNORE] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]                      # every target token is trained
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][n:], skip_special_tokens=False).strip() == "Rayleigh scattering of sunlight. </s>"

    back = data.encode(tok, data.conversation("backward", row))
    system, user = DEFAULTS["backtranslate"].fill(response=row["response"])
    bt_prompt = tok(render(tok, system, user), add_special_tokens=False)["input_ids"]
    assert back["input_ids"][:len(bt_prompt)] == bt_prompt and back["labels"][:len(bt_prompt)] == [data.IGNORE] * len(bt_prompt)
    assert tok.decode([t for t in back["labels"] if t != data.IGNORE]).strip() == "Why is the sky blue? </s>"


def test_mask_on_a_tagged_multi_turn_conversation(tiny_models):
    tok = train.load_tokenizer(tiny_models["chat"])
    msgs = [{"role": "system", "content": "Answer with knowledge from web search."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    ex = data.encode(tok, msgs)
    trained = [t if lab != data.IGNORE else None for t, lab in zip(ex["input_ids"], ex["labels"])]
    spans, cur = [], []
    for t in trained + [None]:
        if t is None and cur:
            spans.append(tok.decode(cur).strip())
            cur = []
        elif t is not None:
            cur.append(t)
    assert spans == ["Hello there. </s>", "Goodbye. </s>"]
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert tok.decode(ex["input_ids"]) == tok.decode(full)


def test_plain_llama2_format_without_a_template(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["plain"])
    assert not tok.chat_template
    pieces = data.segments(tok, data.conversation("forward", {"instruction": "Q?", "response": "A."}))
    assert pieces == [(llama2_format(None, "Q?"), False), (" A.", True)]
    assert pieces[0][0] == render(tok, None, "Q?")


# ---- training -----------------------------------------------------------------------------------------

def _fixed_batch_loss(model_dir, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("seed") / "seed.parquet")
    seed.run(seed.SeedConfig(oasst=FIXTURE, output=out))
    return out


@pytest.fixture(scope="module")
def forward_model(tmp_path_factory, tiny_models, seed_file):
    out = str(tmp_path_factory.mktemp("trained") / "forward")
    summary = train.run(train.TrainConfig(role="forward", base_model=tiny_models["chat"], data=seed_file, output=out,
                                          max_steps=12, lr=3e-3, batch_size=8, per_device_batch_size=4,
                                          warmup_ratio=0.0, logging_steps=1))
    return out, summary


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(forward_model, tiny_models, seed_file):
    out, summary = forward_model
    tok = train.load_tokenizer(tiny_models["chat"])
    ds, _ = data.build_dataset(tok, "forward", pq.read_table(seed_file).to_pylist(), 1024)
    batch = data.PadCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    before, after = _fixed_batch_loss(tiny_models["chat"], batch), _fixed_batch_loss(out, batch)
    assert after < before - 0.5, (before, after)
    assert summary["examples"] == 8 and summary["batch"] == {"per_device": 4, "grad_accum": 2, "processes": 1,
                                                             "effective": 8}
    assert summary["metrics"]["steps"] == 12 and summary["metrics"]["tokens"] > 0


def test_the_trained_folder_loads_in_the_hf_engine_and_reruns_are_no_ops(forward_model):
    out, summary = forward_model
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "bft_train.json"} <= files
    assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".checkpoints")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["attention_dropout"] == 0.0                           # dropout is for training only
    engine = HFEngine(EngineConfig("hf", out, batch_size=2))
    assert engine.tokenizer.chat_template
    answers = evaluate.generate(engine, [{"instruction": "Why is the sky blue?"}], "fwd", max_new_tokens=8)
    assert answers[0]["generator"] == "fwd" and answers[0]["finish_reason"] in ("stop", "length")
    again = train.run(train.TrainConfig(role="forward", base_model="unused", data="unused", output=out))
    assert again["skipped"] and again["metrics"] == json.loads(json.dumps(summary["metrics"]))


def test_sft_trains_on_a_published_release(tmp_path, tiny_models, bpe_tokenizer_path, seed_file):
    from tests.helpers.assemble import run as assemble, write_root

    root = write_root(str(tmp_path / "run"), bpe_tokenizer_path, stages=("backtranslate", "score", "rewrite"))
    assemble(root, seed_data=seed_file, version="r1")
    out = str(tmp_path / "sft")
    rc = cli.main(["train", "--role", "sft", "--base-model", tiny_models["plain"], "--data", root, "--output", out,
                   "--select-steps", "1,2,3", "--lr", "0.05", "--batch-size", "4", "--per-device-batch-size", "2"])
    assert rc == 0
    summary = json.load(open(os.path.join(out, "bft_train.json")))
    assert summary["data"].startswith("release r1") and summary["examples"] + summary["validation_examples"] == 4 + 8
    # the paper's way: train to the largest step, keep the one with the lowest validation loss
    selection = summary["metrics"]["selection"]
    losses = {int(k): v for k, v in selection["eval_loss_at_step"].items()}
    assert sorted(losses) == [1, 2, 3] and selection["kept_step"] == min(losses, key=losses.get)
    assert summary["metrics"]["steps"] == 3 and not os.path.exists(out + ".partial")
    tok = train.load_tokenizer(out)
    val = data.load_rows(root)[1]
    ds, _ = data.build_dataset(tok, "sft", val, 1024)
    kept = _fixed_batch_loss(out, data.PadCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))]))
    assert abs(kept - losses[selection["kept_step"]]) < 1e-3, (kept, losses)
    # a base model without a chat template gets Llama-2's, the one its training prompts were rendered with
    assert "[INST]" in open(os.path.join(out, "chat_template.jinja")).read()


def test_sft_defaults_to_the_papers_steps_chosen_by_validation_loss():
    cfg = dict(base_model="b", data="d", output="o")
    assert train.TrainConfig(role="sft", **cfg).selected_steps() == (600, 900, 1200)
    assert train.TrainConfig(role="sft", max_steps=50, **cfg).selected_steps() == ()
    assert train.TrainConfig(role="sft", select_steps="none", **cfg).selected_steps() == ()
    # a seed model: the end of each of epochs 1-5, on pairs held out by id (below)
    assert train.TrainConfig(role="backward", **cfg).selected_steps(7) == (7, 14, 21, 28, 35)
    assert train.TrainConfig(role="backward", max_steps=9, **cfg).selected_steps(7) == ()
    assert not train.TrainConfig(role="forward", seed_validation_fraction=0, **cfg).holds_out_seed()
    assert train.TrainConfig(role="forward", select_steps="300, 100", **cfg).selected_steps() == (100, 300)
    for bad in ("0,5", "x", ""):
        with pytest.raises(UserError, match="--select-steps"):
            train.TrainConfig(role="sft", select_steps=bad, **cfg).selected_steps()
    with pytest.raises(UserError, match="not both"):
        train.TrainConfig(role="sft", select_steps="5", max_steps=5, **cfg).selected_steps()


def test_a_seed_model_keeps_the_epoch_of_lowest_loss_on_held_out_pairs(tmp_path, tiny_models, seed_file):
    rows = pq.read_table(seed_file).to_pylist()
    train_rows, held = data.hold_out(rows, 0.05, 0)
    assert len(held) == 1 and len(train_rows) + len(held) == len(rows)        # a small seed still holds one out
    assert data.hold_out(rows, 0.05, 0) == (train_rows, held)                  # by key: the same pairs each time
    out = str(tmp_path / "backward")
    summary = train.run(train.TrainConfig(role="backward", base_model=tiny_models["chat"], data=seed_file, output=out,
                                          lr=3e-3, batch_size=4, per_device_batch_size=4, warmup_ratio=0.0))
    losses = summary["metrics"]["selection"]["eval_loss_at_step"]
    assert sorted(losses) == [2, 4, 6, 8, 10] and summary["validation_examples"] == 1   # 7 pairs: 2 steps an epoch
    assert summary["metrics"]["selection"]["kept_step"] == min(losses, key=losses.get)


def test_a_bad_batch_split_and_bad_data_are_named(tmp_path, tiny_models):
    with pytest.raises(UserError, match="not a multiple"):
        train.TrainConfig(role="sft", base_model="", data="", output="", batch_size=32, per_device_batch_size=5).accumulation(1)
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"instruction": "only a question"}\n')
    assert cli.main(["train", "--role", "forward", "--base-model", tiny_models["chat"], "--data", str(bad),
                     "--output", str(tmp_path / "m")]) == 1


# ---- bft eval --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first,second,verdict", [
    # first: a shown as assistant A; second: a shown as assistant B (MT-Bench show_result.py's rule)
    ("A", "B", "win"), ("B", "A", "loss"), ("C", "C", "tie"),
    ("A", "C", "tie"), ("C", "B", "tie"), ("B", "C", "tie"), ("C", "A", "tie"),   # a win/loss and a tie: a tie
    ("A", "A", "tie"), ("B", "B", "tie"),                                       # inconsistent: a tie
    ("A", None, "no_verdict"), (None, "B", "no_verdict"), (None, None, "no_verdict"),
])
def test_verdicts_in_both_orders_as_mt_bench(first, second, verdict):
    assert evaluate.outcome(first, second) == verdict


def test_verdict_parsing_and_win_rate_without_unjudged_items():
    assert evaluate.parse_verdict("A is more helpful. [[A]]") == "A"
    assert evaluate.parse_verdict("Not [[A]] but finally [[C]]") == "C"
    assert evaluate.parse_verdict("[A] is better") is None
    s = evaluate.summarize(["win", "win", "tie", "loss", "no_verdict", "no_verdict"])
    assert (s["items"], s["judged"], s["no_verdict"]) == (6, 4, 2)
    assert (s["win"], s["tie"], s["loss"]) == (2, 1, 1) and s["win_rate"] == pytest.approx(0.625)
    assert s["standard_error"] == pytest.approx((sum((x - 0.625) ** 2 for x in (1, 1, .5, 0)) / 3 / 4) ** 0.5)


class ScriptedEngine:
    """A stand-in engine (generation.engines.base.Engine's interface) that answers request i with the
    i-th scripted (text, finish_reason), and keeps the requests it got."""

    tokenizer = None

    def __init__(self, outputs):
        self.outputs = outputs
        self.requests = []

    def generate(self, requests):
        from generation.engines import Completion

        self.requests += requests
        return [Completion(text=t, finish_reason=r, prompt_tokens=1, output_tokens=1)
                for t, r in self.outputs[:len(requests)]]


def test_judge_counts_cut_judgments_apart_and_writes_alpaca_eval_annotations():
    pairs = [({"instruction": f"q{i}", "output": f"a{i}", "generator": "ours"},
              {"instruction": f"q{i}", "output": f"b{i}", "generator": "base"}) for i in range(4)]
    judge = ScriptedEngine([("[[A]]", "stop"), ("[[B]]", "stop"),          # a wins in both orders
                           ("[[A]]", "stop"), ("[[C]]", "stop"),          # win + tie: a tie
                           ("Assistant A is", "length"), ("[[B]]", "stop"),  # cut off: no verdict
                           ("[[B]]", "stop"), ("[[A]]", "stop")])         # b wins
    summary, items = evaluate.judge(judge, pairs)
    assert [it["verdict"] for it in items] == ["win", "tie", "no_verdict", "loss"]
    assert judge.requests[0].max_new_tokens == evaluate.JUDGE_MAX_NEW_TOKENS == 2048
    assert (summary["judged"], summary["no_verdict"], summary["judgments_cut_off"]) == (3, 1, 1)
    assert summary["win_rate"] == pytest.approx(0.5)
    notes = evaluate.alpaca_eval_annotations(pairs, items, "judge-m")
    assert [n["preference"] for n in notes] == [2.0, 1.5, None, 1.0]
    assert notes[0] | {"raw_completion": None} == {
        "instruction": "q0", "output_1": "b0", "generator_1": "base", "output_2": "a0", "generator_2": "ours",
        "annotator": "judge-m", "preference": 2.0, "raw_completion": None}


def test_eval_generate_and_judge_end_to_end(tmp_path, tiny_models, capsys):
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"instruction": "Name a colour.", "dataset": "mini"},
                                     {"instruction": "Say hello."}]))
    a, b, verdicts = str(tmp_path / "a.json"), str(tmp_path / "b.json"), str(tmp_path / "v.json")
    for model, out in ((tiny_models["chat"], a), (tiny_models["plain"], b)):
        assert cli.main(["eval", "generate", "--model", model, "--questions", str(questions), "--output", out,
                         "--engine", "hf", "--max-new-tokens", "6"]) == 0
    answers = json.load(open(a))
    assert [set(x) >= {"instruction", "output", "generator", "dataset"} for x in answers] == [True, True]
    assert answers[0]["dataset"] == "mini" and answers[1]["dataset"] == "bft" and answers[0]["generator"] == "chat"
    assert cli.main(["eval", "judge", "--a", a, "--b", b, "--judge-model", tiny_models["chat"], "--engine", "hf",
                     "--max-new-tokens", "6", "--output", verdicts]) == 0
    result = json.load(open(verdicts))
    s = result["summary"]
    assert s["items"] == 2 == s["win"] + s["tie"] + s["loss"] + s["no_verdict"] and len(result["items"]) == 2
    assert len(result["items"][0]["judge_outputs"]) == 2 and "without a verdict" in capsys.readouterr().out
    notes = json.load(open(evaluate.annotations_path(verdicts)))
    assert [n["instruction"] for n in notes] == ["Name a colour.", "Say hello."]
    assert {n["generator_1"] for n in notes} == {"plain"} and {n["generator_2"] for n in notes} == {"chat"}
    shutil.copy(a, b)
    json.dump(json.load(open(a))[:1], open(b, "w"))
    assert cli.main(["eval", "judge", "--a", a, "--b", b, "--judge-model", tiny_models["chat"]]) == 1
    assert "answer different questions" in capsys.readouterr().err


def test_eval_prompt_puts_the_tag_where_training_does_and_the_judge_prompt_is_mt_bench(tiny_models):
    tok = train.load_tokenizer(tiny_models["chat"])
    engine = ScriptedEngine([("An answer.", "stop")])
    engine.tokenizer = tok
    evaluate.generate(engine, [{"instruction": "Why?"}], "m", evaluate.TAGS["assistant"])
    sent = engine.requests[0]
    assert sent.messages == [{"role": "system", "content": EVAL_TAG}, {"role": "user", "content": "Why?"}]
    # the prompt is token for token the prompt part of an SFT example tagged the same way
    trained = data.encode(tok, [{"role": "system", "content": EVAL_TAG}, {"role": "user", "content": "Why?"},
                                {"role": "assistant", "content": "An answer."}])
    n = trained["labels"].index(next(x for x in trained["labels"] if x != data.IGNORE))
    assert tok(sent.prompt, add_special_tokens=False)["input_ids"] == trained["input_ids"][:n]
    evaluate.generate(engine, [{"instruction": "Why?"}], "m", evaluate.TAGS["none"])
    assert engine.requests[-1].messages == [{"role": "user", "content": "Why?"}]
    system, user = DEFAULTS["judge"].fill(instruction="Q", answer_a="X", answer_b="Y")
    assert system == JUDGE_SYSTEM and "[The Start of Assistant A's Answer]\nX\n" in user and user.endswith("Answer]")


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }} {% endif %}{% endfor %}",
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{{ m['content'] }} {% endfor %}"])
def test_a_template_that_drops_the_system_turn_is_refused(tiny_models, template):
    """The tags are system prompts; a base whose chat template drops (or refuses)
    the system turn would train without them, silently: refused, naming the fix."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["chat"])
    tok.chat_template = template
    rows = [{"messages": [{"role": "system", "content": "Answer with knowledge from web search."},
                          {"role": "user", "content": "What is rain?"}, {"role": "assistant", "content": "Water."}]}]
    with pytest.raises(data.DataError, match="chat template (drops|refuses) it.*--no-tags"):
        data.build_dataset(tok, "sft", rows, 512)
    untagged = [{"instruction": "What is rain?", "response": "Water."}]   # no system turn: nothing to lose
    assert len(data.build_dataset(tok, "sft", untagged, 512)[0]) == 1


def test_the_judge_prompt_is_fitted_and_failures_are_counted_apart(tiny_models):
    """Two answers of up to 1024 tokens plus 2048 new tokens did not fit a 4096 judge:
    engine errors, counted as `no_verdict`, and long-answer items left the win rate. Now the answers are
    cut to fit (the longer first), engine errors are counted apart, and the win rate is given over the
    judged items and over all items."""
    from generation.engines import Completion

    tok = train.load_tokenizer(tiny_models["chat"])
    long_a = " ".join(f"alpha{i}" for i in range(900))
    pairs = [({"instruction": "q0", "output": long_a}, {"instruction": "q0", "output": "Short answer."}),
             ({"instruction": "q1", "output": "x"}, {"instruction": "q1", "output": "y"}),
             ({"instruction": "q2", "output": "x"}, {"instruction": "q2", "output": "y"})]

    class Judge(ScriptedEngine):
        max_model_len = 1024

        def generate(self, requests):
            self.requests += requests
            out = [Completion("[[A]]", 1, 1, "stop"), Completion("[[B]]", 1, 1, "stop"),
                   Completion("[[C]]", 1, 1, "stop"), Completion("[[C]]", 1, 1, "stop"),
                   Completion("", 1, None, "error", error="HTTP 400: too long"), Completion("[[A]]", 1, 1, "stop")]
            return out[:len(requests)]

    engine = Judge([])
    engine.tokenizer = tok
    summary, items = evaluate.judge(engine, pairs, max_new_tokens=256)
    lengths = [len(tok(r.prompt, add_special_tokens=False)["input_ids"]) for r in engine.requests]
    assert max(lengths) <= 1024 - 256 and lengths[0] > 600          # cut to fit, not to nothing
    assert "Short answer." in engine.requests[0].prompt and "Short answer." in engine.requests[1].prompt
    assert items[0]["answers_cut"] and not items[1]["answers_cut"]
    assert [it["verdict"] for it in items] == ["win", "tie", "no_verdict"]
    assert (summary["items_failed"], summary["no_verdict"], summary["items_with_answers_cut"]) == (1, 1, 1)
    assert summary["win_rate"] == pytest.approx(0.75) and summary["win_rate_all_items"] == pytest.approx(2 / 3)
    assert items[2]["judge_errors"] == ["HTTP 400: too long"]
    # without a tokenizer (a hosted chat judge) the byte bound keeps the messages within the budget
    engine = Judge([])
    engine.max_model_len = 4096
    _, items = evaluate.judge(engine, pairs[:1], max_new_tokens=256)
    assert all(sum(len(m["content"].encode()) + 1 for m in r.messages) + 128 <= 4096 - 256 for r in engine.requests)
    assert items[0]["answers_cut"] and "Short answer." in engine.requests[0].messages[-1]["content"]


def test_every_sample_run_file_loads_and_the_paper_one_curates_with_70b_models():
    import glob

    from bft.run_file import load_run
    from tests.conftest import ROOT

    files = sorted(glob.glob(os.path.join(ROOT, "samples", "runs", "*.yaml")))
    assert len(files) >= 4
    for f in files:
        load_run(f)
    paper = load_run(os.path.join(ROOT, "samples", "runs", "paper-70b.yaml"))
    models = {s.stage: (s.cfg.model, s.cfg.tensor_parallel_size) for s in paper.stages}
    assert set(models) == {"backtranslate", "score", "rewrite"}
    assert all("70b" in model and tp == 8 for model, tp in models.values()), models
    assert "cheaper deviation" in open(os.path.join(ROOT, "samples", "runs", "one-gpu.yaml")).read()
