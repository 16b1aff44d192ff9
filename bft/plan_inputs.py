"""What `bft plan` (bft/plan.py) reads to make its figures: the candidates (measured, or estimated
from a sample of the input before prepare has run), the totals over a stage's existing shards, a stage's
model tokenizer and context length, its prefix share, the run file's prices, the seed pairs, and
tonight's work (the input files new or changed since the last prepare, the shards pending). Each is
read as it stands: the plan writes nothing (a damaged state file is not set aside).
"""
from __future__ import annotations

import storage
from bft.rebuild import no_input
from bft.run_file import RunPlan, StagePlan
from schemas.errors import UserError
from schemas.layout import RunLayout
from schemas.recipes import Gate
from lifecycle.state import prepare_stats, read_json

DEFAULT_BATCH_DISCOUNT = 0.5  # OpenAI's Batch API: the same requests at half the price, within 24 h


def candidates(plan: RunPlan, sample_docs: int) -> dict:
    """{"rows", "doc_tokens", "texts" (a sample), "source"} of the candidates, measured or estimated."""
    import pyarrow.compute as pc

    layout = plan.layout
    if storage.exists(layout.prepare_stats):
        import numpy as np

        rows, tokens, texts, lengths, uncounted, unseen = 0, 0, [], [], 0, []
        want = max(sample_docs, 1)
        for _, _, path in layout.candidate_shards():
            t = storage.read_parquet(path, columns=["n_tokens"])
            if len(texts) < sample_docs or (len(unseen) < want and t["n_tokens"].null_count):
                t = storage.read_parquet(path, columns=["n_tokens", "text"])
            rows += t.num_rows
            tokens += int(pc.sum(t["n_tokens"]).as_py() or 0)
            counted = t.filter(pc.is_valid(t["n_tokens"]))
            lengths.append(counted["n_tokens"].to_numpy())
            uncounted += t.num_rows - counted.num_rows
            if "text" in t.column_names:
                texts += t["text"].to_pylist()[: max(sample_docs - len(texts), 0)]
                unseen += t.filter(pc.is_null(t["n_tokens"]))["text"].to_pylist()[: max(want - len(unseen), 0)]
        weights = [np.ones(sum(map(len, lengths)))]
        counts = "exact counts"
        if uncounted:
            # documents prepare kept by their upper bound, uncounted: a sample of them counted with
            # prepare's tokenizer stands for them all (their lengths, and their tokens by the mean)
            from beam_pipelines.tokens.load import shared_counter

            sample = np.array(shared_counter(plan.prepare.tokenizer).count(unseen), dtype=np.int64)
            tokens += int(round(float(sample.mean()) * uncounted))
            lengths.append(sample)
            weights.append(np.full(len(sample), uncounted / len(sample)))
            counts += f"; {uncounted:,} documents kept uncounted, estimated from {len(sample):,} of them counted"
        return {"rows": rows, "doc_tokens": tokens, "doc_tokens_source": counts, "texts": texts, "source": "candidates",
                "lengths": np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64),
                "weights": np.concatenate(weights) if lengths else np.zeros(0)}
    return _estimate_from_input(plan, sample_docs)


