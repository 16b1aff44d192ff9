"""Training examples for the three roles, tokenized with the loss on the target tokens only.

    backward  user: the backward prompt (Nguyen et al. 2024 App. A.2) around the response   ->  assistant: the instruction
    forward   user: the instruction                           ->  assistant: the response
    sft       the corpus's `messages` (data-source tag as system message, user, assistant)

Prompts are rendered exactly as generation renders them (the model's chat template with the
generation prompt, or the Llama-2 format; tests check this against `generation.prompting.render`) and tokenized piece by piece, prompt apart from target, the way
an engine tokenizes a prompt and then generates: so the model learns the very token sequence it will
see at generation time. Every assistant turn is a target and ends with the EOS token; everything else
is masked (label -100).
"""
from __future__ import annotations

import json
import os

from schemas.errors import UserError
import storage
from generation.prompting import render
from generation.templates import DEFAULTS

ROLES = ("backward", "forward", "sft")
IGNORE = -100


class DataError(UserError):
    pass


def conversation(role: str, row: dict) -> list[dict]:
    """The chat messages one row trains on."""
    if role == "backward":
        system, user = DEFAULTS["backtranslate"].fill(response=row["response"])
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": row["instruction"]}]
    if role == "forward":
        return [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["response"]}]
    if role == "sft":
        msgs = row.get("messages")
        if not msgs:
            msgs = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["response"]}]
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    raise DataError(f"unknown role {role!r}; expected one of {ROLES}")


def segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_target) pieces whose concatenation is the rendered conversation."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("a training conversation needs an assistant turn")
    if not getattr(tokenizer, "chat_template", None):
        # the BOS and Llama-2 format of models without a template: one turn, as generation renders it
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        user = next(m["content"] for m in messages if m["role"] == "user")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        return [(render(tokenizer, system, user), False), (" " + answer.strip(), True)]
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError("the chat template does not render a conversation as a prefix of its continuation; "
                            "the prompt/target split cannot be made")
        pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return pieces


def encode(tokenizer, messages: list[dict]) -> dict:
    """input_ids and labels (-100 on prompt tokens); each target ends with EOS."""
    ids, labels = [], []
    eos = tokenizer.eos_token_id
    for text, target in segments(tokenizer, messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if target and (not piece or piece[-1] != eos):
            piece = piece + [eos]
        ids += piece
        labels += piece if target else [IGNORE] * len(piece)
    return {"input_ids": ids, "labels": labels}


def load_rows(path: str) -> tuple[list[dict], list[dict], str]:
    """(train rows, validation rows, description) from a release (folder, ROOT/sft or run root:
    validated first, as a training team does), a Parquet file, or JSON lines."""
    from lifecycle import release

    if release.is_release(path):
        # through the release protocol: validated against the manifest, each file read once
        manifest, splits = release.load(path)
        return (splits["train"].to_pylist(), splits["validation"].to_pylist(),
                f"release {manifest['version']} ({release.resolve(path)})")
    if storage.is_records_file(path):
        try:
            rows = storage.read_records(path).to_pylist()
        except ValueError as e:
            raise DataError(str(e)) from e
    elif path.endswith(".json"):
        rows = json.loads(storage.read_text(path))
    else:
        raise DataError(f"{path}: not a release, .parquet or JSON lines file")
    for i, r in enumerate(rows):
        if not (r.get("messages") or (r.get("instruction") and r.get("response"))):
            raise DataError(f"{path}: row {i} has neither messages nor instruction and response")
    return rows, [], os.path.basename(path)


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation) of seed pairs: a pair is held out when its key (its id, else its
    instruction) is below `fraction` of the key space, as a release's validation split is drawn; the
    pair of smallest key always is, so that a small seed still has one."""
    from schemas.keys import validation_key

    keys = [validation_key(str(r.get("id") or r.get("instruction") or r.get("messages")), seed) for r in rows]
    limit = int(fraction * 2**64)
    first = min(range(len(rows)), key=keys.__getitem__) if len(rows) > 1 else None
    held = [k < limit or i == first for i, k in enumerate(keys)]
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


SYSTEM_PROBE = "bft probe: the system turn"


def check_system_turn(tokenizer) -> None:
    """DataError when the tokenizer's chat template drops (or refuses) a system message: the seed/web
    tags are system prompts (Humpback, section 2.3) and the backward model's instruction is one, so
    training on such a template would silently lose them. A probe conversation is rendered once."""
    if not getattr(tokenizer, "chat_template", None):
        return  # the Llama-2 format writes the system prompt itself
    probe = [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as e:  # a template that raises on a system role (jinja's TemplateError, ...)
        text, why = "", f"refuses it ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    else:
        why = "drops it"
    if SYSTEM_PROBE not in text:
        raise DataError(f"the base model's chat template {why}: the system turn holds the seed/web tags and the "
                        "backward model's instruction, which training would lose; fine-tune a base whose template "
                        "renders system messages (e.g. Llama-2's: set chat_template in its tokenizer_config.json), "
                        "or assemble the release with --no-tags")


def build_dataset(tokenizer, role: str, rows: list[dict], max_length: int):
    """A `datasets.Dataset` of input_ids/labels/length; rows over max_length are left out (counted),
    since cutting them would cut the target and its EOS."""
    import datasets

    conversations = [conversation(role, row) for row in rows]
    if any(m["role"] == "system" for c in conversations for m in c):
        check_system_turn(tokenizer)
    encoded, too_long = [], 0
    for conv in conversations:
        ex = encode(tokenizer, conv)
        if len(ex["input_ids"]) > max_length:
            too_long += 1
            continue
        if not any(label != IGNORE for label in ex["labels"]):
            continue
        ex["length"] = len(ex["input_ids"])
        encoded.append(ex)
    if not encoded:
        raise DataError(f"no {role} example fits in {max_length} tokens ({too_long} too long, {len(rows)} rows)")
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "length": datasets.Value("int32")})
    return datasets.Dataset.from_list(encoded, features=features), too_long


class PadCollator:
    """Right-pads a batch; labels padded with -100. Counts the real (non-pad) tokens it serves."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
            self.tokens += n
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

