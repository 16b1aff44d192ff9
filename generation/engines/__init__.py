"""One engine interface, three backends: vllm (offline, in-process), openai (any compatible server),
hf (transformers in-process). An `EngineConfig` says which and how; `load_engine` loads it."""
from __future__ import annotations

from generation.engines.base import Completion, Engine, EngineConfig, EngineError, Request


def load_engine(config: EngineConfig) -> Engine:
    """The loaded engine of `config` (checked first). Close it (or use it as a context manager)."""
    config.check()
    if config.engine == "hf":
        from generation.engines.hf import HFEngine

        return HFEngine(config)
    if config.engine == "openai":
        from generation.engines.openai import OpenAIEngine

        return OpenAIEngine(config)
    from generation.engines.vllm import VLLMEngine

    return VLLMEngine(config)


__all__ = ["Completion", "Engine", "EngineConfig", "EngineError", "Request", "load_engine"]
