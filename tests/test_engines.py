"""The engines against what they talk to: configuration apart from loading, close(), the batching
hint; BOS, the logprob score prompt, finish reasons, over-long prompts, dtype names, the chat API
without a tokenizer, malformed answers, timeouts and Retry-After. vLLM's offline API through
tests/vllm_standin/vllm, vLLM's HTTP server through tests/vllm_standin/openai_server.py (both
stand-ins of vLLM 0.33.0)."""
import json
import os
import sys
import time

import pandas as pd
import pytest

from benchmarks import real_tokenizers
from generation.engines import Completion, Engine, EngineConfig, EngineError, Request, load_engine
from generation.engines.base import digit_token_ids, finished
from generation.prompting import SCORE_PREFIX, fit_prompt, fit_prompts, render
from generation.job import GenerateConfig, GenerationError
from generation.runner import StageRunner
from generation.templates import DEFAULTS, LLAMA2_CHAT_TEMPLATE
from schemas.layout import RunLayout
from tests.helpers.generation import copy_root, gen, give_instructions, read_stage
from tests.helpers.servers import answering
from tests.vllm_standin.openai_server import StandinServer

STANDIN = os.path.join(os.path.dirname(__file__), "vllm_standin")


@pytest.fixture
def vllm(monkeypatch):
    """The vLLM stand-in as the `vllm` module, with its call log and hooks reset."""
    monkeypatch.syspath_prepend(STANDIN)
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        sys.modules.pop(name)
    import vllm as standin

    standin.calls.clear()
    yield standin
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        sys.modules.pop(name)


def hf_tokenizer(path, chat_template=True):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(path), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    if chat_template:
        tok.chat_template = LLAMA2_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def space_digit_tokenizer(tmp_path_factory, fixture_texts):
    """A byte-level BPE that has merged " 5" into one token (as GPT-2-style splits do)."""
    from training.tiny import train_byte_level_bpe

    path = str(tmp_path_factory.mktemp("tok_sd") / "tokenizer.json")
    train_byte_level_bpe(fixture_texts[:50] + ["Score: 1 Score: 2 Score: 3 Score: 4 Score: 5"] * 200, 600).save(path)
    return path


@pytest.fixture(scope="module")
def llama2_structure_tokenizer(tmp_path_factory, bpe_tokenizer_path):
    """The exact structure of Llama-2's tokenizer.json: Prepend("▁") + Replace(" ", "▁") normalizer, no
    pre-tokenizer, byte-fallback BPE, "<s> $A" post-processor (the tiny BPE's vocabulary and merges)."""
    import json

    spec = json.load(open(bpe_tokenizer_path))
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                               {"type": "Replace", "pattern": {"String": " "},
                                                                "content": "▁"}]}
    spec["pre_tokenizer"] = None
    bos = next(t["id"] for t in spec["added_tokens"] if t["content"] == "<s>")
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}}}
    path = str(tmp_path_factory.mktemp("tok_l2") / "tokenizer.json")
    json.dump(spec, open(path, "w"))
    return path


@pytest.fixture(scope="module")
def tekken_tokenizer(tmp_path_factory):
    """The real tekken tokenizer that mistral-common ships (byte-level BPE with a split regex, the
    structure of Llama-3's), converted at test time by MistralConverter, as transformers'
    convert_tekken_tokenizer does (the same tokenizer.json; converted once per process)."""
    return real_tokenizers.save("tekken", str(tmp_path_factory.mktemp("tok_tekken")))


# --- configuration apart from loading; close; the batching hint --------------------------------------

def test_engine_config_is_checked_before_anything_loads():
    with pytest.raises(EngineError, match="--engine openai needs --base-url"):
        load_engine(EngineConfig("openai", "m"))
    with pytest.raises(EngineError, match="--dtype 'bf17'"):
        load_engine(EngineConfig("hf", "/nonexistent", dtype="bf17"))
    cfg = GenerateConfig(stage="backtranslate", root="/r", engine="openai", model="m", base_url="http://x/v1",
                         request_timeout=3.0, max_retries=2)
    ec = cfg.engine_config()
    assert (ec.engine, ec.model, ec.request_timeout, ec.max_retries) == ("openai", "m", 3.0, 2)


def test_engines_close_what_they_hold(tiny_models, vllm, fresh):
    with load_engine(EngineConfig("hf", tiny_models["plain"])) as hf:
        assert hf.lm is not None
    assert hf.lm is None
    eng = load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api="chat"))
    eng.generate([Request("", [{"role": "user", "content": "hi"}], 2)])
    session = eng.transport._session
    eng.close()
    assert session.closed and eng.transport._session is None
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate([])
    with load_engine(EngineConfig("vllm", tiny_models["plain"])):
        pass
    assert {"shutdown": True} in vllm.calls and {"cleanup_dist_env_and_memory": True} in vllm.calls


def test_the_runner_closes_the_engine_it_loaded(prepared_root, tmp_path, tiny_models, vllm):
    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", tiny_models["plain"], engine="vllm")
    assert vllm.calls[-1] == {"cleanup_dist_env_and_memory": True}


def test_the_runner_reads_the_batching_hint_not_the_engine_name(prepared_root, tmp_path, tiny_models):
    class WholeShard(Engine):
        name, model, tokenizer, max_model_len, whole_shard = "mine", "m", None, 4096, True

        def __init__(self):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tiny_models["plain"])
            self.calls = []

        def generate(self, requests):
            self.calls.append(len(requests))
            return [Completion("What is it?", 3, 3, "stop") for _ in requests]

    root = copy_root(prepared_root, tmp_path)
    engine = WholeShard()
    cfg = GenerateConfig(stage="backtranslate", root=root, engine="hf", model="m", chunk_rows=1)
    StageRunner(cfg, engine=engine).run()
    assert engine.calls == [4, 4, 4]  # one call per shard despite --chunk-rows 1