def _estimate_from_input(plan: RunPlan, sample_docs: int) -> dict:
    """Before prepare has run: parse up to `sample_docs` lines of the first head-split file, measure
    them with prepare's tokenizer and limits, and scale by the number of files."""
    from beam_pipelines.prepare import dolma
    from beam_pipelines.tokens.load import shared_counter
    from beam_pipelines.prepare import list_inputs

    cfg = plan.prepare
    files = [f for f in list_inputs(cfg.input) if not cfg.splits or dolma.split_of(f, cfg.splits)]
    if not files:
        raise UserError("no input file is in the selected splits: nothing to plan")
    lines, docs = 0, []
    for raw in storage.open_lines(files[0]):
        lines += 1
        doc = dolma.parse_line(raw, cfg.max_line_bytes)
        if isinstance(doc, dolma.Document):
            docs.append(doc.text)
        if lines >= sample_docs:
            break
    kept, tokens, texts, lengths = 0, 0, [], []
    # prepare's own counter (tokens.load.shared_counter): the same loader and exact counts as the pass
    for text, n in zip(docs, shared_counter(cfg.tokenizer).count(docs) if docs else []):
        if cfg.min_tokens <= n <= cfg.max_tokens:
            kept += 1
            tokens += n
            texts.append(text)
            lengths.append(n)
    near = 0
    if cfg.near_dedup:  # the sample's own near-duplicates: a lower bound (those across files are not in it)
        from beam_pipelines.minhash import sketch, survivors

        params = cfg.minhash_params()
        found = survivors({i: sketch(t, params) for i, t in enumerate(texts)}, params)
        dropped = {i for i, s in found.items() if i != s}
        near = len(dropped)
        kept -= near
        tokens -= sum(lengths[i] for i in dropped)
        texts = [t for i, t in enumerate(texts) if i not in dropped]
        lengths = [n for i, n in enumerate(lengths) if i not in dropped]
    # a sampled file that is shorter than the sample is the whole file: scale by files either way
    per_file_lines = lines
    if lines >= sample_docs:  # count the rest of the first file's lines cheaply (no parsing)
        per_file_lines = sum(1 for _ in storage.open_lines(files[0]))
    scale = per_file_lines * len(files) / max(lines, 1)
    rows = kept * scale
    if cfg.target_docs:
        tokens = tokens * min(cfg.target_docs, rows) / max(kept, 1) if kept else 0
        rows = min(cfg.target_docs, rows)
    else:
        tokens *= scale
    import numpy as np

    return {"rows": int(rows), "doc_tokens": int(tokens), "texts": texts, "lengths": np.array(lengths, dtype=np.int64),
            "source": f"estimated from {lines} lines of {files[0]} x {len(files)} files"
                      + (f", less the {near} near-duplicates among them" if cfg.near_dedup else "")}


def measured(layout: RunLayout, stage: str, gate: Gate | None) -> dict | None:
    """Totals over the stage's existing shards' metrics (and the pass count of `gate`, the run's gate
    when `stage` is its gate stage)."""
    import pyarrow.compute as pc

    try:
        shards = layout.candidate_shards()
    except UserError:
        return None
    totals = {"rows": 0, "sent": 0, "ok": 0, "parsed": 0, "prompt_tokens": 0, "output_tokens": 0, "wall_s": 0.0, "passed": 0}
    found = 0
    for k, n, _ in shards:
        metrics = layout.generation_metrics(stage, k, n)
        m = read_json(layout, metrics, {"rows": int}, set_aside=False)   # plan writes nothing
        if m is None:
            continue
        found += 1
        not_sent = (m.get("finish_reasons") or {}).get("not_sent", 0)
        totals["rows"] += m["rows"]
        totals["sent"] += m["rows"] - not_sent
        # rows whose output is usable: sent, parsed, and made from a whole document (assemble drops
        # the pairs of a cut one); every row not sent carries a parse_error, so these are all sent
        parsed = m["rows"] - sum((m.get("parse_failures") or {}).values())
        totals["parsed"] += parsed
        totals["ok"] += max(0, parsed - (m.get("input_truncated") or 0))
        for key in ("prompt_tokens", "output_tokens", "wall_s"):
            totals[key] += m.get(key) or 0
        if gate is not None and storage.exists(layout.generation_shard(stage, k, n)):
            t = storage.read_parquet(layout.generation_shard(stage, k, n),
                                     columns=["score", "parse_error", "input_truncated"])
            passing = gate.passing(t["parse_error"], t["input_truncated"], t["score"])
            totals["passed"] += int(pc.sum(passing.cast("int64")).as_py() or 0)
    return totals if found else None


def model_tokenizer(sp: StagePlan):
    from transformers import AutoTokenizer

    source = sp.cfg.tokenizer or sp.cfg.model
    try:
        return AutoTokenizer.from_pretrained(source), source
    except Exception:  # a served model name with no local tokenizer: fall back to prepare's counts
        return None, None


def context_length(sp: StagePlan) -> int | None:
    """The stage's context length: --max-model-len, else the local model folder's config."""
    if sp.cfg.max_model_len:
        return sp.cfg.max_model_len
    try:
        from transformers import AutoConfig

        from generation.engines.base import model_context_length

        return model_context_length(AutoConfig.from_pretrained(sp.cfg.tokenizer or sp.cfg.model))
    except Exception:  # a served model name: unknown here
        return None


