"""Stand-in for vllm.distributed.parallel_state (vLLM 0.33.0): `cleanup_dist_env_and_memory`, which in
vLLM destroys the model-parallel groups and the distributed environment and empties the CUDA cache.
Here it records the call (tests/vllm_standin/vllm.calls)."""
import gc

import vllm


def cleanup_dist_env_and_memory(shutdown_ray: bool = False):
    vllm.calls.append({"cleanup_dist_env_and_memory": True})
    gc.collect()
