"""`bft plan --config FILE`: what a run will cost before any GPU is spent. It first runs `bft
rebuild`'s preflight of the run's servers (rebuild.check_servers): a plan of requests that cannot
be sent (the server is down, or does not serve the model) is an error, not a plan.

Per generation stage the recipe needs: requests, prompt tokens, output tokens, the rows expected to
pass each gate, and GPU-hours; and the candidates needed for a target corpus size. Each figure says
where it comes from:

- requests: backtranslate gets every candidate (ROOT/candidates when prepare has run, else an estimate
  from a sample of the input: kept share x lines, scaled by file count; with --near-dedup, less the
  sample's near-duplicates: a lower bound on the drops, since those across files are not in it); score/rate get the rows whose
  instruction parsed; rewrite/distill only the rows that pass the gate (score >= 5, rate >= 4.5),
  when the gate is on. Past a rate that is unknown, the requests are an upper bound (every row passes).
- pass rates: measured by a pilot (`--pilot N`: bft/pilot.py; with 95% intervals), else on existing
  shards (ROOT/generations/...). Nothing measured, there is no prior for a model's parse rate nor for
  a gate, with one exception: the paper's 13.6% of pairs scored 5 (Nguyen et al. 2024: generated
  scores at threshold 5, its 70B forward model on Dolma's head split); elsewhere "unknown: run
  --pilot N". With the gate's share known and a parse rate not, the examples are an upper bound.
- prompt tokens: the stage's template rendered with the model's own tokenizer (its chat template or
  the Llama-2 format) with empty values, plus the document's tokens (the candidates' exact counts
  when the model's tokenizer is prepare's, the documents prepare kept uncounted by their upper bound
  estimated from a sample of them counted with prepare's tokenizer; else counted on a sample of
  candidates with the model's tokenizer and scaled), plus for the stages after backtranslate the instruction's tokens (measured,
  else backtranslate's new-token cap: an upper bound).
- output tokens: the mean measured on existing shards, else the stage's new-token cap (upper bound);
  shown per row too.
- prefix share: the share of a stage's prompt tokens in the prefix all its prompts share (the template
  text before the first record field, with the chat format: generation/budget.py), which a server's
  prefix cache computes once: measured on the shards (their markers record it), else from the template
  and the prompt tokens above; unknown without the model's tokenizer.
- documents cut: per stage, the candidates over what its prompt holds whole (context - new-token cap -
  template - instruction, with the model's tokenizer): cut, and for a gating or answering stage their
  pairs are dropped by assemble; the smallest limit is the working length limit, printed beside
  prepare's, and the `prepare.max_tokens` that keeps every stage whole (the paper removed such
  documents before generating).
- expected examples: with a pilot, candidates x the share of its candidates that every stage and
  assemble's rules (beam_pipelines.assemble.recipes.verdicts) keep, with its Wilson interval scaled. Else each
  stage's share applied once, of the requests it was sent: backtranslate's
  parse rate, the gate's pass rate among the pairs scored, the answering stage's usable share (parsed,
  whole document) among those it answered; where a stage has no shards yet, its whole-document share.
- GPU-hours: output tokens / `tokens_per_s` of the stage's section (decode throughput of one GPU for
  that model), else the throughput measured on existing shards (output tokens / wall seconds of a
  worker); unknown when neither exists. Only for self-hosted stages: a stage priced per token is not.
- tonight's work, beside the whole corpus's: the input files new, changed and removed since the last
  prepare (its stats.json records every file's checksum), the documents of the new and changed files
  (their lines x the share prepare kept last time: documents already seen are reused row by row, so
  only these are sent), the shards each stage has pending (not written, or older than their upstream:
  bft.status), whose candidates not yet answered (checkpoints count as answered) are sent too, and so
  the requests each stage will send tonight: those documents and rows x the stage's requests per
  candidate in the plan of the whole corpus. Before any prepare, tonight is the whole corpus.
- cost of a hosted stage: a stage's section may price its tokens (`price_in`, `price_out`: USD per 1M
  input / output tokens, as hosted APIs list them; `batch_discount`: the share the Batch API takes
  off, default 0.5, OpenAI's); its prompt and output tokens above at those prices, online and through
  the Batch API (`--engine openai-batch`). These keys are the plan's; `bft rebuild` ignores them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import storage
from bft.rebuild import RunPlan, StagePlan, check_servers, load_run, no_input
from schemas.errors import UserError
from schemas.state import prepare_stats, read_json
from schemas.layout import RunLayout
from schemas.options import option
from schemas.recipes import ANSWER_STAGES, Gate

PAPER_SCORE5_SHARE = 0.136   # Nguyen et al. 2024: share of backtranslated pairs scored 5
PAPER_SOURCE = "the paper's figure: 13.6% scored 5 (70B forward model, Dolma's head split)"
UNKNOWN = "unknown: run --pilot N"   # a rate nothing measured and no prior holds for
DEFAULT_BATCH_DISCOUNT = 0.5  # OpenAI's Batch API: the same requests at half the price, within 24 h


@dataclass
class PlanConfig:
    """The options of `bft plan`."""

    root: str | None = option(None, "run root (default: the run file's `root:`)")
    format: str = option("table", "output format", choices=["table", "json"])
    target_examples: int | None = option(None, "corpus size wanted: how many candidates it needs (the paper: "
                                         "12800, 51200)")
    sample_docs: int = option(2000, "documents sampled to count tokens with a model's tokenizer")
    pilot: int | None = option(None, "measure first: send N candidates drawn at random through the recipe's "
                               "stages as the night would (running prepare first, reused when current); the "
                               "plan then gives each rate, the examples, GPU-hours and prices with a 95% "
                               "interval. The night reuses the pilot's answers: nothing is paid twice")

    def check(self) -> None:
        if self.pilot is not None and self.pilot < 1:
            raise UserError(f"--pilot {self.pilot}: the candidates to send, at least 1")


def main_plan(cfg: PlanConfig, run_file: str | None) -> int:
    if not run_file:
        raise UserError("needs --config FILE (the run file)")
    plan = load_run(run_file, cfg.root)
    check_servers(plan)   # the plan of a run that cannot send its requests is no plan
    measured = pilot(plan, cfg.pilot) if cfg.pilot else None
    result = make_plan(plan, cfg.target_examples, cfg.sample_docs, measured)
    print(json.dumps(result, indent=2) if cfg.format == "json" else render_table(result))
    return 0


def pilot(plan: RunPlan, n: int) -> dict:
    """bft.pilot's figures of `n` candidates sent through the recipe's stages, with the root's lock
    held (it writes checkpoints) after prepare (the night's own step: reused when current)."""
    from beam_pipelines import prepare
    from bft.pilot import measure, run_pilot
    from schemas.lock import RootLock

    with RootLock(plan.layout):
        prepare.run(plan.prepare, plan.prepare_beam_args)
        return measure(plan, run_pilot(plan, n))


# ---- inputs: candidates, measured shards -------------------------------------------------------

def _candidates(plan: RunPlan, sample_docs: int) -> dict:
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
            from beam_pipelines.tokens.length import shared_counter

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
    from beam_pipelines.tokens.length import shared_counter
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
    # prepare's own counter (length.shared_counter): the same loader and exact counts as the pass
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


def _measured(layout: RunLayout, stage: str, threshold: float | None) -> dict | None:
    """Totals over the stage's existing shards' metrics (and the gate's pass count for scores)."""
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
        if threshold is not None and storage.exists(layout.generation_shard(stage, k, n)):
            t = storage.read_parquet(layout.generation_shard(stage, k, n),
                                     columns=["score", "parse_error", "input_truncated"])
            passing = Gate(stage, threshold).passing(t["parse_error"], t["input_truncated"], t["score"])
            totals["passed"] += int(pc.sum(passing.cast("int64")).as_py() or 0)
    return totals if found else None


# ---- per stage ---------------------------------------------------------------------------------

def _model_tokenizer(sp: StagePlan):
    from transformers import AutoTokenizer

    source = sp.cfg.tokenizer or sp.cfg.model
    try:
        return AutoTokenizer.from_pretrained(source), source
    except Exception:  # a served model name with no local tokenizer: fall back to prepare's counts
        return None, None


def _context(sp: StagePlan) -> int | None:
    """The stage's context length: --max-model-len, else the local model folder's config."""
    if sp.cfg.max_model_len:
        return sp.cfg.max_model_len
    try:
        from transformers import AutoConfig

        from generation.engines.base import model_context_length

        return model_context_length(AutoConfig.from_pretrained(sp.cfg.tokenizer or sp.cfg.model))
    except Exception:  # a served model name: unknown here
        return None


def paper_point(sp: StagePlan, threshold: float | None) -> bool:
    """Whether the paper's 13.6% can stand for a gate: generated scores of the score stage at 5."""
    return sp.stage == "score" and sp.cfg.score_mode == "generate" and threshold == 5


def make_plan(plan: RunPlan, target_examples: int | None = None, sample_docs: int = 2000,
              pilot: dict | None = None) -> dict:
    """The plan (module docstring); `pilot`: bft.pilot.measure's figures, which stand for every
    stage's measured ones and give the intervals."""
    from bft.pilot import stage_measured
    from generation import budget
    from generation.stages import STAGES
    from schemas.recipes import RECIPES

    layout = plan.layout
    recipe = RECIPES[plan.assemble.recipe]
    threshold = plan.assemble.threshold
    cands = _candidates(plan, sample_docs)
    prices = _prices(plan)
    out: dict = {"root": plan.root, "recipe": recipe.name, "candidates": {k: cands[k] for k in (
                     "rows", "doc_tokens", "doc_tokens_source", "source") if k in cands},
                 "prepare_max_tokens": plan.prepare.max_tokens, "stages": {}}
    parsed_rows = cands["rows"]   # the pairs whose instruction parsed (the first stage's estimate, below)
    parsed_upper = False          # ... an upper bound: every instruction parsed (the parse rate unknown)
    instruction_tokens, instruction_source = None, None
    for sp in plan.stages:
        spec = STAGES[sp.stage]
        first = spec.upstream is None   # backtranslate: writes the instructions the other stages quote
        if pilot is not None:
            measured = stage_measured(pilot, sp.stage)
        else:
            measured = _measured(layout, sp.stage, threshold if sp.stage == recipe.gate else None)
        measured_source = (measured or {}).get("source", "measured")
        upper = False
        if first:
            requests, req_source = cands["rows"], cands["source"]
        elif sp.stage in ANSWER_STAGES and recipe.gate:
            gate = out["stages"].get(recipe.gate, {})
            if gate.get("passing_gate") is not None:
                requests, req_source = gate["passing_gate"], f"rows passing the {recipe.gate} gate"
                upper = gate["requests_upper_bound"]
            else:
                requests, upper = gate.get("requests", parsed_rows), True
                req_source = f"at most the pairs the {recipe.gate} gate is sent (its pass rate is {UNKNOWN})"
        else:
            requests, req_source, upper = parsed_rows, "rows whose instruction parsed", parsed_upper
            if parsed_upper:
                req_source = f"at most every candidate (the parse rate is {UNKNOWN})"
        if upper and "at most" not in req_source:
            req_source = f"at most: {req_source} (a rate before it is {UNKNOWN})"
        cap = sp.cfg.new_token_cap()
        if measured and measured["sent"]:
            out_per_req, out_source = measured["output_tokens"] / measured["sent"], measured_source
        else:
            out_per_req, out_source = cap, "new-token cap (upper bound)"
        tokenizer, tok_source = _model_tokenizer(sp)
        if tokenizer is not None:
            overhead = budget.prompt_overhead(tokenizer, sp.stage, sp.cfg.template)
            if tok_source and tok_source == plan.prepare.tokenizer or not cands["texts"]:
                doc_per_req = cands["doc_tokens"] / max(cands["rows"], 1)
            else:
                sample = cands["texts"]
                doc_per_req = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in sample) / len(sample)
            prompt_source = "template with the model's tokenizer + documents"
        else:
            overhead, doc_per_req = 0, cands["doc_tokens"] / max(cands["rows"], 1)
            prompt_source = "documents in prepare's tokens (no local tokenizer for the model)"
        if not spec.doc_field:   # distill: the instruction alone
            doc_per_req = 0
        instr = 0 if first else (instruction_tokens or 0)
        prompt_per_req = overhead + doc_per_req + instr
        if measured and measured["sent"]:
            # backtranslate: the share the next stages get (parsed instructions); an answering stage:
            # the share assemble can keep (parsed, from a whole document)
            usable = measured["parsed"] if first else measured["ok"]
            ok_rate, ok_source = min(1.0, usable / measured["sent"]), f"{measured_source} (of the requests sent)"
        else:
            ok_rate, ok_source = None, UNKNOWN   # no prior: a model's parse rate is its own
        # documents over what the stage's prompt holds whole are cut, and assemble drops their pairs
        # when the stage gates or answers (`score:input_truncated`, ...): counted, with what dropping
        # them up front would take (bft prepare --max-tokens)
        context = _context(sp)
        limit = cut = None
        if tokenizer is not None and context and spec.doc_field:
            limit = budget.max_document_tokens(context, cap, overhead + int(instr))
            lengths = cands["lengths"]
            if len(lengths):
                ratio = doc_per_req / max(cands["doc_tokens"] / max(cands["rows"], 1), 1e-9)  # model vs prepare tokens
                import numpy as np

                weights = cands.get("weights")
                cut = int(round(float(np.average(lengths * ratio > limit, weights=weights)) * requests))
        entry = {
            "requests": int(round(requests)),
            "requests_source": req_source,
            "requests_upper_bound": upper,
            "prompt_tokens": int(round(requests * prompt_per_req)),
            "prompt_tokens_source": prompt_source,
            "output_tokens": int(round(requests * out_per_req)),
            "output_tokens_source": out_source,
            "output_tokens_per_row": round(out_per_req, 1),
            "prefix_share": _prefix_share(layout, sp, tokenizer, prompt_per_req, measured),
            "parse_ok_rate": round(ok_rate, 4) if ok_rate is not None else None,
            "parse_ok_source": ok_source,
            "whole_document_limit": limit,
            "documents_cut": cut,
            "documents_cut_share": round(cut / requests, 4) if cut is not None and requests else None,
        }
        if first:
            parsed_rows = requests * (ok_rate if ok_rate is not None else 1.0)
            parsed_upper = ok_rate is None
            instruction_tokens, instruction_source = out_per_req, out_source
        if sp.stage == recipe.gate:
            if measured and measured["sent"]:
                share = measured["passed"] / measured["sent"]   # of the pairs sent to the gate stage
                gate_source = measured_source
            elif paper_point(sp, threshold):
                share, gate_source = PAPER_SCORE5_SHARE, PAPER_SOURCE
            else:   # another mode, threshold, gate or model: the paper says nothing of it
                share, gate_source = None, UNKNOWN
            entry.update(gate_threshold=threshold, gate_pass_rate=round(share, 4) if share is not None else None,
                         gate_source=gate_source,
                         passing_gate=int(round(requests * share)) if share is not None else None)
        tps = sp.tokens_per_s
        tps_source = "run file" if tps else None
        if not tps and measured and measured.get("tokens_per_s"):
            tps, tps_source = measured["tokens_per_s"], f"{measured_source}, one worker"
        elif not tps and measured and measured["wall_s"] and pilot is None:
            tps, tps_source = measured["output_tokens"] / measured["wall_s"], "measured (one worker)"
        entry["tokens_per_s"] = round(tps, 2) if tps else None
        entry["tokens_per_s_source"] = tps_source
        entry["gpu_hours"] = round(entry["output_tokens"] / tps / 3600, 3) if tps else None
        price = prices.get(sp.stage)
        entry["hosted"] = price is not None
        if price is not None:   # a hosted API: paid per token, no GPU of ours
            online = (entry["prompt_tokens"] * price["price_in"] + entry["output_tokens"] * price["price_out"]) / 1e6
            entry.update(price, gpu_hours=None, cost_online=round(online, 2),
                         cost_batch=round(online * (1 - price["batch_discount"]), 2))
        out["stages"][sp.stage] = entry
    out["instruction_tokens"] = {"per_request": instruction_tokens, "source": instruction_source}
    limits = [s["whole_document_limit"] for s in out["stages"].values() if s.get("whole_document_limit") is not None]
    out["max_tokens_keeping_all_whole"] = min(limits) if limits else None
    yield_rate, yield_upper, yield_source = _yield(out, recipe)
    if pilot is not None:   # every stage and assemble's rules, measured together on the same pairs
        yield_rate, yield_upper = pilot["yield"], False
        yield_source = (f"pilot: {pilot['kept']:,} of {pilot['n']:,} candidates kept by every stage and assemble's "
                        "rules (before its instruction dedup, decontamination and cap)")
    out["examples_expected"] = int(cands["rows"] * yield_rate) if yield_rate is not None else None
    out["examples_expected_upper_bound"] = yield_upper
    out["yield_source"] = yield_source
    out["seed_examples"] = _seed_rows(plan.assemble.seed_data)
    out["release_examples_expected"] = (out["examples_expected"] + (out["seed_examples"] or 0)
                                        if out["examples_expected"] is not None else None)
    out["yield_per_candidate"] = round(yield_rate, 5) if yield_rate is not None else None
    if target_examples:
        out["target_examples"] = target_examples
        out["candidates_needed"] = math.ceil(target_examples / yield_rate) if yield_rate else None
    own = [s for s in out["stages"].values() if not s["hosted"]]
    out["gpu_hours_total"] = (round(sum(s["gpu_hours"] for s in own), 3)
                              if all(s["gpu_hours"] is not None for s in own) else None)
    hosted = [s for s in out["stages"].values() if s["hosted"]]
    out["cost_online_total"] = round(sum(s["cost_online"] for s in hosted), 2) if hosted else None
    out["cost_batch_total"] = round(sum(s["cost_batch"] for s in hosted), 2) if hosted else None
    out["upper_bounds"] = any(s["requests_upper_bound"] for s in out["stages"].values())
    if pilot is not None:
        out["pilot"] = _pilot_intervals(pilot, out, cands["rows"])
    out["tonight"] = tonight(plan, out)
    return out


