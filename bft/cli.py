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


VERBS = {"prepare": _prepare}


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
