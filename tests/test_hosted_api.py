"""The openai engine against OpenAI's hosted API as its reference documents it:
server kinds and the fields each is sent, logprob limits, max_completion_tokens, rate-limit waits;
every stage against tests/openai_api_standin.py in both score modes, with no 400."""
import pytest

from generation.engines import EngineConfig, EngineError, Request, load_engine
from generation.engines.openai.dialect import CHAT_TOP_LOGPROBS, COMPLETION_LOGPROBS, Dialect, server_kind
from generation.engines.openai.engine import MAX_BACKOFF_S
from generation.engines.openai.reader import parse
from generation.engines.openai.transport import check_served
from generation.job import GenerationError
from tests.openai_api_standin import APIError, check_body
from tests.helpers.generation import NO_GATE, copy_root, gen, read_stage

MODEL = "gpt-standin"


def test_the_server_kind_comes_from_the_url_then_the_model_cards():
    assert server_kind("auto", "https://api.openai.com/v1", [], "m") == "openai"
    assert server_kind("auto", "https://res.openai.azure.com/openai/deployments/x", [], "m") == "openai"
    assert server_kind("auto", "http://gpu:8000/v1", [{"id": "m", "owned_by": "vllm"}], "m") == "vllm"
    assert server_kind("auto", "http://proxy/v1", [{"id": "gpt-4o", "owned_by": "system"}], "gpt-4o") == "openai"
    assert server_kind("auto", "http://tgi:80/v1", [{"id": "m", "owned_by": "huggingface"}], "m") == "generic"
    assert server_kind("auto", "http://x/v1", [], "m") == "generic"
    assert server_kind("vllm", "https://api.openai.com/v1", [], "m") == "vllm"       # the option wins


def _dialect(server: str, api: str, bos: str | None = None) -> Dialect:
    return Dialect("m", api, server, bos)


def test_each_kind_of_server_is_sent_only_the_fields_it_accepts():
    prefill = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Score:"}]
    score = Request("<s>[INST] q [/INST] Score:", prefill, 2, digit_probs=True, seed=3)
    _, body = _dialect("vllm", "chat").body(score)
    assert body["continue_final_message"] and body["add_generation_prompt"] is False and body["max_tokens"] == 2
    _, body = _dialect("vllm", "completions").body(score)
    assert body["add_special_tokens"] is False and body["logprobs"] == 20 == COMPLETION_LOGPROBS["vllm"]
    for server in ("openai", "generic"):
        path, body = _dialect(server, "completions", "<s>").body(score)
        assert path == "/completions" and body["logprobs"] == 5 and body["prompt"] == "[INST] q [/INST] Score:"
        check_body("/v1" + path, body)                                  # OpenAI's API takes it
        _, body = _dialect(server, "chat").body(Request("", [{"role": "user", "content": "q"}], 9, seed=1))
        assert not {"continue_final_message", "add_generation_prompt", "add_special_tokens"} & set(body)
    openai_chat = _dialect("openai", "chat").body(score)[1]
    assert openai_chat["max_completion_tokens"] == 2 and "max_tokens" not in openai_chat
    assert _dialect("generic", "chat").body(score)[1]["max_tokens"] == 2
    assert _dialect("openai", "chat").body(score)[1]["top_logprobs"] == CHAT_TOP_LOGPROBS <= 20
    check_body("/v1/chat/completions", _dialect("openai", "chat").body(score)[1])