def _pilot_intervals(m: dict, out: dict, candidates: int) -> dict:
    """The pilot's figures (bft.pilot.measure) and what they give for the whole corpus, each with its
    95% interval: per stage the requests (candidates x the share that reaches the stage), output
    tokens (requests x the tokens per row), GPU-hours or price; the expected examples. An interval
    of a product takes its factors' ends (low x low, high x high): wider than 95%, never narrower."""
    stages = {}
    for stage, s in m["stages"].items():
        e = out["stages"][stage]
        req = [candidates * x for x in s["entered_share_ci"]]
        tokens = [r * t for r, t in zip(req, s["output_tokens_per_row"][1:])]
        prompt = [r * t for r, t in zip(req, s["prompt_tokens_per_row"][1:])]
        figures = {**{k: s[k] for k in ("sent", "parsed", "passed", "sent_now")},
                   "parse_rate": s["parse_rate"], "parse_ci": s["parse_ci"], "pass_rate": s["pass_rate"],
                   "pass_ci": s["pass_ci"], "output_tokens_per_row": s["output_tokens_per_row"],
                   "requests_ci": [round(x) for x in req], "output_tokens_ci": [round(x) for x in tokens]}
        if e["tokens_per_s"] and not e["hosted"]:
            figures["gpu_hours_ci"] = [round(x / e["tokens_per_s"] / 3600, 3) for x in tokens]
        if e["hosted"]:
            online = [(p * e["price_in"] + t * e["price_out"]) / 1e6 for p, t in zip(prompt, tokens)]
            figures["cost_online_ci"] = [round(x, 2) for x in online]
            figures["cost_batch_ci"] = [round(x * (1 - e["batch_discount"]), 2) for x in online]
        stages[stage] = figures
    lo, hi = m["yield_ci"]
    result = {"n": m["n"], "seed": m["seed"], "transient_errors_left_out": m["transient_errors"], "stages": stages,
              "curation": m["curation"], "kept": m["kept"], "yield": round(m["yield"], 5),
              "yield_ci": [round(lo, 5), round(hi, 5)], "drops": m["drops"],
              "examples_expected_ci": [int(candidates * lo), math.ceil(candidates * hi)],
              "pilot_size_for": m["pilot_size_for"]}
    if out["seed_examples"]:
        result["release_examples_expected_ci"] = [x + out["seed_examples"] for x in result["examples_expected_ci"]]
    for key, total in (("gpu_hours_ci", "gpu_hours_total_ci"), ("cost_online_ci", "cost_online_total_ci"),
                       ("cost_batch_ci", "cost_batch_total_ci")):
        parts = [s[key] for s in stages.values() if key in s]
        if parts and (key != "gpu_hours_ci" or out["gpu_hours_total"] is not None):
            result[total] = [round(sum(p[0] for p in parts), 3), round(sum(p[1] for p in parts), 3)]
    return result


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


