"""`bft`: the one entry point. Each verb has --help; Beam verbs pass unknown flags to Beam."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _prepare(argv: list[str]) -> int:
    from beam_pipelines import prepare

    ap = argparse.ArgumentParser(prog="bft prepare", description=prepare.__doc__.split("\n")[0],
                                 epilog="Any other flag (--runner, --project, --temp_location, ...) goes to Beam.")
    prepare.add_arguments(ap)
    args, beam_args = ap.parse_known_args(argv)
    stats = prepare.run(prepare.config_from_args(args), beam_args, overwrite=args.overwrite)
    print_funnel(stats, args.output)
    return 0


def print_funnel(stats: dict, output: str) -> None:
    print(f"prepare: {stats['input_records']:,} input records -> {stats['kept']:,} candidates in {output}")
    for reason, n in sorted(stats["dropped"].items(), key=lambda kv: -kv[1]):
        print(f"  dropped {reason:<14} {n:>10,}")
    sh = stats["shards"]
    print(f"  {sh['num_shards']} shards, {stats['tokens']['total']:,} tokens, balance max/mean "
          f"{sh['balance_max_over_mean']:.4f}; rejects: {stats['rejects']['rows']:,} rows")


def _generate(argv: list[str]) -> int:
    from generation.runner import GenerateConfig, StageRunner
    from generation.stages import STAGES

    ap = argparse.ArgumentParser(prog="bft generate", description="Run one LLM stage over the candidate shards.")
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--root", required=True, help="run root (local or gs://) holding candidates/")
    ap.add_argument("--engine", required=True, choices=["vllm", "openai", "hf"])
    ap.add_argument("--model", required=True, help="model folder or hub id (for openai: the served model name)")
    ap.add_argument("--tokenizer", help="tokenizer of the model, if not the --model folder")
    ap.add_argument("--base-url", help="openai engine: the server, e.g. http://localhost:8000/v1")
    ap.add_argument("--api", choices=["completions", "chat"], default="completions", help="openai engine endpoint")
    ap.add_argument("--worker-index", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--config", help="JSON or YAML file with any of these options (flags win)")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--batch-size", type=int, help="hf engine: prompts per generate call")
    ap.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    ap.add_argument("--score-mode", choices=["generate", "logprob"], help="score stage: the paper's generated "
                    "reasoning + score (default), or the next-token probabilities of 1..5 after 'Score:'")
    ap.add_argument("--template", help="file replacing the stage's prompt template")
    ap.add_argument("--max-error-rate", type=float, help="fail a shard when more requests than this fail")
    ap.add_argument("--concurrency", type=int, help="openai engine: requests in flight")
    ap.add_argument("--tensor-parallel-size", type=int, help="vllm engine")
    ap.add_argument("--gpu-memory-utilization", type=float, help="vllm engine")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"])
    args = ap.parse_args(argv)
    options = load_config(args.config) if args.config else {}
    options.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    cfg = GenerateConfig(**options)
    summary = StageRunner(cfg).run()
    print(f"generate {cfg.stage}: shards written {summary['shards_done']}, skipped (complete) "
          f"{summary['shards_skipped']}; {summary['rows']:,} rows, {summary['errors']} engine errors")
    return 0


def _assemble(argv: list[str]) -> int:
    from beam_pipelines import assemble, release

    ap = argparse.ArgumentParser(prog="bft assemble", description=assemble.__doc__.split("\n")[0],
                                 epilog="Any other flag (--runner, --project, --temp_location, ...) goes to Beam.")
    assemble.add_arguments(ap)
    args, beam_args = ap.parse_known_args(argv)
    try:
        stats = assemble.run(assemble.config_from_args(args), beam_args)
    except (assemble.AssembleError, release.ReleaseError) as e:
        print(f"bft assemble: {e}", file=sys.stderr)
        return 1
    f = stats["funnel"]
    folder = release.release_dir(args.root.rstrip("/"), stats["version"])
    print(f"assemble ({stats['recipe']}): {f['candidates']:,} candidates -> {f['web_examples']:,} web examples "
          f"+ {f['seed']['kept']:,} seed = {f['final']['total']:,} ({f['final']['train']:,} train, "
          f"{f['final']['validation']:,} validation)")
    for reason, n in f["dropped"].items():
        print(f"  dropped {reason:<32} {n:>10,}")
    print(f"release {stats['version']}: {folder}\nreport: {folder}/report.html")
    return 0


def _validate(argv: list[str]) -> int:
    from beam_pipelines import release

    ap = argparse.ArgumentParser(prog="bft validate", description="Re-check a release: manifest, checksums, "
                                 "schemas, row counts, unique ids. Exits 1 when anything is off.")
    ap.add_argument("path", help="a release folder, or a run root / ROOT/sft whose LATEST names one")
    args = ap.parse_args(argv)
    try:
        manifest = release.validate(args.path)
    except release.ReleaseError as e:
        print(f"bft validate: {e}", file=sys.stderr)
        return 1
    print(f"valid: release {manifest['version']} ({manifest['counts']['train']:,} train, "
          f"{manifest['counts']['validation']:,} validation; {len(manifest['files'])} files checked)")
    return 0


def load_config(path: str) -> dict:
    """The one config loader: a JSON or YAML mapping of option names (dashes or underscores)."""
    from bft import storage

    text = storage.read_text(path)
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: a config file holds a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _seed(argv: list[str]) -> int:
    from training import seed

    return seed.main(argv)


def _train(argv: list[str]) -> int:
    from training import train

    return train.main(argv)


def _eval(argv: list[str]) -> int:
    from training import evaluate

    return evaluate.main(argv)


VERBS = {"prepare": _prepare, "generate": _generate, "assemble": _assemble, "validate": _validate,
         "seed": _seed, "train": _train, "eval": _eval}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from bft.runtime import configure_process

    configure_process()
    logging.basicConfig(level=os.environ.get("BFT_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "BFT_LOG_LEVEL" not in os.environ:
        # The local runner relays every worker's start-up warnings; they are noise for a user.
        logging.getLogger("apache_beam").setLevel(logging.ERROR)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print("usage: bft {" + ",".join(VERBS) + "} ...\n\n"
              "Instruction back-and-forth translation: web text -> instruction-tuning data.\n"
              "Run `bft VERB --help` for a verb's flags.", file=sys.stderr if argv else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return VERBS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
