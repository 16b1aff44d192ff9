"""The engine contract, as Beam's ModelHandler divides it: an `EngineConfig` says which engine and how
(cheap, checkable, no model touched); `load_engine(config)` (engines/__init__.py) loads it and returns
an `Engine`; `Engine.generate` turns rendered requests into completions, in the same order;
`Engine.close()` releases what the engine holds (an `Engine` is a context manager that closes itself).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

from schemas.errors import UserError
from schemas.options import option
from schemas.outcomes import ANSWER_TOO_LONG, CONTENT_FILTER, PROMPT_TOO_LONG, REFUSAL  # noqa: F401 (engines name them from here)

SCORE_DIGITS = ("1", "2", "3", "4", "5")
ENGINES = ("vllm", "openai", "hf")
DTYPES = ("auto", "bf16", "fp16", "fp32")
# The kinds of OpenAI-compatible server the openai engine tells apart (engines/openai/dialect.py): each is sent
# only the request fields it accepts. auto: detected from --base-url and GET /models.
SERVERS = ("auto", "vllm", "openai", "generic")


class EngineError(UserError):
    """An engine cannot be set up as configured (no server URL, no context length, ...)."""


# The paper's sampling (Nguyen et al. 2024: T=1.0, top_p=0.9): a request's and a stage's default.
TEMPERATURE, TOP_P = 1.0, 0.9


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """The engine settings a verb takes as options (`bft generate`, `bft eval`): each default is written
    here once, and `for_engine` makes the EngineConfig. run_only: how a stage runs, not what it writes
    (bft generate's product config leaves them out)."""

    tokenizer: str | None = option(None, "tokenizer of the model, if not the --model folder")
    base_url: str | None = option(None, "openai engine: the server, e.g. http://localhost:8000/v1", run_only=True)
    api: str = option("completions", "openai engine endpoint", choices=["completions", "chat"])
    server: str = option("auto", "openai engine: the kind of server, which decides the request fields sent: vllm "
                         "(its extensions: add_special_tokens, continue_final_message, 20 logprobs), openai "
                         "(OpenAI's or Azure's API: documented fields only, max_completion_tokens on chat, 5 "
                         "completion logprobs), generic (documented fields only); auto: from --base-url and "
                         "GET /models", choices=list(SERVERS), run_only=True)
    batch_size: int = option(16, "hf engine: prompts per generate call", run_only=True)
    max_model_len: int | None = option(None, "context length (default: the model's)")
    concurrency: int = option(256, "openai engine: requests in flight (256: vLLM's default max_num_seqs, so "
                              "a vllm serve batch is full; raise it with the server's --max-num-seqs)", run_only=True)
    request_timeout: float = option(600.0, "openai engine: seconds one HTTP request may take, as a whole",
                                    run_only=True)
    max_retries: int = option(8, "openai engine: retries of a request that failed for a transient reason "
                              "(429, 5xx, timeout, connection); the server's Retry-After, retry-after-ms and "
                              "x-ratelimit-reset-* are honoured", run_only=True)
    max_retry_time: float = option(900.0, "openai engine: seconds after a request's first try past which it is "
                                   "not retried again (a rate-limit window may be minutes)", run_only=True)
    tensor_parallel_size: int = option(1, "vllm engine: GPUs per model", run_only=True)
    gpu_memory_utilization: float = option(0.9, "vllm engine: share of GPU memory to take", run_only=True)
    dtype: str = option("auto", "vllm and hf engines: weights' dtype", choices=list(DTYPES))

    def for_engine(self, engine: str, model: str, **settings) -> "EngineConfig":
        """The EngineConfig of `engine` running `model` with these options; `settings`: EngineConfig's
        own fields (seed, offline, api_key_env)."""
        return EngineConfig(engine, model, **{f.name: getattr(self, f.name) for f in fields(EngineOptions)},
                            **settings)


@dataclass(frozen=True)
class EngineConfig(EngineOptions):
    """Which engine runs which model, and its settings (EngineOptions, by keyword). Options an engine
    does not use are ignored."""

    engine: str                          # vllm | openai | hf
    model: str                           # model folder or hub id (openai: the served model name)
    seed: int = 0                        # vllm: the engine's seed (requests carry their own)
    api_key_env: str = "OPENAI_API_KEY"  # openai: the environment variable holding the key
    offline: bool = False                # openai: no server, batch files only (`vllm run-batch`; server vllm)

    def check(self) -> None:
        """Raise EngineError for a setting that cannot work, before anything is loaded."""
        if self.engine not in ENGINES:
            raise EngineError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.dtype not in DTYPES:
            raise EngineError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.engine == "openai":
            if not self.base_url and not self.offline:
                raise EngineError("--engine openai needs --base-url (e.g. http://localhost:8000/v1)")
            if self.api not in ("completions", "chat"):
                raise EngineError(f"--api {self.api!r}: expected completions or chat")
            if self.server not in SERVERS:
                raise EngineError(f"--server {self.server!r}: expected one of {', '.join(SERVERS)}")
        if self.request_timeout <= 0 or self.max_retries < 0 or self.max_retry_time < 0:
            raise EngineError("--request-timeout must be > 0, --max-retries and --max-retry-time >= 0")


@dataclass
class Request:
    prompt: str                      # the full prompt text (chat template already applied)
    messages: list[dict]             # the same prompt as chat messages (for chat endpoints); a last
                                     # assistant message is a prefill the model continues
    max_new_tokens: int
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    digit_probs: bool = False        # logprob mode: only the next-token probabilities of "1".."5"
    prompt_tokens: int | None = None # the prompt's length as counted when it was fitted (None: not counted)


@dataclass
class Completion:
    text: str
    prompt_tokens: int | None
    output_tokens: int | None
    finish_reason: str               # "stop" | "length" | "error"
    error: str | None = None
    digit_probs: dict[str, float] | None = None
    refusal: str | None = None       # with finish_reason "error": the final outcome's category
                                     # (schemas.outcomes.REFUSALS); None: a transient failure
    served_model: str | None = None  # the model the server says answered, where it says
    stopped: bool | None = False     # whether the output ended at one of the request's stop strings,
                                     # which servers leave out of the text: None where the engine cannot
                                     # tell (a finish_reason "stop" from a server that names no stop
                                     # reason: a stop string or the model's own end of sequence)


# The sampling fields a model's generation_config.json may set that our requests do not: `vllm serve`
# fills a request's omitted fields from it (vLLM's ModelConfig.get_diff_sampling_param), so every
# engine applies the same values, and a stage samples the same way on each path.
MODEL_SAMPLING_FIELDS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "top_k", "min_p")


