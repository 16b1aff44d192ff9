"""Stand-in for vllm.sampling_params (vLLM 0.33.0): `RequestOutputKind`, which says what
`LLMEngine.step()` returns for a request in flight. `SamplingParams` is the package's
(tests/vllm_standin/vllm/__init__.py), as `vllm.SamplingParams` re-exports vLLM's own."""
from enum import Enum


class RequestOutputKind(Enum):
    CUMULATIVE = 0    # every step: the output so far
    DELTA = 1         # every step: the new tokens only (not mirrored by the stand-in's engine)
    FINAL_ONLY = 2    # only the finished output (what LLM.generate sets on every request)
