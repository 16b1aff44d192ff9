"""`bft prepare`'s options, and what the driver checks and records before the pass runs: the input
files (listed and fingerprinted), the tokenizer (loaded once, so a bad one is one line), the output
folder (writable), and the differences between a recorded config and this one."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import storage
from beam_pipelines.tokens.shape import TokenizerShape
from beam_pipelines.minhash import MinHashParams
from schemas.errors import UserError
from schemas.layout import Rooted
from schemas.options import option, required


TOKENS, BYTES = "tokens", "utf8_bytes"  # what the shards are balanced by (PrepareConfig.balanced_by)


class UnreadableFileError(UserError):
    """An input file is truncated or corrupt."""


@dataclass(frozen=True)
class PrepareConfig(Rooted):
    """The options of `bft prepare` (flags and the `prepare:` section of a run file)."""

    input: list[str] = required("glob of Dolma JSON-lines files, local or gs:// (repeatable)")
    root: str = required("run root (local or gs://); writes ROOT/candidates/")
    tokenizer: str = required("tokenizer.json, a folder with one, a gs:// path or a hub id")
    max_tokens: int = option(3520, "keep documents of at most this many tokens (3520 = Llama-2's 4096 context minus "
                           "backtranslation's 512 new tokens and 64 for its prompt: every document is backtranslated "
                           "whole; see docs/ARCHITECTURE.md)")
    min_tokens: int = option(0, "drop documents of fewer tokens")
    splits: list[str] = option(["cc_en_head"], "split folders to select; '' selects every file", comma=True)
    select_where: list[str] = option([], "also require a record field (dotted, e.g. metadata.bucket) to have one "
                                     "of the values, as FIELD=V1,V2 (repeatable)")
    exact_counts: bool = option(False, "count every kept document's tokens; without it a document whose upper "
                                "bound (its UTF-8 bytes, +1 for a prepended \"▁\") fits --max-tokens is kept "
                                "uncounted (n_tokens null) and shards are balanced by UTF-8 bytes: the same "
                                "decisions, faster (README, 'Token counts')")
    num_shards: int = option(16, "candidate shards (balanced by tokens with --exact-counts, else by UTF-8 bytes)")
    target_docs: int | None = option(None, "deterministic bottom-k sample of this many documents")
    seed: int = option(0, "seed of the sample")
    max_line_bytes: int = option(1 << 20, "longer lines are rejected as too_large")
    skip_unreadable_files: bool = option(False, "count a truncated/corrupt input file and go on instead of failing")
    reject_shards: int = option(4, "files of rejects")
    batch_docs: int = option(256, "documents measured per tokenizer call")
    near_dedup: bool = option(False, "also drop near-duplicate documents (MinHash LSH over word n-grams; off by "
                              "default: README, 'Near-duplicate documents')")
    near_dedup_ngram: int = option(5, "words per shingle of --near-dedup")
    near_dedup_bands: int = option(14, "LSH bands of --near-dedup")
    near_dedup_rows: int = option(8, "MinHash values per band of --near-dedup")
    near_dedup_threshold: float = option(0.8, "Jaccard similarity from which two documents are near-duplicates "
                                         "(a candidate pair's estimate may fall two standard errors below it)")
    near_dedup_rounds: int = option(6, "large-star/small-star rounds that cluster near-duplicates (a run whose "
                                    "clusters did not settle in them fails, saying so)", run_only=True)
    overwrite: bool = option(False, "redo a complete output (with another config too)", run_only=True)
    allow_empty: bool = option(False, "a pass that keeps no document is complete, not an error (empty shards)",
                               run_only=True)

    def check(self) -> None:
        if self.num_shards < 1 or self.reject_shards < 1 or self.batch_docs < 1:
            raise UserError("--num-shards, --reject-shards and --batch-docs must be >= 1")
        if self.min_tokens > self.max_tokens:
            raise UserError(f"--min-tokens {self.min_tokens} is larger than --max-tokens {self.max_tokens}")
        if self.target_docs is not None and self.target_docs < 1:
            raise UserError("--target-docs must be >= 1")
        if not self.input:
            raise UserError("--input: give at least one glob of Dolma files")
        if min(self.near_dedup_ngram, self.near_dedup_bands, self.near_dedup_rows, self.near_dedup_rounds) < 1:
            raise UserError("--near-dedup-ngram, --near-dedup-bands, --near-dedup-rows and --near-dedup-rounds "
                            "must be >= 1")
        if not 0 < self.near_dedup_threshold <= 1:
            raise UserError(f"--near-dedup-threshold {self.near_dedup_threshold} is not in (0, 1]")
        self.check_root()
        # recorded paths must name the same files from any directory (assemble reads them back); set
        # while the (frozen) config is built: nothing changes it after
        object.__setattr__(self, "input", [p if storage.is_gcs(p) else os.path.abspath(os.path.expanduser(p))
                                           for p in self.input])
        if not storage.is_gcs(self.tokenizer) and os.path.exists(self.tokenizer):
            object.__setattr__(self, "tokenizer", os.path.abspath(self.tokenizer))

    def identity(self) -> dict:
        """What determines the output: every option but the run-only ones and the root (a run root
        copied or moved elsewhere holds the same output). Without --near-dedup its options are left
        out, and with --exact-counts that flag: an output made before they existed is the same output
        (every count exact, shards balanced by tokens)."""
        return {k: v for k, v in asdict(self).items()
                if k != "root" and not PrepareConfig.__dataclass_fields__[k].metadata.get("run_only")
                and (self.near_dedup or not k.startswith("near_dedup"))
                and (k != "exact_counts" or not self.exact_counts)}

    def differences_from(self, recorded: dict) -> list[str]:
        """How the config of a complete output (`recorded`) differs from this one's, for reuse. An output
        made before --exact-counts existed counted every document and balanced by tokens: it serves a
        run without the flag too (the same decisions, every count exact), so a root prepared before an
        upgrade is reused rather than refused."""
        identity = self.identity()
        if "exact_counts" not in recorded:
            identity.pop("exact_counts", None)
        return config_differences(recorded, identity)

    def balanced_by(self, shape: TokenizerShape) -> str:
        """What the shards are balanced by: TOKENS when every kept document is counted (--exact-counts,
        or a tokenizer without an upper bound), else BYTES (UTF-8 bytes of the text, the one measure
        every document has; see write.py)."""
        return TOKENS if self.exact_counts or shape.upper is None else BYTES

    def minhash_params(self) -> MinHashParams:
        """--near-dedup's MinHash parameters (beam_pipelines/minhash.py)."""
        return MinHashParams(self.near_dedup_ngram, self.near_dedup_bands, self.near_dedup_rows,
                             self.near_dedup_threshold)


