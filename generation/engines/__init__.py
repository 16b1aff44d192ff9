"""One engine interface, three backends: vllm (offline, in-process), openai (any compatible server),
hf (transformers in-process). `make_engine` builds one by name."""
from __future__ import annotations

from generation.engines.base import Completion, Engine, Request


def make_engine(name: str, model: str, **options) -> Engine:
    if name == "hf":
        from generation.engines.hf import HFEngine

        return HFEngine(model, **options)
    if name == "openai":
        from generation.engines.openai import OpenAIEngine

        return OpenAIEngine(model, **options)
    if name == "vllm":
        from generation.engines.vllm import VLLMEngine

        return VLLMEngine(model, **options)
    raise ValueError(f"--engine {name!r}: expected vllm, openai or hf")


__all__ = ["Completion", "Engine", "Request", "make_engine"]
