"""The run layout: the only code that knows paths under a run root, and the only code that makes and
parses shard names.

    <root>/candidates/candidates-SSSSS-of-NNNNN.parquet      bft prepare (rows sorted by n_tokens, id)
    <root>/candidates/rejects/rejects-SSSSS-of-NNNNN.parquet  every dropped input line, with its reason
    <root>/candidates/stats.json                              the funnel; written last: marks prepare complete
    <root>/candidates/_tmp/<run>/                             a prepare run in flight
    <root>/candidates/_prior/prior-SSSSS-of-NNNNN.parquet     the ids of the output being replaced, by
                                                              shard: documents already seen keep their shard
    <root>/generations/<stage>/<stage>-SSSSS-of-NNNNN.parquet bft generate (+ .metrics.json beside each)
    <root>/generations/<stage>/_batches/                     a batch stage's shard states (--batch)
    <root>/sft/<version>/                                     a release (see lifecycle.release; its files:
                                                              ReleaseLayout)
    <root>/sft/LATEST                                         the newest release that validated
    <root>/sft/_tmp/<run>/                                    an assemble run in flight
    <root>/seed/seed.parquet                                  bft seed (the OpenAssistant seed pairs)
    <root>/models/<name>/                                     bft train (backward, forward, sft)
    <root>/eval/<name>.json                                   bft eval (answers, judgments)
    <root>/_night.json, _last_night.json                      bft rebuild's record of the night in progress
                                                              and of the last night that ended
    <root>/_jobs/<stage>.json                                 an external stage's resolved job, for its workers
    <root>/_lock/<name>                                       who writes the root now (lifecycle.lock): "root",
                                                              or generate-<stage>-<I>-of-<W> for one worker
    <root>/_damaged/<path>.<time> (+ .reason)                 state files found damaged on read, set aside
                                                              (lifecycle.state)

A local root is made absolute, so that every path recorded in stats and manifests names the same
file from any working directory (and from a Beam worker).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import storage
from schemas.errors import UserError

CANDIDATES = "candidates"
REJECTS = "rejects"
GENERATIONS = "generations"
SFT = "sft"
SEED = "seed"
MODELS = "models"
EVAL = "eval"
TMP = "_tmp"
PRIOR = "_prior"
CHECKPOINTS = "_checkpoints"
BATCHES = "_batches"
NIGHT = "_night.json"
LAST_NIGHT = "_last_night.json"
JOBS = "_jobs"
LOCK = "_lock"
DAMAGED = "_damaged"
STATS = "stats.json"
LATEST = "LATEST"
DATA = "data"      # a release's data files: sft/<version>/data/split=<split>/part-SSSSS-of-NNNNN.parquet
PART = "part"
# a release's other files, beside data/ (ReleaseLayout)
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
REPORT = "report.html"
PLOTS = "plots"
CARD = "README.md"
CHANGES = "changes"
_SHARD = re.compile(r"^(?P<prefix>[a-z_]+)-(?P<shard>\d{5})-of-(?P<num>\d{5})\.(?P<ext>[a-z.]+)$")


class LayoutError(UserError, ValueError):
    """The files under a run root do not form what the layout says they should."""


def shard_name(prefix: str, shard: int, num_shards: int, ext: str = "parquet") -> str:
    """`<prefix>-SSSSS-of-NNNNN.<ext>`: shard k of n, zero-based."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in 0..{num_shards - 1}")
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}.{ext}"


def parse_shard_name(path: str) -> tuple[str, int, int] | None:
    """(prefix, shard, num_shards) of a shard file's name (any folder), or None when it is not one."""
    m = _SHARD.match(path.rstrip("/").rsplit("/", 1)[-1])
    if not m:
        return None
    return m.group("prefix"), int(m.group("shard")), int(m.group("num"))


def release_data_file(split: str, shard: int, num_shards: int) -> str:
    """A release's data file, relative to its folder: `data/split=<split>/part-SSSSS-of-NNNNN.parquet`.
    Hive-style, so that pyarrow.dataset (partitioning="hive"), pandas, polars and DuckDB add a `split`
    column of their own when they read `data/`; the files themselves hold no split column."""
    return f"{DATA}/split={split}/{shard_name(PART, shard, num_shards)}"


_HIVE_SPLIT = re.compile(r"(?:^|/)split=(?P<split>[a-z_]+)/" + PART + r"-\d{5}-of-\d{5}\.parquet$")


def release_split_of(rel: str) -> str | None:
    """The split of a release's data file from its path (relative to the release folder), in either
    layout: `data/split=<split>/part-...` (this one) or `[data/]<split>-SSSSS-of-NNNNN.parquet` (releases
    made before it), or None: the caller checks it is a split it knows."""
    m = _HIVE_SPLIT.search(rel)
    if m:
        return m.group("split")
    parsed = parse_shard_name(rel)
    return parsed[0] if parsed and rel.endswith(".parquet") else None


