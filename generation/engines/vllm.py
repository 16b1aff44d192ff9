"""vLLM offline inference in-process: the production path on GPU nodes.

Written against vLLM 0.33.0's offline API (read from its source: vllm/entrypoints/llm.py,
sampling_params.py, outputs.py, v1/engine): `LLM(model, tokenizer=, tensor_parallel_size=, dtype=,
seed=, gpu_memory_utilization=, **EngineArgs)` with `max_model_len` and `enable_prefix_caching` among
the EngineArgs (an unknown keyword is a TypeError; dtype is one of auto/half/float16/bfloat16/float/
float32, so our bf16/fp16/fp32 are mapped). `LLM.generate(prompts, sampling_params)` takes one
`SamplingParams(n, temperature, top_p, max_tokens, seed, stop, logprobs)` per prompt (max_tokens
defaults to 16, so it is always set), with the model's generation_config values of
MODEL_SAMPLING_FIELDS from `LLM.get_default_sampling_params()` merged in, as `vllm serve` fills them and returns `RequestOutput`s in input order with
`.prompt_token_ids` and `.outputs[i].text / .token_ids / .finish_reason / .logprobs` (per generated
token, {token_id: Logprob(logprob, rank, decoded_token)}); finish_reason is one of stop, length,
abort, error, repetition.

Prompts go as token ids (`{"prompt_token_ids": ids}`): a text prompt would be tokenized again WITH
special tokens, and the chat template already wrote BOS, so the model would see it twice. vLLM
rejects the whole call when one prompt has max_model_len tokens or more; such prompts are answered
here as error rows and never sent. All other prompts of a shard go in one `generate` call
(`whole_shard`), so vLLM schedules them itself; prefix caching shares the long templates.
vLLM cannot be installed on the development machines (CUDA wheels only): the tests check this
adapter against a stand-in module with that API (tests/vllm_standin/).
"""
from __future__ import annotations

import gc
import math

from generation.engines.base import (MODEL_SAMPLING_FIELDS, PROMPT_TOO_LONG, Completion, Engine, EngineConfig, Request,
                                     digit_token_ids, failed, finished)

VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class VLLMEngine(Engine):
    name = "vllm"
    whole_shard = True

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
        # the model's generation_config values that `vllm serve` would fill in (repetition_penalty, top_k,
        # ...): explicit SamplingParams do not get them, so they are merged here
        defaults = self.llm.get_default_sampling_params()
        self.model_defaults = {f: getattr(defaults, f) for f in MODEL_SAMPLING_FIELDS}

    def _params(self, r: Request):
        from vllm import SamplingParams

        if r.digit_probs:
            return SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=20, seed=r.seed, **self.model_defaults)
        return SamplingParams(n=1, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens,
                              seed=r.seed, stop=r.stop or None, **self.model_defaults)

    def generate(self, requests: list[Request]) -> list[Completion]:
        ids = [self.tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in requests]
        results: list[Completion | None] = [None] * len(requests)
        send = []
        for i, p in enumerate(ids):
            if not p or len(p) >= self.max_model_len:  # vLLM needs room for at least one new token
                results[i] = failed(f"prompt of {len(p)} tokens does not fit max_model_len {self.max_model_len}",
                                    len(p), refusal=PROMPT_TOO_LONG)
            else:
                send.append(i)
        outputs = self.llm.generate([{"prompt_token_ids": ids[i]} for i in send],
                                    [self._params(requests[i]) for i in send], use_tqdm=False) if send else []
        for i, out in zip(send, outputs):
            o = out.outputs[0]
            comp = finished(o.text, len(out.prompt_token_ids), len(o.token_ids), o.finish_reason)
            if requests[i].digit_probs and comp.finish_reason != "error":
                first = (o.logprobs or [{}])[0]
                comp.digit_probs = {d: sum(math.exp(first[t].logprob) for t in tids if t in first)
                                    for d, tids in self._digits.items()}
            results[i] = comp
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop vLLM's engine core, drop the LLM, and free GPU memory and the model-parallel groups."""
        if getattr(self, "llm", None) is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        cleanup_dist_env_and_memory()
