"""A STAND-IN for vLLM 0.33.0 (which cannot be installed without CUDA), backed by a transformers model
on CPU. Not vLLM. It mirrors, read from vLLM 0.33.0's source, what our adapter depends on:

- `LLM(model, *, tokenizer, tensor_parallel_size, dtype, seed, gpu_memory_utilization, **EngineArgs)`
  (vllm/entrypoints/llm.py): an unknown keyword is a TypeError (EngineArgs is a dataclass); dtype must
  be one of ModelDType (auto, half, float16, bfloat16, float, float32: vllm/config/model.py), else an
  error; `llm.llm_engine.model_config.max_model_len`; `llm.llm_engine.engine_core.shutdown()`.
- `LLM.generate(prompts, sampling_params, *, use_tqdm)`: a prompt is a str or {"prompt": str}
  (tokenized WITH special tokens, so BOS is added) or {"prompt_token_ids": [...]} (used as is). The
  prompts' lengths are checked before anything runs (v1/engine/input_processor._validate_prompt_len):
  an empty prompt, or one of max_model_len tokens or more (room for one new token), raises
  VLLMValidationError (a ValueError) and the whole call fails.
- `SamplingParams` (sampling_params.py): max_tokens defaults to 16; an unknown keyword is a TypeError;
  `stop` strings end the output, which excludes them (include_stop_str_in_output=False), with
  finish_reason "stop" and `stop_reason` the string; output also ends at max_model_len ("length").
- `RequestOutput.outputs[i]` (outputs.py): text, token_ids, logprobs (per generated token
  {token_id: Logprob(logprob, rank, decoded_token)}), finish_reason in FINISH_REASON_STRINGS
  (stop, length, abort, error, repetition: v1/engine/__init__.py).
- `LLM.get_default_sampling_params()` (llm.py, config/model.py `get_diff_sampling_param`): the model's
  generation_config.json sampling fields (repetition_penalty, presence/frequency_penalty, temperature,
  top_k, top_p, min_p, max_new_tokens as max_tokens); `generate` with explicit SamplingParams does not
  apply them (the caller merges them), while `vllm serve` fills a request's omitted fields from them.
- `llm.llm_engine` as `LLMEngine` (v1/engine/llm_engine.py, input_processor.py, the loop of
  `LLM._run_engine`): `add_request(request_id, prompt, params, arrival_time=None, lora_request=None,
  tokenization_kwargs=None, trace_headers=None, priority=0, prompt_text=None)` checks the prompt as
  `generate` does (raising for that request alone), a request_id that is not a str is a TypeError,
  and returns vLLM's internal id (the given one plus 8 random characters); `step()` runs one engine
  step: the scheduler admits waiting requests first come, first served while fewer than
  `max_num_seqs` (an EngineArg) run, every running request gains one token, and the step returns
  the finished requests' `RequestOutput`s (`finished` True, `request_id` the id given), plus, unless
  the request's `SamplingParams.output_kind` is `RequestOutputKind.FINAL_ONLY`, the output so far of
  each unfinished one (CUMULATIVE; DELTA is not mirrored); `has_unfinished_requests()`,
  `get_num_unfinished_requests()`, `abort_request(request_ids)`.
  `LLM.generate` runs through the same loop (its requests numbered by the LLM's request counter, outputs
  returned in request order), as vLLM's does.
Test hooks (not vLLM): `calls` records constructor arguments, prompts, sampling params, added and
aborted requests and shutdowns; `steps` records each engine step's running request ids and waiting
count; `default_max_num_seqs` is the scheduler's slots when max_num_seqs is not given (vLLM picks
256 or 1024 by GPU); `finish_override`, when set, is the finish_reason of every output (to produce
abort/error/repetition). A request's output is computed whole when it is admitted (transformers'
generate), then released one token per step: the step at which it finishes is its output's length.
"""
from __future__ import annotations

import collections
import itertools
import math
import uuid

from dataclasses import dataclass, field, fields

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .sampling_params import RequestOutputKind

calls: list[dict] = []
steps: list[dict] = []
finish_override: str | None = None
default_max_num_seqs = 256   # what max_num_seqs=None resolves to (vLLM: 256, or 1024 on large GPUs)

