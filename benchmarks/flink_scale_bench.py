"""Scale of `bft prepare --near-dedup` on a real Flink cluster against the local runner (issue 32).

The corpus is benchmarks/near_dedup_bench.py's (real text, ~20% of the documents in planted near-duplicate
clusters; the same cached files). Each runner runs the same command, `bft prepare --near-dedup` with the
Llama-2-structure tokenizer and 4 shards:

- local: the FnApiRunner with 2 worker processes (the driver holds every shuffle);
- flink: scripts/flink_local.py's session cluster (a JobManager, two TaskManagers of 2 slots, Beam's Flink
  job server, Python workers in the PROCESS environment), `--parallelism 2`, started for that run alone.

Reported per run: wall time, the candidates kept and dropped (the two runners must agree), and the peak RSS
of every process by role, sampled every 200 ms over the whole machine: the driver (the `bft prepare`
process; on the local runner also its worker processes, as "local workers"), the job server, the
JobManager, the TaskManagers, the Python SDK workers, and all of them together.

    .venv/bin/python -m benchmarks.flink_scale_bench --docs 100000 1000000
    .venv/bin/python -m benchmarks.flink_scale_bench --docs 5000 --files 4        # a smoke run

Writes benchmarks/work/flink_scale.json. Alone on the machine: the figures are wall times on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import threading
import time

import psutil

from benchmarks.near_dedup_bench import make_corpus
from benchmarks.prepare_bench import ENV, PY, REPO, WORK, make_tokenizer

ROLES = ("driver", "local workers", "job server", "JobManager", "TaskManagers", "Python workers")


def role(proc: psutil.Process, driver: int) -> str | None:
    """Which part of a run a process is, or None for a process of no run."""
    try:
        if proc.pid == driver:
            return "driver"
        if any(p.pid == driver for p in proc.parents()):
            return "local workers"   # the local runner's workers (they run sdk_worker_main too)
        cmd = " ".join(proc.cmdline())
        if "FlinkJobServerDriver" in cmd:
            return "job server"
        if "StandaloneSessionClusterEntrypoint" in cmd:
            return "JobManager"
        if "TaskManagerRunner" in cmd:
            return "TaskManagers"
        if "sdk_worker_main" in cmd or "beam_pipelines.runtime.process_worker" in cmd:
            return "Python workers"
    except psutil.Error:
        return None
    return None


def measure(cmd: list[str], env: dict) -> dict:
    """Runs `cmd`; wall seconds and, per role, the peak RSS of its largest process and of all its processes
    together (MiB), and the peak of every role's processes together."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {r: {"largest": 0, "sum": 0} for r in ROLES}
    total = [0]

    # a process's role, found once it is 2 s old: a JVM's child runs with the JVM's command line until it
    # execs (jspawnhelper, then the worker boot, then Beam's harness), so a young process is asked again
    roles: dict[int, str | None] = {}

    def sample():
        while proc.poll() is None:
            sums = dict.fromkeys(ROLES, 0)
            for p in psutil.process_iter():
                r = roles.get(p.pid, "?")
                if r == "?":
                    r = role(p, proc.pid)
                    try:
                        if time.time() - p.create_time() > 2:
                            roles[p.pid] = r
                    except psutil.Error:
                        continue
                if r is None:
                    continue
                try:
                    rss = p.memory_info().rss >> 20
                except psutil.Error:
                    continue
                sums[r] += rss
                peaks[r]["largest"] = max(peaks[r]["largest"], rss)
            for r, s in sums.items():
                peaks[r]["sum"] = max(peaks[r]["sum"], s)
            total[0] = max(total[0], sum(sums.values()))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{out[-4000:]}")
    return {"wall_s": round(wall, 1), "peak_mib": {r: v for r, v in peaks.items() if v["largest"]},
            "peak_total_mib": total[0]}


def start_flink(state: str, tm_memory: str) -> list[str]:
    script = os.path.join(REPO, "scripts", "flink_local.py")
    subprocess.run([PY, script, "stop", "--dir", state], capture_output=True)
    shutil.rmtree(state, ignore_errors=True)
    subprocess.run([PY, script, "start", "--dir", state, "--tm-memory", tm_memory], check=True, capture_output=True)
    return json.load(open(os.path.join(state, "cluster.json")))["flags"]


def run(n_docs: int, files: int, runners: list[str], tm_memory: str) -> dict:
    """The runs at one size; the Flink cluster is started for its run alone (the local run sees none)."""
    folder = os.path.join(WORK, f"near-dedup-lines-{n_docs}")
    truth = os.path.join(folder, "truth.json")
    if not os.path.exists(truth):
        shutil.rmtree(folder, ignore_errors=True)
        json.dump(make_corpus(folder, n_docs, files, 0.2), open(truth, "w"))
    head = os.path.join(folder, "documents", "cc_en_head")
    state = os.path.join(WORK, "flink-cluster")
    result = {"docs": n_docs}
    for runner in runners:
        root = os.path.join(WORK, f"flink-scale-{runner}-{n_docs}")
        shutil.rmtree(root, ignore_errors=True)
        flags = start_flink(state, tm_memory) if runner == "flink" else [
            "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
        try:
            result[runner] = measure([PY, "-m", "bft.cli", "prepare", "--input", os.path.join(head, "*.json.gz"),
                                      "--root", root, "--tokenizer", make_tokenizer("llama2"), "--max-tokens",
                                      "10000000", "--num-shards", "4", "--near-dedup", *flags], ENV)
        finally:
            if runner == "flink":
                subprocess.run([PY, os.path.join(REPO, "scripts", "flink_local.py"), "stop", "--dir", state],
                               capture_output=True)
        stats = json.load(open(os.path.join(root, "candidates", "stats.json")))
        result[runner]["kept"], result[runner]["dropped"] = stats["kept"], stats["dropped"]
        print(json.dumps({"docs": n_docs, "runner": runner, **result[runner]}), flush=True)
    if len(runners) == 2:
        result["same_funnel"] = all(result[r]["kept"] == result[runners[0]]["kept"]
                                    and result[r]["dropped"] == result[runners[0]]["dropped"] for r in runners)
    return result


def table(results: list[dict]) -> str:
    rows = ["| docs | runner | wall | " + " | ".join(ROLES) + " | all processes |",
            "|---:|---|---:|" + "---:|" * (len(ROLES) + 1)]
    for res in results:
        for runner in ("local", "flink"):
            if runner not in res:
                continue
            r = res[runner]
            cells = [f"{r['peak_mib'][x]['largest']:,}" + (f" ({r['peak_mib'][x]['sum']:,})"
                                                             if r['peak_mib'][x]['sum'] != r['peak_mib'][x]['largest'] else "")
                     if x in r["peak_mib"] else "" for x in ROLES]
            rows.append(f"| {res['docs']:,} | {runner} | {r['wall_s']:.1f} s | " + " | ".join(cells)
                        + f" | {r['peak_total_mib']:,} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--runners", nargs="+", default=["local", "flink"], choices=["local", "flink"])
    ap.add_argument("--tm-memory", default="3072m", help="each TaskManager's process size")
    args = ap.parse_args(argv)
    os.makedirs(WORK, exist_ok=True)
    results = []
    for n in args.docs:
        results.append(run(n, args.files, args.runners, args.tm_memory))
        json.dump(results, open(os.path.join(WORK, "flink_scale.json"), "w"), indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
