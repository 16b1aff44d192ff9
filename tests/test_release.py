"""The release protocol (lifecycle.release.publish) under faults: validate before _SUCCESS, reruns that
finish an interrupted publish, kills at every write of assemble, malformed and edited manifests, and
`bft validate` in many processes (the Arrow thread abort)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage
from bft import cli
from lifecycle import release
from schemas.layout import RunLayout
from tests.conftest import ROOT, SimulatedKill, kill_at, snapshot
from tests.helpers.assemble import run, write_root


@pytest.fixture
def root(tmp_path, bpe_tokenizer_path):
    return write_root(str(tmp_path / "run"), bpe_tokenizer_path)


def latest(root):
    path = os.path.join(root, "sft", "LATEST")
    return storage.read_text(path).strip() if os.path.exists(path) else None


# ---- validate before _SUCCESS; a rerun finishes an interrupted publish ----------------------------

def test_a_release_that_does_not_validate_is_never_marked_complete(root, monkeypatch):
    real = release.parquet_rows
    monkeypatch.setattr(release.manifest, "parquet_rows", lambda path: real(path) + 1)  # a manifest that lies
    with pytest.raises(release.ReleaseError, match="rows, manifest says"):
        run(root, version="v1")
    folder = os.path.join(root, "sft", "v1")
    assert not os.path.exists(os.path.join(folder, "_SUCCESS")) and latest(root) is None
    monkeypatch.undo()
    run(root, version="v1")  # not "published" by the failed run: built again, and valid
    assert release.validate(folder)["version"] == "v1" and latest(root) == "v1"


def test_a_kill_between_success_and_latest_is_finished_by_a_rerun(root, monkeypatch):
    run(root, version="v0")
    with kill_at(monkeypatch, r"/sft/LATEST$"):
        with pytest.raises(SimulatedKill):
            run(root, version="v1")
    assert os.path.exists(os.path.join(root, "sft", "v1", "_SUCCESS")) and latest(root) == "v0"
    run(root, version="v1")
    assert latest(root) == "v1"


def test_a_damaged_published_release_is_not_reported_as_published_again(root):
    run(root, version="v1")
    folder = os.path.join(root, "sft", "v1")
    os.remove(os.path.join(folder, "report.html"))
    with pytest.raises(release.ReleaseError, match="report.html: listed in manifest.json but missing"):
        run(root, version="v1")


# points at which a whole assemble is killed: inside the Beam pass (a staged part, a data file) and the
# driver's first write after it (the report); every later point is a write of the publish protocol,
# driven below with a small build (the same protocol code, without a Beam pass per point)
KILL_POINTS = [r"/sft/_tmp/.*/web-", r"/data/split=train/part-00001-of-00002\.parquet$", r"/v1/report\.html$"]
# every write of a release, in the order assemble makes them: the data, the report, the card, the
# stats, then publish's own: the manifest, _SUCCESS, LATEST
PUBLISH_KILL_POINTS = [r"/data/split=train/part-00001-of-00002\.parquet$", r"/v1/report\.html$", r"/v1/README\.md$",
                       r"/v1/stats\.json$", r"/v1/manifest\.json$", r"/v1/_SUCCESS$", r"/sft/LATEST$"]


def release_snapshot(root):
    """Every file under ROOT/sft, as bytes, less what records the time: created_at, finished_at, the
    timing section, the checksums of stats.json and report.html (which hold them) and _SUCCESS (the
    manifest's)."""
    def clean(rel, data):
        if rel.endswith("/_SUCCESS"):
            return b"present"
        if rel.endswith("/stats.json"):
            stats = json.loads(data)
            return {k: v for k, v in stats.items() if k not in ("timing", "finished_at")}
        if rel.endswith("/manifest.json"):
            m = json.loads(data)
            m.pop("created_at")
            m["files"] = [e if e["path"] not in ("stats.json", "report.html") else {"path": e["path"]}
                          for e in m["files"]]
            return m
        if rel.endswith("/report.html"):  # the report says when the release was finished
            return re.sub(rb"finished \d{4}-\d\d-\d\dT[\d:]+Z", b"finished T", data)
        return data
    return snapshot(os.path.join(root, "sft"), clean)


def test_assemble_killed_at_any_write_reruns_to_the_output_of_an_uninterrupted_run(root, monkeypatch):
    run(root, version="v1")
    expected = release_snapshot(root)
    assert "v1/data/split=train/part-00001-of-00002.parquet" in expected and expected["LATEST"] == b"v1\n"
    for point in KILL_POINTS:
        shutil.rmtree(os.path.join(root, "sft"))
        with kill_at(monkeypatch, point):
            with pytest.raises(Exception) as killed:
                run(root, version="v1")
        assert "SimulatedKill" in repr(killed.value) or "SimulatedKill" in str(killed.value), point
        assert latest(root) is None, point
        run(root, version="v1")
        got = release_snapshot(root)
        assert got == expected, point
        release.validate(root)


def test_publish_killed_at_any_write_reruns_to_the_release_of_an_uninterrupted_run(root, monkeypatch):
    """lifecycle.release.publish with a build that writes a real release's files (assemble's v0) in
    assemble's order: killed before each write of the release, a rerun publishes exactly what an
    uninterrupted run does, and LATEST never names a release before it is complete."""
    run(root, version="v0")
    v0 = os.path.join(root, "sft", "v0")
    manifest = json.loads(open(os.path.join(v0, "manifest.json")).read())
    data = sorted(e["path"] for e in manifest["files"] if e["path"].startswith("data/"))
    rest = sorted(e["path"] for e in manifest["files"] if not e["path"].startswith("data/")
                  and e["path"] not in ("report.html", "README.md", "stats.json"))
    order = data + rest + ["report.html", "README.md", "stats.json"]

    def build(folder, version):
        for rel in order:
            storage.write_bytes(storage.join(folder, rel), open(os.path.join(v0, rel), "rb").read())
        return manifest["counts"]

    def publish():
        return release.publish(RunLayout(root), version="v1", config=manifest["config"], lineage=manifest["inputs"], build=build)

    def state():
        return release_snapshot(root)

    assert publish() == (os.path.join(root, "sft", "v1"), True)
    expected = state()
    assert expected["LATEST"] == b"v1\n" and "v1/data/split=train/part-00001-of-00002.parquet" in expected
    for point in PUBLISH_KILL_POINTS:
        shutil.rmtree(os.path.join(root, "sft", "v1"))
        storage.write_text(os.path.join(root, "sft", "LATEST"), "v0\n")
        with kill_at(monkeypatch, point) as fired:
            with pytest.raises(SimulatedKill):
                publish()
        assert fired, point
        assert latest(root) == "v0", point
        v1 = os.path.join(root, "sft", "v1")
        if os.path.isdir(os.path.join(v1, "data")) and not os.path.exists(os.path.join(v1, "_SUCCESS")):
            # debris of an unfinished release, which the rerun must clear (a published one is never touched)
            open(os.path.join(root, "sft", "v1", "data", "stray.parquet"), "wb").write(b"debris")
        assert publish()[0] == os.path.join(root, "sft", "v1"), point
        assert state() == expected, point
        release.validate(os.path.join(root, "sft", "v1"))


# ---- malformed and edited manifests --------------------------------------------------------------

def _edit_manifest(folder, change):
    path = os.path.join(folder, "manifest.json")
    manifest = json.loads(open(path).read())
    changed = change(manifest)
    manifest = changed if isinstance(changed, list) else manifest  # a change returns a manifest it replaces
    open(path, "w").write(json.dumps(manifest))


@pytest.mark.parametrize("change,problem", [
    (lambda m: m["files"][0].pop("bytes"), r"files\[0\] \(README\.md\): 'bytes' is missing, expected a whole number"),
    (lambda m: m.update(files=["train-00000-of-00002.parquet"]), r"files\[0\] is 'train-00000-of-00002\.parquet', "
                                                                 "expected an object"),
    (lambda m: [m], r"manifest\.json: an array, expected an object"),
    (lambda m: m.pop("counts"), r"'counts' is missing, expected an object"),
    (lambda m: m["files"][0].update(path="../../etc/passwd"), r"'path' is '\.\./\.\./etc/passwd'"),
])
def test_a_malformed_manifest_is_a_list_of_problems_not_a_traceback(published, capsys, change, problem):
    root = published
    folder = os.path.join(root, "sft", "v1")
    _edit_manifest(folder, change)
    assert cli.main(["validate", folder]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "release is not valid" in err
    assert re.search(problem, err), err


@pytest.mark.parametrize("field,value", [("config", {"recipe": "filter"}), ("version", "v2"), ("config_hash", "0")])
def test_an_edit_of_the_manifests_config_or_version_fails_validate(published, field, value):
    root = published
    folder = os.path.join(root, "sft", "v1")
    _edit_manifest(folder, lambda m: m.update({field: value}))
    with pytest.raises(release.ReleaseError, match="manifest.json: its sha256 is not the one _SUCCESS records"):
        release.validate(folder)
    # _SUCCESS is in sha256sum's format: the manifest can be checked without bft too
    assert subprocess.run(["sha256sum", "--status", "-c", "_SUCCESS"], cwd=folder).returncode != 0


def test_success_holds_the_manifest_checksum_in_sha256sum_format(published):
    root = published
    folder = os.path.join(root, "sft", "v1")
    assert subprocess.run(["sha256sum", "--status", "-c", "_SUCCESS"], cwd=folder).returncode == 0


# ---- validate never reads Parquet through Arrow's threads on a BufferReader ---------------------------

def test_validate_and_gcs_reads_do_not_use_read_table_on_a_buffer(published, monkeypatch):
    """The pattern of apache/arrow#34314 and #33975 (SIGABRT in a few percent of processes): a
    deterministic guard; the subprocess loop below is the real symptom."""
    root = published
    real = pq.read_table

    def guarded(source, *a, **kw):
        assert not isinstance(source, pa.BufferReader), "pq.read_table on a BufferReader"
        return real(source, *a, **kw)

    monkeypatch.setattr(pq, "read_table", guarded)
    release.validate(root)
    data = open(os.path.join(root, "sft", "v1", "data", "split=train", "part-00000-of-00002.parquet"), "rb").read()
    assert storage.parquet_from_bytes(data).num_rows > 0


def test_bft_validate_never_aborts_in_a_loop_of_processes(published):
    """Bounded: 24 processes, two at a time. On the old code about one run in 20-60 died with SIGABRT
    (or SIGBUS) after printing "valid"; this loop found it about half the time, the guard above always."""
    root = published
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "bft.cli", "validate", root]
    codes = []
    for _ in range(12):
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
        codes += [p.wait(timeout=120) for p in procs]
    assert codes == [0] * len(codes)


def test_a_published_release_with_an_unreadable_manifest_is_refused_not_rebuilt(published):
    root = published
    folder = os.path.join(root, "sft", "v1")
    open(os.path.join(folder, "manifest.json"), "w").write("{ not json")
    with pytest.raises(release.ReleaseError, match="exists with other inputs or config.*never overwritten"):
        run(root, version="v1")
    assert os.path.exists(os.path.join(folder, "data", "split=train", "part-00000-of-00002.parquet"))


def test_an_empty_success_is_named_and_a_rerun_re_marks_a_release_without_rebuilding_it(root):
    run(root, version="v1")
    folder = os.path.join(root, "sft", "v1")
    data = os.path.join(folder, "data", "split=train", "part-00000-of-00002.parquet")
    stamp = os.path.getmtime(data)
    open(os.path.join(folder, "_SUCCESS"), "w").close()  # as the code before the checksum wrote it
    with pytest.raises(release.ReleaseError, match="_SUCCESS holds no checksum of manifest.json.*delete _SUCCESS"):
        release.validate(folder)
    os.remove(os.path.join(folder, "_SUCCESS"))  # as a kill between the manifest and _SUCCESS leaves it
    run(root, version="v1")
    assert os.path.getmtime(data) == stamp and release.validate(folder)["version"] == "v1"


@pytest.mark.parametrize("name", ["../../other/sft/v1", "/abs/sft/v1", "v1/../../x", "LATEST", ".."])
def test_latest_names_a_version_inside_its_own_sft(tmp_path, capsys, name):
    """LATEST that points outside its sft/ (another root's release, an absolute
    path) is refused in one line, never followed."""
    from bft import cli

    sft = tmp_path / "run" / "sft"
    sft.mkdir(parents=True)
    (sft / "LATEST").write_text(name + "\n")
    with pytest.raises(release.ReleaseError, match="not a version inside"):
        release.validate(str(tmp_path / "run"))
    assert cli.main(["validate", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a version inside" in err


def _tamper(folder, rel, target, manifest_bytes=None):
    path = os.path.join(folder, rel)
    os.remove(path)
    os.symlink(target, path)
    if manifest_bytes is not None:
        mpath = os.path.join(folder, "manifest.json")
        manifest = json.loads(storage.read_text(mpath))
        for entry in manifest["files"]:
            if entry["path"] == rel:
                entry["bytes"] = manifest_bytes
        storage.write_text(mpath, json.dumps(manifest))


def test_a_tampered_release_with_links_is_refused_without_reading_them(published, tmp_path, capsys):
    """README.md a link to /dev/zero with `bytes: 0` in the manifest made `bft
    validate` hash an endless file. A link (to a device, to another release's file, to a folder) or a
    FIFO is a problem named in the one report, and never opened: a FIFO would block an open()."""
    root = published
    folder = os.path.join(root, "sft", "v1")
    other = tmp_path / "other.parquet"
    shutil.copy(os.path.join(folder, "data", "split=train", "part-00000-of-00002.parquet"), other)
    _tamper(folder, "README.md", "/dev/zero", manifest_bytes=0)
    _tamper(folder, "data/split=train/part-00000-of-00002.parquet", str(other))  # the same bytes, elsewhere
    os.symlink(str(tmp_path), os.path.join(folder, "plots-elsewhere"))
    os.mkfifo(os.path.join(folder, "pipe"))
    with pytest.raises(release.ReleaseError) as e:
        release.validate(folder)
    text = str(e.value)
    assert "README.md: a symbolic link (to '/dev/zero')" in text
    assert "data/split=train/part-00000-of-00002.parquet: a symbolic link" in text
    assert "plots-elsewhere: a symbolic link" in text and "pipe: a FIFO" in text
    assert "sha256 is not the one _SUCCESS records" in text  # and the rest is still checked
    assert cli.main(["validate", root]) == 1 and "README.md: a symbolic link" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["LATEST", "manifest.json", "folder"])
def test_latest_the_manifest_or_the_folder_as_a_link_is_never_followed(published, tmp_path, what):
    root = published
    folder = os.path.join(root, "sft", "v1")
    if what == "LATEST":
        _tamper(os.path.join(root, "sft"), "LATEST", "/dev/zero")
        target, message = root, "LATEST is a symbolic link"
    elif what == "manifest.json":
        _tamper(folder, "manifest.json", "/dev/zero")
        target, message = folder, "manifest.json: a symbolic link"
    else:
        moved = str(tmp_path / "moved")
        os.rename(folder, moved)
        os.symlink(moved, folder)
        target, message = folder, "the release folder is a symbolic link"
    with pytest.raises(release.ReleaseError, match=message):
        release.validate(target)