# --- the vLLM stand-in behaves as vLLM 0.33.0 on what the adapter depends on --------------------------

def test_the_vllm_standin_behaves_as_vllm(digit_model, vllm):
    llm = vllm.LLM(digit_model, max_model_len=64)
    tok = llm.get_tokenizer()
    out = llm.generate(["[INST] hi [/INST]"], [vllm.SamplingParams(max_tokens=4)], use_tqdm=False)[0]
    assert out.prompt_token_ids[0] == tok.bos_token_id  # text prompts get BOS
    ids = tok("<s>[INST] hi [/INST]", add_special_tokens=False)["input_ids"]
    out = llm.generate([{"prompt_token_ids": ids}], [vllm.SamplingParams(max_tokens=4)], use_tqdm=False)[0]
    assert out.prompt_token_ids == ids
    assert out.outputs[0].finish_reason in vllm.FINISH_REASON_STRINGS
    text = llm.generate([{"prompt_token_ids": ids}], [vllm.SamplingParams(max_tokens=30, seed=1)])[0].outputs[0].text
    stop = text.split()[1] if len(text.split()) > 1 else text[:2]
    cut = llm.generate([{"prompt_token_ids": ids}], [vllm.SamplingParams(max_tokens=30, seed=1, stop=[stop])])[0]
    assert stop not in cut.outputs[0].text and cut.outputs[0].finish_reason == "stop"
    assert cut.outputs[0].stop_reason == stop
    with pytest.raises(ValueError, match="longer than the maximum model length"):
        llm.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": [5] * 64}], [vllm.SamplingParams()] * 2)
    with pytest.raises(TypeError):
        vllm.SamplingParams(max_new_tokens=3)
    with pytest.raises(TypeError):
        vllm.LLM(digit_model, not_an_engine_arg=1)
    with pytest.raises(ValueError, match="dtype"):
        vllm.LLM(digit_model, dtype="bf16")
    # SamplingParams is checked as vLLM 0.33.0 checks it: no kinder than vLLM
    for bad, message in [({"temperature": -0.1}, "temperature must be non-negative"),
                         ({"temperature": 2.5}, r"temperature must be in \[0, 2\]"),
                         ({"temperature": float("nan")}, "temperature must be a finite number"),
                         ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"), ({"top_p": 1.5}, r"top_p must be in"),
                         ({"max_tokens": 0}, "max_tokens must be at least 1"),
                         ({"logprobs": -2}, "logprobs must be non-negative or -1"), ({"n": 0}, "n must be at least 1")]:
        with pytest.raises(vllm.VLLMValidationError, match=message):
            vllm.SamplingParams(**bad)
    with pytest.raises(vllm.VLLMValidationError, match="greater than max allowed: 20"):
        llm.generate([{"prompt_token_ids": ids}], [vllm.SamplingParams(max_tokens=1, logprobs=21)])


def test_the_vllm_standins_engine_loop_behaves_as_vllms(tiny_models, vllm):
    """`llm.llm_engine` as vLLM 0.33.0's LLMEngine (the stand-in's docstring): add_request checks one
    request and takes only a str id; step admits first come, first served while fewer than
    max_num_seqs run and returns the finished outputs under the id given (and the output so far of the
    others, unless FINAL_ONLY); abort_request drops requests; generate runs through the same loop."""
    from vllm.sampling_params import RequestOutputKind

    llm = vllm.LLM(tiny_models["plain"], max_model_len=64, max_num_seqs=2)
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": llm.get_tokenizer()("[INST] hi [/INST]", add_special_tokens=False)["input_ids"]}

    def params(kind=RequestOutputKind.CUMULATIVE):
        return vllm.SamplingParams(max_tokens=4, seed=3, output_kind=kind)

    with pytest.raises(TypeError, match="request_id must be a string"):
        engine.add_request(1, prompt, params())
    with pytest.raises(ValueError, match="longer than the maximum model length"):
        engine.add_request("long", {"prompt_token_ids": [5] * 64}, params())
    assert not engine.has_unfinished_requests()                      # a refused request is not queued
    internal = engine.add_request("a", prompt, params(RequestOutputKind.FINAL_ONLY))
    assert internal.startswith("a-") and len(internal) == 10         # vLLM's own id: ours + 8 characters
    engine.add_request("b", prompt, params())
    engine.add_request("c", prompt, params())
    assert engine.get_num_unfinished_requests() == 3
    outputs = []
    while engine.has_unfinished_requests():
        outputs.append(engine.step())
    assert vllm.steps[0] == {"running": ["a", "b"], "waiting": 1}   # 2 slots, first come, first served
    assert "c" in vllm.steps[-1]["running"]
    final = [o for step in outputs for o in step if o.finished]
    assert sorted(o.request_id for o in final) == ["a", "b", "c"] and len({o.outputs[0].text for o in final}) == 1
    partial = [o.request_id for step in outputs for o in step if not o.finished]
    assert partial and "a" not in partial                           # FINAL_ONLY: nothing before the end
    same = llm.generate([prompt], [params()], use_tqdm=False)[0]
    assert same.outputs[0].text == final[0].outputs[0].text and same.finished
    engine.add_request("d", prompt, params())
    engine.abort_request(["d"])
    assert not engine.has_unfinished_requests() and {"abort": ["d"]} in vllm.calls