MODEL_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
FINISH_REASON_STRINGS = ("stop", "length", "abort", "error", "repetition")


class VLLMValidationError(ValueError):
    pass


MAX_LOGPROBS = 20   # vllm/config/model.py: ModelConfig.max_logprobs default


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    @classmethod
    def from_optional(cls, **kwargs) -> "SamplingParams":
        """vLLM 0.33.0's `SamplingParams.from_optional`: a None penalty, temperature or top_p takes the
        field's default (the subset of fields above; an unknown keyword is a TypeError)."""
        defaults = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                    "temperature": 1.0, "top_p": 1.0}
        return cls(**{k: defaults[k] if v is None and k in defaults else v for k, v in kwargs.items()})

    def __post_init__(self):
        """vLLM 0.33.0's `SamplingParams._verify_args` (sampling_params.py), for the fields above."""
        if not isinstance(self.n, int):
            raise VLLMValidationError(f"n must be an int, but is of type {type(self.n)}")
        if self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise VLLMValidationError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise VLLMValidationError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not math.isfinite(self.repetition_penalty):
            raise VLLMValidationError(f"repetition_penalty must be a finite number, got {self.repetition_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise VLLMValidationError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not math.isfinite(self.temperature):
            raise VLLMValidationError(f"temperature must be a finite number, got {self.temperature}.")
        if self.temperature < 0.0:
            raise VLLMValidationError(f"temperature must be non-negative, got {self.temperature}.")
        if self.temperature > 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not isinstance(self.top_k, int):
            raise VLLMValidationError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        if not 0.0 <= self.min_p <= 1.0:
            raise VLLMValidationError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.logprobs is not None and self.logprobs != -1 and self.logprobs < 0:
            raise VLLMValidationError(f"logprobs must be non-negative or -1, got {self.logprobs}.")


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
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


@dataclass
class _EngineArgs:  # the EngineArgs our adapter passes through LLM's **kwargs (a subset of vLLM's)
    max_model_len: int | None = None
    enable_prefix_caching: bool | None = None
    disable_log_stats: bool = True
    max_num_seqs: int | None = None      # None: default_max_num_seqs


class _ModelConfig:
    def __init__(self, n):
        self.max_model_len = n


class _EngineCore:
    def shutdown(self, timeout=None):
        calls.append({"shutdown": True})


class _Engine:
    """LLMEngine: the engine loop (module docstring)."""

    def __init__(self, llm: "LLM", n: int, max_num_seqs: int | None):
        self.model_config = _ModelConfig(n)
        self.engine_core = _EngineCore()
        self._llm, self._slots = llm, max_num_seqs or default_max_num_seqs
        self._waiting: collections.deque = collections.deque()   # (request_id, text, ids, params)
        self._running: dict[str, list] = {}   # request_id -> [whole output, steps left, params]

    def add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None, tokenization_kwargs=None,
                    trace_headers=None, priority=0, prompt_text=None) -> str:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id)}")
        if params.output_kind == RequestOutputKind.DELTA:
            raise NotImplementedError("the vLLM stand-in does not mirror RequestOutputKind.DELTA")
        text, ids = self._llm._prompt_ids(prompt)
        self._llm._validate(ids, params)
        calls.append({"add_request": request_id, "prompt_token_ids": [ids],
                      "sampling": [{f.name: getattr(params, f.name) for f in fields(params)}]})
        self.enqueue(request_id, text, ids, params)
        return f"{request_id}-{uuid.uuid4().hex[:8]}"

    def enqueue(self, request_id: str, text: str | None, ids: list[int], params: SamplingParams) -> None:
        """Not vLLM's: the queueing that add_request and LLM.generate share (checked, not recorded)."""
        self._waiting.append((request_id, text, ids, params))

    def step(self) -> list[RequestOutput]:
        while self._waiting and len(self._running) < self._slots:   # first come, first served
            request_id, text, ids, params = self._waiting.popleft()
            out = self._llm._one(request_id, text, ids, params)
            self._running[request_id] = [out, max(1, len(out.outputs[0].token_ids)), params]
        steps.append({"running": list(self._running), "waiting": len(self._waiting)})
        outputs = []
        for request_id, state in list(self._running.items()):
            out, left, params = state
            state[1] = left - 1
            if state[1] == 0:
                del self._running[request_id]
                outputs.append(out)
            elif params.output_kind == RequestOutputKind.CUMULATIVE:   # the output so far
                o = out.outputs[0]
                done = o.token_ids[: len(o.token_ids) - state[1]]
                outputs.append(RequestOutput(request_id, out.prompt, out.prompt_token_ids, [CompletionOutput(
                    0, self._llm._tok.decode(done, skip_special_tokens=True), done, None, None)], finished=False))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    def get_num_unfinished_requests(self) -> int:
        return len(self._waiting) + len(self._running)

    def abort_request(self, request_ids, internal=False) -> None:
        gone = set(request_ids)
        self._waiting = collections.deque(w for w in self._waiting if w[0] not in gone)
        for request_id in gone & set(self._running):
            del self._running[request_id]
        calls.append({"abort": sorted(gone)})