def _prefix_share(layout: RunLayout, sp: StagePlan, tokenizer, prompt_per_req: float, measured: dict | None):
    """The share of the stage's prompt tokens in the prefix all its prompts share (what a server's prefix
    cache reuses): measured on its shards where they record it, else from its template and the prompt
    tokens estimated above; None without a tokenizer."""
    from generation import budget

    share = budget.token_figures(layout, sp.stage)["prefix_share"] if measured else None
    if share is None:
        share = budget.prefix_share(budget.shared_prefix_tokens(tokenizer, sp.stage, sp.cfg.template), 1, prompt_per_req)
    return share


def _prices(plan: RunPlan) -> dict[str, dict]:
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


def _seed_rows(path: str | None) -> int | None:
    """The seed pairs assemble mixes in (the rows of --seed-data; None without one or before it exists)."""
    if not path or not storage.exists(path):
        return None
    from beam_pipelines.assemble.pipeline import read_seed_table

    try:
        return read_seed_table(path).num_rows
    except Exception:  # assemble names the problem; the plan only leaves the figure out
        return None


def _yield(out: dict, recipe) -> tuple[float | None, bool, str]:
    """(examples per candidate, whether it is an upper bound, where it comes from): each a share of
    the requests its stage was sent (applied once): the backtranslate parse rate, the gate's pass rate
    among the pairs scored, the answering stage's usable share among the pairs it was sent; where a
    stage is not measured yet, the share of its documents that its prompt holds whole (assemble drops
    the pairs of a cut document). A parse rate not measured is at most 1: with the gate's share known
    (measured, or the paper's at its point) the yield is an upper bound; without it, unknown."""
    stages = out["stages"]
    first = recipe.stages[0]   # the stage that writes the instructions (backtranslate)
    rate, upper, sources = 1.0, False, []
    for name, key in ((first, "parse_ok_rate"), (recipe.gate, "gate_pass_rate"), (recipe.answer, "parse_ok_rate")):
        s = stages.get(name) if name else None
        if s is None:
            continue
        source = s["gate_source" if key == "gate_pass_rate" else "parse_ok_source"]
        if s[key] is None:
            if key == "gate_pass_rate":
                return None, False, f"unknown: the {name} gate's pass rate is {UNKNOWN}"
            upper = True
        else:
            rate *= s[key]
            sources.append(f"{name}: {source}")
        if not source.startswith("measured") and s.get("documents_cut") and s["requests"]:
            rate *= 1 - s["documents_cut"] / s["requests"]
    if upper and not sources:
        return None, False, f"unknown: no stage's rate is measured ({UNKNOWN})"
    if upper:
        return rate, True, f"at most ({'; '.join(sources)}; the parse rates are {UNKNOWN})"
    return rate, False, "; ".join(sources)


