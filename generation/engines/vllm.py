"""vLLM offline inference in-process: the production path on GPU nodes.

Written against vLLM's documented offline API (0.3x+, and unchanged through 0.6+):
`LLM(model, tokenizer, tensor_parallel_size, max_model_len, gpu_memory_utilization,
enable_prefix_caching, seed, dtype)`, `LLM.generate(prompts, sampling_params)` with one
`SamplingParams(n, temperature, top_p, max_tokens, seed, stop, logprobs)` per prompt (its max_tokens
defaults to 16, so it is always set), returning `RequestOutput`s in input order with
`.prompt_token_ids` and `.outputs[i].text / .token_ids / .finish_reason / .logprobs` (a list, per
generated token, of {token_id: Logprob(logprob, rank, decoded_token)}). All prompts of a shard go in
one `generate` call so vLLM schedules them itself; prefix caching shares the long templates.
vLLM cannot be installed on the development machines (CUDA wheels only): the tests check this
adapter against a stand-in module with exactly that API (tests/vllm_standin/).
"""
from __future__ import annotations

import math

from generation.engines.base import Completion, Engine, Request, digit_token_ids


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, model: str, tokenizer: str | None = None, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, seed: int = 0, dtype: str = "auto", **_):
        from vllm import LLM

        self.model = model
        kwargs = dict(model=model, tokenizer=tokenizer or model, tensor_parallel_size=tensor_parallel_size,
                      gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                      seed=seed, dtype=dtype)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = max_model_len or self.llm.llm_engine.model_config.max_model_len
        self._digits = digit_token_ids(self.tokenizer)

    def _params(self, r: Request):
        from vllm import SamplingParams

        if r.digit_probs:
            return SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=20, seed=r.seed)
        return SamplingParams(n=1, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens,
                              seed=r.seed, stop=r.stop or None)

    def generate(self, requests: list[Request]) -> list[Completion]:
        outputs = self.llm.generate([r.prompt for r in requests], [self._params(r) for r in requests],
                                    use_tqdm=False)
        results = []
        for r, out in zip(requests, outputs):
            o = out.outputs[0]
            finish = "length" if o.finish_reason == "length" else "stop"
            comp = Completion(o.text, len(out.prompt_token_ids), len(o.token_ids), finish)
            if r.digit_probs:
                first = (o.logprobs or [{}])[0]
                comp.digit_probs = {d: sum(math.exp(first[t].logprob) for t in ids if t in first)
                                    for d, ids in self._digits.items()}
            results.append(comp)
        return results