class LLM:
    def __init__(self, model, *, tokenizer=None, tensor_parallel_size=1, dtype="auto", seed=0,
                 gpu_memory_utilization=0.92, **kwargs):
        engine_args = _EngineArgs(**kwargs)  # TypeError on an unknown keyword, as vLLM's EngineArgs
        if dtype not in MODEL_DTYPES:
            raise ValueError(f"Unknown dtype: {dtype!r}; expected one of {MODEL_DTYPES}")
        calls.append({"init": dict(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                                   gpu_memory_utilization=gpu_memory_utilization,
                                   **{f.name: getattr(engine_args, f.name) for f in fields(engine_args)})})
        self._model = model
        self._tok = AutoTokenizer.from_pretrained(tokenizer or model)
        self._lm = AutoModelForCausalLM.from_pretrained(model).eval()
        self.llm_engine = _Engine(self, engine_args.max_model_len or self._lm.config.max_position_embeddings,
                                  engine_args.max_num_seqs)
        self.model_config = self.llm_engine.model_config
        self._request_counter = itertools.count()   # LLM.request_counter: generate's request ids

    def get_tokenizer(self):
        return self._tok

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM 0.33.0's `LLM.get_default_sampling_params` with generation_config="auto" (the default):
        the model's generation_config.json, non-default values only (`GenerationConfig.to_diff_dict`),
        limited to the sampling fields of `ModelConfig.get_diff_sampling_param`. NOT applied by
        `generate` when sampling params are given (as in vLLM): a caller merges them itself."""
        diff = self.diff_sampling_param()
        return SamplingParams.from_optional(**diff) if diff else SamplingParams()

    def diff_sampling_param(self) -> dict:
        """`ModelConfig.get_diff_sampling_param` (vllm/config/model.py): what `vllm serve` fills into a
        request's omitted fields and `get_default_sampling_params` starts from."""
        from transformers import GenerationConfig

        try:
            config = GenerationConfig.from_pretrained(self._model).to_diff_dict()
        except OSError:  # no generation_config.json
            return {}
        available = ["repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k", "top_p",
                     "min_p", "max_new_tokens", "skip_special_tokens"]
        if not any(p in config for p in available):
            return {}
        diff = {p: config.get(p) for p in available if config.get(p) is not None}
        if "max_new_tokens" in diff:
            diff["max_tokens"] = diff.pop("max_new_tokens")
        return diff

    def _prompt_ids(self, p) -> tuple[str | None, list[int]]:
        if isinstance(p, str):
            p = {"prompt": p}
        if "prompt_token_ids" in p:
            return None, list(p["prompt_token_ids"])
        return p["prompt"], self._tok(p["prompt"])["input_ids"]  # with special tokens, as vLLM

    @torch.inference_mode()
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
                 tokenization_kwargs=None):
        prompts = prompts if isinstance(prompts, list) else [prompts]
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        encoded = [self._prompt_ids(p) for p in prompts]
        for (_, ids), sp in zip(encoded, sampling_params):   # every prompt checked before any runs
            self._validate(ids, sp)
        for sp in sampling_params:
            sp.output_kind = RequestOutputKind.FINAL_ONLY   # "We only care about the final output"
        calls.append({"generate": len(prompts), "prompt_token_ids": [ids for _, ids in encoded],
                      "sampling": [{f.name: getattr(sp, f.name) for f in fields(sp)} for sp in sampling_params]})
        for (text, ids), sp in zip(encoded, sampling_params):
            self.llm_engine.enqueue(str(next(self._request_counter)), text, ids, sp)
        outputs = []   # LLM._run_engine: step until no request is unfinished, then in request order
        while self.llm_engine.has_unfinished_requests():
            outputs += [o for o in self.llm_engine.step() if o.finished]
        return sorted(outputs, key=lambda o: int(o.request_id))

    def _validate(self, ids: list[int], sp: SamplingParams) -> None:
        """The checks of a request before it runs (SamplingParams._validate_logprobs: ModelConfig.max_logprobs
        defaults to 20; v1/engine/input_processor._validate_prompt_len)."""
        if sp.logprobs and sp.logprobs > MAX_LOGPROBS:
            raise VLLMValidationError(f"Requested sample logprobs of {sp.logprobs}, which is greater than max "
                                      f"allowed: {MAX_LOGPROBS}")
        limit = self.llm_engine.model_config.max_model_len
        if not ids:
            raise VLLMValidationError("The decoder prompt cannot be empty")
        if len(ids) >= limit:
            raise VLLMValidationError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model "
                                      f"length of {limit}." if len(ids) > limit else
                                      f"The decoder prompt (length {len(ids)}) plus the number of requested "
                                      f"output tokens (at least 1) is longer than the maximum model length")

    def _one(self, request_id, text, ids, sp) -> RequestOutput:
        x = torch.tensor([ids])
        max_new = min(sp.max_tokens if sp.max_tokens is not None else 10**9, self.llm_engine.model_config.max_model_len - len(ids))
        torch.manual_seed(sp.seed or 0)
        greedy = sp.temperature == 0
        # presence/frequency penalties have no transformers counterpart: the stand-in samples without them
        g = self._lm.generate(x, max_new_tokens=max_new, do_sample=not greedy,
                              temperature=None if greedy else sp.temperature, top_p=None if greedy else sp.top_p,
                              top_k=None if greedy else sp.top_k, min_p=None if greedy or not sp.min_p else sp.min_p,
                              repetition_penalty=sp.repetition_penalty if sp.repetition_penalty != 1.0 else None,
                              pad_token_id=self._tok.pad_token_id,
                              return_dict_in_generate=True, output_logits=bool(sp.logprobs))
        logprobs = None
        if sp.logprobs:  # per generated token: the sampled one and the top `logprobs`, from the raw logits
            logprobs = []
            for step, logits in enumerate(g.logits):
                lp = torch.log_softmax(logits[0].float(), -1)
                top = torch.topk(lp, sp.logprobs)
                entry = {int(t): Logprob(float(v), r + 1, self._tok.decode([int(t)]))
                         for r, (v, t) in enumerate(zip(top.values, top.indices))}
                chosen = int(g.sequences[0, len(ids) + step])
                entry.setdefault(chosen, Logprob(float(lp[chosen]), int((lp > lp[chosen]).sum()) + 1,
                                                 self._tok.decode([chosen])))
                logprobs.append(entry)
        g = g.sequences
        new = g[0, len(ids):].tolist()
        finish, stop_reason = "length", None
        if self._tok.eos_token_id in new:
            new, finish = new[: new.index(self._tok.eos_token_id)], "stop"
        out_text = self._tok.decode(new, skip_special_tokens=True)
        stops = [sp.stop] if isinstance(sp.stop, str) else (sp.stop or [])
        hits = [(out_text.index(s), s) for s in stops if s in out_text]
        if hits:
            at, s = min(hits)
            out_text = out_text[: at + (len(s) if sp.include_stop_str_in_output else 0)]
            new = self._tok(out_text, add_special_tokens=False)["input_ids"]
            finish, stop_reason = "stop", s
        if finish_override:
            finish = finish_override
        if logprobs is not None:
            logprobs = logprobs[: len(new)] or logprobs[:1]
        return RequestOutput(request_id, text, ids,
                             [CompletionOutput(0, out_text, new, None, logprobs, finish, stop_reason)])