def test_stop_strings_go_where_servers_take_them_and_their_reason_is_read():
    """Rewrite's requests stop at [/RES] on vllm and generic servers; OpenAI's API,
    whose reasoning models refuse `stop`, gets none. What ended a "stop" answer is read from the
    choice: vLLM's stop_reason, SGLang's matched_stop, else unknown (None)."""
    import orjson

    rewrite = Request("p", [{"role": "user", "content": "q"}], 9, seed=1, stop=["[/RES]"])
    for server in ("vllm", "generic"):
        for api in ("completions", "chat"):
            assert _dialect(server, api).body(rewrite)[1]["stop"] == ["[/RES]"]
    hosted_body = _dialect("openai", "chat").body(rewrite)[1]
    assert "stop" not in hosted_body
    check_body("/v1/chat/completions", hosted_body)
    with pytest.raises(APIError, match="Unsupported parameter: 'stop'"):
        check_body("/v1/chat/completions", {**hosted_body, "stop": ["[/RES]"]})

    def stopped(choice: dict, r: Request = rewrite):
        content = orjson.dumps({"choices": [{"text": "[RES] An answer. ", **choice}],
                                "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
        return parse(content, r, "completions").stopped

    assert stopped({"finish_reason": "stop", "stop_reason": "[/RES]"}) is True
    assert stopped({"finish_reason": "stop", "matched_stop": "[/RES]"}) is True
    assert stopped({"finish_reason": "stop", "stop_reason": None}) is False    # the model's end of sequence
    assert stopped({"finish_reason": "stop", "stop_reason": 2}) is False       # a stop token id
    assert stopped({"finish_reason": "stop"}) is None                          # the server names no reason
    assert stopped({"finish_reason": "length"}) is False
    assert stopped({"finish_reason": "stop"}, Request("p", [], 9)) is False   # a request without stop strings


def test_the_standin_refuses_what_the_engine_used_to_send():
    """The fields of the old requests, as OpenAI's API answers them."""
    for path, body, message in [
            ("/v1/completions", {"model": "m", "prompt": "p", "max_tokens": 1, "add_special_tokens": False},
             "Unrecognized request argument supplied: add_special_tokens"),
            ("/v1/completions", {"model": "m", "prompt": "p", "max_tokens": 1, "logprobs": 20}, "maximum of 5"),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 4},
             "Use 'max_completion_tokens' instead"),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "q"}],
                                      "max_completion_tokens": 4, "continue_final_message": True},
             "Unrecognized request argument supplied: continue_final_message"),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "q"}],
                                      "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 21},
             "Expected a value <= 20")]:
        with pytest.raises(APIError, match=message) as e:
            check_body(path, body)
        assert e.value.status == 400


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_every_stage_runs_against_the_hosted_api_in_both_score_modes(prepared_root, tmp_path, tiny_models, hosted,
                                                                      api):
    root = copy_root(prepared_root, tmp_path)
    kw = dict(engine="openai", base_url=hosted.url, api=api, max_model_len=8192, max_new_tokens=64)
    if api == "completions":
        kw["tokenizer"] = tiny_models["chat"]
    for stage in ("backtranslate", "score", "rewrite", "distill", "rate"):
        gen(root, stage, MODEL, **kw, **NO_GATE.get(stage, {}))
        rows = read_stage(root, stage)[1]
        sent = rows.dropna(subset=["finish_reason"])
        assert len(sent) >= 9 and sent["parse_error"].isna().all(), (stage, sent["parse_error"].tolist())
    scores = read_stage(root, "score")[1]["score"].dropna()
    assert len(scores) >= 9 and scores.isin([1, 2, 3, 4, 5]).all()
    if api == "completions":
        gen(root, "score", MODEL, score_mode="logprob", **kw)
        scored = read_stage(root, "score")[1].dropna(subset=["finish_reason"])
        assert len(scored) >= 9 and scored["parse_error"].isna().all()
        assert scored["score"].between(1, 5).all() and not scored["score"].isin([1, 2, 3, 4, 5]).all()
        logprob_bodies = [r["body"] for r in hosted.requests if "logprobs" in r["body"]]
        assert len(logprob_bodies) >= 9 and all(b["logprobs"] == 5 for b in logprob_bodies)
    else:
        with pytest.raises(GenerationError, match="--score-mode logprob cannot run here: the openai server's chat API "
                                                  "has no assistant prefill"):
            gen(root, "score", MODEL, score_mode="logprob", **kw)
    assert hosted.requests and set(hosted.statuses()) == {200}
    bodies = [r["body"] for r in hosted.requests]
    assert all("add_special_tokens" not in b and "continue_final_message" not in b for b in bodies)
    if api == "chat":
        assert all("max_completion_tokens" in b and "max_tokens" not in b for b in bodies)
    assert not any("stop" in b for b in bodies)   # OpenAI's reasoning models refuse it


def test_a_rate_limit_reset_header_is_waited_on_the_hosted_api(hosted):
    hosted.plan += [{"status": 429, "headers": {"x-ratelimit-reset-requests": "20ms",
                                                "x-ratelimit-reset-tokens": "700ms"},
                     "body": {"error": {"message": "Rate limit reached for requests", "type": "requests",
                                        "code": "rate_limit_exceeded"}}}]
    with load_engine(EngineConfig("openai", MODEL, base_url=hosted.url, api="chat", max_model_len=8192)) as eng:
        assert eng.dialect.server == "openai"
        out = eng.generate([Request("", [{"role": "user", "content": "hi"}], 8)])
    first, second = hosted.requests
    assert out[0].finish_reason == "stop" and 0.7 <= second["time"] - first["time"] < 5


def test_a_served_model_without_a_context_length_asks_for_max_model_len(hosted):
    """OpenAI's /models lists no context length: --max-model-len is asked for in one line, then used."""
    with pytest.raises(EngineError, match=f"{hosted.url}/models lists 'gpt-standin' without a max_model_len and it "
                                          "is no local model folder: give --max-model-len"):
        load_engine(EngineConfig("openai", MODEL, base_url=hosted.url, api="chat"))
    with load_engine(EngineConfig("openai", MODEL, base_url=hosted.url, api="chat", max_model_len=512)) as eng:
        assert eng.max_model_len == 512


