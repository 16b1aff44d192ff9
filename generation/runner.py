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
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
from tqdm import tqdm

import schemas
import storage
from schemas.errors import UserError
from schemas.keys import row_seed
from schemas.layout import RunLayout
from schemas.options import option, required
from generation import parsing
from generation.engines import Completion, Engine, EngineConfig, Request, load_engine
from generation.prompting import SCORE_PREFIX, fit_prompt, n_tokens
from generation.stages import STAGES
from generation.templates import load_template

log = logging.getLogger("bft.generate")


class GenerationError(UserError):
    pass


@dataclass
class GenerateConfig:
    """The options of `bft generate STAGE` (flags and the `generate:` section of a run file)."""

    stage: str = required("the stage to run", choices=sorted(STAGES))
    root: str = required("run root (local or gs://) holding candidates/")
    engine: str = required("vllm (in-process), openai (any compatible server) or hf (transformers)",
                           choices=["vllm", "openai", "hf"])
    model: str = required("model folder or hub id (for openai: the served model name)")
    tokenizer: str | None = option(None, "tokenizer of the model, if not the --model folder")
    base_url: str | None = option(None, "openai engine: the server, e.g. http://localhost:8000/v1")
    api: str = option("completions", "openai engine endpoint", choices=["completions", "chat"])
    worker_index: int = option(0, "this worker's index: it takes shards k with k % num_workers == index",
                               run_only=True)
    num_workers: int = option(1, "workers sharing the stage", run_only=True)
    temperature: float | None = option(None, "sampling temperature (default: the stage's, 1.0 in the paper)")
    top_p: float | None = option(None, "nucleus sampling (default: the stage's, 0.9 in the paper)")
    max_new_tokens: int | None = option(None, "new-token cap (default: the stage's)")
    seed: int = option(0, "seed of every row's sampling seed")
    batch_size: int = option(16, "hf engine: prompts per generate call")
    max_model_len: int | None = option(None, "context length (default: the model's)")
    score_mode: str = option("generate", "score stage: the paper's generated reasoning + score, or the next-token "
                             "probabilities of 1..5 after 'Score:'", choices=["generate", "logprob"])
    template: str | None = option(None, "file replacing the stage's prompt template")
    max_error_rate: float = option(0.02, "fail a shard when a larger share of its requests fails")
    concurrency: int = option(16, "openai engine: requests in flight")
    request_timeout: float = option(600.0, "openai engine: seconds one HTTP request may take")
    max_retries: int = option(5, "openai engine: retries of a request that failed for a transient reason "
                              "(429, 5xx, timeout, connection); Retry-After is honoured")
    tensor_parallel_size: int = option(1, "vllm engine: GPUs per model")
    gpu_memory_utilization: float = option(0.9, "vllm engine: share of GPU memory to take")
    dtype: str = option("auto", "vllm and hf engines: weights' dtype", choices=["auto", "bf16", "fp16", "fp32"])
    chunk_rows: int = option(512, "rows per engine call (progress granularity) for engines that stream",
                             run_only=True)

    def check(self) -> None:
        if self.stage not in STAGES:
            raise UserError(f"unknown stage {self.stage!r}; expected one of {sorted(STAGES)}")
        if not 0 <= self.worker_index < self.num_workers:
            raise UserError("--worker-index must be in 0..--num-workers-1")
        if self.chunk_rows < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise UserError("--chunk-rows, --batch-size and --concurrency must be >= 1")
        self.root = RunLayout(self.root).root

    def engine_config(self) -> EngineConfig:
        return EngineConfig(self.engine, self.model, **{k: getattr(self, k) for k in (
            "tokenizer", "base_url", "api", "batch_size", "max_model_len", "concurrency", "tensor_parallel_size",
            "gpu_memory_utilization", "dtype", "seed", "request_timeout", "max_retries")})


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
        cfg.check()
        self.cfg, self.spec = cfg, STAGES[cfg.stage]
        self.layout = RunLayout(cfg.root)
        self.template = load_template(cfg.stage, cfg.template)
        self._engine = engine
        self._owns_engine = engine is None
        self.logprob = cfg.stage == "score" and cfg.score_mode == "logprob"

    def __enter__(self) -> "StageRunner":
        return self

    def __exit__(self, *exc) -> None:
        """Close the engine if the runner loaded it (an engine passed in belongs to the caller)."""
        if self._owns_engine and self._engine is not None:
            self._engine.close()
            self._engine = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = load_engine(self.cfg.engine_config())
        return self._engine

    def run(self) -> dict:
        cfg = self.cfg
        shards = [s for s in self.layout.candidate_shards() if s[0] % cfg.num_workers == cfg.worker_index]
        summary = {"stage": cfg.stage, "shards_done": [], "shards_skipped": [], "rows": 0, "errors": 0}
        for k, n, cand_path in shards:
            out = self.layout.generation_shard(cfg.stage, k, n)
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
        up_path = self.layout.generation_shard(self.spec.upstream, k, n)
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
        # an engine that schedules a whole shard itself (vLLM) gets it in one call; others report progress by chunk
        step = max(len(pending), 1) if self.engine.whole_shard else cfg.chunk_rows
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
        storage.write_text(self.layout.generation_metrics(cfg.stage, k, n), json.dumps(metrics, indent=2) + "\n")
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
