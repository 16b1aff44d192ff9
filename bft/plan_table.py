"""`bft plan`'s table: the plan (bft/plan.py's make_plan) as text, with each figure's source, the
documents cut, the pilot's rates and intervals, the hosted stages' prices and tonight's work beside
the whole corpus's."""
from __future__ import annotations


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