def tonight(plan: RunPlan, out: dict) -> dict:
    """What tonight's rebuild will send, beside the whole corpus's plan `out` (module docstring)."""
    from beam_pipelines.prepare import input_fingerprint, list_inputs
    from bft.status import stage_pending

    layout, cands = plan.layout, out["candidates"]
    per_candidate = {stage: s["requests"] / cands["rows"] if cands["rows"] else 0.0 for stage, s in out["stages"].items()}
    stats = prepare_stats(layout, set_aside=False)
    if stats is None:
        return {"first_night": True, "documents": cands["rows"], "documents_source": cands["source"],
                "stages": {stage: {"requests": s["requests"], "pending_shards": None} for stage, s in out["stages"].items()}}
    empty = no_input(plan.prepare)
    if empty:   # the rebuild stops at once: nothing new tonight
        return {"first_night": False, "nothing_new": f"nothing new tonight: {empty}",
                "stages": {stage: {"requests": 0, "pending_shards": None} for stage in out["stages"]}}
    seen = {f["path"]: f for f in stats.get("inputs") or []}
    now = {f["path"]: f for f in input_fingerprint(list_inputs(plan.prepare.input))}
    new = sorted(p for p in now if p not in seen)
    changed = sorted(p for p in now if p in seen and now[p] != seen[p])
    lines = sum(sum(1 for _ in storage.open_lines(p)) for p in new + changed)
    kept_share = stats["kept"] / stats["input_records"] if stats.get("input_records") else 1.0
    documents = int(round(lines * kept_share))
    result = {"first_night": False, "files": {"new": len(new), "changed": len(changed),
                                              "removed": len(set(seen) - set(now)), "unchanged": len(now) - len(new) - len(changed)},
              "documents": documents,
              "documents_source": f"{lines:,} lines of the new and changed input files x the {kept_share:.1%} prepare "
                                  "kept last time (an upper bound for a changed file: its unchanged documents are reused)",
              "stages": {}}
    shards = layout.candidate_shards()
    rows = {k: storage.read_parquet(path, columns=["id"]).num_rows for k, _, path in shards}
    for stage in out["stages"]:
        state = stage_pending(layout, stage, shards)
        answered = sum(len(storage.read_parquet(p, columns=["id"]))
                       for k in state["in_flight"]
                       for p in storage.list_files(layout.generation_checkpoints(stage, k, shards[0][1]))
                       if p.endswith(".parquet"))
        pending = sum(rows[k] for k in state["pending"])
        # the answered rows (a pilot's, a killed run's) are requests, not candidates: taken off the
        # requests the pending candidates make (a stage past a rate is sent only some of them)
        todo = max(0, pending * per_candidate[stage] - answered)
        result["stages"][stage] = {"pending_shards": state["pending"], "pending_rows": max(0, pending - answered),
                                   "requests": int(round(documents * per_candidate[stage] + todo))}
    return result


def prefix_share(layout: RunLayout, sp: StagePlan, tokenizer, prompt_per_req: float, measured: dict | None):
    """The share of the stage's prompt tokens in the prefix all its prompts share (what a server's prefix
    cache reuses): measured on its shards where they record it, else from its template and the prompt
    tokens estimated above; None without a tokenizer."""
    from generation import budget

    share = budget.token_figures(layout, sp.stage)["prefix_share"] if measured else None
    if share is None:
        share = budget.prefix_share(budget.shared_prefix_tokens(tokenizer, sp.stage, sp.cfg.template), 1, prompt_per_req)
    return share


def prices(plan: RunPlan) -> dict[str, dict]:
    """{stage: {price_in, price_out, batch_discount}} of the stages whose run-file section prices its
    tokens (USD per 1M; module docstring). load_run keeps only what bft rebuild reads, so the stage
    sections are read again here (their keys and types were checked when the run was loaded)."""
    from bft import config
    from generation.job import GenerateConfig

    doc = config.read_run_file(plan.path)
    out = {}
    for sp in plan.stages:
        run = config.section_values(GenerateConfig, doc, plan.path, "generate", sp.stage)[1]
        if "price_in" not in run and "price_out" not in run:
            continue
        price = {"price_in": run.get("price_in", 0.0), "price_out": run.get("price_out", 0.0),
                 "batch_discount": run.get("batch_discount", DEFAULT_BATCH_DISCOUNT)}
        if min(price["price_in"], price["price_out"]) < 0 or not 0 <= price["batch_discount"] < 1:
            raise UserError(f"{plan.path}: generate.{sp.stage}: price_in and price_out are USD per 1M tokens (>= 0) "
                            f"and batch_discount the share the Batch API takes off (0 <= it < 1)")
        out[sp.stage] = price
    return out


def seed_rows(path: str | None) -> int | None:
    """The seed pairs assemble mixes in (the rows of --seed-data; None without one or before it exists)."""
    if not path or not storage.exists(path):
        return None
    from beam_pipelines.assemble.seed import read_seed_table

    try:
        return read_seed_table(path).num_rows
    except Exception:  # assemble names the problem; the plan only leaves the figure out
        return None

