"""Tiny tokenizers (and models) built offline from text, for tests, the demo and benchmarks.

Nothing here downloads anything: a tokenizer is trained with `tokenizers` on the text it is given.
The byte-fallback BPE mirrors Llama-2's sentencepiece model (pieces start with "▁", bytes <0x00>..<0xFF>
are ordinary vocabulary entries, <unk>/<s>/</s> are the special tokens).
"""
from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def train_byte_fallback_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A Llama-style byte-fallback BPE (Metaspace, split on "▁") trained on `texts`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    n_learned = max(vocab_size - len(SPECIAL_TOKENS) - len(BYTE_TOKENS), 64)
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned + len(SPECIAL_TOKENS), special_tokens=SPECIAL_TOKENS,
        limit_alphabet=200, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Put the 256 byte pieces into the model's vocabulary (as sentencepiece does) right after the
    # special tokens, so that byte fallback has every byte and no literal "<0x41>" text is special.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    learned = sorted((i, t) for t, i in vocab.items() if t not in SPECIAL_TOKENS)
    new_vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for _, t in learned:
        if t not in new_vocab:
            new_vocab[t] = len(new_vocab)
    spec["model"]["vocab"] = new_vocab
    for added in spec["added_tokens"]:
        added["id"] = new_vocab[added["content"]]
    return Tokenizer.from_str(json.dumps(spec))


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on `texts` (a second tokenizer family for tests)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def make_tiny_llama(folder: str, tokenizer: Tokenizer, chat_template: bool = True, hidden_size: int = 64,
                    layers: int = 2, context: int = 2048, seed: int = 0, mean_output_tokens: int = 16) -> str:
    """Saves a randomly initialised Llama-architecture model with `tokenizer` as a standard Hugging
    Face folder (config, safetensors, tokenizer with or without a chat template); returns `folder`.

    A random model almost never emits </s> (p ~ 1/vocab per token), so its outputs would always run to
    the token limit. One residual dimension is made constant (every token embedding has 1.0 there);
    after RMSNorm it carries a steady ~sqrt(hidden) signal that the untied lm_head reads for </s> alone,
    with a weight that makes p(</s>) ~ 1/mean_output_tokens per step: outputs end after about
    `mean_output_tokens` tokens, as a trained model's do."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from generation.templates import LLAMA2_CHAT_TEMPLATE

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", pad_token="<unk>")
    if chat_template:
        hf_tok.chat_template = LLAMA2_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden_size,
                         intermediate_size=hidden_size * 2, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=context, tie_word_embeddings=False,
                         bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                         pad_token_id=hf_tok.pad_token_id)
    model = LlamaForCausalLM(config)
    if mean_output_tokens:
        _calibrate_eos(model, hf_tok.eos_token_id, 1.0 / mean_output_tokens, hidden_size - 1)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def _calibrate_eos(model, eos: int, p_eos: float, d: int) -> None:
    """Makes residual dimension `d` constant and sets lm_head's weight from it to </s> so that the
    mean next-token probability of </s> on fixed random inputs is `p_eos`."""
    import math

    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, d] = model.model.embed_tokens.weight.abs().max() * 4
        model.lm_head.weight[:, d] = 0.0
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=g)
        hidden = model.model(ids).last_hidden_state.reshape(-1, model.config.hidden_size)
        logits = model.lm_head(hidden)
        h_d = hidden[:, d]
        others = torch.logsumexp(torch.cat([logits[:, :eos], logits[:, eos + 1:]], dim=1), dim=1)
        target = math.log(p_eos / (1 - p_eos))
        # per position: logit_eos + w * h_d - others = target; one weight for all: the mean solution
        w = float(((target + others - logits[:, eos]) / h_d).mean())
        model.lm_head.weight[eos, d] = w


def sample_texts(glob_pattern: str, limit: int = 2000) -> list[str]:
    """Texts of the Dolma-layout files matching `glob_pattern`, to train on: the lines bft prepare
    reads as documents (at most 1 MB, a JSON object with a usable id and a non-blank text; the rest
    skipped), read here without bft prepare's parser (training sits beside the Beam passes, not on them)."""
    import orjson

    import storage

    texts: list[str] = []
    for path in storage.glob(glob_pattern):
        for raw in storage.open_lines(path):
            if not raw.strip() or len(raw) > 1 << 20:
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            doc_id, text = record.get("id"), record.get("text")
            if doc_id is None or isinstance(doc_id, (dict, list)) or (isinstance(doc_id, str) and not doc_id.strip()):
                continue
            if isinstance(text, str) and text.strip() and len(text) < 100_000:
                texts.append(text)
                if len(texts) >= limit:
                    return texts
    return texts


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os

    ap = argparse.ArgumentParser(description="Tiny smoke-test models: a byte-fallback BPE trained on Dolma-layout "
                                             "text, and random-weight Llama models using it (nothing downloaded).")
    ap.add_argument("--texts", required=True, help="glob of Dolma JSON-lines files to train the tokenizer on")
    ap.add_argument("--output", required=True, help="folder; gets tokenizer/ and one folder per --model")
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--model", action="append", default=[], metavar="NAME[:plain]",
                    help="a tiny model folder to create (':plain' = no chat template)")
    args = ap.parse_args(argv)
    texts = sample_texts(args.texts)
    if not texts:
        raise SystemExit(f"{args.texts}: no text to train on")
    tok = train_byte_fallback_bpe(texts, args.vocab_size)
    os.makedirs(os.path.join(args.output, "tokenizer"), exist_ok=True)
    tok.save(os.path.join(args.output, "tokenizer", "tokenizer.json"))
    for i, spec in enumerate(args.model):
        name, _, kind = spec.partition(":")
        make_tiny_llama(os.path.join(args.output, name), tok, chat_template=kind != "plain", seed=i)


if __name__ == "__main__":
    main()
