"""A generation stage as a batch job over candidate shards.

Work unit = a shard: worker I of W takes shards k with k % W == I (Slurm arrays, Kubernetes indexed
jobs). Shard k of every stage holds exactly the ids of candidates shard k, read beside the upstream
stage's shard k, so no shuffle is needed. A shard's output is written whole or not at all; a rerun
skips shards whose output exists and validates (same ids as the candidates shard), so a crash loses
at most the shard in flight. Outputs are reproducible given the seed: each row's seed is derived
from its id, the stage and --seed.
"""
from __future__ import annotations

import collections
import json
import logging
import re
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import xxhash
from tqdm import tqdm

import schemas
from bft import storage
from generation import parsing
from generation.engines import Completion, Engine, Request, make_engine
from generation.prompting import SCORE_PREFIX, fit_prompt, n_tokens
from generation.stages import STAGES
from generation.templates import load_template

log = logging.getLogger("bft.generate")
_SHARD = re.compile(r"candidates-(\d{5})-of-(\d{5})\.parquet$")


class GenerationError(RuntimeError):
    pass


@dataclass
class GenerateConfig:
    stage: str
    root: str
    engine: str
    model: str
    tokenizer: str | None = None
    base_url: str | None = None
    api: str = "completions"
    worker_index: int = 0
    num_workers: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int = 0
    batch_size: int = 16
    max_model_len: int | None = None
    score_mode: str = "generate"
    template: str | None = None
    max_error_rate: float = 0.02
    concurrency: int = 16
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    chunk_rows: int = 512

    def engine_options(self) -> dict:
        return {k: getattr(self, k) for k in ("tokenizer", "base_url", "api", "batch_size", "max_model_len",
                                              "concurrency", "tensor_parallel_size", "gpu_memory_utilization",
                                              "dtype", "seed")}


