"""Rows -> rendered prompts that fit the model: chat template (or Llama-2 format), the score prefill
of the logprob mode, and cutting the document part when the prompt would not fit the budget
(`max_model_len - max_new_tokens`).

With a tokenizer, lengths are counted in tokens, exactly. Without one (the openai engine's chat API
with no --tokenizer: the server applies its own template), lengths are bounded in UTF-8 bytes: every
token of a byte-level BPE or a byte-fallback sentencepiece covers at least one byte of the text,
except the "▁" a sentencepiece prepends to a text (one per message), so a message of B bytes is at
most B + 1 tokens. The template the server wraps around the messages (role headers, BOS, a default
system prompt) is not known here; CHAT_TEMPLATE_RESERVE tokens are kept for it. Documents are then cut
so that bytes + one per message + the reserve fit the budget: safe for those tokenizers, and about
4x stricter than needed on English text. So where the server counts for us (vLLM's /tokenize: the
engine's `count_messages`), a prompt over that bound is counted exactly by the server, and cut only
when the count is over the budget. A server that still finds the prompt too long answers 400, which
becomes an error row.
"""
from __future__ import annotations

import json

from generation.templates import Template, llama2_format, messages

SCORE_PREFIX = "Score:"
CHAT_TEMPLATE_RESERVE = 128


def bos_text(tokenizer) -> str:
    """The BOS text a prompt without a chat template starts with: the tokenizer's BOS token when the
    tokenizer itself puts one first (Llama-2's `add_bos_token`, a "<s> $A" post-processor), as
    meta-llama's generation.py encodes a dialog with `bos=True`; "" for a tokenizer that adds none (or
    no tokenizer). Prompts are tokenized without special tokens everywhere (generation and training),
    so this text is the one BOS the model sees."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ""
    cached = getattr(tokenizer, "_bft_bos_text", None)
    if cached is None:
        cached = bos if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else ""
        try:
            tokenizer._bft_bos_text = cached
        except AttributeError:
            pass
    return cached


def fallback_format(tokenizer) -> str | None:
    """What a tokenizer without a chat template falls back to, in words (None when it has one)."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None):
        return None
    bos = bos_text(tokenizer)
    return ("the Llama-2 chat format ([INST] <<SYS>> ... <</SYS>> ... [/INST], meta-llama's generation.py)"
            + (f" after the BOS token {bos!r}" if bos else ", no BOS (the tokenizer adds none)"))


def render(tokenizer, system: str | None, user: str, assistant_prefix: str = "") -> str:
    """The prompt text: the model's own chat template when it has one (it writes the BOS), else the
    tokenizer's BOS text and the Llama-2 format; `assistant_prefix` is written as the start of the
    assistant's turn (the template's own spacing)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = messages(system, user)
        if assistant_prefix:
            return tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": assistant_prefix}],
                                                 tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return bos_text(tokenizer) + llama2_format(system, user) + (" " + assistant_prefix if assistant_prefix else "")


def score_prompt(tokenizer, system: str | None, user: str) -> tuple[str, str]:
    """(prompt, prefill) of the logprob score mode: the prompt ends exactly where the digit token
    begins in the model's own tokenization of the assistant turn "Score: 5", so the next token is the
    digit ("Score", ":", "▁", "5" in Llama-2's sentencepiece ends the prompt after the space; a
    tokenizer with a " 5" token ends it after the colon). `prefill` is the assistant turn's text up to
    there, for chat endpoints that continue a final assistant message."""
    full = render(tokenizer, system, user, SCORE_PREFIX + " 5")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    digit = len(full) - 1
    start = next(s for s, e in reversed(enc["offset_mapping"]) if s <= digit < e)
    content = full.rindex(SCORE_PREFIX + " 5")
    return full[:start], full[content:start]


def n_tokens(tokenizer, text: str) -> int | None:
    """Tokens of `text` without special tokens added; None without a tokenizer."""
    if tokenizer is None:
        return None
    backend = fast_backend(tokenizer)
    if backend is None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(backend.encode_batch_fast([text], add_special_tokens=False)[0])


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """len(ids) for each row of tokenizer(texts, add_special_tokens=False)["input_ids"], in one batch:
    by the Rust tokenizer's `encode_batch_fast` where `fast_backend` gives it, else by the call."""
    backend = fast_backend(tokenizer)
    if backend is None:
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return [len(e) for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]


