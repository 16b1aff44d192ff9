"""A STAND-IN for vLLM (which cannot be installed without CUDA): exactly the offline API the adapter
uses (LLM, SamplingParams, RequestOutput, CompletionOutput, Logprob), backed by a transformers model on
CPU, so that the adapter's calls, argument names and output reading are exercised. Not vLLM."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

calls: list[dict] = []


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: list[str] | None = None
    logprobs: int | None = None


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class _ModelConfig:
    def __init__(self, n):
        self.max_model_len = n


class _Engine:
    def __init__(self, n):
        self.model_config = _ModelConfig(n)


class LLM:
    def __init__(self, model, tokenizer=None, tensor_parallel_size=1, max_model_len=None, gpu_memory_utilization=0.9,
                 enable_prefix_caching=False, seed=0, dtype="auto", **kwargs):
        calls.append({"init": dict(model=model, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                                   gpu_memory_utilization=gpu_memory_utilization,
                                   enable_prefix_caching=enable_prefix_caching, seed=seed)})
        self._tok = AutoTokenizer.from_pretrained(tokenizer or model)
        self._lm = AutoModelForCausalLM.from_pretrained(model).eval()
        self.llm_engine = _Engine(max_model_len or self._lm.config.max_position_embeddings)

    def get_tokenizer(self):
        return self._tok

    @torch.inference_mode()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert isinstance(prompts, list) and len(prompts) == len(sampling_params)
        calls.append({"generate": len(prompts)})
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params)):
            ids = self._tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logprobs = None
            if sp.logprobs:
                lp = torch.log_softmax(self._lm(ids).logits[0, -1].float(), -1)
                top = torch.topk(lp, sp.logprobs)
                logprobs = [{int(t): Logprob(float(v), r + 1) for r, (v, t) in enumerate(zip(top.values, top.indices))}]
                new = [int(top.indices[0])]
            else:
                torch.manual_seed(sp.seed or 0)
                g = self._lm.generate(ids, max_new_tokens=sp.max_tokens, do_sample=sp.temperature > 0,
                                      temperature=sp.temperature or None, top_p=sp.top_p, top_k=0,
                                      pad_token_id=self._tok.pad_token_id)
                new = g[0, ids.shape[1]:].tolist()
            finish = "stop" if self._tok.eos_token_id in new else "length"
            if self._tok.eos_token_id in new:
                new = new[: new.index(self._tok.eos_token_id)]
            text = self._tok.decode(new, skip_special_tokens=True)
            outs.append(RequestOutput(str(i), p, ids[0].tolist(),
                                      [CompletionOutput(0, text, new, None, logprobs, finish)]))
        return outs
