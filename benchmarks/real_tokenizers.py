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

import functools
import os

from tokenizers import Tokenizer, normalizers, pre_tokenizers

STRUCTURES = ("llama2", "tekken", "nfkc")


# the Llama-2-structure conversion lives with the report's paper column (one copy)
from beam_pipelines.tokens.paper_tokens import llama2_structure, mistral_data as _data, spm_bpe as _spm_bpe  # noqa: E402


def build(structure: str) -> Tokenizer:
    """One of STRUCTURES as a `tokenizers.Tokenizer`."""
    if structure == "llama2":
        return llama2_structure()
    if structure == "nfkc":
        tok = _spm_bpe()
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁"),
                                               normalizers.Prepend("▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        return tok
    if structure == "tekken":
        return Tokenizer.from_str(_tekken_json())  # a fresh copy each call: callers change their own
    raise ValueError(f"unknown tokenizer structure {structure!r}; one of {STRUCTURES}")


@functools.lru_cache(maxsize=1)
def _tekken_json() -> str:
    """tekken converted once per machine: MistralConverter derives its 131K merges in Python (seconds,
    in every test process otherwise); the converted JSON is kept in the temporary folder under the
    versions of the two packages that make it, written whole (renamed into place)."""
    import tempfile
    from importlib.metadata import version

    cached = os.path.join(tempfile.gettempdir(), f"bft-tekken-{version('mistral-common')}-"
                                                 f"{version('transformers')}.json")
    if os.path.exists(cached):
        with open(cached, encoding="utf-8") as f:
            return f.read()
    from transformers.integrations.mistral.tokenizer import MistralConverter

    text = MistralConverter(_data("tekken_240718.json")).converted().to_str()
    partial = f"{cached}.{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, cached)
    return text


def save(structure: str, folder: str) -> str:
    """Builds `structure` into folder/tokenizer.json (once); returns the file's path."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        build(structure).save(path)
    return path