def test_the_vllm_engine_streams_across_shards(prepared_root, tmp_path, tiny_models, vllm):
    """The offline engine feeds vLLM's engine loop as its slots free, across shard
    boundaries. With 3 slots and shards of 4 requests, every engine step runs min(3, the stage's
    requests not yet answered) requests; one generate call per shard ran shard 0's last request alone,
    2 slots idle while shard 1 waited. The shards equal those made one request at a time (1 slot)."""
    vllm.default_max_num_seqs = 3
    streamed = copy_root(prepared_root, tmp_path / "streamed")
    gen(streamed, "backtranslate", tiny_models["plain"], engine="vllm")
    running = [step["running"] for step in vllm.steps]
    last = {rid: i for i, ids in enumerate(running) for rid in ids}  # the step in which each request ended
    assert len(last) == 12 and all(c.get("add_request") in last for c in vllm.calls if "add_request" in c)
    for i, ids in enumerate(running):
        assert len(ids) == min(3, 12 - sum(end < i for end in last.values())), (i, running)
    vllm.default_max_num_seqs = 1
    one = copy_root(prepared_root, tmp_path / "one")
    gen(one, "backtranslate", tiny_models["plain"], engine="vllm")
    for k in range(3):
        a, b = RunLayout(streamed).generation_shard("backtranslate", k, 3), RunLayout(one).generation_shard(
            "backtranslate", k, 3)
        assert open(a, "rb").read() == open(b, "rb").read()


def test_a_vllm_stream_that_fails_leaves_no_request_in_the_engine(tiny_models, vllm):
    """An emit that raises (a kill, a write that failed) mid-stream aborts what vLLM still holds, so the
    engine is left empty and can serve the next call."""
    class Killed(Exception):
        pass

    seen = []

    def emit(key, comp):
        seen.append(key)
        if len(seen) == 2:
            raise Killed

    with load_engine(EngineConfig("vllm", tiny_models["plain"])) as eng:
        with pytest.raises(Killed):
            eng.stream(((i, Request(f"[INST] hi {i} [/INST]", [], 4, seed=i)) for i in range(6)), emit)
        assert not eng.llm.llm_engine.has_unfinished_requests()
        assert [len(c["abort"]) for c in vllm.calls if "abort" in c] == [4]
        assert eng.generate([Request("[INST] again [/INST]", [], 4, seed=1)])[0].finish_reason in ("stop", "length")


# --- BOS once ----------------------------------------------------------------------------------------

def test_vllm_gets_token_ids_with_one_bos(prepared_root, tmp_path, digit_model, vllm):
    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", digit_model, engine="vllm")
    sent = [ids for c in vllm.calls if "add_request" in c for ids in c["prompt_token_ids"]]
    assert len(sent) == 12 and all(ids[0] == 1 and ids[1] != 1 for ids in sent)


def test_completions_endpoint_gets_one_bos(prepared_root, tmp_path, digit_model, fresh):
    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", "tiny-chat", engine="openai", base_url=fresh.url, tokenizer=digit_model)
    sent = [r["prompt_token_ids"] for r in fresh.requests]
    assert len(sent) == 12 and all(ids[0] == 1 and ids[1] != 1 for ids in sent)
    rows = read_stage(root, "backtranslate")[1]
    assert sorted(rows["prompt_tokens"]) == sorted(len(ids) for ids in sent)  # the server's usage


@pytest.fixture(scope="module")
def bos_plain_model(digit_model, tmp_path_factory):
    """The digit model without a chat template: a Llama-2 base model as it is tokenized (the tokenizer
    puts BOS first) and prompted (no template: the Llama-2 format)."""
    import shutil

    from transformers import AutoTokenizer

    folder = str(tmp_path_factory.mktemp("bos_plain"))
    shutil.copytree(digit_model, folder, dirs_exist_ok=True)
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = None
    tok.save_pretrained(folder)
    assert not AutoTokenizer.from_pretrained(folder).chat_template
    return folder


