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


def sample_texts(glob_pattern: str, limit: int = 2000) -> list[str]:
    """Texts of the Dolma-layout files matching `glob_pattern` (bad lines skipped), to train on."""
    import glob
    import gzip

    texts: list[str] = []
    for path in sorted(glob.glob(glob_pattern)):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            for raw in f:
                try:
                    text = json.loads(raw).get("text")
                except (ValueError, AttributeError):
                    continue
                if isinstance(text, str) and text.strip() and len(text) < 100_000:
                    texts.append(text)
                if len(texts) >= limit:
                    return texts
    return texts


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os

    ap = argparse.ArgumentParser(description="Train a tiny byte-fallback BPE tokenizer on Dolma-layout text.")
    ap.add_argument("--texts", required=True, help="glob of Dolma JSON-lines files to train on")
    ap.add_argument("--output", required=True, help="folder; tokenizer.json is written there")
    ap.add_argument("--vocab-size", type=int, default=2000)
    args = ap.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    texts = sample_texts(args.texts)
    if not texts:
        raise SystemExit(f"{args.texts}: no text to train on")
    train_byte_fallback_bpe(texts, args.vocab_size).save(os.path.join(args.output, "tokenizer.json"))


if __name__ == "__main__":
    main()
