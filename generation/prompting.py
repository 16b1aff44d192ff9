"""Rows -> rendered prompts that fit the model: chat template (or Llama-2 format), and truncation of
the document part when the prompt would not fit `max_model_len - max_new_tokens`."""
from __future__ import annotations

from generation.templates import Template, llama2_format, messages

SCORE_PREFIX = "Score:"


def render(tokenizer, system: str | None, user: str, assistant_prefix: str = "") -> str:
    """The prompt text: the model's own chat template when it has one, else the Llama-2 format."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages(system, user), tokenize=False, add_generation_prompt=True)
    else:
        text = llama2_format(system, user)
    return text + (" " + assistant_prefix if assistant_prefix else "")


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(tokenizer, template: Template, values: dict[str, str], doc_field: str | None, budget: int,
               assistant_prefix: str = "") -> tuple[str, list[dict], bool]:
    """(prompt, messages, truncated): the document value is cut (by tokens, at its end) until the
    rendered prompt has at most `budget` tokens. Never raises for length; a template that cannot fit
    even with an empty document is returned as it is and the engine reports the overflow."""
    system, user = template.fill(**values)
    prompt = render(tokenizer, system, user, assistant_prefix)
    total = n_tokens(tokenizer, prompt)
    if total <= budget or not doc_field or not values.get(doc_field):
        return prompt, messages(system, user), False
    doc_ids = tokenizer(values[doc_field], add_special_tokens=False)["input_ids"]
    keep = max(0, len(doc_ids) - (total - budget))
    for _ in range(4):  # re-tokenization at the cut can shift a token or two
        cut = dict(values, **{doc_field: tokenizer.decode(doc_ids[:keep], skip_special_tokens=True)})
        system, user = template.fill(**cut)
        prompt = render(tokenizer, system, user, assistant_prefix)
        over = n_tokens(tokenizer, prompt) - budget
        if over <= 0:
            break
        keep = max(0, keep - over - 2)
    return prompt, messages(system, user), True