def test_a_model_without_a_chat_template_gets_one_bos_in_generation_and_training(prepared_root, tmp_path,
                                                                                   bos_plain_model, tiny_models,
                                                                                   vllm, caplog):
    """The Llama-2 fallback format wrote no <s> and every engine tokenizes without
    special tokens, so a base model without a template was prompted without BOS (and trained so)."""
    from transformers import AutoTokenizer

    from generation.prompting import bos_text, fallback_format
    from training.data import conversation, encode

    root = copy_root(prepared_root, tmp_path)
    with caplog.at_level("WARNING", logger="bft.generate"):
        gen(root, "backtranslate", bos_plain_model, engine="vllm")
    sent = [ids for c in vllm.calls if "add_request" in c for ids in c["prompt_token_ids"]]
    assert len(sent) == 12 and all(ids[0] == 1 and ids[1] != 1 and ids.count(1) == 1 for ids in sent)
    assert "no chat template: prompts use the Llama-2 chat format" in caplog.text and "BOS token '<s>'" in caplog.text
    tok = AutoTokenizer.from_pretrained(bos_plain_model)
    ids = encode(tok, conversation("forward", {"instruction": "Why?", "response": "Because."}))["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # a tokenizer that adds no BOS gets none, and says so
    plain = AutoTokenizer.from_pretrained(tiny_models["plain"])
    assert bos_text(plain) == "" and "no BOS" in fallback_format(plain)
    assert bos_text(tok) == "<s>" and fallback_format(AutoTokenizer.from_pretrained(tiny_models["chat"])) is None


# --- the logprob score prompt -------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["metaspace", "llama2_structure", "byte_level", "space_digit", "tekken"])
@pytest.mark.parametrize("chat_template", [True, False])
def test_the_score_prompt_ends_where_the_digit_token_begins(which, chat_template, request):
    path = request.getfixturevalue({"metaspace": "bpe_tokenizer_path", "llama2_structure": "llama2_structure_tokenizer",
                                    "byte_level": "byte_level_tokenizer_path", "space_digit": "space_digit_tokenizer",
                                    "tekken": "tekken_tokenizer"}[which])
    tok = hf_tokenizer(path, chat_template)
    values = {"instruction": "Explain BPE.", "response": "It merges frequent pairs."}
    prompt, msgs, _ = fit_prompt(tok, DEFAULTS["score"], values, "response", 4000, SCORE_PREFIX)
    system, user = DEFAULTS["score"].fill(**values)
    full = tok(render(tok, system, user, "Score: 5"), add_special_tokens=False)["input_ids"]
    mine = tok(prompt, add_special_tokens=False)["input_ids"]
    assert full[: len(mine)] == mine and len(full) == len(mine) + 1  # the next token is the digit's
    assert tok.decode(full[-1:]).strip() == "5" and full[-1] in digit_token_ids(tok)["5"]
    assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"].startswith("Score:")
    if which == "space_digit":
        assert msgs[-1]["content"] == "Score:"


def test_logprob_scores_through_vllm_and_both_http_endpoints(prepared_root, tmp_path, digit_model, vllm, fresh):
    for engine, extra in [("vllm", {}), ("openai", dict(base_url=fresh.url, tokenizer=digit_model)),
                          ("openai", dict(base_url=fresh.url, tokenizer=digit_model, api="chat"))]:
        root = copy_root(prepared_root, tmp_path / f"{engine}{len(extra)}")
        gen(root, "backtranslate", digit_model, engine="hf")
        give_instructions(root)
        gen(root, "score", digit_model if engine == "vllm" else "tiny-chat", engine=engine, score_mode="logprob", **extra)
        sent = read_stage(root, "score")[1].dropna(subset=["finish_reason"])
        assert len(sent) == 9 and sent["parse_error"].isna().all(), sent["parse_error"].tolist()
        assert sent["score"].between(1, 5).all() and sent["reasoning"].str.contains("argmax=").all()
    chat = [r["body"] for r in fresh.requests if r["path"].endswith("/chat/completions")]
    assert chat and all(b["continue_final_message"] and b["messages"][-1]["role"] == "assistant" for b in chat)


# --- stop strings ------------------------------------------------------------------------------------

def test_a_rewrite_stops_at_its_close_and_parses_whole(prepared_root, tmp_path, tiny_models):
    """The runner sends rewrite's requests with the stop string [/RES] (recorded in the shard's config)
    and hands what ended each output to the parser: a block the stop string closed is a whole answer."""
    from transformers import AutoTokenizer

    class Stopping(Engine):   # answers as vLLM does: the text up to the stop string, which it names
        name, model, max_model_len = "stopping", "m", 4096

        def __init__(self):
            self.tokenizer, self.stops = AutoTokenizer.from_pretrained(tiny_models["plain"]), []

        def generate(self, requests):
            self.stops += [r.stop for r in requests]
            return [Completion("[RES] The rewritten answer. ", 3, 5, "stop", stopped=True) if r.stop else
                    Completion("What does the text explain?", 3, 5, "stop") for r in requests]

    root, engine = copy_root(prepared_root, tmp_path), Stopping()
    for stage, gate in (("backtranslate", None), ("rewrite", "none")):
        StageRunner(GenerateConfig(stage=stage, root=root, engine="hf", model="m", gate=gate), engine=engine).run()
    rows = read_stage(root, "rewrite")[1].dropna(subset=["finish_reason"])
    assert len(rows) == 12 and rows["parse_error"].isna().all() and rows["response"].eq("The rewritten answer.").all()
    assert engine.stops == [[]] * 12 + [["[/RES]"]] * 12   # backtranslate has no stop string
    marker = json.load(open(RunLayout(root).generation_metrics("rewrite", 0, 3)))
    assert marker["provenance"]["config"]["stop"] == ["[/RES]"]


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_vllms_server_leaves_the_stop_string_out_and_names_it(fresh, digit_model, api):
    fresh.answer = lambda body: "Sure. [RES] The rewritten answer. [/RES] And then it went on."
    with load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api=api, tokenizer=digit_model)) as eng:
        out = eng.generate([Request("[INST] hi [/INST]", [{"role": "user", "content": "hi"}], 4, seed=1,
                                    stop=["[/RES]"])])[0]
    assert (out.text, out.finish_reason, out.stopped) == ("Sure. [RES] The rewritten answer. ", "stop", True)
    assert fresh.requests[-1]["body"]["stop"] == ["[/RES]"]


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_in_process_engines_end_at_a_stop_string_and_say_so(digit_model, vllm, engine):
    with load_engine(EngineConfig(engine, digit_model, max_model_len=256)) as eng:
        r = Request("[INST] hi [/INST]", [], 12, seed=1)
        free = eng.generate([r])[0]
        words = free.text.split()
        stop = words[1] if len(words) > 1 else free.text[:2]
        cut = eng.generate([Request(r.prompt, [], 12, seed=1, stop=[stop])])[0]
    assert not free.stopped and free.text.startswith(cut.text) and stop not in cut.text
    assert cut.stopped is True and cut.finish_reason == "stop"


# --- finish reasons -----------------------------------------------------------------------------------

def test_only_stop_and_length_are_outputs():
    assert finished("x", 1, 1, "length").finish_reason == "length"
    for reason in ("content_filter", "abort", "error", "repetition", "tool_calls", None):
        c = finished("partial", 1, 1, reason)
        assert c.finish_reason == "error" and c.error == f"finish_reason {reason}"


