"""`bft plan --pilot N`: measure before promising. N candidates drawn at random by sample key (the N
smallest `schemas.keys.sample_key(id, prepare.seed)` over every candidates shard, not a shard's first
rows, which are sorted by length) go through the stages the recipe needs, exactly as the night sends
them (StageRunner.pilot: the run file's engines and servers, the same prompts, config and row seeds),
and assemble's own rules (beam_pipelines.assemble.recipes.verdicts) say which of them the release would keep.

The answers stay as checkpoint parts of their shards (no shard file, no marker): the night's runner
reuses them, so no request is paid twice; a second pilot reuses them too (and a larger one sends
only the new rows). A stage sent through a Batch API is piloted online (one request per row); a
stage written as files for `vllm run-batch` (no server) cannot be piloted. An external stage is
piloted here, with its section's engine.

What it measures (`measure`): per stage, of the pairs that reached it, the share whose output parsed
and the share that went on (the gate: passed it), each with its 95% Wilson interval; assemble's
curation after them (instruction length, empty or cut responses); the end-to-end yield k/N with its
interval, and so the expected examples (candidates x yield, the interval scaled); the output and
prompt tokens per row (mean and a 95% interval), from which bft plan derives requests, GPU-hours
and prices with their intervals; and the N that measures the yield to +-20% and +-10% (relative, at
95%): n = z^2 (1 - p) / (p r^2). A row whose request failed for a transient reason is left out of
the measure (the night resends it) and counted.
"""
from __future__ import annotations

import heapq
import math

import pyarrow as pa

import schemas
import storage
from schemas.errors import UserError