def lock_name(stage: str | None = None, worker_index: int = 0, num_workers: int = 1) -> str:
    """The lock a writer of the root takes: "root", or for one of several generate workers
    `generate-<stage>-<I>-of-<W>` (each writes only its own shards, so workers do not exclude each other)."""
    if stage is None or num_workers <= 1:
        return "root"
    return f"generate-{stage}-{worker_index}-of-{num_workers}"


def normalize_root(root: str) -> str:
    root = root.rstrip("/") or "/"
    if storage.is_gcs(root):
        return root
    return os.path.abspath(os.path.expanduser(root))


@dataclass(frozen=True)
class RunLayout:
    """Paths under one run root (local folder or gs://bucket/prefix)."""

    root: str

    def __post_init__(self):
        object.__setattr__(self, "root", normalize_root(self.root))

    def _join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # ---- bft prepare ----------------------------------------------------------------------------
    @property
    def candidates(self) -> str:
        return self._join(CANDIDATES)

    @property
    def prepare_stats(self) -> str:
        return self._join(CANDIDATES, STATS)

    @property
    def rejects(self) -> str:
        return self._join(CANDIDATES, REJECTS)

    def candidates_shard(self, shard: int, num_shards: int) -> str:
        return self._join(CANDIDATES, shard_name(CANDIDATES, shard, num_shards))

    def rejects_shard(self, shard: int, num_shards: int) -> str:
        return self._join(CANDIDATES, REJECTS, shard_name(REJECTS, shard, num_shards))

    def prepare_tmp(self, run_id: str) -> str:
        return self._join(CANDIDATES, TMP, run_id)

    @property
    def prepare_prior(self) -> str:
        return self._join(CANDIDATES, PRIOR)

    def prior_shard(self, shard: int, num_shards: int) -> str:
        return self._join(CANDIDATES, PRIOR, shard_name(PRIOR.strip("_"), shard, num_shards))

    @property
    def prepare_tmp_root(self) -> str:
        return self._join(CANDIDATES, TMP)

    def prepare_stash(self, tmp: str, input_file: str) -> str:
        """The folder of the measured documents of one input file, kept for a --target-docs sample."""
        import xxhash

        return storage.join(tmp, "stash", xxhash.xxh3_64_hexdigest(input_file.encode("utf-8")))

    def prepare_part(self, tmp: str, shard: int, tag: str) -> str:
        return storage.join(tmp, f"shard-{shard:05d}", f"part-{tag}.parquet")

    def candidate_shards(self) -> list[tuple[int, int, str]]:
        """[(k, n, path)] of a complete prepare output, sorted; LayoutError when it is incomplete."""
        if not storage.exists(self.prepare_stats):
            raise LayoutError(f"{self.candidates}: no complete prepare output ({STATS} missing); "
                              "run bft prepare first")
        shards = []
        for path in storage.list_files(self.candidates):
            if storage.parent(path) != self.candidates:
                continue  # rejects/ and _tmp/ hold other files
            parsed = parse_shard_name(path)
            if parsed and parsed[0] == CANDIDATES:
                shards.append((parsed[1], parsed[2], path))
        if not shards:
            raise LayoutError(f"{self.candidates}: no {CANDIDATES}-*.parquet shards")
        n = shards[0][1]
        if sorted(k for k, _, _ in shards) != list(range(n)) or any(s[1] != n for s in shards):
            raise LayoutError(f"{self.candidates}: shard files are not exactly 0..{n - 1} of {n}")
        return sorted(shards)

    # ---- bft generate ---------------------------------------------------------------------------
    @property
    def all_generations(self) -> str:
        """The folder of every stage's folder."""
        return self._join(GENERATIONS)

    def generations(self, stage: str) -> str:
        return self._join(GENERATIONS, stage)

    def generation_shard(self, stage: str, shard: int, num_shards: int) -> str:
        return self._join(GENERATIONS, stage, shard_name(stage, shard, num_shards))

    def generation_metrics(self, stage: str, shard: int, num_shards: int) -> str:
        return self._join(GENERATIONS, stage, shard_name(stage, shard, num_shards, "metrics.json"))

    def stage_job(self, stage: str) -> str:
        """The resolved job of an external stage (generation.job.StageJob as JSON), written by `bft
        rebuild` for its workers: `bft generate STAGE --job FILE` runs it as is."""
        return self._join(JOBS, f"{stage}.json")

    @property
    def night_record(self) -> str:
        """bft rebuild's record of a night still in progress (bft/night.py: Night)."""
        return self._join(NIGHT)

    @property
    def last_night_record(self) -> str:
        """The record of the last night that ended (published, found current, or nothing new): `bft status`."""
        return self._join(LAST_NIGHT)

    def generation_checkpoints(self, stage: str, shard: int, num_shards: int) -> str:
        """The folder of a shard in flight's checkpoint parts (generation/shard.py: Checkpoints)."""
        return self._join(GENERATIONS, stage, CHECKPOINTS, shard_name(stage, shard, num_shards, "d"))

    def all_generation_checkpoints(self, stage: str) -> str:
        """The folder of every shard's checkpoint folder of a stage."""
        return self._join(GENERATIONS, stage, CHECKPOINTS)

    def generation_batches(self, stage: str) -> str:
        """The folder of a batch stage's shard states and `vllm run-batch` files (generation/batch.py)."""
        return self._join(GENERATIONS, stage, BATCHES)

    # ---- bft assemble ---------------------------------------------------------------------------
    @property
    def sft(self) -> str:
        return self._join(SFT)

    @property
    def latest(self) -> str:
        return self._join(SFT, LATEST)

    def release(self, version: str) -> str:
        return self._join(SFT, version)

    def assemble_tmp(self, run_id: str) -> str:
        return self._join(SFT, TMP, run_id)

    @property
    def assemble_tmp_root(self) -> str:
        return self._join(SFT, TMP)

    @staticmethod
    def assemble_part(tmp: str, kind: str, shard: int) -> str:
        return storage.join(tmp, f"{kind}-{shard:05d}.parquet")

    @staticmethod
    def summary(tmp: str) -> str:
        return storage.join(tmp, "summary.json")

    # ---- training/ ------------------------------------------------------------------------------
    @property
    def seed_pairs(self) -> str:
        return self._join(SEED, "seed.parquet")

    def model(self, name: str) -> str:
        return self._join(MODELS, name)

    def eval_file(self, name: str) -> str:
        return self._join(EVAL, f"{name}.json")

    # ---- one writer per root --------------------------------------------------------------------
    def lock(self, name: str = "root") -> str:
        """The lock file (or object) of a writer of this root (lifecycle.lock.RootLock; `lock_name`)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"lock name {name!r}: letters, digits, '_', '.', '-' only")
        return self._join(LOCK, name)

    @property
    def damaged(self) -> str:
        """Where damaged state files are set aside (lifecycle.state.set_aside)."""
        return self._join(DAMAGED)

    def relative(self, path: str) -> str:
        """`path` relative to the root (for display); unchanged when it is outside."""
        prefix = self.root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path


@dataclass(frozen=True)
class ReleaseLayout:
    """The files of one release folder (ROOT/sft/<version>, or a copy anywhere), beside its data/:

        stats.json        every number of the release (schemas.release_stats.ReleaseStats)
        report.html       the report, with plots/<name>.png (beam_pipelines.report)
        README.md         the dataset card
        changes/{added,removed}.parquet    the examples added and removed since the parent release
        manifest.json     every file's checksum, the config and lineage (lifecycle.release)
        _SUCCESS          written last: the manifest's sha256
    """

    folder: str

    def _join(self, *parts: str) -> str:
        return storage.join(self.folder, *parts)

    @property
    def stats(self) -> str:
        return self._join(STATS)

    @property
    def report(self) -> str:
        return self._join(REPORT)

    def plot(self, name: str) -> str:
        return self._join(PLOTS, f"{name}.png")

    @property
    def card(self) -> str:
        return self._join(CARD)

    def changes(self, kind: str) -> str:
        """changes/<kind>.parquet: kind "added" or "removed"."""
        return self._join(CHANGES, f"{kind}.parquet")

    @property
    def manifest(self) -> str:
        return self._join(MANIFEST)

    @property
    def success(self) -> str:
        return self._join(SUCCESS)

    @property
    def data(self) -> str:
        return self._join(DATA)


class Rooted:
    """A mixin for the options of a verb that works under one run root (its `root` field). `layout`
    is the run's one RunLayout, handed to every step: no step wraps the root string itself. The root
    is normalized by RunLayout (a local one made absolute), and `check_root` stores that form back, so
    that every path a step records names the same file from any directory and any Beam worker."""

    root: str

    @property
    def layout(self) -> "RunLayout":
        cached = self.__dict__.get("_layout")
        if cached is None or cached.root != self.root:
            cached = self.__dict__["_layout"] = RunLayout(self.root)
        return cached

    def share_layout(self, layout: "RunLayout") -> None:
        """Works under `layout`, another step's of the same run (bft rebuild: one RunLayout per run);
        part of building the config (bft.run_file), before any step reads it: a frozen config too."""
        object.__setattr__(self, "root", layout.root)
        self.__dict__["_layout"] = layout

    def check_root(self) -> None:
        """The root in its normalized form, stored while the config is built (its `check`)."""
        object.__setattr__(self, "root", self.layout.root)