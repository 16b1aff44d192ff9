"""`bft`: the one entry point, and the roof of the code: the verb table, one config loader
(`bft.config`), and one error path (a `UserError` is one line and exit 1; a usage error exit 2).

    bft rebuild | plan | status | prepare | generate STAGE | assemble | validate | latest | diff | show | seed
        | train | eval generate|judge

Every verb takes its options as flags or from a run file (`--config FILE`: the verb's section, see
bft.config). Beam verbs (prepare, assemble) pass the flags that Beam's PipelineOptions knows to Beam
(`--runner`, `--project`, ...); any other unknown flag is a usage error. Beam's own logs show only
with --verbose. A verb run with `--format json` prints exactly one JSON document on stdout, also when
it fails (the error's one line and the exit status in it). The exit statuses: EXIT_STATUS.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable

from bft import config
from lifecycle import signals
from schemas.errors import JSON_ANSWERED, exit_status, interrupt_status, interrupted_text, one_line, user_error_message


@dataclass(frozen=True)
class Verb:
    name: str
    summary: str
    config: str                       # "module:Class" of the verb's config dataclass (imported when run)
    run: Callable                     # (cfg, beam_args, run_file) -> exit status; prints what the user needs
    beam: bool = False                # takes Beam's pipeline options
    positional: tuple[str, ...] = ()
    exits: tuple[int, ...] = ()       # the exit statuses --help lists (EXIT_STATUS), for verbs a scheduler runs

    def config_class(self):
        module, cls = self.config.split(":")
        return getattr(importlib.import_module(module), cls)


# What each exit status means; `bft VERB --help` lists those of the verbs a scheduler runs (Verb.exits).
EXIT_STATUS = {
    0: "done",
    1: "failed: one line on stderr says why (a user's mistake), or a traceback (a bug)",
    2: "usage error: an unknown flag or verb, a missing value",
    75: "EX_TEMPFAIL: waiting for external workers or batches; run again later (or --wait)",
    130: "interrupted (Ctrl-C, SIGINT); what was answered is kept, a rerun resumes",
    143: "terminated (SIGTERM, 128 + 15); a rerun resumes",
}


def exit_epilog(verb: "Verb") -> str | None:
    if not verb.exits:
        return None
    return "exit status: " + "; ".join(f"{code} {EXIT_STATUS[code]}" for code in verb.exits) + "."


# ---- what each verb prints ---------------------------------------------------------------------

def _prepare(cfg, beam_args, run_file) -> int:
    from beam_pipelines import prepare

    stats = prepare.run(cfg, beam_args)
    if stats.get("reused"):
        print(f"prepare: {cfg.root}/candidates is complete with this config; nothing to do")
    print(f"prepare: {stats['input_records']:,} input records -> {stats['kept']:,} candidates in "
          f"{cfg.root}/candidates")
    for reason, n in sorted(stats["dropped"].items(), key=lambda kv: -kv[1]):
        print(f"  dropped {reason:<14} {n:>10,}")
    sh = stats["shards"]
    tokens = stats["tokens"]
    uncounted = tokens.get("uncounted_documents") or 0
    counted = f" in {tokens['counted_documents']:,} counted documents ({uncounted:,} kept uncounted)" if uncounted else ""
    print(f"  {sh['num_shards']} shards, {tokens['total']:,} tokens{counted}, balance max/mean "
          f"{sh['balance_max_over_mean']:.4f} (by {sh.get('balanced_by', 'tokens')}); "
          f"rejects: {stats['rejects']['rows']:,} rows")
    return 0


def _generate(cfg, beam_args, run_file) -> int:
    from generation.job import worker_job
    from generation.runner import StageRunner

    with StageRunner(worker_job(cfg)) as runner:
        summary = runner.run()
    from schemas.outcomes import refused_text

    print(f"generate {cfg.stage}: shards written {summary['shards_done']}, skipped (complete) "
          f"{summary['shards_skipped']}; {summary['rows']:,} rows, {summary['sent']:,} requests sent, "
          f"{summary['reused']:,} rows reused, {summary['errors']} engine errors (transient), "
          f"{refused_text(summary['refusals'])}")
    return 0


def _assemble(cfg, beam_args, run_file) -> int:
    from beam_pipelines.assemble import driver as assemble

    stats = assemble.run(cfg, beam_args)
    f = stats["funnel"]
    folder = stats["folder"]
    print(f"assemble ({stats['recipe']}): {f['candidates']:,} candidates -> {f['web_examples']:,} web examples "
          f"+ {f['seed']['kept']:,} seed = {f['final']['total']:,} ({f['final']['train']:,} train, "
          f"{f['final']['validation']:,} validation)")
    for reason, n in f["dropped"].items():
        print(f"  dropped {reason:<32} {n:>10,}")
    decontamination = stats.get("decontamination") or {}
    for s in decontamination.get("sets") or []:
        print(f"  decontaminated against {s['name']} ({s['prompts']:,} prompts, {decontamination['ngram']}-word "
              f"n-grams): {decontamination['dropped'].get(s['name'], 0):,} pairs dropped")
    print(f"release {stats['version']}: {folder}\nreport: {folder}/report.html")
    return 0


def _validate(cfg, beam_args, run_file) -> int:
    from lifecycle import release

    manifest = release.validate(cfg.target)
    print(f"valid: release {manifest['version']} ({manifest['counts']['train']:,} train, "
          f"{manifest['counts']['validation']:,} validation; {len(manifest['files'])} files checked)")
    return 0


def _latest(cfg, beam_args, run_file) -> int:
    from lifecycle import release

    print(release.latest_data(cfg.target, check=cfg.verify))
    return 0


def _diff(cfg, beam_args, run_file) -> int:
    from beam_pipelines.report import changes

    old, new = cfg.folder(cfg.old), cfg.folder(cfg.new)
    d = changes.diff_releases(old, new)
    parts = [f"{o}: +{v['added']:,} -{v['removed']:,} ={v['kept']:,}" for o, v in d["examples"].items()]
    print(f"{old} -> {new}: {'; '.join(parts) or 'no examples in either'}")
    if cfg.ids:
        for i, origin in d["added"]:
            print(f"+ {i} {origin}")
        for i, origin, reason in d["removed"]:
            print(f"- {i} {origin} {reason or '(reason: not recorded; NEW was not built on OLD)'}")
    return 0


def _show(cfg, beam_args, run_file) -> int:
    from bft import show

    return show.main_show(cfg)


def _seed(cfg, beam_args, run_file) -> int:
    from training import seed

    counts = seed.run(cfg)
    print(f"seed: {counts['trees']:,} trees -> {counts['pairs']:,} first-turn pairs -> {counts['selected']:,} "
          f"selected in {cfg.output} (left out: {counts['root_not_english_deleted_or_unreviewed']:,} roots not "
          f"English/deleted/unreviewed, {counts['no_usable_rank0_reply']:,} without a usable rank-0 reply)")
    return 0


def _train(cfg, beam_args, run_file) -> int:
    from training import train

    summary = train.run(cfg)
    m = summary["metrics"]
    if summary.get("skipped"):
        print(f"train {cfg.role}: {cfg.output} is already trained (bft_train.json); skipped")
    elif int(os.environ.get("RANK", "0")) == 0:
        losses = m["losses"] or [m["train_loss"]]
        print(f"train {cfg.role}: {summary['examples']:,} examples ({summary['left_out_too_long']} too long), "
              f"{m['steps']} steps, logged loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
              f"{m['tokens_per_s']:,} tokens/s -> {cfg.output}")
    return 0


def _eval_generate(cfg, beam_args, run_file) -> int:
    from generation import evaluate

    out = evaluate.run_generate(cfg)
    print(f"eval generate: {len(out)} answers by {cfg.generator} -> {cfg.output}")
    return 0


def _eval_judge(cfg, beam_args, run_file) -> int:
    from generation import evaluate

    s = evaluate.run_judge(cfg)
    rate = (f"win rate {s['win_rate']:.3f} ± {s['standard_error']:.3f} over {s['judged']} judged items"
            if s["judged"] else "no item has a verdict in both orders, so no win rate")
    if s["no_verdict"]:
        rate += f" ({s['win_rate_all_items']:.3f} over all {s['items']} items, those without a verdict as ties)"
    print(f"eval judge: a={cfg.a} vs b={cfg.b}: {s['win']} win / {s['tie']} tie / {s['loss']} loss, {rate}; "
          f"{s['no_verdict']} item(s) without a verdict ({s['items_failed']} failed: judge engine errors; "
          f"{s['judgments_without_verdict']} judgments, {s['judgments_cut_off']} cut off at "
          f"{s['max_new_tokens']} new tokens); {s['items_with_answers_cut']} item(s) with answers cut to fit "
          "the judge's context"
          + (f" -> {cfg.output}" if cfg.output else ""))
    return 0


def _rebuild(cfg, beam_args, run_file) -> int:
    from bft import rebuild

    return rebuild.main_rebuild(cfg, run_file)


def _status(cfg, beam_args, run_file) -> int:
    from bft import status

    return status.main_status(cfg, run_file)


def _plan(cfg, beam_args, run_file) -> int:
    from bft import plan

    return plan.main_plan(cfg, run_file)


VERBS = {v.name: v for v in [
    Verb("rebuild", "the whole run from one run file, reusing what is current: prepare -> generate -> assemble "
         "-> validate -> publish", "bft.rebuild:RebuildConfig", _rebuild, exits=(0, 1, 2, 75, 130, 143)),
    Verb("status", "for the on-call engineer: the last night, the work pending, who holds the lock, LATEST and "
         "its alerts", "bft.status:StatusConfig", _status, positional=("root",)),
    Verb("plan", "before any GPU is spent: requests, tokens, gate pass rates and GPU-hours per stage (--pilot N: "
         "measured on N candidates, with 95% intervals)",
         "bft.plan:PlanConfig", _plan),
    Verb("prepare", "Beam pass 1: Dolma head split -> exact length filter -> dedup -> balanced candidate shards",
         "beam_pipelines.prepare:PrepareConfig", _prepare, beam=True, exits=(0, 1, 2, 130, 143)),
    Verb("generate", "run one LLM stage (backtranslate, score, rewrite, distill, rate) over the candidate shards",
         "generation.job:GenerateConfig", _generate, positional=("stage",), exits=(0, 1, 2, 75, 130, 143)),
    Verb("assemble", "Beam pass 2: candidates + generations -> the SFT corpus, its statistics, a versioned release",
         "beam_pipelines.assemble.config:AssembleConfig", _assemble, beam=True, exits=(0, 1, 2, 130, 143)),
    Verb("validate", "re-check a release: manifest, checksums, schemas, row counts, unique ids (exit 1 if not)",
         "lifecycle.release:ValidateConfig", _validate, positional=("path",)),
    Verb("latest", "print the data folder of the release ROOT/sft/LATEST names, for loaders",
         "lifecycle.release:LatestConfig", _latest, positional=("path",)),
    Verb("diff", "which examples one release has that another has not (by origin; --ids: each, and why removed)",
         "beam_pipelines.report.changes:DiffConfig", _diff, positional=("old", "new")),
    Verb("show", "one example's history: its document, instruction, scores, rewrite, and why kept or dropped",
         "bft.show:ShowConfig", _show, positional=("id",)),
    Verb("seed", "the seed pairs: first turns of OpenAssistant oasst1 trees", "training.seed:SeedConfig", _seed),
    Verb("train", "fine-tune the backward, forward or SFT model (transformers' Trainer)",
         "training.train:TrainConfig", _train),
    Verb("eval generate", "answer an AlpacaEval-format question file", "generation.evaluate:EvalGenerateConfig",
         _eval_generate),
    Verb("eval judge", "judge two answer files pairwise, both orders (MT-Bench's prompt)",
         "generation.evaluate:EvalJudgeConfig", _eval_judge),
]}


def usage() -> str:
    import bft

    lines = [f"usage: bft VERB [options]   (bft {bft.__version__})", "",
             "Instruction back-and-forth translation: web text -> instruction-tuning data.", "", "verbs:"]
    lines += [f"  {v.name:<15} {v.summary}" for v in VERBS.values()]
    lines += ["", "Run `bft VERB --help` for a verb's options. Every option can also come from a run file:",
              "`bft VERB --config FILE` reads FILE's section for the verb (flags win)."]
    return "\n".join(lines)


# ---- one error path ----------------------------------------------------------------------------

def _configure_logging(verbose: bool) -> None:
    level = os.environ.get("BFT_LOG_LEVEL", "INFO" if verbose else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars too
    if not verbose and "BFT_LOG_LEVEL" not in os.environ:
        # The local runner relays every worker's start-up warnings; they are noise for a user.
        for name in ("apache_beam", "absl", "httpx", "transformers", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)


WRITERS = ("prepare", "generate", "assemble")  # verbs that write under --root: one writer per root at a time
RUNS_BEAM = ("prepare", "assemble", "rebuild")  # verbs that run a Beam pipeline (rebuild: prepare's, assemble's)


def root_lock(verb: Verb, cfg):
    """The root's lock for a verb that writes it (lifecycle.lock; bft rebuild takes it in main_rebuild);
    one of several generate workers locks only its own name, so the workers run side by side."""
    if verb.name not in WRITERS:
        return contextlib.nullcontext()
    from lifecycle.lock import RootLock, lock_name

    if verb.name == "generate":
        return RootLock(cfg.root, lock_name(cfg.stage, cfg.worker_index, cfg.num_workers))
    return RootLock(cfg.root)


def run_verb(verb: Verb, argv: list[str]) -> int:
    if verb.name not in RUNS_BEAM:
        return _run_verb(verb, argv)
    from beam_pipelines.runtime import warm   # before Beam's imports: the local workers' own run beside them

    with warm.started(verb.name, pass_flags(verb.name, argv)):
        return _run_verb(verb, argv)


def pass_flags(verb: str, argv: list[str]) -> list[list[str]]:
    """The flags each pass of `bft VERB ARGV` runs with, as far as Beam's are concerned: its run file's
    `beam_args` (--config; rebuild: prepare's and assemble's), then the command line. A run file that
    cannot be read leaves the command line alone: the verb says what is wrong with it."""
    sections = ("prepare", "assemble") if verb == "rebuild" else (verb,)
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if path is None:
        return [argv]
    try:
        doc = config.read_run_file(path)
        return [list((doc.get(s) or {}).get("beam_args") or []) + argv for s in sections]
    except Exception:
        return [argv]


def _run_verb(verb: Verb, argv: list[str]) -> int:
    cls = verb.config_class()
    epilog = " ".join(filter(None, ["Beam's pipeline options (--runner, --project, --temp_location, ...) pass "
                                    "through to Beam." if verb.beam else None, exit_epilog(verb)]))
    ap = argparse.ArgumentParser(prog=f"bft {verb.name}", description=(cls.__doc__ or verb.summary).strip(),
                                 allow_abbrev=False, epilog=epilog or None)
    ap.add_argument("--config", metavar="FILE", help=f"run file (YAML or JSON): its `{verb.name.split()[0]}:` "
                    "section (and `root:`) supplies options; flags win")
    ap.add_argument("--verbose", action="store_true",
                    help="show INFO logs, " + ("Beam's and the libraries' too" if verb.name in RUNS_BEAM else
                                               "the libraries' too (transformers, HTTP clients)"))
    ap.add_argument("--quiet", action="store_true", help="show no progress line or bar on stderr (as BFT_QUIET=1 "
                    "does); results and errors still print")
    config.add_arguments(ap, cls, verb.positional)
    if verb.beam:
        args, beam_args = ap.parse_known_args(argv)
        from beam_pipelines.runtime.options import unknown_beam_flags

        unknown = unknown_beam_flags(beam_args)
        if unknown:
            ap.error(f"unknown option(s) {', '.join(unknown)}: neither bft {verb.name} nor Beam's pipeline "
                     "options know them")
    else:
        args, beam_args = ap.parse_args(argv), []
    _configure_logging(args.verbose)
    if args.quiet:  # for this process and those it starts (BFT_QUIET=1 in the environment does the same)
        from lifecycle.progress import set_quiet

        set_quiet(True)
    from beam_pipelines.runtime.options import configure_process

    configure_process()
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "verbose", "quiet")}
    cfg, file_values = None, {}
    try:
        if args.config:
            head, _, sub = verb.name.partition(" ")
            doc = config.read_run_file(args.config)
            # a generate stage's run keys (external, workers, tokens_per_s) are bft rebuild's: not used here
            file_values, run_values, _ = config.section_values(cls, doc, args.config, head, sub or flags.get("stage"))
            beam_args = run_values.get("beam_args", []) + beam_args
        if verb.name == "generate" and flags.get("job"):   # an external worker: the job bft rebuild wrote
            from generation.job import job_options

            file_values = job_options(flags, args.config)
        cfg = config.build(cls, file_values, flags, args.config or "")
        with root_lock(verb, cfg):
            return verb.run(cfg, beam_args, args.config)
    except (KeyboardInterrupt, Exception) as e:  # a user's mistake, Ctrl-C or SIGTERM: one line; a bug keeps its traceback
        message = user_error_message(e)
        fmt = getattr(cfg, "format", None) or flags.get("format") or file_values.get("format")
        if fmt == "json" and not getattr(e, JSON_ANSWERED, False):  # stdout is one JSON document, always
            print(json.dumps({"verb": verb.name, "error": one_line(e), "exit_code": exit_status(e)}, indent=2))
        if isinstance(e, KeyboardInterrupt):   # Ctrl-C or SIGTERM (lifecycle.signals): 130 or 143
            message = interrupted_text(e)
        if message is None:
            raise
        print(f"bft {verb.name}: {message}", file=sys.stderr)
        # an error that is a state to wait out says so (generation.batch.BatchesPending: 75, EX_TEMPFAIL)
        return exit_status(e)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        import bft

        print(f"bft {bft.__version__}")
        return 0
    name = argv[0]
    if name == "eval" and len(argv) > 1 and not argv[1].startswith("-"):
        name, argv = f"eval {argv[1]}", argv[1:]
    elif name == "eval":   # `bft eval` alone or `bft eval --help`: its sub-verbs
        helping = argv[1:2] in (["-h"], ["--help"])
        print("usage: bft eval {generate,judge} [options]\n\n"
              + "\n".join(f"  {v.name:<15} {v.summary}" for v in VERBS.values() if v.name.startswith("eval "))
              + "\n\nRun `bft eval generate --help` or `bft eval judge --help` for their options.",
              file=sys.stdout if helping else sys.stderr)
        return 0 if helping else 2
    verb = VERBS.get(name)
    if verb is None:
        print(usage() + f"\n\nbft: unknown verb {' '.join(argv[:1])!r}", file=sys.stderr)
        return 2
    previous = signals.take_sigterm()  # SIGTERM as Ctrl-C, in every verb
    try:
        return run_verb(verb, argv[1:])
    except KeyboardInterrupt as interrupt:  # before the verb's own handler (imports, parsing) or after it
        print(f"bft {name}: {interrupted_text(interrupt)}", file=sys.stderr)
        return interrupt_status(interrupt)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The `bft` command: `main`, then the interpreter's exit without its teardown of modules and objects
    (~0.3 s after a Beam pass, the runner's gRPC objects among them). What an exit must do is still
    done, in the interpreter's order: threading's exit hooks run (concurrent.futures ends its pools'
    threads there) and non-daemon threads joined, atexit functions run (logging's flush, temporary
    folders, process pools), the standard streams flushed. A bug's exception takes the
    ordinary exit, its traceback printed."""
    import atexit
    import threading

    try:
        status = main()
    except SystemExit as e:   # argparse's usage error (2), --help (0)
        status = e.code
    if not isinstance(status, int):
        if status is not None:
            print(status, file=sys.stderr)
        status = 0 if status is None else 1
    threading._shutdown()   # what the interpreter's exit does first: threading's exit hooks, then the join
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
