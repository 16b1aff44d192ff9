"""State that heals: every file a run reads back is checked on read, and a
damaged one is named in one line and set aside under ROOT/_damaged/ so that the rerun redoes only
the part it held; a full disk is one line naming the folder and the bytes; write targets that are
links are never followed; the debris of a killed write goes with the next run of the same step.
Each test writes the damaged file itself and calls the reader (or a small verb): no model, no Beam."""
import errno
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage
from bft.night import Night
from generation.batch import BatchDispatch
from generation.shard import Checkpoints
from lifecycle import provenance, state
from schemas.errors import user_error_message
from schemas.layout import RunLayout
from tests.helpers.cli import run as bft

TRUNCATED, EMPTY, ARRAY = b'{"config": "abc", "batches": [{"id": "b', b"", b"[]"


def set_aside(layout: RunLayout) -> dict[str, str]:
    """{path under _damaged/: its reason} of everything set aside under the root."""
    return {os.path.relpath(p, layout.damaged): open(p + ".reason").read()
            for p in storage.list_files(layout.damaged) if not p.endswith(".reason")}


@pytest.mark.parametrize("shape", [TRUNCATED, EMPTY, ARRAY, b'{"config": "k", "batches": [{"id": 7, "rows": {}}], '
                                   b'"rounds": {}}', b'{"config": "k", "batches": [], "rounds": {"d01": "two"}}'],
                         ids=["truncated", "empty", "array", "id-a-number", "rounds-a-string"])
def test_a_damaged_batch_record_is_set_aside_and_the_shard_starts_anew(tmp_path, shape, caplog):
    layout = RunLayout(str(tmp_path))
    batches = BatchDispatch(None, layout, "score", "k", "vllm", "m")
    storage.write_bytes(batches.state_path(0, 3), shape)
    with caplog.at_level(logging.WARNING, "bft.state"):
        assert batches.load(0, 3) == {"config": "k", "batches": [], "rounds": {}}
    assert not os.path.exists(batches.state_path(0, 3))
    [(name, reason)] = set_aside(layout).items()
    assert name.startswith("generations/score/_batches/score-00000-of-00003.json.") and reason.startswith(
        batches.state_path(0, 3))
    [line] = [r.getMessage() for r in caplog.records]
    assert "is damaged" in line and "set aside" in line and "\n" not in line


def generation_rows(ids):
    return [{"id": i, "stage": "backtranslate", "model": "m", "input_hash": "h", "parse_error": None} for i in ids]