_CALL_PATH = ("__call__", "_call_one", "encode_plus", "batch_encode_plus", "_encode_plus", "_batch_encode_plus")


def fast_backend(tokenizer):
    """The Rust tokenizer whose `encode_batch_fast` gives the ids of `tokenizer(text,
    add_special_tokens=False)` (without offsets, a third faster), or None. A fast tokenizer's call is
    that Rust tokenizer's `encode_batch` after setting no truncation, no padding and
    `encode_special_tokens` to its `split_special_tokens` (transformers 5.x
    `TokenizersBackend._encode_plus`; 4.x `PreTrainedTokenizerFast._batch_encode_plus`), then a
    conversion of every encoding to Python lists. So only for an instance of that class whose call
    path no subclass overrides (CodeLlama's reads "<FILL_ME>" itself), and whose Rust tokenizer is in
    that state already (a call sets it; one left with truncation, padding or other special-token
    splitting is counted by the call)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    base = _fast_class()
    if backend is None or base is None or not isinstance(tokenizer, base) or not hasattr(backend, "encode_batch_fast"):
        return None
    cls = type(tokenizer)
    if any(hasattr(base, name) and getattr(cls, name, None) is not getattr(base, name) for name in _CALL_PATH):
        return None
    if (backend.truncation is not None or backend.padding is not None
            or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False))):
        return None
    return backend


def _fast_class():
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
        return TokenizersBackend
    except ImportError:
        try:
            from transformers import PreTrainedTokenizerFast
            return PreTrainedTokenizerFast
        except ImportError:
            return None


def prompt_bound(tokenizer, prompt: str, msgs: list[dict]) -> int:
    """The prompt's length in tokens, or without a tokenizer its upper bound (module docstring)."""
    if tokenizer is not None:
        return n_tokens(tokenizer, prompt)
    return sum(len(m["content"].encode("utf-8", "surrogatepass")) + 1 for m in msgs) + CHAT_TEMPLATE_RESERVE


def _build(tokenizer, template: Template, values: dict[str, str], assistant_prefix: str) -> tuple[str, list[dict]]:
    system, user = template.fill(**values)
    msgs = messages(system, user)
    if not assistant_prefix:
        return render(tokenizer, system, user), msgs
    if tokenizer is None:
        return llama2_format(system, user) + " " + assistant_prefix, msgs + [
            {"role": "assistant", "content": assistant_prefix}]
    prompt, prefill = score_prompt(tokenizer, system, user)
    return prompt, msgs + [{"role": "assistant", "content": prefill}]


# A prompt of B UTF-8 bytes has at most B + BYTE_SLACK tokens under a `byte_bounded` tokenizer.
BYTE_SLACK = 2
_SPLITS = ("ByteLevel", "Metaspace", "Split", "Digits", "Whitespace", "WhitespaceSplit", "Punctuation")