def test_abort_from_vllm_is_an_error_row(prepared_root, tmp_path, tiny_models, vllm):
    vllm.finish_override = "abort"
    root = copy_root(prepared_root, tmp_path)
    try:
        gen(root, "backtranslate", tiny_models["plain"], engine="vllm", max_error_rate=1.0)
    finally:
        vllm.finish_override = None
    assert read_stage(root, "backtranslate")[1]["parse_error"].eq("engine_error: finish_reason abort").all()


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_content_filter_over_http_is_an_error_row(fresh, digit_model, api):
    fresh.plan += [{"choice": {"finish_reason": "content_filter"}}, {"choice": {"finish_reason": "abort"}}]
    with load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api=api, tokenizer=digit_model,
                                  concurrency=1)) as eng:
        out = eng.generate([Request("[INST] hi [/INST]", [{"role": "user", "content": "hi"}], 4)] * 3)
    assert [c.finish_reason for c in out[:2]] == ["error", "error"]
    assert [c.error for c in out[:2]] == ["finish_reason content_filter", "finish_reason abort"]
    assert out[2].finish_reason in ("stop", "length")


# --- the chat API without a local tokenizer ----------------------------------------------------------

def test_chat_api_needs_no_local_tokenizer(prepared_root, tmp_path, fresh, fixture_texts):
    root = copy_root(prepared_root, tmp_path)
    gen(root, "backtranslate", "tiny-chat", engine="openai", base_url=fresh.url, api="chat", max_new_tokens=8)
    rows = read_stage(root, "backtranslate")[1]
    assert not rows["parse_error"].fillna("").str.startswith("engine_error").any()
    assert sorted(rows["prompt_tokens"]) == sorted(len(r["prompt_token_ids"]) for r in fresh.requests)  # usage
    # a document far over the context is cut by the byte bound, and the server accepts the prompt
    with load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api="chat")) as eng:
        assert eng.tokenizer is None and eng.max_model_len == 1024
        long_doc = " ".join(fixture_texts[:30])  # far beyond the served context of 1024 tokens
        prompt, msgs, cut = fit_prompt(None, DEFAULTS["backtranslate"], {"response": long_doc}, "response",
                                       eng.max_model_len - 8)
        assert cut and sum(len(m["content"].encode()) for m in msgs) <= 1024
        out = eng.generate([Request(prompt, msgs, 8)])[0]
    assert out.finish_reason in ("stop", "length") and out.prompt_tokens <= 1024 - 8


def test_chat_api_without_a_tokenizer_cuts_only_what_the_servers_count_finds_too_long(prepared_root, tmp_path,
                                                                                     fresh, fixture_texts):
    """Without a tokenizer the byte bound (+128 reserve) cut most documents that fit
    (16 of 32 score prompts at 4096). Where the server counts (vLLM's /tokenize), a document is cut only
    when the server's count is over the budget; without it the byte bound stays."""
    from generation.prompting import fit_prompts

    root = copy_root(prepared_root, tmp_path / "counted")
    bound = copy_root(prepared_root, tmp_path / "bound")
    budget = 1024 - 524
    gen(root, "backtranslate", "tiny-chat", engine="openai", base_url=fresh.url, api="chat", max_new_tokens=524)
    counted = read_stage(root, "backtranslate")[1]
    sent = [r for r in fresh.requests if r["path"].endswith("/chat/completions")]
    assert fresh.tokenize_calls and all(len(r["prompt_token_ids"]) <= budget for r in sent)
    assert len(sent) == 12 and not counted["input_truncated"].any()   # every document fits: none is cut
    assert sorted(counted["prompt_tokens"]) == sorted(len(r["prompt_token_ids"]) for r in sent)
    fresh.requests.clear()
    fresh.tokenize = False                                             # a server that cannot count
    gen(bound, "backtranslate", "tiny-chat", engine="openai", base_url=fresh.url, api="chat", max_new_tokens=524)
    assert read_stage(bound, "backtranslate")[1]["input_truncated"].sum() >= 6   # the byte bound cuts most
    # a document far over the context is cut to fit by the server's count, not to nothing
    with load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api="chat")) as eng:
        assert eng.count_messages is None                              # no /tokenize: the byte bound
    fresh.tokenize = True
    with load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api="chat")) as eng:
        long_doc = " ".join(fixture_texts[:30])
        prompt, msgs, cut, n = fit_prompts(None, DEFAULTS["backtranslate"], [{"response": long_doc}], "response",
                                           budget, count=eng.count_messages)[0]
    assert cut and budget - 40 <= n <= budget and fresh.count({"messages": msgs})["count"] == n


def test_a_model_the_server_does_not_serve_is_one_line_naming_what_it_serves(fresh):
    """A model name the server does not serve said "give --max-model-len", and with that
    given the stage ran against the server's own model. The model must be among GET /models' ids."""
    with pytest.raises(EngineError) as e:
        load_engine(EngineConfig("openai", "tiny-chaat", base_url=fresh.url, api="chat", max_model_len=512))
    assert str(e.value) == (f"model 'tiny-chaat' is not served at {fresh.url}; it serves: tiny-chat "
                            "(did you mean 'tiny-chat'?)")
    assert fresh.requests == []                                  # nothing was sent


@pytest.mark.parametrize("status, body, said", [
    (404, b"<html><body>Not Found</body></html>", "GET {url}/models answered 404: <html>"),
    (200, b"<!doctype html><title>Router login</title>", "answered 200 with a body that is not JSON"),
    (200, b'{"status": "ok"}', "answered 200 with JSON without a `data` list"),
])
def test_a_url_that_is_no_openai_server_is_named_as_such(status, body, said):
    """A port that answered 404 (no LLM server) gave "give --max-model-len"; with it given,
    the stage ran into errors row by row. The preflight names it, with a hint on /v1."""
    with answering(status, body) as url:
        with pytest.raises(EngineError) as e:
            load_engine(EngineConfig("openai", "m", base_url=url, api="chat", max_model_len=512))
    message = str(e.value)
    assert message.startswith(f"{url} is not an OpenAI-compatible server (") and said.format(url=url) in message
    assert "/v1" in message and len(message.splitlines()) == 1


# --- dtype names, over-long prompts -------------------------------------------------------------------

