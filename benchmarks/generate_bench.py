"""Benchmark of the generation stages on the hf engine (issue: GPU batch generators).

(a) the share of a stage's wall time spent outside the engine's generate calls (reading, prompting,
    parsing, writing): the backtranslate stage over a prepared root;
(b) output tokens/s of the engine's batching (length-sorted batches, left padding) against a plain
    loop of `model.generate` over the same prompts in input order with the same batch size and
    sampling, side by side in one run.
A small Llama (hidden 256, 4 layers, random weights with outputs ending after ~48 tokens) stands in
for the backward model; documents have log-normal lengths as in the prepare benchmark.

    .venv/bin/python -m benchmarks.generate_bench [--docs 256] [--device cpu|cuda]
    .venv/bin/python -m benchmarks.generate_bench --engine vllm [--model PATH]   # where vLLM and a GPU exist
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work", "generate")


def build(docs: int) -> tuple[str, str]:
    from beam_pipelines import prepare
    from benchmarks.corpus import TextMaker, write_dolma
    from training.tiny import make_tiny_llama, train_byte_fallback_bpe

    root = os.path.join(WORK, f"root-{docs}")
    model = os.path.join(WORK, "model")
    if not os.path.exists(os.path.join(model, "config.json")):
        maker = TextMaker(seed=5)
        tok = train_byte_fallback_bpe([maker.text(maker.length()) for _ in range(500)], 8000)
        make_tiny_llama(model, tok, hidden_size=256, layers=4, context=4096, mean_output_tokens=48)
    if not os.path.exists(os.path.join(root, "candidates", "stats.json")):
        shutil.rmtree(root, ignore_errors=True)
        write_dolma(os.path.join(root, "dolma"), docs, 2, maker=TextMaker(seed=docs), dup_rate=0.0)
        prepare.run(prepare.PrepareConfig(input=[os.path.join(root, "dolma", "documents", "*", "*.json.gz")],
                                          root=root, tokenizer=model,
                                          max_tokens=1500, num_shards=1, reject_shards=1), ["--runner=FnApiRunner"])
    return root, model


def stage_overhead(root: str, model: str, batch_size: int, max_new: int, device: str) -> dict:
    from generation.engines import EngineConfig
    from generation.engines.hf import HFEngine
    from generation.job import GenerateConfig
    from generation.runner import StageRunner

    shutil.rmtree(os.path.join(root, "generations"), ignore_errors=True)
    engine = HFEngine(EngineConfig("hf", model, batch_size=batch_size), device=device)
    inside = [0.0]
    original = engine.generate

    def timed(requests):
        t0 = time.perf_counter()
        try:
            return original(requests)
        finally:
            inside[0] += time.perf_counter() - t0

    engine.generate = timed
    cfg = GenerateConfig(stage="backtranslate", root=root, engine="hf", model=model, max_new_tokens=max_new,
                         batch_size=batch_size, seed=0)
    t0 = time.perf_counter()
    summary = StageRunner(cfg, engine=engine).run()
    wall = time.perf_counter() - t0
    return {"rows": summary["rows"], "stage_wall_s": wall, "inside_generate_s": inside[0],
            "outside_share": (wall - inside[0]) / wall}


def backtranslate_requests(root: str, tokenizer, max_model_len: int, max_new: int, input_order: bool = False):
    """(prompts, requests): the backtranslate prompt of every candidate, fitted to the context."""
    import pyarrow.parquet as pq

    from generation.engines import Request
    from generation.prompting import fit_prompt
    from generation.templates import DEFAULTS

    rows = pq.read_table(os.path.join(root, "candidates", "candidates-00000-of-00001.parquet"),
                         columns=["id", "text"]).to_pylist()
    if input_order:
        rows.sort(key=lambda r: r["id"])  # the order documents arrive in, not sorted by length
    prompts = [fit_prompt(tokenizer, DEFAULTS["backtranslate"], {"response": r["text"]}, "response",
                          max_model_len - max_new)[0] for r in rows]
    return prompts, [Request(p, [], max_new, 1.0, 0.9, seed=i) for i, p in enumerate(prompts)]


def batching_vs_loop(root: str, model: str, batch_size: int, max_new: int, device: str) -> dict:
    """Same prompts, same batch size and sampling: engine batching vs plain loop in input order."""
    from generation.engines import EngineConfig
    from generation.engines.hf import HFEngine

    engine = HFEngine(EngineConfig("hf", model, batch_size=batch_size), device=device)
    tok, lm = engine.tokenizer, engine.lm
    prompts, requests = backtranslate_requests(root, tok, engine.max_model_len, max_new, input_order=True)

    t0 = time.perf_counter()
    ours = engine.generate(requests)
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(c.output_tokens for c in ours)

    t0 = time.perf_counter()
    loop_tokens = 0
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(engine.device)
            torch.manual_seed(start)
            out = lm.generate(**enc, max_new_tokens=max_new, do_sample=True, temperature=1.0, top_p=0.9, top_k=0,
                              pad_token_id=tok.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for row in new.tolist():
                loop_tokens += row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
    loop_s = time.perf_counter() - t0
    return {"prompts": len(prompts), "ours_tokens_per_s": ours_tokens / ours_s, "loop_tokens_per_s": loop_tokens / loop_s,
            "ratio": (ours_tokens / ours_s) / (loop_tokens / loop_s), "ours_s": ours_s, "loop_s": loop_s}


def vllm_vs_bare(root: str, model: str, max_new: int) -> dict:
    """--engine vllm: our adapter vs a bare `LLM.generate` on the same prompts, same LLM instance."""
    from vllm import SamplingParams

    from generation.engines import EngineConfig
    from generation.engines.vllm import VLLMEngine

    engine = VLLMEngine(EngineConfig("vllm", model))
    prompts, requests = backtranslate_requests(root, engine.tokenizer, engine.max_model_len, max_new)
    engine.generate(requests[:8])  # warm-up
    t0 = time.perf_counter()
    ours = sum(c.output_tokens for c in engine.generate(requests))
    ours_s = time.perf_counter() - t0
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=max_new, seed=i) for i in range(len(prompts))]
    t0 = time.perf_counter()
    ids = [{"prompt_token_ids": engine.tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    bare = sum(len(o.outputs[0].token_ids) for o in engine.llm.generate(ids, params, use_tqdm=False))
    bare_s = time.perf_counter() - t0
    return {"prompts": len(prompts), "ours_tokens_per_s": ours / ours_s, "bare_tokens_per_s": bare / bare_s,
            "ratio": (ours / ours_s) / (bare / bare_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--model", help="vllm mode: the model to serve (default: the tiny benchmark model)")
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    root, model = build(args.docs)
    if args.engine == "vllm":
        result = vllm_vs_bare(root, args.model or model, args.max_new_tokens)
        print(json.dumps(result, indent=2))
        print(f"\n| vLLM | prompts | ours tok/s | bare LLM.generate tok/s | ratio (target >= 0.97) |\n|---|---:|---:|---:|---:|\n"
              f"| {args.model or 'tiny'} | {result['prompts']} | {result['ours_tokens_per_s']:.0f} | "
              f"{result['bare_tokens_per_s']:.0f} | {result['ratio']:.3f}x |")
        return
    a = stage_overhead(root, model, args.batch_size, args.max_new_tokens, args.device)
    b = batching_vs_loop(root, model, args.batch_size, args.max_new_tokens, args.device)
    result = {"device": args.device, "overhead": a, "batching": b}
    print(json.dumps(result, indent=2))
    json.dump(result, open(os.path.join(WORK, "generate_bench.json"), "w"), indent=2)
    print(f"\n| device | rows | stage wall | outside generate | ours tok/s | plain loop tok/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.device} | {a['rows']} | {a['stage_wall_s']:.1f} s | {a['outside_share']:.1%} | "
          f"{b['ours_tokens_per_s']:.0f} | {b['loop_tokens_per_s']:.0f} | {b['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