def byte_bounded(tokenizer) -> bool:
    """Whether no text has more tokens (special tokens not added) than its UTF-8 bytes + BYTE_SLACK,
    so that a prompt that short in bytes fits without being tokenized. True for a fast tokenizer
    whose model is BPE and whose normalizer only prepends "▁" and/or replaces " " with "▁" (or is
    absent), with pre-tokenizers that only split or map bytes (ByteLevel, Metaspace, Split, ...):
    Llama-2's structure, Llama-3's, Qwen's, tekken. Why: a BPE token is a vocabulary piece of at
    least one character, or (byte fallback) one byte of a character; ByteLevel turns each byte into
    one character; " " -> "▁" keeps one character per space (and "▁" must be in the vocabulary, or
    its byte fallback would take 3 tokens); Prepend, Metaspace's prefix and ByteLevel's prefix space
    add at most one character. A normalizer that can lengthen text (NFKC: "ﷺ" is 1 character, 18
    after) or any other model makes this False, and every prompt is counted."""
    cached = getattr(tokenizer, "_bft_byte_bounded", None)
    if cached is not None:
        return cached
    ok = False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model, norm, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")

        def steps(node, key):
            if node is None:
                return []
            return [x for n in node.get(key, []) for x in steps(n, key)] if node.get("type") == "Sequence" else [node]

        norms, pres = steps(norm, "normalizers"), steps(pre, "pretokenizers")
        space_ok = all(n["type"] == "Prepend" and n.get("prepend") == "▁"
                       or n["type"] == "Replace" and n.get("pattern") == {"String": " "} and n.get("content") == "▁"
                       for n in norms)
        needs_meta = any(n["type"] == "Replace" for n in norms) or any(p["type"] == "Metaspace" for p in pres)
        prefixes = sum(n["type"] == "Prepend" for n in norms) + sum(
            p["type"] == "Metaspace" or p["type"] == "ByteLevel" and p.get("add_prefix_space") for p in pres)
        ok = (model.get("type") == "BPE" and space_ok and all(p["type"] in _SPLITS for p in pres)
              and (not needs_meta or "▁" in (model.get("vocab") or {})) and prefixes < BYTE_SLACK)
    try:
        tokenizer._bft_byte_bounded = ok
    except AttributeError:
        pass
    return ok


def fit_prompt(tokenizer, template: Template, values: dict[str, str], doc_field: str | None, budget: int,
               assistant_prefix: str = "") -> tuple[str, list[dict], bool]:
    """(prompt, messages, truncated): the document value is cut at its end until the prompt has at
    most `budget` tokens (by the byte bound when `tokenizer` is None). A non-empty `assistant_prefix`
    asks for the logprob score prompt (`score_prompt`; the messages end with the prefill). Never
    raises for length; a template that cannot fit even with an empty document is returned as it is
    and the engine reports the overflow."""
    return fit_prompts(tokenizer, template, [values], doc_field, budget, assistant_prefix)[0][:3]


def fit_prompts(tokenizer, template: Template, values: list[dict[str, str]], doc_field: str | None, budget: int,
                assistant_prefix: str = "", count=None) -> list[tuple[str, list[dict], bool, int | None]]:
    """`fit_prompt` of many rows, plus each prompt's length in tokens (None when it was not counted).
    A prompt whose UTF-8 bytes already prove it fits (`byte_bounded`) is not tokenized at all; the
    others are counted in one batched tokenizer call, and only those over the budget take the
    cutting path, one by one. The prompts are the same as `fit_prompt`'s row by row.

    Without a tokenizer, `count` (the engine's `count_messages`: the server's own count of chat
    messages, e.g. vLLM's /tokenize) replaces the byte bound for the prompts the bound would cut: a
    document that fits is then never cut, and one that does not is cut to fit by the server's count.
    `count` returning None (the server could not count) falls back to the byte bound."""
    built = [_build(tokenizer, template, v, assistant_prefix) for v in values]
    totals: list[int | None]
    if tokenizer is None and count is not None:
        return _fit_counted(template, values, doc_field, budget, assistant_prefix, count, built)
    if tokenizer is None:
        totals = [prompt_bound(None, p, m) for p, m in built]
    else:
        totals = [None] * len(built)
        if byte_bounded(tokenizer):
            count = [i for i, (p, _) in enumerate(built) if len(p.encode("utf-8", "surrogatepass")) + BYTE_SLACK > budget]
        else:
            count = range(len(built))
        if count:
            for i, n in zip(count, token_counts(tokenizer, [built[i][0] for i in count])):
                totals[i] = n
    out = []
    for v, (prompt, msgs), total in zip(values, built, totals):
        if total is None or total <= budget or not doc_field or not v.get(doc_field):
            out.append((prompt, msgs, False, total if tokenizer is not None else None))
        else:
            prompt, msgs = _cut(tokenizer, template, v, doc_field, budget, assistant_prefix, total)
            out.append((prompt, msgs, True, n_tokens(tokenizer, prompt)))
    return out


