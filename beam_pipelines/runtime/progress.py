"""What a running Beam pass (prepare, assemble) shows, and how it ends on Ctrl-C.

`running(verb, options)` is the pipeline of a pass (`with progress.running("prepare", options) as p:`).
While the pass runs:

* on a terminal (stderr is a tty) one status line, redrawn in place: the time so far, the pass's
  counters as of the last finished bundle (documents read, kept, dropped; the local runner reports a
  bundle's counters when it ends, so a long first stage shows its counts when it is done) and the
  stage running (the labels of its transforms, e.g. `ReadAndMeasure`);
* off a terminal one line a minute at most (none for a pass shorter than LOG_EVERY_S);
* nothing with --quiet (lifecycle.progress.quiet()).

The stage and the counters come from the local runner (FnApiRunner, the default): other runners get the
elapsed time only. Ctrl-C and SIGTERM: the local workers ignore both (warm.local_worker_command);
the driver, on either, ends them (driver_watch.end_workers) and raises KeyboardInterrupt (on SIGTERM
schemas.errors.Terminated), which bft's CLI turns into one line and exit status 130 (143).
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
import signal
import sys
import threading
import time

from schemas.errors import UserError, user_error_in_text
from lifecycle import signals
from lifecycle.progress import LOG_EVERY_S, duration, quiet

REDRAW_S = 0.5
# the counters of a pass shown, by (namespace, name); "dropped/..." counters are summed as "dropped"
SHOWN = {("bft.prepare", "input_records"): "read", ("bft.prepare", "kept"): "kept",
         ("bft.assemble", "candidates"): "candidates", ("bft.assemble", "kept_by_recipe"): "kept by recipe"}
DROPPED = ("bft.prepare", "dropped/")
NOISY_LOGGERS = ("apache_beam", "grpc")  # what the runner logs about workers it lost to a Ctrl-C


class PassStatus:
    """The status of one pass: `stage()` and `count()` feed it (from the runner's thread), `tick()`
    shows it (redraws the terminal line, or writes the minute's log line), `close()` clears the line."""

    def __init__(self, verb: str, stream=None, clock=time.monotonic, tty: bool | None = None):
        self.verb = verb
        self.stream = stream if stream is not None else sys.stderr
        self.clock, self.t0 = clock, clock()
        self.quiet = quiet()
        self.tty = (self.stream.isatty() if tty is None else tty) and not self.quiet
        self.current = ""
        self.counters: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._next_log = self.t0 + LOG_EVERY_S
        self._drawn = False

    def stage(self, name: str) -> None:
        with self._lock:
            self.current = name

    def count(self, counters: dict[tuple[str, str], int]) -> None:
        with self._lock:
            for key, n in counters.items():
                self.counters[key] = self.counters.get(key, 0) + n

    def line(self) -> str:
        with self._lock:
            stage, counters = self.current, dict(self.counters)
        shown = [f"{counters[k]:,} {label}" for k, label in SHOWN.items() if k in counters]
        dropped = [n for (ns, name), n in counters.items() if ns == DROPPED[0] and name.startswith(DROPPED[1])]
        if dropped:
            shown.append(f"{sum(dropped):,} dropped")
        return (f"bft {self.verb}: {duration(self.clock() - self.t0)}" + (f"; {', '.join(shown)}" if shown else "")
                + (f"; stage {stage}" if stage else ""))

    def tick(self) -> None:
        if self.quiet:
            return
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r\x1b[K" + self.line()[:width])
            self.stream.flush()
            self._drawn = True
        elif self.clock() >= self._next_log:
            self._next_log = self.clock() + LOG_EVERY_S
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


_PLUMBING = re.compile(r"[^/]+/(Impulse|MaybeReshuffle|Map\(decode\)|FlatMap\(<lambda at core\.py)")


def stage_label(stage) -> str:
    """A fused stage's name for a user: the labels (first path element) of the transforms that do its
    work, in order; not the runner's reads, writes and flattens, nor a beam.Create's own steps, whose
    labels are used only when nothing else runs in the stage (a shuffle's read and write, a Create)."""
    work: list[str] = []
    other: list[str] = []
    for transform in getattr(stage, "transforms", []):
        name, urn = transform.unique_name or "", transform.spec.urn
        if name.startswith("ref_"):
            continue
        moves = urn.startswith("beam:runner:") or urn == "beam:transform:flatten:v1"
        (other if moves or _PLUMBING.match(name) else work).append(name.split("/", 1)[0])
    return "+".join(dict.fromkeys(work or other)) or str(getattr(stage, "name", ""))


def user_counters(infos) -> dict[tuple[str, str], int]:
    """The user counters (Metrics.counter) of a bundle's monitoring infos, by (namespace, name)."""
    from apache_beam.metrics import monitoring_infos as mi

    out: dict[tuple[str, str], int] = {}
    for info in infos:
        if mi.is_user_monitoring_info(info) and mi.is_counter(info):
            key = mi.parse_namespace_and_name(info)
            out[key] = out.get(key, 0) + mi.extract_counter_value(info)
    return out


def local_runner(options, status: PassStatus):
    """The runner for `options` when it is the FnApiRunner (what bft defaults to), with the status
    hooks and SIGINT-ignoring workers; None (the runner the options name) otherwise."""
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.portability import python_urns
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from beam_pipelines.runtime import warm

    if (options.view_as(StandardOptions).runner or "").rsplit(".", 1)[-1] != "FnApiRunner":
        warm.discard()   # another runner's workers are its own
        return None

    class Runner(FnApiRunner):
        def run_via_runner_api(self, pipeline_proto, options):
            for env in pipeline_proto.components.environments.values():
                if env.urn == python_urns.SUBPROCESS_SDK:
                    env.payload = warm.local_worker_command(env.payload.decode()).encode()
            return super().run_via_runner_api(pipeline_proto, options)

        def _execute_bundle(self, runner_execution_context, bundle_context_manager, bundle_input):
            status.stage(stage_label(getattr(bundle_context_manager, "stage", None)))
            result = super()._execute_bundle(runner_execution_context, bundle_context_manager, bundle_input)
            try:
                status.count(user_counters(result.process_bundle.monitoring_infos))
            except Exception:  # progress never fails a pass
                pass
            return result

    return Runner()


@contextlib.contextmanager
def interrupts():
    """While the pass runs: SIGINT, and SIGTERM where bft's CLI takes it (lifecycle.signals), end the
    local workers at once and raise their interrupt in the driver (KeyboardInterrupt, Terminated).
    From then on, until the pass has unwound, what the runner's threads and Beam's loggers say about
    the workers it lost (gRPC stream errors, "Worker subprocess exited", "Error closing
    worker_handler") is dropped: it is the interrupt, said some ninety times; and so is the runner's
    log record of a worker's UserError (its traceback, ~65 lines), which the command says in one line.
    Not in effect where SIGINT is ignored (a background job) or outside the main thread."""
    from beam_pipelines.runtime import driver_watch

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if threading.current_thread() is not threading.main_thread() or previous[signal.SIGINT] in (signal.SIG_IGN, None):
        yield
        return
    hook = threading.excepthook
    interrupted = threading.Event()

    def thread_exception(args):
        if not interrupted.is_set():
            hook(args)

    def runner_record(record: logging.LogRecord) -> bool:
        if not record.name.startswith(NOISY_LOGGERS):
            return True
        if interrupted.is_set():
            return False
        # a worker's UserError (a stale shard, a damaged file), logged by the runner with the worker's
        # whole traceback: the command says it in one line when the pass fails with it
        return record.levelno < logging.ERROR or user_error_in_text(record.getMessage()) is None

    replaced: dict = {}

    def on_signal(signum, frame):
        for sig, handler in replaced.items():  # a second Ctrl-C is an ordinary KeyboardInterrupt
            signal.signal(sig, handler)
        interrupted.set()
        driver_watch.end_workers()
        if callable(previous[signum]):
            previous[signum](signum, frame)
        raise KeyboardInterrupt

    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(runner_record)
    threading.excepthook = thread_exception
    try:
        # SIGTERM at its default (a library call, not the CLI) still ends the process at once; its
        # workers die with it (driver_watch.boot)
        with signals.taken(on_signal, lambda sig, current: sig == signal.SIGINT or callable(current)) as taken:
            replaced.update(taken)
            yield
    finally:
        threading.excepthook = hook
        for handler in handlers:
            handler.removeFilter(runner_record)


class RunnerJobFailed(UserError):
    """A job that a remote runner (Flink, Spark, Dataflow through the portable job service) ran and
    reported FAILED: its first error line, not the SDK's traceback of waiting for it."""


_JOB_FAILED = re.compile(r"Pipeline \S+ failed in state (\w+): (.*)")


def job_failure(message: str) -> str | None:
    """The runner's own error of Beam's PortableRunner "Pipeline X failed in state FAILED: ..." message,
    cut to its first sentence-long line; None for another error."""
    match = _JOB_FAILED.search(message)
    if match is None:
        return None
    first = match.group(2).strip().splitlines()[0] if match.group(2).strip() else match.group(1)
    return first if len(first) <= 300 else first[:297] + "..."


@contextlib.contextmanager
def running(verb: str, options, stream=None):
    """The pipeline of pass `verb` with `options` (PipelineOptions), run when the block ends, with
    its status shown and Ctrl-C handled (module doc)."""
    import apache_beam as beam

    status = PassStatus(verb, stream)
    done = threading.Event()

    def show():
        while not done.wait(REDRAW_S):
            status.tick()

    ticker = None if status.quiet else threading.Thread(target=show, name="bft-progress", daemon=True)
    with interrupts():
        if ticker is not None:
            ticker.start()
        try:
            with beam.Pipeline(runner=local_runner(options, status), options=options) as p:
                yield p
        except RuntimeError as e:
            failed = job_failure(str(e))
            if failed is None:
                raise
            raise RunnerJobFailed(f"the {verb} job failed on the runner: {failed}; the runner's logs have its "
                                  "whole trace (Flink: the TaskManagers' logs)") from e
        finally:
            done.set()
            if ticker is not None:
                ticker.join()
            status.close()