def test_vllm_gets_its_own_dtype_names(tiny_models, vllm):
    for ours, theirs in [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"), ("auto", "auto")]:
        load_engine(EngineConfig("vllm", tiny_models["plain"], dtype=ours)).close()
        assert [c["init"]["dtype"] for c in vllm.calls if "init" in c][-1] == theirs


def test_an_over_long_prompt_is_an_error_row_not_a_failed_shard(tiny_models, vllm):
    with load_engine(EngineConfig("vllm", tiny_models["plain"], max_model_len=64)) as eng:
        out = eng.generate([Request("[INST] hi [/INST]", [], 4), Request("word " * 200, [], 4)])
    assert out[0].finish_reason in ("stop", "length")
    assert out[1].finish_reason == "error" and "does not fit max_model_len 64" in out[1].error


# --- malformed answers, timeouts, Retry-After ---------------------------------------------------------

@pytest.mark.parametrize("raw", [b'{"id": "x", "object": "text_completion"}', b'{"choices": [null]}',
                                 b'{"choices": []}', b"not json {", b'{"choices": [{"finish_reason": "stop"}]}'])
def test_a_malformed_200_is_an_engine_error_row(prepared_root, tmp_path, digit_model, fresh, raw):
    root = copy_root(prepared_root, tmp_path)
    fresh.plan += [{"raw": raw}] * 4
    with pytest.raises(GenerationError, match="over --max-error-rate"):
        gen(root, "backtranslate", "tiny-chat", engine="openai", base_url=fresh.url, tokenizer=digit_model,
            concurrency=1)
    fresh.plan[:] = [{"raw": raw}] * 4
    gen(root, "backtranslate", "tiny-chat", engine="openai", base_url=fresh.url, tokenizer=digit_model,
        concurrency=1, max_error_rate=1.0)
    rows = read_stage(root, "backtranslate")[1]
    errors = rows["parse_error"].fillna("").str.startswith("engine_error: the server answered 200")
    assert errors.sum() == 4 and not rows["parse_error"].fillna("").eq("empty").any()


def test_a_server_that_never_answers_is_bounded_by_the_timeout(fresh):
    fresh.plan += [{"hang": True}] * 4
    t0 = time.monotonic()
    with load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api="chat", request_timeout=0.5,
                                  max_retries=1)) as eng:
        out = eng.generate([Request("", [{"role": "user", "content": "hi"}], 4)] * 2)
    assert time.monotonic() - t0 < 10
    assert all(c.finish_reason == "error" and c.error.startswith("gave up after 1 retries: ReadTimeout") for c in out)


def test_retry_after_is_honoured(fresh):
    fresh.plan += [{"status": 429, "headers": {"Retry-After": "2"}, "body": {"error": {"message": "slow down"}}}]
    with load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api="chat")) as eng:
        out = eng.generate([Request("", [{"role": "user", "content": "hi"}], 4)])
    first, second = fresh.requests
    assert out[0].finish_reason in ("stop", "length") and second["time"] - first["time"] >= 2.0


# --- final outcomes and the server's back-off headers --------------------------------------------------

def test_the_servers_wait_headers():
    from generation.engines.openai.reader import duration, retry_after, retry_wait

    assert [duration(v) for v in ("1s", "6m0s", "20ms", "1h2m3.5s", "2.5", "soon", "")] == \
        [1.0, 360.0, 0.02, 3723.5, 2.5, None, None]
    assert [retry_after(v) for v in ("3", "nan", "inf", "-1", "x", None)] == [3.0, None, None, None, None, None]
    assert retry_wait({"retry-after-ms": "250", "retry-after": "9"}, 429) == 0.25
    assert retry_wait({"retry-after": "9", "x-ratelimit-reset-tokens": "1m"}, 429) == 9.0
    assert retry_wait({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "6m0s"}, 429) == 360.0
    assert retry_wait({"x-ratelimit-reset-tokens": "6m0s"}, 503) is None      # those are for 429 only
    assert retry_wait({"retry-after": "nan"}, 429) is None


def test_a_429_with_retry_after_ms_is_waited_then_answered(fresh):
    fresh.plan += [{"status": 429, "headers": {"retry-after-ms": "700"}, "body": {"error": {"message": "slow"}}}]
    with load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api="chat")) as eng:
        out = eng.generate([Request("", [{"role": "user", "content": "hi"}], 4)])
    first, second = fresh.requests
    assert out[0].finish_reason in ("stop", "length") and 0.7 <= second["time"] - first["time"] < 5


def test_retries_stop_at_the_total_retry_time(fresh):
    """A rate limit that outlasts --max-retry-time: the request gives up instead of waiting past it."""
    fresh.plan += [{"status": 429, "headers": {"x-ratelimit-reset-tokens": "30s"}, "body": {}}] * 3
    t0 = time.monotonic()
    with load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api="chat", max_retry_time=5)) as eng:
        out = eng.generate([Request("", [{"role": "user", "content": "hi"}], 4)])
    assert time.monotonic() - t0 < 5 and len(fresh.requests) == 1
    assert out[0].finish_reason == "error" and out[0].refusal is None
    assert out[0].error.startswith("gave up after 0 retries (--max-retry-time 5 s would pass): HTTP 429")


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_refusals_are_final_and_transient_failures_are_not(fresh, digit_model, api):
    too_long = {"error": {"message": "This model's maximum context length is 1024 tokens. However, you requested "
                                     "3000 tokens", "type": "BadRequestError", "code": 400}}
    fresh.plan += [{"choice": {"finish_reason": "content_filter"}}, {"status": 400, "body": too_long},
                   {"choice": {"finish_reason": "abort"}}, {"status": 400, "body": {"error": {"message": "bad"}}}]
    if api == "chat":
        fresh.plan.append({"choice": {"message": {"role": "assistant", "content": None,
                                                  "refusal": "I can't help with that."}}})
    with load_engine(EngineConfig("openai", "tiny-chat", base_url=fresh.url, api=api, tokenizer=digit_model,
                                  concurrency=1)) as eng:
        out = eng.generate([Request("[INST] hi [/INST]", [{"role": "user", "content": "hi"}], 4)] * 5)
    got = [(c.finish_reason, c.refusal) for c in out]
    assert got[:4] == [("error", "content_filter"), ("error", "prompt_too_long"), ("error", None), ("error", None)]
    assert got[4] == (("error", "refusal") if api == "chat" else (out[4].finish_reason, None))