def _fit_counted(template: Template, values: list[dict[str, str]], doc_field: str | None, budget: int,
                 assistant_prefix: str, count, built) -> list[tuple[str, list[dict], bool, int | None]]:
    """fit_prompts without a tokenizer, with the server's counts (see fit_prompts)."""
    bounds = [prompt_bound(None, p, m) for p, m in built]
    over = [i for i, b in enumerate(bounds) if b > budget]
    exact = count([built[i][1] for i in over]) if over else []
    if exact is None:  # the server could not count: the byte bound decides
        exact = list(bounds[i] for i in over)
        counted = False
    else:
        counted = True
    out = [(p, m, False, None) for p, m in built]
    for i, total in zip(over, exact):
        v = values[i]
        if total <= budget or not doc_field or not v.get(doc_field):
            out[i] = (*built[i], False, total if counted else None)
            continue
        if not counted:
            prompt, msgs = _cut(None, template, v, doc_field, budget, assistant_prefix, total)
            out[i] = (prompt, msgs, True, None)
            continue
        out[i] = _cut_counted(template, v, doc_field, budget, assistant_prefix, total, count)
    return out


def _cut_counted(template: Template, values: dict[str, str], doc_field: str, budget: int, assistant_prefix: str,
                 total: int, count) -> tuple[str, list[dict], bool, int | None]:
    """The document cut (at its end, by bytes) until the server counts the prompt within `budget`."""
    doc = values[doc_field].encode()
    empty = _build(None, template, dict(values, **{doc_field: ""}), assistant_prefix)
    base = (count([empty[1]]) or [0])[0]
    doc_tokens = max(1, total - base)
    keep = int(len(doc) * max(0, budget - base) / doc_tokens)
    for _ in range(6):  # the bytes per token of the kept part differ a little from the whole's
        prompt, msgs = _build(None, template, dict(values, **{doc_field: doc[:keep].decode(errors="ignore")}),
                              assistant_prefix)
        n = count([msgs])
        if n is None:
            return prompt, msgs, True, None
        if n[0] <= budget or keep == 0:
            return prompt, msgs, True, n[0]
        keep = max(0, keep - int((n[0] - budget) * len(doc) / doc_tokens) - 8)
    return prompt, msgs, True, n[0]


def _cut(tokenizer, template: Template, values: dict[str, str], doc_field: str, budget: int, assistant_prefix: str,
         total: int) -> tuple[str, list[dict]]:
    """The prompt with the document cut at its end so that it fits `budget` (`total`: its length now)."""
    if tokenizer is None:
        doc = values[doc_field].encode()
        keep = max(0, len(doc) - (total - budget))
        cut = dict(values, **{doc_field: doc[:keep].decode(errors="ignore")})  # never half a character
        return _build(None, template, cut, assistant_prefix)
    doc_ids = tokenizer(values[doc_field], add_special_tokens=False)["input_ids"]
    keep = max(0, len(doc_ids) - (total - budget))
    for _ in range(4):  # re-tokenization at the cut can shift a token or two
        cut = dict(values, **{doc_field: tokenizer.decode(doc_ids[:keep], skip_special_tokens=True)})
        prompt, msgs = _build(tokenizer, template, cut, assistant_prefix)
        over = n_tokens(tokenizer, prompt) - budget
        if over <= 0:
            break
        keep = max(0, keep - over - 2)
    return prompt, msgs
