"""Benchmark: the client's own ceiling (issue 33 point 4), in requests per second, on 1 and 2 cores.

The client is the backtranslate stage run in this process through `StageRunner(GenerateConfig(...)).run()`,
as `bft generate backtranslate` runs it, over one candidates shard of the documents of
benchmarks/utilization_bench.py (docstrings, median ~2,600 characters, a tiny byte-fallback BPE
tokenizer trained on them, context 4,096: a third of the prompts need an exact token count). Against:

- `--server sim`: benchmarks/serving_sim.py answering at once (C = 100,000 slots, 0 ms per token) with
  `--engine openai --concurrency 256`: preparing, dispatching over HTTP and reading the answers;
- `--server none`: no server: an in-process engine that answers each request at once, so the figure
  is preparing the prompts and the runner's own work (rows, checkpoints, the shard written).

`--cores N ...`: the client is pinned to its first N usable CPUs (os.sched_setaffinity, as taskset
does), which is what generation/preparing.py sizes its pool by; the server gets the next CPU when there
is one, else shares the client's. `--pool auto` is what `bft generate` does (worker processes when
there are >= 2 cores and >= POOL_MIN_ROWS rows), `--pool off` prepares on the client's thread
whatever the cores, `--pool on` uses the pool (usable cores less one worker, at least one) whatever the
rows and the cores: the pair measures both thresholds (one core; POOL_MIN_ROWS, with `--requests`). Each configuration runs `--repeat` times; the best run is reported (the machine's noise
only slows a run down).

    .venv/bin/python -m benchmarks.client_bench                                   # the timed run
    .venv/bin/python -m benchmarks.client_bench --requests 200 --cores 1 --repeat 1 --server none  # smoke

Writes benchmarks/work/client.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

from benchmarks.utilization_bench import WORK, Server, build

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work", "client.json")
CONCURRENCY = 256


def instant_engine(model: str):
    """An in-process engine answering every request at once (an instruction of a few words)."""
    from transformers import AutoTokenizer

    from generation.engines import Completion, Engine

    class Instant(Engine):
        name, max_model_len = "instant", 4096

        def __init__(self):
            self.model, self.tokenizer = model, AutoTokenizer.from_pretrained(model)

        def generate(self, requests):
            return [Completion("What does this part of the library do?", r.prompt_tokens, 9, "stop") for r in requests]

    return Instant()


def run_once(root: str, model: str, server: str, cpus: list[int], all_cpus: set[int], pool: str) -> dict:
    from generation import preparing
    from generation.job import GenerateConfig
    from generation.runner import StageRunner

    shutil.rmtree(os.path.join(root, "generations"), ignore_errors=True)
    os.sched_setaffinity(0, set(cpus))
    real_workers = preparing.pool_workers
    if pool == "off":
        preparing.pool_workers = lambda rows: 0
    elif pool == "on":   # whatever the rows and the cores: what the thresholds are measured against
        preparing.pool_workers = lambda rows: max(1, preparing.usable_cores() - 1)
    started: list = []
    real_start = preparing.PreparePool.start.__func__
    preparing.PreparePool.start = classmethod(lambda cls, tok, rows: started.append(real_start(cls, tok, rows))
                                              or started[-1])
    sim = None
    try:
        if server == "sim":
            spare = sorted(all_cpus - set(cpus))
            sim = Server(100_000, 0.0, model, spare[0] if spare else None)
            cfg = GenerateConfig(stage="backtranslate", root=root, engine="openai", model=model,
                                 base_url=sim.url + "/v1", concurrency=CONCURRENCY)
            engine = None
        else:
            cfg = GenerateConfig(stage="backtranslate", root=root, engine="hf", model=model)
            engine = instant_engine(model)
        t0 = time.perf_counter()
        with StageRunner(cfg, engine=engine) as runner:
            summary = runner.run()
        wall = time.perf_counter() - t0
    finally:
        if sim is not None:
            sim.close()
        preparing.pool_workers = real_workers
        preparing.PreparePool.start = classmethod(real_start)
        os.sched_setaffinity(0, all_cpus)
    if summary["errors"]:
        raise RuntimeError(f"{server}: {summary}")
    return {"server": server, "cores": len(cpus), "pool": pool,
            "workers": started[0].workers if started and started[0] else 0,
            "requests": summary["sent"], "wall_s": round(wall, 3), "requests_per_s": round(summary["sent"] / wall, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| server | cores | pool | worker processes | requests | wall s | requests/s |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['cores']} | {r['pool']} | {r['workers']} | {r['requests']:,} | "
                     f"{r['wall_s']:.2f} | **{r['requests_per_s']:.0f}** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3200)
    ap.add_argument("--cores", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--server", nargs="*", default=["none", "sim"], choices=["none", "sim"])
    ap.add_argument("--pool", nargs="*", default=["auto", "off"], choices=["auto", "off", "on"])
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration; the best is reported")
    ap.add_argument("--work", default=WORK, help="where the documents, roots and the tiny model are kept "
                                                "(shared with utilization_bench)")
    ap.add_argument("--out", default=RESULT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    all_cpus = set(os.sched_getaffinity(0))
    if max(args.cores) > len(all_cpus):
        sys.exit(f"--cores {max(args.cores)}: this process may use {len(all_cpus)} CPUs")
    roots, model = build(args.work, [(args.requests, 1)])
    from transformers import AutoTokenizer   # the ~8 s import once, before any timed run

    AutoTokenizer.from_pretrained(model)
    rows = []
    for server in args.server:
        for cores in args.cores:
            for pool in args.pool:
                if cores == 1 and pool == "auto" and "off" in args.pool:
                    continue   # auto on one core is off: the same run
                runs = [run_once(roots[(args.requests, 1)], model, server, sorted(all_cpus)[:cores], all_cpus, pool)
                        for _ in range(args.repeat)]
                best = max(runs, key=lambda r: r["requests_per_s"])
                best["runs_requests_per_s"] = [r["requests_per_s"] for r in runs]
                rows.append(best)
                print(f"server={server} cores={cores} pool={pool}: {best['requests_per_s']:.0f} requests/s "
                      f"(runs {best['runs_requests_per_s']})", file=sys.stderr)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"requests": args.requests, "cpus": sorted(all_cpus), "runs": rows, "table": table(rows)}, f,
                  indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
