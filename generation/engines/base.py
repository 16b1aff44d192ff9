"""The engine contract: rendered requests in, completions out, in the same order."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

SCORE_DIGITS = ("1", "2", "3", "4", "5")


@dataclass
class Request:
    prompt: str                      # the full prompt text (chat template already applied)
    messages: list[dict]             # the same prompt as chat messages (for chat endpoints)
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    digit_probs: bool = False        # logprob mode: only the next-token probabilities of "1".."5"


@dataclass
class Completion:
    text: str
    prompt_tokens: int | None
    output_tokens: int | None
    finish_reason: str               # "stop" | "length" | "error"
    error: str | None = None
    digit_probs: dict[str, float] | None = None


class Engine(ABC):
    """A text generator. `tokenizer` is a Hugging Face tokenizer of the served model, used for chat
    templates, prompt truncation and token counts; `max_model_len` is the context length."""

    name: str
    model: str
    tokenizer: object
    max_model_len: int

    @abstractmethod
    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions for `requests`, in order. A request that fails becomes a Completion with
        finish_reason "error" and the error text; only a failure of the whole engine raises."""

    def close(self) -> None:
        pass


def digit_token_ids(tokenizer) -> dict[str, list[int]]:
    """Token ids that spell each score digit right after "Score:" ("5", "▁5", "Ġ5" ...)."""
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