def _rate(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "?"


def _ci(ci: list, fmt: str = ",.0f") -> str:
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def render_table(result: dict) -> str:
    c = result["candidates"]
    lines = [f"plan for {result['root']} (recipe {result['recipe']})",
             f"candidates: {c['rows']:,} documents, {c['doc_tokens']:,} tokens ({c['source']})", "",
             f"{'stage':<14}{'requests':>12}{'prompt tok':>15}{'output tok':>14}{'pass':>8}{'tok/s':>10}{'GPU-h':>10}"]
    for stage, s in result["stages"].items():
        passing = s["gate_pass_rate"] if "gate_pass_rate" in s else s["parse_ok_rate"]
        at_most = "<=" if s["requests_upper_bound"] else ""
        lines.append(f"{stage:<14}{at_most + format(s['requests'], ','):>12}{s['prompt_tokens']:>15,}"
                     f"{s['output_tokens']:>14,}{_rate(passing):>8}{(s['tokens_per_s'] or 0):>10,.0f}"
                     + (f"{'hosted':>10}" if s.get("hosted") else
                        f"{(s['gpu_hours'] if s['gpu_hours'] is not None else float('nan')):>10.2f}"))
    lines.append("")
    for stage, s in result["stages"].items():
        src = [s["requests_source"], "outputs: " + s["output_tokens_source"], "parsed: " + s["parse_ok_source"]]
        if "gate_source" in s:
            src.append(f"gate >= {s['gate_threshold']:g}: {s['gate_source']}")
        if s["tokens_per_s_source"]:
            src.append("tok/s: " + s["tokens_per_s_source"])
        lines.append(f"  {stage}: " + "; ".join(src))
    for stage, s in result["stages"].items():   # what each row pays, and what a prefix cache saves of it
        share = s.get("prefix_share")
        lines.append(f"  {stage}: {s['output_tokens_per_row']:,.1f} output tokens per row"
                     + (f"; {share:.1%} of its prompt tokens are the prefix every prompt shares (a server's "
                        "prefix cache computes it once)" if share is not None else ""))
    lines += _length_lines(result)
    lines += _pilot_lines(result)
    seeds = result.get("seed_examples")
    expected = result["examples_expected"]
    if expected is None:
        lines.append(f"\nexpected examples: {result['yield_source']}")
    else:
        at_most = "at most " if result["examples_expected_upper_bound"] else ""
        ci = result.get("pilot", {}).get("examples_expected_ci")
        lines.append(f"\nexpected examples: {at_most}{expected:,}" + (f" {_ci(ci)}" if ci else "")
                     + f" ({result['yield_per_candidate']:.4f} per candidate)"
                     + (f" + {seeds:,} seed = {result['release_examples_expected']:,}" if seeds else "")
                     + (f" {_ci(result['pilot']['release_examples_expected_ci'])}"
                        if seeds and ci and "release_examples_expected_ci" in result["pilot"] else "")
                     + (" in the release" if seeds else "") + f"; {result['yield_source']}")
    if "target_examples" in result:
        needed = result["candidates_needed"]
        lines.append(f"candidates needed for {result['target_examples']:,} examples: "
                     + (("at least " if result["examples_expected_upper_bound"] else "") + f"{needed:,}" if needed else
                        "unknown (run --pilot N)" if result["yield_per_candidate"] is None else "cannot be reached"))
    hosted = {stage: s for stage, s in result["stages"].items() if s.get("hosted")}
    pilot = result.get("pilot") or {}
    if hosted:
        lines.append("\ncost of the hosted stages (USD; prices per 1M tokens from the run file):")
        for stage, s in hosted.items():
            ci = pilot.get("stages", {}).get(stage, {})
            lines.append(f"  {stage}: {s['requests']:,} requests, {s['prompt_tokens']:,} in x ${s['price_in']:g} + "
                         f"{s['output_tokens']:,} out x ${s['price_out']:g}: online ${s['cost_online']:,.2f}"
                         + (f" {_ci(ci['cost_online_ci'], ',.2f')}" if "cost_online_ci" in ci else "")
                         + f", batch ${s['cost_batch']:,.2f} ({s['batch_discount']:.0%} off)")
        at_most = "at most " if any(s["requests_upper_bound"] for s in hosted.values()) else ""
        lines.append(f"  in all: {at_most}online ${result['cost_online_total']:,.2f}"
                     + (f" {_ci(pilot['cost_online_total_ci'], ',.2f')}" if "cost_online_total_ci" in pilot else "")
                     + f", batch ${result['cost_batch_total']:,.2f}")
    total = result["gpu_hours_total"]
    lines.append(("GPU-hours in all (self-hosted stages): " if hosted else "GPU-hours in all: ")
                 + (("at most " if any(s["requests_upper_bound"] for s in result["stages"].values()
                                         if not s.get("hosted")) else "") + f"{total:.2f}"
                    + (f" {_ci(pilot['gpu_hours_total_ci'], ',.2f')}" if "gpu_hours_total_ci" in pilot else "")
                    if total is not None else "unknown (give tokens_per_s in each stage's section)"))
    if result["upper_bounds"]:
        lines.append("(<=, at most: a rate before the stage is unknown; `bft plan --pilot N` measures it)")
    return "\n".join(lines + tonight_lines(result))


def _length_lines(result: dict) -> list[str]:
    """Per stage the documents over what its prompt holds whole (cut: assemble drops the pairs of a
    gating or answering stage), and the working limit beside prepare's."""
    lines, order = [], list(result["stages"])
    for stage, s in result["stages"].items():
        if s.get("documents_cut"):
            paid = order.index(stage) + 1  # one request in each stage up to this one
            dropped = (f" (their pairs are dropped by assemble, after ~{s['documents_cut'] * paid:,} requests in "
                       f"{', '.join(order[:paid])})") if paid > 1 else ""
            lines.append(f"  {stage}: {s['documents_cut']:,} document(s) ({s['documents_cut_share']:.1%} of its requests) "
                         f"over the {s['whole_document_limit']:,} tokens its prompt holds whole: cut{dropped}")
    limit = result["max_tokens_keeping_all_whole"]
    if limit is not None:
        lines.append(f"  working length limit: {limit:,} document tokens (the smallest stage's; prepare keeps up to "
                     f"{result['prepare_max_tokens']:,})")
    if any(s.get("documents_cut") for s in result["stages"].values()):
        lines.append(f"  `prepare: {{max_tokens: {limit}}}` keeps every stage whole "
                     "and drops those documents before any request (the paper removed such documents up front)")
    return lines


def _pilot_lines(result: dict) -> list[str]:
    p = result.get("pilot")
    if not p:
        return []
    lines = ["", f"pilot: {p['n']:,} candidates drawn by sample key (seed {p['seed']}); rates of the pairs that reached "
                 "each stage, 95% Wilson intervals"
             + (f"; {p['transient_errors_left_out']} left out (a transient failure: the night resends them)"
                if p["transient_errors_left_out"] else ""),
             f"{'stage':<14}{'sent':>6}{'parsed':>8}{'parse rate':>22}{'passed':>8}{'pass rate':>22}{'requests (95%)':>26}"]

    def rate(r, ci):
        return f"{_rate(r)} {_ci(ci, '.3f')}" if r is not None else "?"

    for stage, s in p["stages"].items():
        lines.append(f"{stage:<14}{s['sent']:>6}{s['parsed']:>8}{rate(s['parse_rate'], s['parse_ci']):>22}"
                     f"{s['passed']:>8}{rate(s['pass_rate'], s['pass_ci']):>22}{_ci(s['requests_ci']):>26}")
    cur = p["curation"]
    lines.append(f"{'curation':<14}{cur['entered']:>6}{'':>8}{'':>22}{cur['passed']:>8}"
                 f"{rate(cur['passed'] / cur['entered'] if cur['entered'] else None, cur['pass_ci']):>22}")
    lines.append(f"end to end: {p['kept']} of {p['n']} kept, yield {p['yield']:.4f} {_ci(p['yield_ci'], '.4f')}")
    if p["drops"]:
        lines.append("  dropped: " + ", ".join(f"{r} {n}" for r, n in sorted(p["drops"].items(), key=lambda kv: -kv[1])))
    sizes = p["pilot_size_for"]
    lines.append("pilot size for a relative precision of the yield at 95%: "
                 + ", ".join(f"+-{float(r):.0%}: " + (f"{n:,} candidates" if n else "unreachable (no pair kept)")
                             for r, n in sizes.items()))
    return lines


def tonight_lines(result: dict) -> list[str]:
    t = result["tonight"]
    if t["first_night"]:
        return ["", "tonight: the first night (no prepare output yet): the whole corpus above"]
    if t.get("nothing_new"):
        return ["", f"tonight: {t['nothing_new']}; no request is sent"]
    f = t["files"]
    lines = ["", f"tonight (since the last prepare): input files {f['new']} new, {f['changed']} changed, {f['removed']} "
                 f"removed, {f['unchanged']} unchanged; ~{t['documents']:,} new or changed documents "
                 f"({t['documents_source']})",
             f"{'stage':<14}{'pending shards':>16}{'requests tonight':>18}{'whole corpus':>14}"]
    for stage, s in t["stages"].items():
        pending = f"{len(s['pending_shards'])} ({s['pending_rows']:,} rows)" if s["pending_shards"] else "0"
        lines.append(f"{stage:<14}{pending:>16}{s['requests']:>18,}{result['stages'][stage]['requests']:>14,}")
    return lines