def matching(pattern: str) -> tuple[str, list[str]]:
    """(the pattern, a local one made absolute; the files it matches now)."""
    if not storage.is_gcs(pattern):
        pattern = os.path.abspath(os.path.expanduser(pattern))
    return pattern, storage.glob(pattern)


def list_inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        pattern, matched = matching(pattern)
        if not matched:
            raise UserError(f"--input {pattern!r} matches no file")
        files.extend(matched)
    return sorted(set(files))


def size_or_zero(path: str) -> int:
    """A file's stored bytes for the sample's estimate; 0 for one that cannot be read (reported by the
    read pass)."""
    try:
        return storage.size(path)
    except OSError:
        return 0


def input_fingerprint(files: list[str]) -> list[dict]:
    """What the output was made from: every input file's path, size and content checksum. A file
    that cannot be read (deleted after it was listed, access denied) is recorded with its error, and
    the read pass reports it (or skips it under --skip-unreadable-files) as any unreadable file."""
    out = []
    for f in files:
        try:
            out.append({"path": f, **storage.fingerprint(f)})
        except OSError as e:  # storage.StorageError on gs://
            out.append({"path": f, "unreadable": str(e)[:300]})
    return out


def config_differences(recorded: dict, current: dict) -> list[str]:
    """'key: recorded -> current' for every key whose value differs."""
    keys = sorted(set(recorded) | set(current))
    return [f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in keys if recorded.get(k) != current.get(k)]


def check_output(folder: str) -> None:
    """Fails at once, in one line, when the output folder cannot be written (a file stands in its
    path, or it is read-only), instead of after the whole read pass."""
    try:
        storage.check_writable(folder)
    except Exception as e:  # OSError locally; google.api_core's Forbidden and the like on gs://
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--root: cannot write {folder} ({reason})") from e
