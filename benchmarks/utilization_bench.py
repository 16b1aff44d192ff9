"""Benchmark "no idle accelerator" (issue 18): how busy `bft generate --engine openai` keeps a server.

The server is benchmarks/serving_sim.py: continuous batching of C sequences at once, FIFO queue,
output_tokens * 10 ms per request (log-normal output lengths, median 60 tokens, sigma 1.0, cut to the
stage's 256), in its own process. The client is the backtranslate stage run in this process through
`StageRunner(GenerateConfig(...)).run()`, exactly as `bft generate backtranslate --engine openai
--base-url URL` runs it, over one candidates shard of real English documents: docstrings of the Python
standard library (then of the installed packages), in source order, cut at docstring boundaries into
documents of log-normal length (median 2,000 characters, sigma 0.8, 300..12,000), put through
`bft prepare` with a tiny tokenizer trained on them (training/tiny.py; nothing is downloaded).

Configurations: C in (64, 256) with --concurrency C and 2C, and C = 256 with the default concurrency
(no --concurrency); --chunk-rows is always the default. Each run sends max(1200, 12 x C) requests.
Reported per configuration: utilization = busy slot-seconds / (C x (last finish - first arrival)), the
ceiling of that figure for the same requests (`ideal`: every request sent at once; the drain at the end
keeps it below 1), the utilization while the client still had requests to send (`window`: first to
last arrival), the stage's wall time, requests / wall, and the time before the first request reached
the server. Then the client's own ceiling: the same stage against a server that answers at once
(C = 100000, 0 ms per token, --concurrency 256, max(1200, ...) = the smallest request set): requests
prepared and dispatched per second. transformers is imported (and the tokenizer loaded once) before
the first run, so that no run pays the ~8 s import and every run starts alike.

Across shards (issue 33): with `--shards S ...` the same documents are also split into S candidates
shards (one root per count, `bft prepare --num-shards S`), and each configuration runs once per count;
one worker takes every shard, as a worker of `bft generate` does. Reported beside the utilization:
`span_ratio` = the best possible span (every request queued at the first arrival, served FIFO: the
`ideal` schedule) / the span served (first arrival to last finish); a client that lets the slots drain
at each shard boundary falls below 1 as the shards multiply.

The client is pinned to CPU 0 and the server to CPU 1 (one core each) when the machine has two.

    .venv/bin/python -m benchmarks.utilization_bench [--profile] [--work DIR]
    .venv/bin/python -m benchmarks.utilization_bench --capacities 128 256 --shards 1 8 64 --factors 1 \
        --no-default --no-ceiling --out benchmarks/work/utilization_shards.json     # issue 33

Writes benchmarks/work/utilization.json; --profile also runs the client-ceiling configuration under
cProfile (every thread of the client, added together) and prints its top entries by cumulative time.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import cProfile
import gzip
import json
import logging
import math
import os
import pstats
import random
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORK = os.path.join(HERE, "work", "utilization")
RESULT = os.path.join(HERE, "work", "utilization.json")
CONTEXT = 4096              # the served model's max_model_len (GET /v1/models) and the tiny model's context
CEILING_CONCURRENCY = 256


# ---- documents ------------------------------------------------------------------------------------

def docstrings():
    """Docstrings (>= 40 characters, each once) of the standard library's modules, then of the installed
    packages', in sorted file order."""
    seen: set[str] = set()
    for lib in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]):
        for path in sorted(Path(lib).rglob("*.py")):
            if lib != sysconfig.get_paths()["purelib"] and "site-packages" in path.parts:
                continue
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 40 and doc not in seen:
                        seen.add(doc)
                        yield doc


def documents(n: int, seed: int = 0) -> list[str]:
    """`n` documents of consecutive docstrings, each of a log-normal target length (median 2,000
    characters, sigma 0.8, 300..12,000), cut at a docstring boundary once the target is reached."""
    rng = random.Random(seed)
    out: list[str] = []
    parts: list[str] = []
    size, target = 0, 0
    for doc in docstrings():
        if not parts:
            target = min(12000, max(300, int(rng.lognormvariate(math.log(2000), 0.8))))
        room = 12000 - size
        parts.append(doc if len(doc) <= room else doc[:room].rsplit(" ", 1)[0])
        size += len(parts[-1]) + 2
        if size >= target:
            out.append("\n\n".join(parts))
            parts, size = [], 0
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} documents of docstrings on this machine; {n} wanted")


def write_dolma(folder: str, texts: list[str]) -> str:
    """One Dolma-layout file of `texts` under `folder`; returns its glob."""
    split = os.path.join(folder, "documents", "cc_en_head")
    os.makedirs(split, exist_ok=True)
    with gzip.open(os.path.join(split, "cc_en_head-0000.json.gz"), "wt", encoding="utf-8", compresslevel=1) as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i:06d}", "text": text, "source": "python-docstrings",
                                "added": "2024-01-01T00:00:00.000Z", "metadata": {"url": f"docstring://{i}"}}) + "\n")
    return os.path.join(split, "*.json.gz")


