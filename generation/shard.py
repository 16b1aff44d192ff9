"""A shard in flight and its checkpoints. A `PendingShard` holds the rows a shard already has (reused,
or not sent) and takes each answered row as it comes; once the last is in, it writes the shard whole
(data, then its marker: metrics and the provenance record of lifecycle/provenance.py), its rows in
candidates order, whatever the order of the answers. Inside a shard, answered rows are checkpointed
(`--checkpoint-rows` rows or `--checkpoint-s` seconds, whichever comes first) as whole part files under
`generations/<stage>/_checkpoints/<shard>/<config>/` (`Checkpoints`); a killed run loses at most what
came after the last checkpoint, and the rerun takes the rest from them (StageRunner.open_shard). The
checkpoints of a shard go once its marker is written. A `PilotShard` (`bft plan --pilot`) leaves its
answers as checkpoints and writes no shard.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import asdict

import pyarrow as pa

import schemas
import storage
from generation.job import GenerationError
from lifecycle import provenance
from lifecycle import state as stored
from schemas.layout import RunLayout
from schemas.outcomes import REFUSALS, category, is_engine_error, shard_summary

log = logging.getLogger("bft.generate")


def read_generation(path: str) -> pa.Table:
    return schemas.validate(storage.read_parquet(path), schemas.GENERATION, path)



class PendingShard:
    """A shard in flight: the rows it already has (reused, or not sent) and the requests it has out.
    Each answered row comes through `answer` (checkpointed as it comes); once the last is in, `write`
    writes the shard whole, its rows in candidates order (so the file never depends on the order in
    which the answers came), then its marker, and removes its checkpoints. `runner`: the StageRunner
    whose shard it is (its job's options, spec, layout, prefix tokens and served models go into the
    marker)."""

    def __init__(self, runner, k: int, n: int, out: str, made: dict, ids: list[str],
                 results: list[dict], sent: int, reused: int, ckpt: "Checkpoints"):
        self.runner, self.k, self.n, self.out, self.made = runner, k, n, out, made
        self.ids, self.results, self.sent, self.reused, self.ckpt = ids, results, sent, reused, ckpt
        self.rows = len(ids)
        self.answered: list[dict] = []
        self.tokens = 0
        self.t0 = time.perf_counter()

    def answer(self, row: dict, output_tokens: int) -> bool:
        """Takes one answered row; True when it is the shard's last."""
        if len(self.answered) >= self.sent:
            raise GenerationError(f"{self.out}: the engine answered more than the {self.sent} requests sent; "
                                  "not written")
        cfg = self.runner.cfg
        self.answered.append(row)
        self.ckpt.add(row, cfg.checkpoint_rows, cfg.checkpoint_s)
        self.tokens += output_tokens
        return len(self.answered) == self.sent

    def write(self) -> dict:
        """Writes the shard (data, then its marker with metrics and provenance); returns the metrics."""
        runner, cfg = self.runner, self.runner.cfg
        results = self.results + self.answered
        failed = [r["parse_error"] for r in self.answered if is_engine_error(r["parse_error"])]
        order = {doc_id: i for i, doc_id in enumerate(self.ids)}
        results.sort(key=lambda r: order[r["id"]])
        table = schemas.to_table(results, schemas.GENERATION, self.out)
        storage.write_parquet(table, self.out)
        refusals = dict(Counter(c for c in map(category, (r["parse_error"] for r in self.answered)) if c in REFUSALS))
        metrics = {"stage": cfg.stage, "shard": self.k, "model": cfg.model, "engine": cfg.engine,
                   "wall_s": round(time.perf_counter() - self.t0, 3), **shard_summary(table, runner.spec.scored),
                   "sent_now": self.sent, "reused_rows": self.reused, "errors_now": len(failed),
                   "refusals_now": refusals, "first_error": failed[0] if failed else None,
                   "output_tokens_now": self.tokens, "prefix_tokens": runner.prefix_tokens(),
                   "served_models": sorted(runner._served),
                   "config": {k: v for k, v in asdict(cfg).items() if k != "base_url"},
                   provenance.KEY: provenance.seal(self.out, self.made)}
        storage.write_text(runner.layout.generation_metrics(cfg.stage, self.k, self.n),
                           json.dumps(metrics, indent=2) + "\n")
        self.ckpt.clear()
        log.info("%s written: %d rows, %d sent now, %d reused", self.out, self.rows, self.sent, self.reused)
        return metrics


class PilotShard(PendingShard):
    """The rows of a shard that a pilot sends (StageRunner.pilot): once the last is answered, `write`
    leaves every answer in the shard's checkpoints, which the night's run reuses, and writes no
    shard file and no marker (the shard is not whole); it returns the rows."""

    def write(self) -> dict:
        self.ckpt.flush()
        return {"rows": self.results + self.answered, "sent_now": self.sent, "output_tokens_now": self.tokens}


PART = re.compile(r"part-(\d{5})\.parquet")


class Checkpoints:
    """The answered rows of one shard in flight, persisted as whole part files
    (RunLayout.generation_checkpoints: one folder per shard and product config)."""

    def __init__(self, layout: RunLayout, stage: str, k: int, n: int, config_key: str):
        self.layout = layout
        self.shard_dir = layout.generation_checkpoints(stage, k, n)
        self.folder = storage.join(self.shard_dir, config_key)
        self.buffer: list[dict] = []
        self.last = time.monotonic()
        self.parts = 0

    def rows(self) -> list[dict]:
        """The rows of every part of this config; parts of other configs are removed, and a damaged
        part is set aside (lifecycle.state): its rows are sent again."""
        out = []
        for path in sorted(storage.list_files(self.shard_dir)):
            part = PART.fullmatch(path.rsplit("/", 1)[-1])
            if storage.parent(path) != self.folder or not part:
                storage.delete(path)   # another config's parts, or the temporary file of a write killed midway
                continue
            self.parts = max(self.parts, int(part.group(1)))   # new parts are numbered after every old one
            table = stored.read_table(self.layout, path, schemas.GENERATION)
            if table is not None:
                out += table.to_pylist()
        return out

    def add(self, row: dict, every_rows: int, every_s: float) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= every_rows or time.monotonic() - self.last >= every_s:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.parts += 1
            path = storage.join(self.folder, f"part-{self.parts:05d}.parquet")
            storage.write_parquet(schemas.to_table(self.buffer, schemas.GENERATION, path), path)
            self.buffer = []
        self.last = time.monotonic()

    def clear(self) -> None:
        self.buffer = []
        storage.delete_tree(self.shard_dir)

