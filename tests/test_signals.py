"""SIGTERM as Ctrl-C (lifecycle/signals.py), as schedulers send it: a real process, a real signal."""
from __future__ import annotations

import gzip
import json
import os
import random
import re
import signal
import time
from collections import Counter

import schemas
import storage
from schemas.layout import RunLayout
from tests.helpers.generation import copy_root, read_stage
from tests.helpers.processes import CliForks
from tests.openai_api_standin import method_answer


def grow_candidates(root: str, times: int) -> int:
    """Each candidates shard of `root` with every document `times` times (new ids, so new seeds and
    requests); returns the number of candidates."""
    total = 0
    for _, _, path in RunLayout(root).candidate_shards():
        rows = schemas.validate(storage.read_parquet(path), schemas.CANDIDATE, path).to_pylist()
        rows = [{**r, "id": f"{r['id']}-{i}"} for i in range(times) for r in rows]
        storage.write_parquet(schemas.to_table(rows, schemas.CANDIDATE, path), path)
        total += len(rows)
    return total


def test_a_stage_signalled_at_random_moments_keeps_every_answer_and_a_rerun_pays_none_twice(
        prepared_root, tmp_path, hosted):
    """Ten SIGTERMs, then a Ctrl-C, each at a seeded random moment after the command's first request
    (at default checkpoint settings, so only the interrupt saves what was answered), against a server
    that takes 0.06 s per answer: each ends in one line naming the rows kept, which are every request
    the server received meanwhile (those in flight come back and are kept), exit 143 (130); the
    rerun then sends each of the others once."""
    root = copy_root(prepared_root, tmp_path / "run")
    rows = grow_candidates(root, 6)   # more than 11 tries answer, so that each try is inside the stage
    hosted.answer = lambda text: (time.sleep(0.06), method_answer(text))[1]
    command = ["generate", "backtranslate", "--root", root, "--engine", "openai", "--model", "gpt-standin",
               "--base-url", hosted.url, "--api", "chat", "--max-model-len", "8192", "--quiet"]
    moments = random.Random(34)
    tries = []
    with CliForks() as bft:
        for sig in [signal.SIGTERM] * 10 + [signal.SIGINT]:
            err = tmp_path / f"err-{len(tries)}"
            before = len(hosted.requests)
            pid = bft.start(command + ["--concurrency", "2"], err)
            deadline = time.monotonic() + 30
            while len(hosted.requests) == before and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(moments.uniform(0, 0.12))
            os.kill(pid, sig)
            status = bft.wait(pid)
            tries.append((sig, status, err.read_text(), len(hosted.requests) - before))
        err = tmp_path / "err-rerun"
        status = bft.wait(bft.start(command + ["--concurrency", "32"], err))   # nothing signalled
        assert status == 0 and err.read_text() == "", err.read_text()
    for sig, status, err, received in tries:
        kept = re.fullmatch(r"bft generate: interrupted( by SIGTERM)?: (\d+) answered rows kept; rerun to resume\n",
                            err)
        assert kept and status == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], (sig, status, err)
        assert bool(kept.group(1)) == (sig == signal.SIGTERM) and int(kept.group(2)) == received, (err, received)
    bodies = Counter(json.dumps(r["body"], sort_keys=True) for r in hosted.requests)
    assert [n for n in bodies.values() if n > 1] == [] and len(bodies) == rows and set(hosted.statuses()) == {200}
    written = read_stage(root, "backtranslate")[1]
    assert len(written) == rows and written["finish_reason"].eq("stop").all()
    checkpoints = os.path.join(root, "generations", "backtranslate", "_checkpoints")
    assert [name for _, _, names in os.walk(checkpoints) for name in names] == []


def test_a_nightly_rebuild_sigterm_is_one_line_exit_143_and_in_the_nights_record(tmp_path, monkeypatch, capsys):
    """`bft rebuild` killed by a scheduler's SIGTERM (here while prepare runs): the invocation is in
    ROOT/_night.json with the line the command ended with."""
    import yaml

    from beam_pipelines import prepare
    from bft import cli

    root = tmp_path / "run"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.json.gz").write_bytes(gzip.compress(b'{"id": "a", "text": "a document"}\n'))
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({
        "root": str(root), "prepare": {"input": [str(tmp_path / "in" / "*.json.gz")], "tokenizer": "tok",
                                       "max_tokens": 100},
        "generate": {"engine": "hf", "backtranslate": {"model": "m"}, "score": {"model": "m"}},
        "assemble": {"recipe": "filter"}}))

    def killed(cfg, beam_args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    def not_taken(signum, frame):   # instead of the default, which would end the test run
        raise AssertionError("bft's CLI did not take SIGTERM")
    monkeypatch.setattr(prepare, "run", killed)
    previous = signal.signal(signal.SIGTERM, not_taken)
    try:
        assert cli.main(["rebuild", "--config", str(run_file)]) == 143
        assert signal.getsignal(signal.SIGTERM) is not_taken   # the CLI's handler is gone with the command
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == "bft rebuild: interrupted by SIGTERM\n"
    night = json.loads((root / "_night.json").read_text())
    assert [i["status"] for i in night["invocations"]] == ["interrupted by SIGTERM"]
