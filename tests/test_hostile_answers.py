"""Property-based (hypothesis) tests of what a hostile or broken OpenAI-compatible server can answer
with a 200: generated answers, mutated from valid ones of each API (a value replaced
by any JSON: NaN, 10**30, a lone surrogate, a list where a string was, a key removed) or not JSON at all
(garbage, nesting past any parser's depth), thrown at the openai engine's parser and at every stage
through the vLLM-server stand-in. The properties: no traceback, every row accounted for (one per
upstream row, each a result, a parse failure with its reason, or an engine error), every value the
schema stores is finite and valid Unicode, and a shard is written once (nothing is paid twice).

Deterministic (derandomize=True, no example database): the same examples on every run."""
import copy
import json
import math
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import schemas
import storage
from schemas import outcomes
from generation.engines import Request
from generation.engines.openai.reader import parse
from schemas.layout import RunLayout
from tests.helpers.generation import copy_root, gen, give_instructions, read_stage, write_scores

# no explain phase: its line tracing (sys.settrace) makes loading a model 100x slower
SETTINGS = dict(derandomize=True, database=None, deadline=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "model": "tiny-chat",
              "choices": [{"index": 0, "text": "Score: 5", "finish_reason": "stop",
                           "logprobs": {"tokens": ["5"], "top_logprobs": [{"5": -0.1, "4": -2.5, " 3": -4.0}]}}],
              "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "model": "tiny-chat",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Score: 5", "refusal": None},
                     "logprobs": {"content": [{"token": "5", "logprob": -0.1,
                                               "top_logprobs": [{"token": "5", "logprob": -0.1},
                                                                {"token": "4", "logprob": -2.5}]}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}
TEMPLATES = {"completions": COMPLETION, "chat": CHAT}

HOSTILE_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\x00", "Score: 5/10", "Score: nan", "", " ",
                                "Score: 4", "5", "Explain the text of d01 in detail.", "\u202e\u0000x" * 50])
SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.sampled_from([10 ** 30, -1, 2 ** 31])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | HOSTILE_TEXT)
# values that broke parsers before, drawn more often than chance would
HOSTILE = st.sampled_from([None, -1, 2 ** 31, 10 ** 30, float("nan"), float("inf"), -1000, 1000, 0, True, "x", "\ud800",
                           "5", [], {}, [1], ["5"], ["abc"], [None], {"5": -0.1}, [{"token": "5"}], -0.0])
