"""The tokenizer, loaded once per process and proved once, in the driver (Beam's shared-model pattern):
`load_tokenizer` and its fingerprint, `prove` (the driver's check and proof), `shared_tokenizer` (a
process's one copy, checked against the proof) and each thread's TokenCounter on it."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass

from tokenizers import Tokenizer

from beam_pipelines.tokens.counter import TokenCounter
from beam_pipelines.tokens.shape import TokenizerProof, tokenizer_shape
from schemas.errors import UserError


def load_tokenizer(path_or_id: str) -> Tokenizer:
    """A fast tokenizer from a tokenizer.json file, a folder holding one, a gs:// path or a hub id."""
    import storage

    if storage.is_gcs(path_or_id):
        target = path_or_id if path_or_id.endswith(".json") else storage.join(path_or_id, "tokenizer.json")
        return Tokenizer.from_str(storage.read_text(target))
    if os.path.isdir(path_or_id):
        path_or_id = os.path.join(path_or_id, "tokenizer.json")
        if not os.path.exists(path_or_id):
            raise FileNotFoundError(f"{path_or_id}: no tokenizer.json in the tokenizer folder "
                                    "(a fast tokenizer is required; save it with save_pretrained)")
    if os.path.isfile(path_or_id):
        return Tokenizer.from_file(path_or_id)
    if path_or_id.startswith((".", "/")) or path_or_id.endswith(".json"):
        raise FileNotFoundError(f"{path_or_id}: tokenizer file not found")
    from huggingface_hub import hf_hub_download

    return Tokenizer.from_file(hf_hub_download(path_or_id, "tokenizer.json"))


def tokenizer_fingerprint(path_or_id: str) -> dict:
    """The tokenizer as a run records it: the tokenizer.json that load_tokenizer reads, by content
    (storage.fingerprint: xxh3_128 of a local file, GCS's crc32c), so that a tokenizer replaced in
    place is a change; a hub id by its name (its revision is the hub's)."""
    import storage

    target = path_or_id
    if storage.is_gcs(path_or_id):
        target = path_or_id if path_or_id.endswith(".json") else storage.join(path_or_id, "tokenizer.json")
    elif os.path.isdir(path_or_id):
        target = os.path.join(path_or_id, "tokenizer.json")
    elif not os.path.isfile(path_or_id):
        return {"hub_id": path_or_id}
    return {"path": target, **storage.fingerprint(target)}


class TokenizerChanged(UserError):
    """The tokenizer's file a worker loads is not the one the driver proved."""


def prove(path_or_id: str) -> TokenizerProof:
    """Loads the tokenizer and proves its shape, in the driver of prepare and assemble: a bad
    --tokenizer is one clear error there (a UserError), not a worker traceback. The process's shared
    copy is this one, so the driver's own counters reuse it."""
    try:
        return shared_tokenizer(path_or_id).proof
    except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise UserError(f"--tokenizer {path_or_id!r}: cannot load it as a Hugging Face tokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


_LOCK = threading.Lock()
_LOADED: dict[str, "SharedTokenizer"] = {}  # per process: source -> its loaded copy and proof
_THREAD = threading.local()                 # per thread: {id of a SharedTokenizer: (it, its TokenCounter)}


@dataclass(frozen=True, eq=False)
class SharedTokenizer:
    """A process's one loaded copy of a tokenizer with its proof (Beam's shared-model pattern). Steps
    get it in `setup` and ask for `counter()` per bundle or per call, never keeping a counter: a
    DoFn set up in one thread may run its later bundles in another, and a counter's caches and totals
    belong to one thread."""

    tokenizer: Tokenizer
    proof: TokenizerProof

    def counter(self) -> "TokenCounter":
        """The calling thread's TokenCounter on this tokenizer (built on the proof: no spec parsed and
        no shape proved again), shared by every step the thread runs, its chunk cache warm across them."""
        counters = getattr(_THREAD, "counters", None)
        if counters is None:
            counters = _THREAD.counters = {}
        hit = counters.get(id(self))
        if hit is None or hit[0] is not self:
            hit = counters[id(self)] = (self, TokenCounter(self.tokenizer, proof=self.proof))
        return hit[1]


def shared_tokenizer(path_or_id: str, proof: TokenizerProof | None = None) -> SharedTokenizer:
    """The process's copy of a tokenizer, loaded once (under a lock) and proved once: by the driver
    when it passes its `proof` (checked against the file: a file replaced in place after the driver
    read it is TokenizerChanged), else here. The file is fingerprinted at each call (a step's setup:
    ~5 ms for a 17 MB tokenizer.json), so a file replaced in place is loaded again, never served
    stale, and fingerprinted again after loading, so a file replaced while it loads is not taken for
    the one fingerprinted before. Truncation and padding are switched off once, here: the copy is
    shared by threads, which only encode with it. A hub id has no content to check (the hub picks
    the revision): each process proves the copy it downloaded, once."""
    file = tokenizer_fingerprint(path_or_id)
    if proof is not None and proof.checkable and proof.file != file:
        raise TokenizerChanged(f"{path_or_id}: the tokenizer's file changed after the driver loaded it "
                               f"({proof.file['checksum']} then {file.get('checksum')}); run again")
    with _LOCK:
        hit = _LOADED.get(path_or_id)
        if hit is None or hit.proof.file != file:
            tok = load_tokenizer(path_or_id)
            if tokenizer_fingerprint(path_or_id) != file:
                raise TokenizerChanged(f"{path_or_id}: the tokenizer's file changed while it was loaded; run again")
            # a tokenizer.json saved with truncation or padding on would cap or pad every count
            tok.no_truncation()
            tok.no_padding()
            if proof is None or not proof.checkable:
                spec = json.loads(tok.to_str())
                proof = TokenizerProof(path_or_id, file, tokenizer_shape(tok, spec), spec.get("pre_tokenizer"))
            hit = _LOADED[path_or_id] = SharedTokenizer(tok, proof)
        return hit


def shared_counter(path_or_id: str, proof: TokenizerProof | None = None) -> "TokenCounter":
    """The calling thread's counter on the process's copy of a tokenizer (shared_tokenizer): for a
    caller that counts in one thread (`bft plan`); a Beam step takes the SharedTokenizer in setup and
    asks it for the counter in each bundle."""
    return shared_tokenizer(path_or_id, proof).counter()