def test_a_content_filter_row_is_final_in_the_shard_and_never_resent(prepared_root, tmp_path, digit_model, fresh):
    root = copy_root(prepared_root, tmp_path)
    refused = set()

    def refuse(body):
        if len(refused) < 2 or body["prompt"] in refused:
            refused.add(body["prompt"])
            return True
        return False

    fresh.refuse = refuse
    kw = dict(engine="openai", base_url=fresh.url, tokenizer=digit_model, max_new_tokens=4)
    summary = gen(root, "backtranslate", "tiny-chat", **kw)
    assert summary["refusals"] == {"content_filter": 2} and summary["errors"] == 0 and summary["sent"] == 12
    rows = read_stage(root, "backtranslate")[1]
    assert rows["parse_error"].fillna("").str.startswith("content_filter: finish_reason content_filter").sum() == 2
    assert (rows["finish_reason"] == "content_filter").sum() == 2
    fresh.requests.clear()
    again = gen(root, "backtranslate", "tiny-chat", **kw)
    assert again["shards_skipped"] == [0, 1, 2] and again["sent"] == 0 and fresh.requests == []


# --- the client's cheap path: prompts short enough in bytes are not tokenized --------------------------

def test_byte_bounded_tokenizers_never_exceed_bytes_plus_slack(llama2_structure_tokenizer, tekken_tokenizer,
                                                               fixture_texts):
    """Llama-2's structure (byte fallback, Prepend+Replace) and tekken (byte-level BPE with a split
    regex) qualify, and on texts built to stress the bound (multi-byte characters outside the
    vocabulary, runs of spaces, emoji, combining marks) no text has more tokens than bytes + slack."""
    import random

    from generation.prompting import BYTE_SLACK, byte_bounded

    rng = random.Random(3)
    pieces = ["  ", " ", "\n\n", "é", "漢字", "😀", "e\u0301", "ﷺ", "\t", "[INST]", "<s>", "▁", "Ġ"]
    texts = [t[:400] for t in fixture_texts[:20]] + [
        "".join(rng.choice(pieces + [w for w in fixture_texts[0].split()[:30]]) for _ in range(rng.randint(1, 80)))
        for _ in range(300)]
    for path in (llama2_structure_tokenizer, tekken_tokenizer):
        tok = hf_tokenizer(path)
        assert byte_bounded(tok)
        for text, ids in zip(texts, tok(texts, add_special_tokens=False)["input_ids"]):
            assert len(ids) <= len(text.encode()) + BYTE_SLACK, (path, text)


def test_a_normalizer_that_lengthens_text_is_not_byte_bounded(bpe_tokenizer_path):
    import json

    from generation.prompting import byte_bounded

    spec = json.load(open(bpe_tokenizer_path))
    spec["normalizer"] = {"type": "NFKC"}
    tok = hf_tokenizer(bpe_tokenizer_path)
    from tokenizers import Tokenizer

    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    assert not byte_bounded(tok)


def test_fit_prompts_counts_only_what_bytes_cannot_prove(llama2_structure_tokenizer, fixture_texts):
    """Short prompts are not tokenized (count None); long ones are counted and cut exactly as before."""
    from generation.prompting import fit_prompts

    tok = hf_tokenizer(llama2_structure_tokenizer)
    calls = []
    real = tok.__call__
    tok.__class__ = type("Counting", (tok.__class__,), {
        "__call__": lambda self, texts, **kw: calls.append(texts) or real(texts, **kw)})
    docs = [fixture_texts[0][:200], " ".join(fixture_texts[1:11])]
    out = fit_prompts(tok, DEFAULTS["backtranslate"], [{"response": d} for d in docs], "response", 600)
    assert out[0][2] is False and out[0][3] is None                       # proved by bytes: never tokenized
    assert out[1][2] is True and out[1][3] <= 600                         # counted, then cut to the budget
    assert all(docs[0] not in (t if isinstance(t, str) else " ".join(t)) for t in calls)
    assert out[1][3] == len(real(out[1][0], add_special_tokens=False)["input_ids"])