Z95 = 1.959963984540054   # the normal quantile of a two-sided 95% interval
PRECISIONS = (0.2, 0.1)   # relative half-widths the plan gives the pilot size for


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share k/n (Wilson 1927): within [0, 1], and not empty at k = 0
    or k = n, where the normal one is; (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pairs_for_precision(p: float, r: float, z: float = Z95) -> int | None:
    """The sample size whose 95% interval of a share p has a relative half-width r: z^2 (1-p) / (p r^2)
    (p = 0.14: ~590 for +-20%, ~2,360 for +-10%); None when p is 0 (no precision is reachable)."""
    return math.ceil(z * z * (1 - p) / (p * r * r)) if p > 0 else None


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` with its normal 95% interval (low at least 0)."""
    if not values:
        return 0.0, 0.0, 0.0
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return mean, max(0.0, mean - half), mean + half


def draw(layout, n: int, seed: int) -> dict[int, set[str]]:
    """{shard k: ids}: the n candidates with the smallest sample keys over every candidates shard."""
    from schemas.keys import sample_key

    smallest: list[tuple[int, str, int]] = []
    for k, _, path in layout.candidate_shards():
        for doc_id in storage.read_parquet(path, columns=["id"])["id"].to_pylist():
            item = (-sample_key(doc_id, seed), doc_id, k)
            if len(smallest) < n:
                heapq.heappush(smallest, item)
            elif item > smallest[0]:
                heapq.heapreplace(smallest, item)
    sample: dict[int, set[str]] = {}
    for _, doc_id, k in smallest:
        sample.setdefault(k, set()).add(doc_id)
    return sample


def run_pilot(plan, n: int) -> dict:
    """Sends the pilot's rows through the recipe's stages (module docstring); the caller holds the
    root's lock and prepare has run. {"n", "seed", "sample": {k: ids}, "rows": {stage: {id: row}},
    "sent_now": {stage: requests}, "output_tokens_now", "seconds"}."""
    from generation.runner import StageRunner

    for sp in plan.stages:
        if sp.cfg.batch == "vllm":
            raise UserError(f"{plan.path}: generate.{sp.stage} writes its requests as files for `vllm run-batch` "
                            "(batch: vllm): the pilot sends requests to a model; give the stage an engine that "
                            "answers (a server, vllm in-process) for the pilot, or plan without --pilot")
    seed = plan.prepare.seed
    sample = draw(plan.layout, n, seed)
    if not sample:
        raise UserError(f"{plan.layout.candidates}: prepare kept no candidate: nothing to pilot")
    out = {"n": sum(map(len, sample.values())), "seed": seed, "sample": sample, "rows": {}, "sent_now": {},
           "output_tokens_now": {}, "seconds": {}}
    for sp in plan.stages:
        with StageRunner(sp.cfg) as runner:
            done = runner.pilot(sample, {s: out["rows"][s] for s in runner.spec.reads(runner.gate)})
        out["rows"][sp.stage] = done["rows"]
        out["sent_now"][sp.stage] = done["sent_now"]
        out["output_tokens_now"][sp.stage] = done["output_tokens_now"]
        out["seconds"][sp.stage] = done["seconds"]
    return out


def _sample_candidates(layout, sample: dict[int, set[str]]) -> pa.Table:
    """The pilot's candidates rows (id, text, n_tokens, url, crawl_date)."""
    import pyarrow.compute as pc

    import schemas

    parts = []
    for k, _, path in layout.candidate_shards():
        if sample.get(k):   # validated: a shard written before a column was added gets it as nulls
            t = schemas.validate(storage.read_parquet(path), schemas.CANDIDATE, path).select(
                ["id", "text", "n_tokens", "url", "crawl_date"])
            parts.append(t.filter(pc.is_in(t["id"], pa.array(sorted(sample[k]), pa.string()))))
    return pa.concat_tables(parts)


def measure(plan, pilot: dict) -> dict:
    """What the pilot measured (module docstring): {"n", "transient_errors", "stages": {stage: {"sent",
    "parsed", "parse_rate", "parse_ci", "passed", "pass_rate", "pass_ci", "output_tokens_per_row"
    (mean, low, high), "prompt_tokens_per_row" (the same), "entered_share_ci"}}, "curation",
    "kept", "yield", "yield_ci", "drops", "pilot_size_for"}."""
    import pyarrow.compute as pc

    from beam_pipelines.assemble import recipes
    from schemas.outcomes import NOT_SENT, is_engine_error
    from schemas import drops as schemas_drops
    from schemas.drops import CURATION_DROPS
    from schemas.recipes import RECIPES

    recipe = RECIPES[plan.assemble.recipe]
    rows = pilot["rows"]
    # a transient failure is no answer: the night resends it; the measure leaves its candidate out
    failed = {i for by_id in rows.values() for i, r in by_id.items() if is_engine_error(r["parse_error"])}
    cands = _sample_candidates(plan.layout, pilot["sample"])
    cands = cands.filter(pc.invert(pc.is_in(cands["id"], pa.array(sorted(failed), pa.string()))))
    n = cands.num_rows
    ids = set(cands["id"].to_pylist())
    tables = {stage: schemas.to_table([r for i, r in by_id.items() if i in ids], schemas.GENERATION, stage)
              for stage, by_id in rows.items()}
    joined = recipes.join_stages(cands, {s: t for s, t in tables.items() if s in recipe.stages})
    reasons = recipes.verdicts(joined, recipe, plan.assemble.curation(), plan.gate).to_pylist()   # the run's one gate
    by_id = dict(zip(joined["id"].to_pylist(), reasons))
    drops: dict[str, int] = {}
    for reason in reasons:
        if reason is not None:
            drops[reason] = drops.get(reason, 0) + 1

    def dropped_at(stage: str, reason: str | None) -> bool:   # the stage's own drops: failed, unscored, below the gate
        return reason is not None and schemas_drops.parse(reason).stage == stage

    stages, entered = {}, set(ids)
    for stage in recipe.stages:
        lost = {i for i in entered if dropped_at(stage, by_id[i])}
        sent = [rows[stage][i] for i in entered if rows[stage].get(i) and rows[stage][i]["finish_reason"] != NOT_SENT]
        parsed = sum(r["parse_error"] is None for r in sent)
        whole = sum(r["parse_error"] is None and not r["input_truncated"] for r in sent)
        outputs = [r["output_tokens"] for r in sent if r["output_tokens"] is not None]
        prompts = [r["prompt_tokens"] for r in sent if r["prompt_tokens"] is not None]
        stages[stage] = {
            "entered": len(entered), "entered_share_ci": [1.0, 1.0] if stage == recipe.stages[0] else
            list(wilson(len(entered), n)), "sent": len(sent), "parsed": parsed, "whole": whole,
            "parse_rate": parsed / len(sent) if sent else None, "parse_ci": list(wilson(parsed, len(sent))),
            "passed": len(entered) - len(lost), "pass_rate": (len(entered) - len(lost)) / len(entered) if entered else None,
            "pass_ci": list(wilson(len(entered) - len(lost), len(entered))),
            "output_tokens_per_row": list(mean_interval(outputs)), "prompt_tokens_per_row": list(mean_interval(prompts)),
            "sent_now": pilot["sent_now"].get(stage, 0), "output_tokens_now": pilot["output_tokens_now"].get(stage, 0),
            "seconds": pilot["seconds"].get(stage, 0.0)}
        entered -= lost
    curated = {i for i in entered if by_id[i] in CURATION_DROPS}
    kept = len(entered) - len(curated)
    p = kept / n if n else 0.0
    return {"n": n, "seed": pilot["seed"], "transient_errors": len(failed), "stages": stages,
            "curation": {"entered": len(entered), "passed": kept, "pass_ci": list(wilson(kept, len(entered)))},
            "kept": kept, "yield": p, "yield_ci": list(wilson(kept, n)), "drops": drops,
            "pilot_size_for": {f"{r:g}": pairs_for_precision(p, r) for r in PRECISIONS}}


def stage_measured(m: dict, stage: str) -> dict | None:
    """A stage's pilot figures in the shape of plan_inputs.measured (totals over the rows sent to it)."""
    s = m["stages"].get(stage)
    if s is None:
        return None
    sent = s["sent"]
    return {"rows": s["entered"], "sent": sent, "parsed": s["parsed"], "ok": s["whole"], "passed": s["passed"],
            "output_tokens": s["output_tokens_per_row"][0] * sent, "prompt_tokens": s["prompt_tokens_per_row"][0] * sent,
            "wall_s": s["seconds"] if s["sent_now"] else 0.0,
            "tokens_per_s": s["output_tokens_now"] / s["seconds"] if s["sent_now"] and s["seconds"] else None,
            "source": f"measured (pilot of {m['n']:,})"}