JSON = HOSTILE | HOSTILE | st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _paths(value, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _mutated(template: dict, edits: list[tuple[int, bool, object]]) -> dict:
    body = copy.deepcopy(template)
    for pick, delete, value in edits:
        paths = [p for p in _paths(body) if p]
        if not paths:
            break
        path = paths[pick % len(paths)]
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if delete and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(value)  # a drawn value may be shared between examples
    return body


@st.composite
def answers(draw, api: str) -> bytes:
    """A 200 body: a valid answer of `api` with 1-3 values replaced or keys removed, or not JSON."""
    kind = draw(st.sampled_from(["mutated"] * 6 + ["valid", "garbage", "deep", "big_number"]))
    if kind == "garbage":
        return draw(st.binary(max_size=40))
    if kind == "deep":
        return b"[" * draw(st.sampled_from([1100, 100_000])) + b"]" * 3
    if kind == "big_number":
        return json.dumps(TEMPLATES[api]).replace('"prompt_tokens": 10', '"prompt_tokens": 1' + "0" * 40).encode()
    body = copy.deepcopy(TEMPLATES[api])
    if kind == "mutated":
        edits = draw(st.lists(st.tuples(st.integers(0, 200), st.booleans(), JSON), min_size=1, max_size=3))
        body = _mutated(body, edits)
    # json.dumps writes NaN/Infinity and "\ud800" as a server's encoder may (orjson refuses both on input)
    return json.dumps(body, allow_nan=True).encode()


@settings(max_examples=400, **SETTINGS)
@given(api=st.sampled_from(["completions", "chat"]), data=st.data(), digits=st.booleans())
def test_any_200_answer_parses_to_a_result_or_an_error_row(api, data, digits):
    body = data.draw(answers(api))
    comp = parse(body, Request("p", [], 4, digit_probs=digits), api)
    assert comp.finish_reason in ("stop", "length", "error")
    if comp.finish_reason == "error":
        assert comp.error and isinstance(comp.error, str)
        comp.error.encode("utf-8")
    else:
        assert isinstance(comp.text, str)
        comp.text.encode("utf-8")
    for count in (comp.prompt_tokens, comp.output_tokens):
        assert count is None or (type(count) is int and 0 <= count < 2 ** 31)
    if comp.served_model is not None:
        assert isinstance(comp.served_model, str)
        comp.served_model.encode("utf-8")
    if comp.digit_probs is not None:
        assert set(comp.digit_probs) == set("12345")
        assert all(math.isfinite(p) and 0 <= p for p in comp.digit_probs.values())


# ---- through the runner, at every stage --------------------------------------------------------------

@pytest.fixture(scope="module")
def upstream(prepared_root, tmp_path_factory, tiny_models):
    """A root with backtranslate shards (a valid instruction per row but one per shard) and score
    shards of 5 for every pair, so that score and rewrite send a request for most rows."""
    root = copy_root(prepared_root, tmp_path_factory.mktemp("hostile") / "root")
    gen(root, "backtranslate", tiny_models["plain"])
    give_instructions(root)
    ids = read_stage(root, "backtranslate")[1]["id"]
    write_scores(root, "score", {i: 5.0 for i in ids})
    return root


STAGES = [("backtranslate", {}), ("score", {}), ("score", {"score_mode": "logprob"}), ("rewrite", {})]


@pytest.mark.parametrize("stage,extra", STAGES, ids=["backtranslate", "score", "score-logprob", "rewrite"])
def test_hostile_answers_at_every_stage_leave_every_row_accounted_for(upstream, fresh, digit_model, stage, extra):
    @settings(max_examples=2, **SETTINGS)
    @given(api=st.sampled_from(["completions", "chat"]), data=st.data())
    def check(api, data):
        bodies = [data.draw(answers(api)) for _ in range(12)]
        with tempfile.TemporaryDirectory() as tmp:
            root = os.path.join(tmp, "root")
            shutil.copytree(upstream, root)
            if stage != "backtranslate":  # only the upstream shards: this stage's own are made here
                shutil.rmtree(os.path.join(root, "generations", stage), ignore_errors=True)
            else:
                shutil.rmtree(os.path.join(root, "generations"))
            fresh.plan[:] = [{"raw": b} for b in bodies]
            fresh.requests.clear()
            summary = gen(root, stage, "tiny-chat", engine="openai", base_url=fresh.url, api=api,
                          tokenizer=digit_model, concurrency=2, max_retries=0, max_error_rate=1.0, **extra)
            layout = RunLayout(root)
            rows = []
            for k in range(3):
                path = layout.generation_shard(stage, k, 3)
                rows += schemas.validate(storage.read_parquet(path), schemas.GENERATION, path).to_pylist()
            assert len(rows) == 12 and len({r["id"] for r in rows}) == 12      # one row per upstream row
            sent = [r for r in rows if r["finish_reason"] is not None]
            assert len(fresh.requests) == len(sent) == summary["sent"]        # each request paid once
            for r in rows:
                assert r["finish_reason"] is not None or r["parse_error"], r  # a result or its reason
                if r["score"] is not None:
                    assert math.isfinite(r["score"]) and 1 <= r["score"] <= 5, r
                for value in r.values():
                    if isinstance(value, str):
                        value.encode("utf-8")
            transient = sum(1 for r in sent if outcomes.is_engine_error(r["parse_error"]))
            fresh.requests.clear()
            fresh.plan.clear()
            again = gen(root, stage, "tiny-chat", engine="openai", base_url=fresh.url, api=api,
                        tokenizer=digit_model, concurrency=2, max_retries=0, max_error_rate=1.0, **extra)
            # exactly the transient failures are resent; results and final outcomes are never paid twice
            assert again["sent"] == len(fresh.requests) == transient, [r["parse_error"] for r in rows]

    check()