@pytest.mark.parametrize("damage", [b"PAR1 garbage", b"", "cut"], ids=["garbage", "empty", "truncated"])
def test_a_damaged_checkpoint_part_is_set_aside_and_only_its_rows_are_sent_again(tmp_path, damage):
    layout = RunLayout(str(tmp_path))
    ckpt = Checkpoints(layout, "backtranslate", 1, 3, "cfg")
    for ids in (["d01", "d02"], ["d03"], ["d04"]):
        ckpt.buffer = generation_rows(ids)
        ckpt.flush()
    second = os.path.join(ckpt.folder, "part-00002.parquet")
    data = open(second, "rb").read()
    open(second, "wb").write(data[: len(data) // 2] if damage == "cut" else damage)
    again = Checkpoints(layout, "backtranslate", 1, 3, "cfg")
    assert [r["id"] for r in again.rows()] == ["d01", "d02", "d04"]         # d03 is sent again
    assert list(set_aside(layout)) and "not a readable generation Parquet file" in next(iter(set_aside(layout).values()))
    again.buffer = generation_rows(["d03"])
    again.flush()                                         # numbered after every part, never over one
    assert sorted(os.listdir(again.folder)) == ["part-00001.parquet", "part-00003.parquet", "part-00004.parquet"]


@pytest.mark.parametrize("shape", [b'{"kept": 3, "input_rec', b"[]", b'{"kept": "3", "input_records": 3, '
                                   b'"dropped": {}, "config": {}}'], ids=["truncated", "array", "kept-a-string"])
def test_damaged_prepare_stats_are_set_aside_and_prepare_counts_as_not_done(tmp_path, shape, capsys):
    layout = RunLayout(str(tmp_path))
    storage.write_bytes(layout.prepare_stats, shape)
    assert state.prepare_stats(layout, set_aside=False) is None and os.path.exists(layout.prepare_stats)  # bft status
    assert state.prepare_stats(layout) is None and not os.path.exists(layout.prepare_stats)
    assert list(set_aside(layout))[0].startswith("candidates/stats.json.")
    storage.write_bytes(layout.prepare_stats, shape)           # bft assemble: one line, what to run
    rc, _, err = bft(capsys, "assemble", "--root", str(tmp_path), "--tokenizer", "t")
    assert rc == 1 and "run bft prepare first" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


NIGHTS = {"invocations-an-object": {"invocations": {}, "stages": {}},
          "invocation-a-number": {"invocations": [3], "stages": {}},
          "stage-a-number": {"invocations": [], "stages": {"score": 5}},
          "work-a-string": {"invocations": [], "stages": {"score": {"requests_sent": "12"}}},
          "live-a-list": {"invocations": [{"status": "running", "live": []}], "stages": {}}}


@pytest.mark.parametrize("shape", list(NIGHTS))
def test_a_night_record_of_wrong_inner_types_is_set_aside_and_never_written_back(tmp_path, shape):
    layout = RunLayout(str(tmp_path))
    storage.write_text(layout.night_record, json.dumps(NIGHTS[shape]))
    night = Night(layout, "run.yaml")
    assert [i["status"] for i in night.record["invocations"]] == ["running"]
    night.save("failed: x")
    written = json.loads(open(layout.night_record).read())
    assert written["stages"] == {} and len(written["invocations"]) == 1
    assert json.loads(open(os.path.join(layout.damaged, next(iter(set_aside(layout))))).read()) == NIGHTS[shape]


@pytest.mark.parametrize("manifest", [b'{"version": "v1", "fil', b"[]", b'{"version": "v1", "config_hash": "x", '
                                      b'"counts": {"train": 1, "validation": 0}, "files": [7]}', b"[" * 100_000],
                         ids=["truncated", "array", "files-of-numbers", "nested"])
def test_bft_latest_on_a_damaged_manifest_is_one_line(tmp_path, manifest, capsys):
    folder = tmp_path / "sft" / "v1"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes(manifest)
    (folder / "_SUCCESS").write_text("0" * 64 + "  manifest.json\n")
    (tmp_path / "sft" / "LATEST").write_text("v1\n")
    rc, out, err = bft(capsys, "latest", str(tmp_path))
    assert rc == 1 and out == "" and "manifest.json" in err and "bft validate" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_marker_of_wrong_inner_types_is_no_marker(tmp_path):
    marker = str(tmp_path / "score-00000-of-00001.metrics.json")
    good = {"provenance": {"sha256": "a", "bytes": 1, "inputs": {"candidates": {"path": "c", "sha256": "b"}},
                           "config": {}}}
    storage.write_text(marker, json.dumps(good))
    assert provenance.read_record(marker) == good["provenance"]
    good["provenance"]["inputs"] = {"candidates": ["c", "b"]}
    storage.write_text(marker, json.dumps(good))
    assert provenance.read_record(marker) is None


def test_a_full_disk_is_one_line_naming_the_folder_and_the_bytes(tmp_path, monkeypatch):
    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "sft" / "LATEST"
    with pytest.raises(storage.DiskFull) as e:
        storage.write_text(str(target), "20240101-abcd\n")
    assert user_error_message(e.value) == (f"{tmp_path / 'sft'}: no space left on the device while writing LATEST "
                                           "(14 bytes needed); free space there and run again (what was written "
                                           "before is kept)")
    assert os.listdir(tmp_path / "sft") == []                 # no temporary file left behind
    monkeypatch.undo()

    def full_parquet(table, where, **_):
        raise OSError(errno.ENOSPC, "[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left")

    monkeypatch.setattr(pq, "write_table", full_parquet)
    part = tmp_path / "generations" / "score" / "_checkpoints" / "part-00001.parquet"
    with pytest.raises(storage.DiskFull, match=r"_checkpoints: no space left on the device while writing "
                                               r"part-00001.parquet \(up to [\d,]+ bytes, its size in memory"):
        storage.write_parquet(pa.table({"id": ["a"] * 100}), str(part))
    assert os.listdir(part.parent) == []


def test_a_lock_file_that_is_a_link_is_refused_and_never_written_through(tmp_path):
    """`_lock/root -> ../sft/LATEST` overwrote and truncated LATEST."""
    from schemas.errors import UserError
    from lifecycle.lock import RootLock

    layout = RunLayout(str(tmp_path))
    storage.write_text(layout.latest, "v1\n")
    os.makedirs(os.path.dirname(layout.lock()))
    os.symlink("../sft/LATEST", layout.lock())
    with pytest.raises(UserError, match=r"_lock/root is a symbolic link \(to '../sft/LATEST'\), never followed: "
                                        "remove it"):
        RootLock(layout.root).acquire()
    assert open(layout.latest).read() == "v1\n"
    # LATEST itself as a link: a new LATEST replaces the link, never the file it names
    other = tmp_path / "elsewhere"
    other.write_text("keep\n")
    os.unlink(layout.latest)
    os.symlink(other, layout.latest)
    storage.write_text(layout.latest, "v2\n")
    assert other.read_text() == "keep\n" and not os.path.islink(layout.latest) and open(layout.latest).read() == "v2\n"


def test_the_next_run_of_a_step_removes_its_own_debris_only(tmp_path):
    """A kill mid-write left generations/<stage>/.tmp-* and sft/.tmp-LATEST.* that reruns never removed,
    and empty _checkpoints/ folders stayed."""
    import time

    from generation.job import GenerateConfig
    from generation.runner import clear_debris

    layout = RunLayout(str(tmp_path))
    stage = layout.generations("score")
    debris = [os.path.join(stage, n) for n in (".tmp-score-00000-of-00002.parquet.k2x9a0b1",
                                               ".tmp-score-00000-of-00002.metrics.json.a1b2c3d4",
                                               ".tmp-score-00001-of-00002.parquet.q0w9e8r7",     # worker 1's
                                               "_batches/.tmp-score-00000-of-00002.json.z9y8x7w6")]
    for path in debris:
        storage.write_bytes(path, b"half")
    worker = GenerateConfig(stage="score", root=str(tmp_path), engine="hf", model="m", num_workers=2)
    clear_debris(worker, 0)                                # written after the run started: never touched
    assert all(os.path.exists(p) for p in debris)
    clear_debris(worker, time.time() + 1)
    assert [os.path.exists(p) for p in debris] == [False, False, True, False]
    storage.write_bytes(os.path.join(layout.sft, ".tmp-LATEST.ab12cd34"), b"v")   # bft assemble's publish
    storage.write_bytes(os.path.join(layout.sft, "v1", "manifest.json"), b"{}")
    assert storage.clear_debris(layout.sft, time.time() + 1) == [os.path.join(layout.sft, ".tmp-LATEST.ab12cd34")]
    os.makedirs(layout.all_generation_checkpoints("score"))
    storage.remove_empty_folder(layout.all_generation_checkpoints("score"))
    assert not os.path.exists(layout.all_generation_checkpoints("score"))