def build(work: str, sets: list[tuple[int, int]]) -> tuple[dict[tuple[int, int], str], str]:
    """({(requests, shards): run root whose candidates are the first `requests` documents in `shards`
    shards}, tiny model folder)."""
    from beam_pipelines import prepare
    from training.tiny import make_tiny_llama, train_byte_fallback_bpe

    model = os.path.join(work, "model")
    texts: list[str] = []
    roots = {(n, k): os.path.join(work, f"root-{n}" if k == 1 else f"root-{n}-shards-{k}") for n, k in sets}
    missing = [s for s, root in roots.items() if not os.path.exists(os.path.join(root, "candidates", "stats.json"))]
    if missing or not os.path.exists(os.path.join(model, "config.json")):
        t0 = time.perf_counter()
        texts = documents(max(n for n, _ in sets))
        print(f"{len(texts)} documents of docstrings in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not os.path.exists(os.path.join(model, "config.json")):
        tok = train_byte_fallback_bpe(texts[:1000], 8000)
        make_tiny_llama(model, tok, hidden_size=64, layers=2, context=CONTEXT)
    for n, k in missing:
        root = roots[(n, k)]
        shutil.rmtree(root, ignore_errors=True)
        glob = write_dolma(os.path.join(root, "dolma"), texts[:n])
        prepare.run(prepare.PrepareConfig(input=[glob], root=root, tokenizer=model, max_tokens=100_000,
                                          num_shards=k, reject_shards=1), ["--runner=FnApiRunner"])
    return roots, model


# ---- one configuration ----------------------------------------------------------------------------

class Server:
    """benchmarks.serving_sim in a subprocess (pinned to `cpu` when given)."""

    def __init__(self, capacity: int, ms_per_token: float, model: str, cpu: int | None):
        cmd = [sys.executable, "-m", "benchmarks.serving_sim", "--capacity", str(capacity), "--ms-per-token",
               str(ms_per_token), "--model", model, "--max-model-len", str(CONTEXT)]
        if cpu is not None:
            cmd += ["--cpu", str(cpu)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"serving_sim did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/stats") as resp:
            return json.loads(resp.read())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_stage(root: str, model: str, base_url: str, concurrency: int | None, profile: str | None = None) -> dict:
    """The backtranslate stage of `root` against `base_url`: {"wall_s", "t0", "summary"}."""
    from generation.job import GenerateConfig
    from generation.runner import StageRunner

    shutil.rmtree(os.path.join(root, "generations"), ignore_errors=True)
    extra = {} if concurrency is None else {"concurrency": concurrency}
    cfg = GenerateConfig(stage="backtranslate", root=root, engine="openai", model=model, base_url=base_url, **extra)
    if profile:
        with profiled(profile):
            t0 = time.perf_counter()
            with StageRunner(cfg) as runner:
                summary = runner.run()
    else:
        t0 = time.perf_counter()
        with StageRunner(cfg) as runner:
            summary = runner.run()
    return {"wall_s": time.perf_counter() - t0, "t0": t0, "summary": summary}


@contextlib.contextmanager
def profiled(path: str):
    """cProfile of this thread and of every thread started inside (an engine may prepare requests in a
    thread of its own), their stats added together into `path`."""
    profiles = [cProfile.Profile()]
    thread_run = threading.Thread.run

    def run(thread):
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()
        try:
            thread_run(thread)
        finally:
            prof.disable()

    threading.Thread.run = run
    profiles[0].enable()
    try:
        yield
    finally:
        profiles[0].disable()
        threading.Thread.run = thread_run
        stats = pstats.Stats(profiles[0])
        for prof in profiles[1:]:
            if prof.getstats():
                stats.add(prof)
        stats.dump_stats(path)


def measure(root: str, n: int, model: str, capacity: int, concurrency: int | None, ms_per_token: float,
            server_cpu: int | None, profile: str | None = None, shards: int = 1) -> dict:
    server = Server(capacity, ms_per_token, model, server_cpu)
    try:
        run = run_stage(root, model, server.url + "/v1", concurrency, profile)
        stats = server.stats()
    finally:
        server.close()
    summary = run["summary"]
    if summary["sent"] != n or summary["errors"]:
        raise RuntimeError(f"C={capacity} concurrency={concurrency}: {summary}")
    return {"capacity": capacity, "concurrency": concurrency or "default", "ms_per_token": ms_per_token,
            "shards": shards, "requests": summary["sent"], "wall_s": run["wall_s"],
            "client_requests_per_s": summary["sent"] / run["wall_s"],
            "first_request_after_s": stats["first_arrival"] - run["t0"],
            **{k: stats[k] for k in ("utilization", "ideal_utilization", "window_utilization", "busy_slot_s",
                                     "span_s", "ideal_span_s", "span_ratio", "max_queue", "mean_wait_s")}}


def table(rows: list[dict], ceiling: dict | None) -> str:
    lines = ["| C | concurrency | shards | requests | wall s | utilization | ideal (all sent at once) | while sending "
             "| best span / span | client req/s | first request after |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['capacity']} | {r['concurrency']} | {r['shards']} | {r['requests']:,} | "
                     f"{r['wall_s']:.1f} | **{r['utilization']:.3f}** | {r['ideal_utilization']:.3f} | {r['window_utilization']:.3f} | "
                     f"**{r['span_ratio']:.3f}** | {r['client_requests_per_s']:.0f} | "
                     f"{r['first_request_after_s']:.1f} s |")
    if ceiling:
        lines += ["", "| client ceiling (server answers at once) | concurrency | requests | wall s | requests/s |",
                  "|---|---:|---:|---:|---:|",
                  f"| C = 100000, 0 ms/token | {ceiling['concurrency']} | {ceiling['requests']:,} | "
                  f"{ceiling['wall_s']:.1f} | **{ceiling['client_requests_per_s']:.0f}** |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capacities", type=int, nargs="*", default=[64, 256], help="none: the client ceiling only")
    ap.add_argument("--ms-per-token", type=float, default=10.0)
    ap.add_argument("--min-requests", type=int, default=1200)
    ap.add_argument("--requests-per-slot", type=int, default=12)
    ap.add_argument("--shards", type=int, nargs="*", default=[1],
                    help="candidates shards the requests are split into; every configuration runs once per count")
    ap.add_argument("--factors", type=int, nargs="*", default=[1, 2], help="--concurrency = factor x C")
    ap.add_argument("--no-default", action="store_true", help="skip the default-concurrency run")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the client-ceiling run")
    ap.add_argument("--profile", action="store_true", help="also profile the client-ceiling run (cProfile)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the client and the server to one CPU each")
    ap.add_argument("--work", default=WORK, help="where the documents, roots and the tiny model are kept")
    ap.add_argument("--out", default=RESULT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import generation.runner

    print(f"generation.runner: {generation.runner.__file__}", file=sys.stderr)
    size = {c: max(args.min_requests, args.requests_per_slot * c) for c in args.capacities}
    ceiling_n = min(size.values(), default=args.min_requests)
    roots, model = build(args.work, sorted({(n, k) for n in size.values() for k in args.shards} | {(ceiling_n, 1)}))
    # the engine's imports (transformers, ~8 s) once before the first run, so that every run starts alike
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model)
    client_cpu = server_cpu = None
    if not args.no_pin and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
        client_cpu, server_cpu = sorted(os.sched_getaffinity(0))[:2]
        os.sched_setaffinity(0, {client_cpu})
    plan = [(c, f * c) for c in args.capacities for f in args.factors]
    if args.capacities and not args.no_default:
        plan.append((max(args.capacities), None))
    rows = []
    for c, conc in plan:
        for k in args.shards:
            rows.append(measure(roots[(size[c], k)], size[c], model, c, conc, args.ms_per_token, server_cpu, shards=k))
            r = rows[-1]
            print(f"C={c} concurrency={r['concurrency']} shards={k}: {r['requests']} requests, {r['wall_s']:.1f} s, "
                  f"utilization {r['utilization']:.3f} (ideal {r['ideal_utilization']:.3f}, while sending "
                  f"{r['window_utilization']:.3f}), best span / span {r['span_ratio']:.3f}, "
                  f"{r['client_requests_per_s']:.0f} req/s", file=sys.stderr)
    ceiling = None
    if not args.no_ceiling or args.profile:
        ceiling = measure(roots[(ceiling_n, 1)], ceiling_n, model, 100_000, CEILING_CONCURRENCY, 0.0, server_cpu)
        print(f"client ceiling: {ceiling['client_requests_per_s']:.0f} req/s", file=sys.stderr)
    profile = None
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if args.profile:
        profile = os.path.join(os.path.dirname(args.out), "utilization.prof")
        measure(roots[(ceiling_n, 1)], ceiling_n, model, 100_000, CEILING_CONCURRENCY, 0.0, server_cpu, profile)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30).sort_stats("tottime").print_stats(15)
    result = {"generation_runner": generation.runner.__file__, "client_cpu": client_cpu, "server_cpu": server_cpu,
              "docs": {f"{n} in {k} shards": root for (n, k), root in roots.items()}, "runs": rows,
              "client_ceiling": ceiling,
              "profile": profile, "table": table(rows, ceiling)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(table(rows, ceiling))


if __name__ == "__main__":
    main()
