"""Stand-in for vllm.distributed (vLLM 0.33.0): only what the adapter calls."""
