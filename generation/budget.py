"""Which `bft prepare --max-tokens` keeps every stage's document whole for a given context length.

A stage that puts the document in its prompt (backtranslate, score, rewrite, rate) cuts it when the
rendered prompt exceeds `context - the stage's new-token cap` (generation.prompting.fit_prompt). The
prompt around the document is the template text, the chat format and, for the stages that quote the
backtranslated instruction, that instruction. So a document stays whole in stage S when

    document tokens <= context - cap(S) - overhead(S)

and `--max-tokens` at the minimum over the stages keeps it whole everywhere (the limit of a stage is
measured with the model's own tokenizer and an instruction of `instruction_tokens` tokens).

    python -m generation.budget --tokenizer MODEL_OR_FOLDER --context 4096 [--instruction-tokens 200]
"""
from __future__ import annotations

import argparse

from generation.prompting import n_tokens, render
from generation.stages import STAGES
from generation.templates import Template, load_template


def placeholder_instruction(tokens: int) -> str:
    """A text of about `tokens` tokens (one repeated word)."""
    return " ".join(["word"] * tokens) if tokens else "?"


def prompt_overhead(tokenizer, stage: str, template: str | None = None, instruction: str = "") -> int:
    """Tokens of `stage`'s rendered prompt around an empty document: the template's text (its default,
    or the `template` file), the chat format, and `instruction` for the stages that quote it."""
    system, user = load_template(stage, template).fill(**STAGES[stage].prompt("", instruction))
    return n_tokens(tokenizer, render(tokenizer, system, user))


def shared_prefix_tokens(tokenizer, stage: str, template: str | Template | None = None) -> int | None:
    """Tokens every prompt of `stage` begins with, which a server's prefix cache (vLLM's automatic
    prefix caching, on in our vllm engine) computes once for all the stage's requests: the common
    prefix of the token ids of the stage's prompt rendered with two sets of values that differ from
    their first character (so a token the fixed text shares with the value's start is not counted).
    None without a tokenizer. A server caches in blocks (vLLM: 16 tokens), so it reuses up to a block
    less."""
    if tokenizer is None:
        return None
    spec = STAGES[stage]
    tpl = template if isinstance(template, Template) else load_template(stage, template)
    records = (("A document.", "An instruction?"), ("Zebra text.", "Zebra question?"))
    ids = [tokenizer(render(tokenizer, *tpl.fill(**spec.prompt(doc, instruction))), add_special_tokens=False)
           ["input_ids"] for doc, instruction in records]
    return next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))


def prefix_share(prefix_tokens: int | None, requests: float, prompt_tokens: float) -> float | None:
    """The share of `prompt_tokens` (of `requests` prompts) that their shared prefix accounts for."""
    if prefix_tokens is None or not prompt_tokens:
        return None
    return round(min(1.0, prefix_tokens * requests / prompt_tokens), 4)


def token_figures(layout, stage: str) -> dict:
    """What the stage's written shards (their markers) paid per row: {"output_tokens_per_row": output
    tokens per row sent (rows not sent are not counted), "prefix_share": the share of their prompt
    tokens in the prefix every prompt shares (`prefix_tokens`, which the runner records), or None
    where no shard says}. What `bft plan` and the night's summary show."""
    import json

    import storage

    rows = out = prefix_rows = prompt = 0
    prefix = None
    for k, n, _ in layout.candidate_shards():
        marker = layout.generation_metrics(stage, k, n)
        if not storage.exists(marker):
            continue
        m = json.loads(storage.read_text(marker))
        sent = m["rows"] - (m.get("finish_reasons") or {}).get("not_sent", 0)
        rows, out = rows + sent, out + (m.get("output_tokens") or 0)
        if m.get("prefix_tokens") is not None:
            prefix = (prefix or 0) + m["prefix_tokens"] * sent
            prefix_rows, prompt = prefix_rows + sent, prompt + (m.get("prompt_tokens") or 0)
    return {"output_tokens_per_row": round(out / rows, 1) if rows else None,
            "prefix_share": prefix_share(prefix, 1, prompt) if prefix_rows else None}


def max_document_tokens(context: int, cap: int, overhead: int) -> int:
    """The most document tokens a prompt of `overhead` tokens holds whole with `cap` new tokens."""
    return context - cap - overhead - 1


def document_limits(tokenizer, context: int, instruction_tokens: int = 200) -> dict[str, dict]:
    """{stage: {"cap", "overhead", "max_document_tokens"}} for each stage whose prompt holds the
    document, with the stages' default new-token caps and templates."""
    out = {}
    instruction = placeholder_instruction(instruction_tokens)
    for name, spec in STAGES.items():
        if not spec.doc_field:
            continue
        overhead = prompt_overhead(tokenizer, name, None, instruction)
        out[name] = {"cap": spec.max_new_tokens, "overhead": overhead,
                     "max_document_tokens": max_document_tokens(context, spec.max_new_tokens, overhead)}
    return out


def whole_document_limit(tokenizer, context: int, instruction_tokens: int = 200) -> int:
    """The largest `--max-tokens` that keeps every stage's document whole."""
    return min(v["max_document_tokens"] for v in document_limits(tokenizer, context, instruction_tokens).values())


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(prog="python -m generation.budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="the generation models' tokenizer (hub id or folder)")
    p.add_argument("--context", type=int, required=True, help="the models' context length (--max-model-len)")
    p.add_argument("--instruction-tokens", type=int, default=200,
                   help="room for the backtranslated instruction (assemble drops instructions over 800 chars)")
    args = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    limits = document_limits(tok, args.context, args.instruction_tokens)
    for stage, v in limits.items():
        print(f"{stage:<14} cap {v['cap']:>5}  prompt overhead {v['overhead']:>4}  whole up to "
              f"{v['max_document_tokens']} document tokens")
    print(f"bft prepare --max-tokens {min(v['max_document_tokens'] for v in limits.values())} keeps every "
          f"stage whole at context {args.context}")


if __name__ == "__main__":
    main()
