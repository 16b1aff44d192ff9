"""Any OpenAI-compatible server (vllm serve, SGLang, transformers serve, hosted APIs).

`/v1/completions` with the rendered prompt (default: the chat template is applied here, so every
server sees the same text), or `/v1/chat/completions` with the messages (`api="chat"`: the server
applies its template; needed for hosted chat-only APIs).

In parts, the protocol apart from the transport (as vLLM's entrypoints/openai keeps its request and
response shapes apart from serving):
    dialect.py    what each kind of server is sent (server kinds, BOS, logprobs, stop strings), the
                  bytes an answer may hold, the context length
    reader.py     an answer -> Completion (final or transient outcomes) and the waits a server asks
                  for; shared by the online path and the batch files (generation/batch.py)
    transport.py  the endpoint, the preflight (GET /models), the aiohttp session and its event loop,
                  the stream keeping `concurrency` requests in flight
    engine.py     OpenAIEngine, tying them: loading, the tries, the server's own token counts
"""
from generation.engines.openai.engine import OpenAIEngine
from generation.engines.openai.transport import preflight

__all__ = ["OpenAIEngine", "preflight"]
