"""Token counts in the paper's unit, for the report's paper column: Nguyen et al. 2024 report lengths in
Llama-2 tokens (Table 6). Llama-2's own tokenizer is gated on the Hub; Mistral-7B-v0.1's sentencepiece
model (`tokenizer.model.v1`, shipped by the `mistral-common` package) has Llama-2's structure (a 32000-piece
byte-fallback BPE; normalizer Prepend("▁") + Replace(" ", "▁"); no pre-tokenizer), converted offline here
as transformers' LlamaConverter does. Its vocabulary is not Llama-2's, so the counts are close to, not
equal to, Llama-2's; the report says which tokenizer counted. Without mistral-common and sentencepiece
(the `report` extra installs them) nothing is recounted and the report says so."""
from __future__ import annotations

import functools
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

NAME = "Llama-2 structure (Mistral-7B v1 sentencepiece, mistral-common)"


def mistral_data(name: str) -> str:
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", name)


def spm_bpe() -> Tokenizer:
    """The sentencepiece v1 model's pieces as a byte-fallback BPE (LlamaConverter's model part): a
    fresh copy each call (callers set their own normalizer), converted once per process."""
    return Tokenizer.from_str(_spm_bpe_json())


@functools.lru_cache(maxsize=1)
def _spm_bpe_json() -> str:
    import sentencepiece as spm
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=mistral_data("tokenizer.model.v1"))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    merges = generate_merges(vocab, dict(pieces))  # ordered by the merged piece's score, as LlamaConverter
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok.to_str()


def llama2_structure() -> Tokenizer:
    tok = spm_bpe()
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return tok


@functools.lru_cache(maxsize=1)
def paper_tokenizer() -> Tokenizer | None:
    """The Llama-2-structure tokenizer (built once per process), or None without mistral-common."""
    try:
        return llama2_structure()
    except (ImportError, OSError):
        return None


class WebLengths:
    """Mean instruction and response lengths of the web examples of SFT tables, in the paper's unit,
    added a table at a time (`add`), so that a release's data files are read once for every figure
    taken from them (assemble also collects their ids there)."""

    def __init__(self):
        self.tok = paper_tokenizer()
        self.sums, self.n = {"instruction": 0, "response": 0}, 0

    def add(self, table) -> None:
        import pyarrow.compute as pc

        if self.tok is None:
            return
        web = table.filter(pc.equal(table["origin"], "web"))
        self.n += web.num_rows
        for field in self.sums:
            texts = web[field].to_pylist()
            if texts:
                self.sums[field] += sum(len(e.ids) for e in self.tok.encode_batch(texts, add_special_tokens=False))

    def result(self) -> dict | None:
        """None when the tokenizer cannot be built (no mistral-common) or there is no web example."""
        if self.tok is None or not self.n:
            return None
        return {"tokenizer": NAME, "examples": self.n, **{f: round(v / self.n, 2) for f, v in self.sums.items()}}