def row_seed(doc_id: str, stage: str, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(f"{stage}\0{doc_id}".encode(), seed=seed) % (2**31)


def candidate_shards(root: str) -> list[tuple[int, int, str]]:
    folder = storage.join(root, "candidates")
    if not storage.exists(storage.join(folder, "stats.json")):
        raise GenerationError(f"{folder}: no complete prepare output (stats.json missing); run bft prepare first")
    shards = []
    for path in storage.list_files(folder):
        m = _SHARD.search(path)
        if m and "/rejects/" not in path and "/_tmp/" not in path:
            shards.append((int(m.group(1)), int(m.group(2)), path))
    if not shards:
        raise GenerationError(f"{folder}: no candidates-*.parquet shards")
    n = shards[0][1]
    if sorted(k for k, _, _ in shards) != list(range(n)) or any(s[1] != n for s in shards):
        raise GenerationError(f"{folder}: shard files are not exactly 0..{n - 1} of {n}")
    return sorted(shards)


def output_path(root: str, stage: str, shard: int, num_shards: int) -> str:
    return storage.join(root, "generations", stage, f"{stage}-{shard:05d}-of-{num_shards:05d}.parquet")


def read_generation(path: str) -> pa.Table:
    return schemas.validate(storage.read_parquet(path), schemas.GENERATION, path)


def shard_complete(path: str, ids: list[str]) -> bool:
    if not storage.exists(path):
        return False
    try:
        table = read_generation(path)
    except (schemas.SchemaError, OSError, pa.ArrowInvalid) as e:
        log.warning("%s exists but is not valid (%s); regenerating it", path, e)
        return False
    return sorted(table.column("id").to_pylist()) == sorted(ids)


class StageRunner:
    def __init__(self, cfg: GenerateConfig, engine: Engine | None = None):
        if cfg.stage not in STAGES:
            raise ValueError(f"unknown stage {cfg.stage!r}; expected one of {sorted(STAGES)}")
        if not 0 <= cfg.worker_index < cfg.num_workers:
            raise ValueError("--worker-index must be in 0..--num-workers-1")
        if cfg.score_mode not in ("generate", "logprob"):
            raise ValueError("--score-mode must be generate or logprob")
        self.cfg, self.spec = cfg, STAGES[cfg.stage]
        self.template = load_template(cfg.stage, cfg.template)
        self._engine = engine
        self.logprob = cfg.stage == "score" and cfg.score_mode == "logprob"

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.cfg.engine, self.cfg.model, **self.cfg.engine_options())
        return self._engine

    def run(self) -> dict:
        cfg = self.cfg
        shards = [s for s in candidate_shards(cfg.root) if s[0] % cfg.num_workers == cfg.worker_index]
        summary = {"stage": cfg.stage, "shards_done": [], "shards_skipped": [], "rows": 0, "errors": 0}
        for k, n, cand_path in shards:
            out = output_path(cfg.root, cfg.stage, k, n)
            cands = schemas.validate(storage.read_parquet(cand_path), schemas.CANDIDATE, cand_path)
            ids = cands.column("id").to_pylist()
            if shard_complete(out, ids):
                log.info("%s is complete; skipped", out)
                summary["shards_skipped"].append(k)
                continue
            metrics = self.run_shard(k, n, cands, out)
            summary["shards_done"].append(k)
            summary["rows"] += metrics["rows"]
            summary["errors"] += metrics["engine_errors"]
        return summary

    def _joined_rows(self, k: int, n: int, cands: pa.Table) -> list[dict]:
        rows = cands.select(["id", "text"]).to_pylist()
        if not self.spec.upstream:
            return rows
        up_path = output_path(self.cfg.root, self.spec.upstream, k, n)
        if not storage.exists(up_path):
            raise GenerationError(f"{up_path}: missing; run `bft generate {self.spec.upstream}` for shard {k} first")
        up = {r["id"]: r for r in read_generation(up_path).select(["id", "instruction", "parse_error"]).to_pylist()}
        for row in rows:
            u = up.get(row["id"])
            if u is None:
                row["upstream_missing"] = True
            else:
                row["instruction"] = u["instruction"] if not u["parse_error"] else None
                row["upstream_error"] = u["parse_error"]
        return rows

    def _request(self, row: dict, values: dict) -> tuple[Request, bool]:
        cfg, spec, eng = self.cfg, self.spec, self.engine
        max_new = 1 if self.logprob else (cfg.max_new_tokens or spec.max_new_tokens)
        budget = eng.max_model_len - max_new
        prompt, msgs, truncated = fit_prompt(eng.tokenizer, self.template, values, spec.doc_field, budget,
                                             SCORE_PREFIX if self.logprob else "")
        temperature = spec.temperature if cfg.temperature is None else cfg.temperature
        top_p = spec.top_p if cfg.top_p is None else cfg.top_p
        return Request(prompt, msgs, max_new, temperature, top_p, row_seed(row["id"], cfg.stage, cfg.seed),
                       digit_probs=self.logprob), truncated

    def run_shard(self, k: int, n: int, cands: pa.Table, out: str) -> dict:
        cfg, spec = self.cfg, self.spec
        t0 = time.perf_counter()
        rows = self._joined_rows(k, n, cands)
        results: list[dict] = []
        pending: list[tuple[dict, Request, bool]] = []
        for row in rows:
            values, missing = spec.values(row)
            if values is None:
                results.append(self._row(row, None, None, False, missing))
            else:
                req, truncated = self._request(row, values)
                pending.append((row, req, truncated))
        bar = tqdm(total=len(pending), unit="row", desc=f"{cfg.stage} shard {k}", disable=None)
        out_tokens = 0
        # vLLM schedules a whole shard best in one generate call; other engines report progress by chunk
        step = max(len(pending), 1) if self.engine.name == "vllm" else cfg.chunk_rows
        for start in range(0, len(pending), step):
            chunk = pending[start:start + step]
            comps = self.engine.generate([req for _, req, _ in chunk])
            for (row, req, truncated), comp in zip(chunk, comps):
                results.append(self._row(row, req, comp, truncated, None))
                out_tokens += comp.output_tokens or 0
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{out_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        bar.close()
        errors = sum(1 for r in results if (r["parse_error"] or "").startswith("engine_error"))
        if pending and errors / len(pending) > cfg.max_error_rate:
            first = next(r["parse_error"] for r in results if (r["parse_error"] or "").startswith("engine_error"))
            raise GenerationError(f"{cfg.stage} shard {k}: {errors} of {len(pending)} requests failed, over "
                                  f"--max-error-rate {cfg.max_error_rate}; not written. First: {first}")
        order = {doc_id: i for i, doc_id in enumerate(cands.column("id").to_pylist())}
        results.sort(key=lambda r: order[r["id"]])
        storage.write_parquet(schemas.to_table(results, schemas.GENERATION, out), out)
        metrics = self._metrics(k, results, time.perf_counter() - t0, errors)
        storage.write_text(out.replace(".parquet", ".metrics.json"), json.dumps(metrics, indent=2) + "\n")
        return metrics

    def _row(self, row: dict, req: Request | None, comp: Completion | None, truncated: bool, reason: str | None) -> dict:
        base = {"id": row["id"], "stage": self.cfg.stage, "model": self.cfg.model, "prompt_tokens": None,
                "output_tokens": None, "finish_reason": None, "raw_output": None, "instruction": None,
                "score": None, "reasoning": None, "response": None, "parse_error": reason,
                "input_truncated": truncated, "seed": req.seed if req else None}
        if comp is None:
            return base
        base.update(prompt_tokens=comp.prompt_tokens if comp.prompt_tokens is not None
                    else n_tokens(self.engine.tokenizer, req.prompt),
                    output_tokens=comp.output_tokens, finish_reason=comp.finish_reason, raw_output=comp.text)
        if comp.finish_reason == "error":
            base["parse_error"] = f"engine_error: {comp.error}"
            return base
        if self.logprob:
            fields, error = parsing.score_from_probs(comp.digit_probs or {})
        else:
            fields, error = self.spec.parse(comp.text, row, comp.finish_reason)
        if self.cfg.stage in ("score", "rewrite", "distill", "rate"):
            fields.setdefault("instruction", row.get("instruction"))
        base.update(fields)
        base["parse_error"] = error
        return base

    def _metrics(self, k: int, results: list[dict], wall: float, errors: int) -> dict:
        finish = collections.Counter(r["finish_reason"] or "not_sent" for r in results)
        failures = collections.Counter((r["parse_error"] or "").split(":")[0] for r in results if r["parse_error"])
        return {"stage": self.cfg.stage, "shard": k, "rows": len(results), "model": self.cfg.model,
                "engine": self.cfg.engine, "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in results),
                "output_tokens": sum(r["output_tokens"] or 0 for r in results), "wall_s": round(wall, 3),
                "finish_reasons": dict(finish), "parse_failures": dict(failures), "engine_errors": errors,
                "input_truncated": sum(1 for r in results if r["input_truncated"]),
                "config": {k2: v for k2, v in asdict(self.cfg).items() if k2 != "base_url"}}
