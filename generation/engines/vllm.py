"""vLLM offline inference in-process: the production path on GPU nodes.

Written against vLLM 0.33.0's offline API (read from its source: vllm/entrypoints/llm.py,
sampling_params.py, outputs.py, v1/engine): `LLM(model, tokenizer=, tensor_parallel_size=, dtype=,
seed=, gpu_memory_utilization=, **EngineArgs)` with `max_model_len` and `enable_prefix_caching` among
the EngineArgs (an unknown keyword is a TypeError; dtype is one of auto/half/float16/bfloat16/float/
float32, so our bf16/fp16/fp32 are mapped). Each request gets its own `SamplingParams(n, temperature,
top_p, max_tokens, seed, stop, logprobs, output_kind)` (max_tokens defaults to 16, so it is always
set), with the model's generation_config values of MODEL_SAMPLING_FIELDS from
`LLM.get_default_sampling_params()` merged in, as `vllm serve` fills them. A `RequestOutput` has
`.request_id`, `.finished`, `.prompt_token_ids` and `.outputs[i].text / .token_ids / .finish_reason /
.logprobs / .stop_reason` (logprobs per generated token, {token_id: Logprob(logprob, rank,
decoded_token)}; stop_reason the stop string that ended the output, which include_stop_str_in_output
False, the default, leaves out of the text, or a stop token id, or None); finish_reason is one of
stop, length, abort, error, repetition.

Requests are fed to vLLM's engine as they come (`stream`; `continuous`), not in one `generate` call
per shard: the loop of `LLM._run_engine` with requests of our own, through `llm.llm_engine`
(`LLMEngine`): `add_request(request_id: str, prompt, params)`, each SamplingParams with
`output_kind=RequestOutputKind.FINAL_ONLY` as `LLM.generate` sets it; `step()`, whose finished
outputs carry the request_id we gave (vLLM keys its own internal id apart); `has_unfinished_requests()`;
`abort_request(ids)`. Up to QUEUED requests wait in vLLM's queue, topped up after every step, so the
scheduler has the next request (of the next shard too) whenever a slot frees, and each answer is
emitted (checkpointed; its shard written once complete) as soon as it is done.

Prompts go as token ids (`{"prompt_token_ids": ids}`): a text prompt would be tokenized again WITH
special tokens, and the chat template already wrote BOS, so the model would see it twice. vLLM
rejects a prompt of max_model_len tokens or more (`add_request` raises; `generate` fails the whole
call); such prompts are answered here as error rows and never sent. Prefix caching shares the long
templates. vLLM cannot be installed on the development machines (CUDA wheels only): the tests check
this adapter against a stand-in module with that API (tests/vllm_standin/).
"""
from __future__ import annotations

import gc
import itertools
import math
from typing import Any, Callable, Iterable

from generation.engines.base import (MODEL_SAMPLING_FIELDS, PROMPT_TOO_LONG, Completion, Engine, EngineConfig, Request,
                                     digit_token_ids, failed, finished)

VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Requests added to vLLM's engine and not yet answered, at most: twice the largest default max_num_seqs
# (vLLM resolves it to 256, or 1024 on GPUs of 70 GiB and more), so that the queue never runs dry
# between two steps, yet a worker's prompts are not all tokenized and held at once.
QUEUED = 2048


class VLLMEngine(Engine):
    name = "vllm"
    continuous = True   # `stream` feeds vLLM's scheduler as slots free; each request has its own seed

    def __init__(self, config: EngineConfig):
        from vllm import LLM

        self.model = config.model
        kwargs = dict(tokenizer=config.tokenizer or config.model, tensor_parallel_size=config.tensor_parallel_size,
                      gpu_memory_utilization=config.gpu_memory_utilization, enable_prefix_caching=True,
                      seed=config.seed, dtype=VLLM_DTYPES[config.dtype])
        if config.max_model_len:
            kwargs["max_model_len"] = config.max_model_len
        self.llm = LLM(config.model, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._digits = digit_token_ids(self.tokenizer)
        self._ids = itertools.count()     # request ids of our own (vLLM wants a str, unique while in flight)
        # the model's generation_config values that `vllm serve` would fill in (repetition_penalty, top_k,
        # ...): explicit SamplingParams do not get them, so they are merged here
        defaults = self.llm.get_default_sampling_params()
        self.model_defaults = {f: getattr(defaults, f) for f in MODEL_SAMPLING_FIELDS}

    def _params(self, r: Request):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        final = RequestOutputKind.FINAL_ONLY   # one output per request, when it is done (as LLM.generate sets)
        if r.digit_probs:
            return SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=20, seed=r.seed, output_kind=final,
                                  **self.model_defaults)
        return SamplingParams(n=1, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens,
                              seed=r.seed, stop=r.stop or None, output_kind=final, **self.model_defaults)

    def generate(self, requests: list[Request]) -> list[Completion]:
        return self.generate_through_stream(requests)

    def stream(self, items: Iterable[tuple[Any, Request]], emit: Callable[[Any, Completion], None],
               chunk: int = 512) -> None:
        """Every item answered through vLLM's engine loop (module docstring); `emit(key, completion)` as
        each request finishes, in any order (`chunk` is not used). A prompt vLLM cannot hold is an error
        row, never sent. Whatever raises (an interrupt, an emit that fails) aborts the requests in
        flight first, so the engine is left empty."""
        engine = self.llm.llm_engine
        items = iter(items)
        out: dict[str, tuple[Any, Request]] = {}    # our request id -> (key, request), until answered
        more = True
        try:
            while more or out:
                while more and len(out) < QUEUED:
                    item = next(items, None)
                    if item is None:
                        more = False
                        break
                    key, r = item
                    ids = self.tokenizer(r.prompt, add_special_tokens=False)["input_ids"]
                    if not ids or len(ids) >= self.max_model_len:   # vLLM needs room for one new token
                        emit(key, failed(f"prompt of {len(ids)} tokens does not fit max_model_len "
                                         f"{self.max_model_len}", len(ids), refusal=PROMPT_TOO_LONG))
                        continue
                    rid = f"bft-{next(self._ids)}"
                    engine.add_request(rid, {"prompt_token_ids": ids}, self._params(r))
                    out[rid] = (key, r)
                if not out:
                    continue
                if not engine.has_unfinished_requests():   # never a hang on a request vLLM dropped
                    for key, r in out.values():
                        emit(key, failed("vLLM's engine dropped the request without an answer"))
                    out.clear()
                    continue
                for o in engine.step():
                    if o.finished and o.request_id in out:
                        key, r = out.pop(o.request_id)
                        emit(key, self._completion(o, r))
        except BaseException:
            if out:
                engine.abort_request(list(out))
            raise

    def _completion(self, out, r: Request) -> Completion:
        """The Completion of a finished RequestOutput."""
        o = out.outputs[0]
        comp = finished(o.text, len(out.prompt_token_ids), len(o.token_ids), o.finish_reason)
        # stop_reason: the stop string that ended the output (left out of the text), a stop token id, or None
        comp.stopped = comp.finish_reason == "stop" and isinstance(o.stop_reason, str) and o.stop_reason in r.stop
        if r.digit_probs and comp.finish_reason != "error":
            first = (o.logprobs or [{}])[0]
            comp.digit_probs = {d: sum(math.exp(first[t].logprob) for t in tids if t in first)
                                for d, tids in self._digits.items()}
        return comp

    def close(self) -> None:
        """Stop vLLM's engine core, drop the LLM, and free GPU memory and the model-parallel groups."""
        if getattr(self, "llm", None) is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        cleanup_dist_env_and_memory()