def model_sampling_defaults(model: str) -> dict:
    """{field: value} of MODEL_SAMPLING_FIELDS that the model folder's generation_config.json sets to a
    non-default value ({} without one), as vLLM reads it (`GenerationConfig.to_diff_dict`)."""
    from transformers import GenerationConfig

    try:
        diff = GenerationConfig.from_pretrained(model).to_diff_dict()
    except (OSError, ValueError):  # no generation_config.json (or a hub id without network)
        return {}
    return {k: diff[k] for k in MODEL_SAMPLING_FIELDS if diff.get(k) is not None}


def failed(error: str, prompt_tokens: int | None = None, refusal: str | None = None) -> Completion:
    """The completion of a request that produced no usable output; `error` says why. `refusal`: the
    category of a FINAL outcome (a resend would not change it); None for a transient failure."""
    return Completion("", prompt_tokens, None, "error", error=error, refusal=refusal)


def finished(text: str, prompt_tokens: int | None, output_tokens: int | None, reason: str | None) -> Completion:
    """A completion from a server's finish reason. Only "stop" and "length" are outputs; every other
    reason is an error row naming it, never an answer: content_filter (OpenAI, Azure, hosted vLLM
    gateways) is final, a refusal of this prompt; the others (vLLM's abort and error, none at all,
    anything unknown) are transient."""
    if reason in ("stop", "length"):
        return Completion(text, prompt_tokens, output_tokens, reason)
    return Completion(text, prompt_tokens, output_tokens, "error", error=f"finish_reason {reason}",
                      refusal=CONTENT_FILTER if reason == CONTENT_FILTER else None)


class Engine(ABC):
    """A loaded text generator.

    `tokenizer`: a Hugging Face tokenizer of the served model (chat templates, prompt cutting, token
    counts), or None where the engine needs none (openai chat API without --tokenizer).
    `max_model_len`: the context length. `whole_shard`: the batching hint of the default `stream`: True
    when the engine schedules best with every request of a shard in one `generate` call, False when
    the runner should send chunks (progress, bounded memory). `continuous`: True when the engine's own
    `stream` keeps its slots full (a freed slot takes the next item at once, each answer is emitted as
    soon as it is done) and an answer depends on its request alone (a per-request seed), not on the
    requests it was sent beside: the runner then sends all of a worker's pending shards through one
    `stream`, so that the slots do not drain at a shard boundary (openai, vllm). False: one `stream`
    per shard (hf, whose batch seed and padding shape a row).
    """

    name: str
    model: str
    tokenizer: object | None
    max_model_len: int
    whole_shard: bool = False
    continuous: bool = False

    @abstractmethod
    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions for `requests`, in order. A request that fails becomes a Completion with
        finish_reason "error" and the error text; only a failure of the whole engine raises."""

    def generate_through_stream(self, requests: list[Request]) -> list[Completion]:
        """`generate` of an engine whose `stream` is its real dispatch (openai, vllm): the answers of
        one stream, in request order."""
        out: list[Completion | None] = [None] * len(requests)

        def emit(i, comp):
            out[i] = comp
        self.stream(enumerate(requests), emit)
        return out  # type: ignore[return-value]

    def stream(self, items: Iterable[tuple[Any, Request]], emit: Callable[[Any, Completion], None],
               chunk: int = 512) -> None:
        """Every (key, request) of `items` answered, `emit(key, completion)` called as each is done
        (in any order). `items` may be a generator that prepares requests lazily. This default sends
        `chunk` requests per `generate` call, or all of them for an engine that schedules a whole
        shard itself (`whole_shard`); an engine that can keep a server busy overrides it with a
        stream (openai)."""
        batch: list[tuple[Any, Request]] = []
        for item in items:
            batch.append(item)
            if len(batch) >= chunk and not self.whole_shard:
                self._emit_all(batch, emit)
                batch = []
        if batch:
            self._emit_all(batch, emit)

    def _emit_all(self, batch: list[tuple[Any, Request]], emit) -> None:
        for (key, _), comp in zip(batch, self.generate([r for _, r in batch])):
            emit(key, comp)

    def logprob_problem(self) -> str | None:
        """Why the logprob score mode (the next token's probabilities after a prompt that ends at
        "Score:") cannot run on this engine, or None when it can. In-process engines always can."""
        return None

    def close(self) -> None:
        """Release what the engine holds (model weights, GPU memory, connections). Idempotent."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def digit_token_ids(tokenizer) -> dict[str, list[int]]:
    """Token ids that spell each score digit where the prompt stops ("5", "▁5", "Ġ5" ...)."""
    out: dict[str, list[int]] = {}
    vocab = tokenizer.get_vocab()
    for d in SCORE_DIGITS:
        ids = {vocab[t] for t in (d, "▁" + d, "Ġ" + d, " " + d) if t in vocab}
        out[d] = sorted(ids)
    return out


def model_context_length(config, default: int = 4096) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default
