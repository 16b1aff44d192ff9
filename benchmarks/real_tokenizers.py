"""The three tokenizer structures production models use, converted offline from the real vocabularies
that the `mistral-common` package ships (nothing is downloaded), for the length tests and the benchmark.

    llama2   Mistral-7B-v0.1's sentencepiece model (tokenizer.model.v1; Llama-2's structure: 32000
             pieces, byte fallback) converted as transformers' LlamaConverter does in legacy mode:
             normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, BPE with byte fallback.
    tekken   Mistral's tekken (tekken_240718.json, 131K byte-level BPE), converted by transformers'
             MistralConverter: Split(regex, isolated) + ByteLevel pre-tokenizer, Llama-3's structure.
    nfkc     the same sentencepiece vocabulary with the structure transformers' generic SpmConverter
             gives a sentencepiece model with NFKC normalization: normalizer NFKC + Replace(" ", "▁") +
             Prepend("▁"), Metaspace(split=True) pre-tokenizer.

Needs the test extra: `mistral-common`, `sentencepiece` (read the .model file), `transformers`.
"""
from __future__ import annotations

import os

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

STRUCTURES = ("llama2", "tekken", "nfkc")


def _data(name: str) -> str:
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", name)


def _spm_bpe() -> Tokenizer:
    """The sentencepiece v1 model's pieces as a byte-fallback BPE (LlamaConverter's model part)."""
    import sentencepiece as spm
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=_data("tokenizer.model.v1"))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    merges = generate_merges(vocab, dict(pieces))  # ordered by the merged piece's score, as LlamaConverter
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def build(structure: str) -> Tokenizer:
    """One of STRUCTURES as a `tokenizers.Tokenizer`."""
    if structure == "llama2":
        tok = _spm_bpe()
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        return tok
    if structure == "nfkc":
        tok = _spm_bpe()
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁"),
                                               normalizers.Prepend("▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        return tok
    if structure == "tekken":
        from transformers.integrations.mistral.tokenizer import MistralConverter

        return MistralConverter(_data("tekken_240718.json")).converted()
    raise ValueError(f"unknown tokenizer structure {structure!r}; one of {STRUCTURES}")


def save(structure: str, folder: str) -> str:
    """Builds `structure` into folder/tokenizer.json (once); returns the file's path."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        build(structure).save(path)
    return path