def test_the_served_names_shown_are_the_closest_first_and_azure_deployments_are_not_checked():
    """A hosted API lists many models: ten are named, the closest first, then how many more; Azure
    OpenAI's requests name a deployment, which its /models does not list."""
    models = [{"id": f"ft:gpt-{i}"} for i in range(12)] + [{"id": "gpt-4o-mini"}, {"object": "model"}]
    url = "https://api.openai.com/v1"
    with pytest.raises(EngineError) as e:
        check_served(models, "gpt-4o-mni", url, url)
    assert str(e.value) == (f"model 'gpt-4o-mni' is not served at {url}; it serves: gpt-4o-mini, "
                            + ", ".join(f"ft:gpt-{i}" for i in range(9)) + " and 3 more (did you mean 'gpt-4o-mini'?)")
    azure = "https://res.openai.azure.com/openai/v1"
    check_served(models, "my-deployment", azure, azure)


def test_the_back_off_budget_covers_a_one_minute_token_window():
    """Without a header, the default 8 retries wait at least ~62 s (0.5 s doubling, jitter >= 0.5),
    within the default --max-retry-time (900 s); a header asking a minute is waited as asked."""
    cfg = EngineConfig("openai", "m", base_url="http://x/v1")
    least = sum(min(MAX_BACKOFF_S, 0.5 * 2 ** a) * 0.5 for a in range(cfg.max_retries))
    assert least >= 60 and cfg.max_retry_time >= 60 + cfg.request_timeout


def test_an_answer_over_its_byte_cap_is_a_final_outcome_never_read_whole(prepared_root, tmp_path, hosted):
    """A server answering 10 MB bodies: the body is read in chunks up to the
    request's cap (answer_cap: its new tokens at 64 bytes, plus 64 KiB), the rest never; the row is a
    final answer_too_long with its reason, online and from a batch's output file alike."""
    import tracemalloc

    from generation.engines.openai.dialect import answer_cap
    from schemas.outcomes import REFUSALS

    big = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "' + b"x" * (10 << 20) + b'"}}]}'
    hosted.plan += [{"status": 200, "body": big}] * 3       # bytes, sent as they are: the server copies nothing
    request = Request("", [{"role": "user", "content": "hi"}], 8)
    with load_engine(EngineConfig("openai", MODEL, base_url=hosted.url, api="chat", max_model_len=8192)) as eng:
        tracemalloc.start()
        try:
            out = eng.generate([request] * 3)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 2 << 20, peak                                     # three 10 MB answers, under 2 MB read
    assert all(c.finish_reason == "error" and c.refusal == "answer_too_long" and c.text == "" for c in out)
    assert f"answer over {answer_cap(request):,} bytes" in out[0].error and "answer_too_long" in REFUSALS
    sizes = iter([10 << 20])                                        # the first prompt's answer: 10 MB of text

    def answer(text):
        return "y" * next(sizes, 0) or f"What does {len(text)} explain?"

    for batch in ("none", "openai"):
        hosted.answer = answer
        sizes = iter([10 << 20])
        root = copy_root(prepared_root, tmp_path / batch)
        opts = dict(engine="openai", base_url=hosted.url, api="chat", max_model_len=8192, max_new_tokens=64,
                    batch=batch, wait=True, poll_s=0.01)
        summary = gen(root, "backtranslate", MODEL, **opts)
        _, rows = read_stage(root, "backtranslate")
        long = rows[rows["finish_reason"] == "answer_too_long"]
        assert len(long) == 1 and summary["refusals"] == {"answer_too_long": 1} and summary["errors"] == 0, batch
        assert long.iloc[0]["parse_error"].startswith("answer_too_long: answer over 69,632 bytes (10,"), batch
        assert long.iloc[0]["raw_output"] == "" and rows["parse_error"].isna().sum() == len(rows) - 1, batch
        assert gen(root, "backtranslate", MODEL, **opts)["shards_skipped"] == [0, 1, 2]    # final: never resent


def test_requests_go_through_the_proxy_the_environment_names(hosted, monkeypatch):
    """Proxies come from the environment (HTTP_PROXY, NO_PROXY, as aiohttp's trust_env reads them), read
    once per session rather than once per request: the preflight and the requests reach a host that
    only the proxy knows."""
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, hosted.url.removesuffix("/v1"))
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    upstream = "http://bft-upstream.invalid/v1"
    with load_engine(EngineConfig("openai", MODEL, base_url=upstream, api="chat", max_model_len=8192)) as eng:
        out = eng.generate([Request("", [{"role": "user", "content": "hi"}], 8)])
    assert out[0].finish_reason == "stop" and hosted.statuses() == [200]
    assert hosted.proxied == [upstream + "/models", upstream + "/chat/completions"]