def test_prompts_prepared_in_worker_processes_are_the_same_in_the_same_order(prepared_root, tmp_path, tiny_models,
                                                                            monkeypatch):
    """With cores to spare, a stage's prompts are prepared in worker processes
    (generation/preparing.py): the same bytes, in the same order, as on one thread. Kept off on one
    core and for small stages."""
    from transformers import AutoTokenizer

    from generation import preparing

    for cores in (1, 2):   # on 2 cores the pool measured slower than the thread (docs/BENCHMARKS.md)
        monkeypatch.setattr(preparing, "usable_cores", lambda: cores)
        assert preparing.pool_workers(10 ** 6) == 0
    monkeypatch.setattr(preparing, "usable_cores", lambda: 4)
    assert preparing.pool_workers(preparing.POOL_MIN_ROWS - 1) == 0 and preparing.pool_workers(10 ** 6) == 3

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chat"])

    class Instant(Engine):   # answers at once; records what it was sent
        name, model, max_model_len = "instant", "m", 160   # a context that cuts the longer documents

        def __init__(self):
            self.tokenizer, self.sent = tokenizer, []

        def generate(self, requests):
            self.sent += [(r.prompt, r.messages, r.prompt_tokens, r.seed) for r in requests]
            return [Completion(f"What is {len(r.prompt)}?", r.prompt_tokens, 4, "stop") for r in requests]

    monkeypatch.setattr(preparing, "POOL_MIN_ROWS", 0)
    monkeypatch.setattr(preparing, "usable_cores", lambda: 2)   # one worker: each costs a Python start
    monkeypatch.setattr(preparing, "MIN_POOL_CORES", 2)
    started = []
    monkeypatch.setattr(preparing.PreparePool, "start", classmethod(
        lambda cls, tok, rows, real=preparing.PreparePool.start.__func__: started.append(real(cls, tok, rows))
        or started[-1]))
    root, engine = copy_root(prepared_root, tmp_path), Instant()
    StageRunner(GenerateConfig(stage="backtranslate", root=root, engine="hf", model="m", max_new_tokens=16),
                engine=engine).run()
    assert started[0] is not None and started[0].workers == 1
    # what one thread prepares from the same documents, in shard order
    texts = [t for _, _, path in RunLayout(root).candidate_shards() for t in pd.read_parquet(path)["text"]]
    expected = fit_prompts(tokenizer, DEFAULTS["backtranslate"], [{"response": t} for t in texts], "response", 160 - 16)
    assert [(p, m, n) for p, m, n, _ in engine.sent] == [(p, m, n) for p, m, _, n in expected] and len(expected) == 12
    assert any(cut for _, _, cut, _ in expected)   # some documents were counted and cut in the workers


def test_a_server_answering_503_to_the_preflight_fails_in_seconds(monkeypatch):
    """A gateway whose backend is down answers 503 to everything: one error naming the URL and the
    status, within the preflight's few seconds (PREFLIGHT_S), not 900 s of retries per request later."""
    from generation.engines.openai import transport

    monkeypatch.setattr(transport, "PREFLIGHT_S", 1.0)
    with answering(503, b"unavailable") as url:
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=r"cannot reach the server at http://127.0.0.1:\d+/v1: it answered 503"):
            load_engine(EngineConfig("openai", "m", base_url=url, api="chat", max_model_len=512))
        assert 1.0 <= time.monotonic() - t0 < 5


def test_the_budget_reserves_what_the_request_asks(tmp_path):
    """The new tokens a request asks for are the ones its prompt's budget reserved
    (chat logprob asks for 2: the digit may come after a stripped space), so prompt + max_tokens never
    passes the context (OpenAI's API refuses that; vLLM 0.33.0 would clamp)."""
    from generation.engines.openai.dialect import Dialect

    def cfg(**kw):
        return GenerateConfig(stage="score", root=str(tmp_path), engine="openai", model="m", base_url="http://x", **kw)

    assert cfg(score_mode="logprob", api="chat").new_token_cap() == 2
    assert cfg(score_mode="logprob").new_token_cap() == 1
    assert cfg().new_token_cap() == 512 and cfg(max_new_tokens=7).new_token_cap() == 7
    for api, cap in (("chat", 2), ("completions", 1)):
        _, body = Dialect("m", api).body(Request("p", [{"role": "user", "content": "q"}], cap, digit_probs=True))
        assert body["max_tokens"] == cap


# --- one sampler on both vLLM paths ---------------------------------------------------------------------

def test_vllm_offline_and_served_sample_with_the_models_generation_config(prepared_root, tmp_path, digit_model,
                                                                          vllm):
    """`vllm serve` fills a request's omitted top_k/min_p/repetition_penalty from the model's
    generation_config.json; the offline engine got none of them. Now both sample with the same values
    (and so give the same rows for the same seeds), and the hf engine applies them too."""
    import shutil

    from transformers import GenerationConfig

    from generation.engines import load_engine

    model = str(tmp_path / "model")
    shutil.copytree(digit_model, model)
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, repetition_penalty=1.3, top_k=7, min_p=0.05,
                     bos_token_id=1, eos_token_id=2).save_pretrained(model)  # as Llama-3's sets them
    offline = copy_root(prepared_root, tmp_path / "offline")
    gen(offline, "backtranslate", model, engine="vllm")
    used = [sp for c in vllm.calls if "sampling" in c for sp in c["sampling"]]
    assert used and all((sp["repetition_penalty"], sp["top_k"], sp["min_p"]) == (1.3, 7, 0.05) for sp in used)
    assert all((sp["temperature"], sp["top_p"]) == (1.0, 0.9) for sp in used)  # the stage's own values win
    served = StandinServer(model, served_name="tiny-gc")
    try:
        root = copy_root(prepared_root, tmp_path / "served")
        vllm.calls.clear()
        gen(root, "backtranslate", "tiny-gc", engine="openai", base_url=served.url, tokenizer=model, concurrency=1)
        assert all("top_k" not in r["body"] for r in served.requests)   # omitted: the server fills them
        used_served = [sp for c in vllm.calls if "sampling" in c for sp in c["sampling"]]
        assert all((sp["repetition_penalty"], sp["top_k"], sp["min_p"], sp["temperature"], sp["top_p"]) ==
                   (1.3, 7, 0.05, 1.0, 0.9) for sp in used_served)
    finally:
        served.stop()
    key = ["id", "instruction", "raw_output", "finish_reason"]
    a = read_stage(offline, "backtranslate")[1][key].sort_values("id").reset_index(drop=True)
    b = read_stage(root, "backtranslate")[1][key].sort_values("id").reset_index(drop=True)
    assert a.equals(b)                                                   # the same rows on both paths
    with load_engine(EngineConfig("hf", model)) as eng:
        assert eng.model_defaults == {"repetition_penalty": 1.3, "top_k": 7, "min_p": 0.05}
