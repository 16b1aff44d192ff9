"""transformers in-process (CPU or one GPU): batched generation with left padding.

Requests are sorted by prompt length and cut into batches, so that a batch pads little; results go
back in input order. Sampling uses the requests' temperature/top_p; the batch's torch seed is derived
from its rows' seeds, so a run is reproducible for a given seed and batch size.
"""
from __future__ import annotations

import gc
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from generation.engines.base import (Completion, Engine, EngineConfig, Request, digit_token_ids, failed,
                                     model_context_length, model_sampling_defaults)

log = logging.getLogger("bft.engine.hf")


class HFEngine(Engine):
    name = "hf"

    def __init__(self, config: EngineConfig, device: str | None = None):
        self.model = config.model
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[config.dtype]
        self.lm = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch_dtype).to(self.device).eval()
        self.max_model_len = config.max_model_len or model_context_length(self.lm.config)
        self.batch_size = config.batch_size
        # the model's generation_config values as vLLM applies them (base.MODEL_SAMPLING_FIELDS);
        # transformers has no presence/frequency penalty
        self.model_defaults = model_sampling_defaults(config.model)
        unsupported = sorted({"presence_penalty", "frequency_penalty"} & set(self.model_defaults))
        if unsupported:
            log.warning("%s sets %s in generation_config.json: the hf engine cannot apply it (vLLM does)",
                        config.model, ", ".join(unsupported))

    def close(self) -> None:
        """Drop the model and return its memory (the GPU cache too)."""
        self.lm = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def generate(self, requests: list[Request]) -> list[Completion]:
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
        out: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = [requests[i] for i in idx]
            try:
                results = self._digits(batch) if batch[0].digit_probs else self._sample(batch)
            except (RuntimeError, ValueError) as e:  # e.g. out of memory on one batch
                log.warning("batch failed: %s", e)
                results = [failed(f"{type(e).__name__}: {e}") for _ in batch]
            for i, r in zip(idx, results):
                out[i] = r
        return out  # type: ignore[return-value]

    def _encode(self, batch: list[Request]):
        enc = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.inference_mode()
    def _sample(self, batch: list[Request]) -> list[Completion]:
        enc = self._encode(batch)
        first = batch[0]
        seed = sum((r.seed or 0) for r in batch) % (2**31)
        torch.manual_seed(seed)
        do_sample = first.temperature > 0
        gen = self.lm.generate(
            **enc, max_new_tokens=max(r.max_new_tokens for r in batch), do_sample=do_sample,
            temperature=first.temperature if do_sample else None, top_p=first.top_p if do_sample else None,
            # transformers samples from the top 50 unless told otherwise; vLLM from all (0) unless the model says
            top_k=self.model_defaults.get("top_k", 0) if do_sample else None,
            min_p=self.model_defaults.get("min_p") if do_sample else None,
            repetition_penalty=self.model_defaults.get("repetition_penalty"),
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            stop_strings=first.stop or None, tokenizer=self.tokenizer if first.stop else None,
        )
        prompt_len = enc["input_ids"].shape[1]
        results = []
        for row, r in enumerate(batch):
            n_prompt = int(enc["attention_mask"][row].sum())
            ids = gen[row, prompt_len:].tolist()
            ids = ids[: r.max_new_tokens]
            finish = "length"
            eos = self.tokenizer.eos_token_id
            if eos in ids:
                ids = ids[: ids.index(eos)]
                finish = "stop"
            pad = self.tokenizer.pad_token_id
            while ids and ids[-1] == pad and pad != eos:
                ids.pop()
                finish = "stop"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            hits = [(text.index(s), s) for s in r.stop if s in text]
            if hits:  # as vLLM: the output ends before the first stop string, which is left out of the text
                text, finish = text[: min(hits)[0]], "stop"
            if finish == "length" and len(ids) < r.max_new_tokens:
                finish = "stop"
            results.append(Completion(text, n_prompt, len(ids), finish, stopped=bool(hits)))
        return results

    @torch.inference_mode()
    def _digits(self, batch: list[Request]) -> list[Completion]:
        enc = self._encode(batch)
        logits = self.lm(**enc).logits[:, -1, :].float()
        probs = torch.softmax(logits, dim=-1)
        ids = digit_token_ids(self.tokenizer)
        results = []
        for row in range(len(batch)):
            p = {d: float(probs[row, t].sum()) if t else 0.0 for d, t in ids.items()}
            best = max(p, key=p.get)
            results.append(Completion(best, int(enc["attention_mask"][row].sum()), 1, "length", digit_probs=p))
        return results
