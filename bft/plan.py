"""`bft plan --config FILE`: what a run will cost before any GPU is spent. It first runs `bft
rebuild`'s preflight of the run's servers (run_file.check_servers): a plan of requests that cannot
be sent (the server is down, or does not serve the model) is an error, not a plan. What it reads:
bft/plan_inputs.py; its table: bft/plan_table.py.

Per generation stage the recipe needs: requests, prompt and output tokens, the rows expected to pass
each gate, GPU-hours or price, and the candidates needed for a target corpus size; each figure says
where it comes from (docs/OPERATIONS.md, "What `bft plan` counts"): measured (a pilot, existing
shards), the paper's figure at the one point it holds, or "unknown: run --pilot N".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from bft import plan_inputs
from bft.plan_table import render_table
from bft.run_file import RunPlan, StagePlan, check_servers, load_run
from beam_pipelines.report.paper import PAPER_SCORE5_SHARE
from schemas.errors import UserError
from schemas.options import option
from schemas.recipes import ANSWER_STAGES

PAPER_SOURCE = "the paper's figure: 13.6% scored 5 (70B forward model, Dolma's head split)"
UNKNOWN = "unknown: run --pilot N"   # a rate nothing measured and no prior holds for


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
    from lifecycle.lock import RootLock

    with RootLock(plan.layout):
        prepare.run(plan.prepare, plan.prepare_beam_args)
        return measure(plan, run_pilot(plan, n))


def paper_point(sp: StagePlan, threshold: float | None) -> bool:
    """Whether the paper's 13.6% can stand for a gate: generated scores of the score stage at 5."""
    return sp.stage == "score" and sp.cfg.score_mode == "generate" and threshold == 5


def make_plan(plan: RunPlan, target_examples: int | None = None, sample_docs: int = 2000,
              pilot: dict | None = None) -> dict:
    """The plan (module docstring); `pilot`: bft.pilot.measure's figures, which stand for every
    stage's measured ones and give the intervals."""
    from bft.pilot import stage_measured
    from generation import budget
    from generation.prompting import token_counts
    from generation.stages import STAGES
    from schemas.recipes import RECIPES

    layout = plan.layout
    recipe = RECIPES[plan.assemble.recipe]
    cands = plan_inputs.candidates(plan, sample_docs)
    prices = plan_inputs.prices(plan)
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
            measured = plan_inputs.measured(layout, sp.stage, plan.gate if sp.stage == recipe.gate else None)
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
        tokenizer, tok_source = plan_inputs.model_tokenizer(sp)
        if tokenizer is not None:
            overhead = budget.prompt_overhead(tokenizer, sp.stage, sp.cfg.template)
            if tok_source and tok_source == plan.prepare.tokenizer or not cands["texts"]:
                doc_per_req = cands["doc_tokens"] / max(cands["rows"], 1)
            else:
                sample = cands["texts"]
                doc_per_req = sum(token_counts(tokenizer, sample)) / len(sample)
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
        context = plan_inputs.context_length(sp)
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
            "prefix_share": plan_inputs.prefix_share(layout, sp, tokenizer, prompt_per_req, measured),
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
            elif paper_point(sp, plan.gate.threshold):
                share, gate_source = PAPER_SCORE5_SHARE, PAPER_SOURCE
            else:   # another mode, threshold, gate or model: the paper says nothing of it
                share, gate_source = None, UNKNOWN
            entry.update(gate_threshold=plan.gate.threshold,
                         gate_pass_rate=round(share, 4) if share is not None else None, gate_source=gate_source,
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
    out["seed_examples"] = plan_inputs.seed_rows(plan.assemble.seed_data)
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
    out["tonight"] = plan_inputs.tonight(plan, out)
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
