import os

import pyarrow as pa
import pytest

import schemas
import storage
from storage import gcs


def candidate_row(**kw):
    row = {"id": "a", "text": "t", "source": "cc", "url": None, "n_chars": 1, "n_tokens": 1, "shard": 0,
           "text_hash": "0" * 32}
    row.update(kw)
    return row


def test_rows_become_a_validated_table():
    table = schemas.to_table([candidate_row()], schemas.CANDIDATE, "x.parquet")
    assert table.schema.metadata[b"bft.kind"] == b"candidate"


def test_a_null_in_a_required_column_names_the_file_and_column():
    with pytest.raises(schemas.SchemaError, match=r"x.parquet: column 'text' has 1 null"):
        schemas.to_table([candidate_row(text=None)], schemas.CANDIDATE, "x.parquet")


def test_n_tokens_may_be_null_and_a_candidate_file_made_when_it_could_not_still_reads():
    """A document prepare kept by its upper bound has no count (null); files written when the column
    was declared non-null are the same records."""
    table = schemas.to_table([candidate_row(n_tokens=None), candidate_row(id="b")], schemas.CANDIDATE, "x.parquet")
    assert table["n_tokens"].to_pylist() == [None, 1]
    before = table.slice(1).cast(table.schema.set(table.schema.get_field_index("n_tokens"),
                                         pa.field("n_tokens", pa.int32(), nullable=False)))
    assert schemas.validate(before, schemas.CANDIDATE, "old.parquet").schema.field("n_tokens").nullable


def test_wrong_columns_wrong_kind_and_wrong_version_are_named():
    t = schemas.to_table([candidate_row()], schemas.CANDIDATE)
    with pytest.raises(schemas.SchemaError, match="missing"):
        schemas.validate(t.drop(["url"]), schemas.CANDIDATE, "f")
    with pytest.raises(schemas.SchemaError, match="holds candidate records, expected reject"):
        schemas.validate(t, schemas.REJECT, "f")
    old = t.replace_schema_metadata({b"bft.kind": b"candidate", b"bft.schema_version": b"0"})
    with pytest.raises(schemas.SchemaError, match="schema version 0"):
        schemas.validate(old, schemas.CANDIDATE, "f")
    wrong_type = t.set_column(t.schema.get_field_index("n_tokens"), "n_tokens", pa.array(["1"]))
    with pytest.raises(schemas.SchemaError, match="'n_tokens' is string"):
        schemas.validate(wrong_type, schemas.CANDIDATE, "f")


def test_write_bytes_leaves_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "sub" / "out.bin")
    storage.write_bytes(path, b"whole")
    assert open(path, "rb").read() == b"whole"

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        storage.write_bytes(path, b"partial")
    assert open(path, "rb").read() == b"whole"
    assert os.listdir(tmp_path / "sub") == ["out.bin"]


def test_glob_regex_keeps_single_star_within_a_folder():
    import re

    rx = re.compile(gcs._glob_regex("d/documents/*/*.json.gz"))
    assert rx.fullmatch("d/documents/cc_en_head/cc_en_head-0000.json.gz")
    assert not rx.fullmatch("d/documents/a/b/c.json.gz")
    assert re.compile(gcs._glob_regex("d/**/*.gz")).fullmatch("d/a/b/c.gz")
    assert re.compile(gcs._glob_regex("d/**/*.gz")).fullmatch("d/c.gz")


def test_open_lines_reads_gzip_zstd_and_plain(tmp_path):
    from tests.conftest import write_dolma_file

    for name in ("a.json.gz", "a.jsonl.zst", "a.jsonl"):
        path = write_dolma_file(str(tmp_path / name), [b'{"a": 1}', b"\xff\xfe", b""])
        assert list(storage.open_lines(path)) == [b'{"a": 1}', b"\xff\xfe", b""]


def test_one_rule_says_which_names_read_records_reads(tmp_path):
    """storage.compression's suffixes, one owner: training's loader took .jsonl.zst but not .jsonl.zstd."""
    from training.data import load_rows

    yes = ["a.parquet", "a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.jsonl.zstd", "a.json.gz", "a.json.zst"]
    assert all(storage.is_records_file(n) for n in yes)
    assert not any(storage.is_records_file(n) for n in ["a.json", "a.txt", "a.gz", "a.zst", "a.parquet.gz"])
    import zstandard

    path = tmp_path / "sft.jsonl.zstd"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"instruction": "Why?", "response": "Because."}\n'))
    assert load_rows(str(path))[0] == [{"instruction": "Why?", "response": "Because."}]


def test_written_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    storage.write_text(str(tmp_path / "a.json"), "{}")
    storage.write_parquet(pa.table({"x": [1]}), str(tmp_path / "b.parquet"))
    for name in ("a.json", "b.parquet"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~mask


def _docs(n):
    return [b'{"id": "%d", "text": "%s"}' % (i, os.urandom(120).hex().encode()) for i in range(n)]


@pytest.mark.parametrize("name", ["a.jsonl.zst", "a.json.gz"])
def test_a_cut_compressed_file_is_an_error_naming_it_not_a_short_file(tmp_path, name):
    """600 documents cut at 60% used to read as ~360 lines and one malformed line."""
    from tests.conftest import write_dolma_file

    path = write_dolma_file(str(tmp_path / name), _docs(600))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * 0.6)])
    read = []
    with pytest.raises(storage.CorruptFileError, match=f"{name}: truncated"):
        for line in storage.open_lines(path):
            read.append(line)
    assert len(read) < 600  # what was read before the cut (zstd may hold back a partial block)


def test_a_garbage_zstd_is_an_error_naming_the_file_and_frames_are_read_across(tmp_path):
    import zstandard

    path = str(tmp_path / "g.jsonl.zst")
    open(path, "wb").write(b"not zstd at all " * 100)
    with pytest.raises(storage.CorruptFileError, match=r"g\.jsonl\.zst: corrupt zstd stream"):
        list(storage.open_lines(path))
    docs = _docs(50)
    frames = b"".join(zstandard.ZstdCompressor().compress(b"\n".join(docs[i:i + 10]) + b"\n") for i in range(0, 50, 10))
    open(path, "wb").write(frames)
    assert list(storage.open_lines(path)) == docs


def test_a_byte_order_mark_at_the_start_is_dropped(tmp_path):
    from tests.conftest import write_dolma_file

    for name in ("a.json.gz", "a.jsonl.zst", "a.jsonl"):
        path = write_dolma_file(str(tmp_path / name), [b'\xef\xbb\xbf{"a": 1}', b'{"b": 2}'])
        assert list(storage.open_lines(path)) == [b'{"a": 1}', b'{"b": 2}']


def test_check_writable_names_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="a file stands where a folder is needed"):
        storage.check_writable(str(tmp_path / "f" / "candidates"))
    storage.check_writable(str(tmp_path / "d" / "candidates"))
    assert os.listdir(tmp_path / "d" / "candidates") == []


# ---- GCS errors are the OSErrors a local file gives --------------------------------------------------

def test_gcs_errors_map_to_oserrors_naming_the_path(bucket, monkeypatch):
    from google.api_core import exceptions as gexc

    missing = f"gs://{bucket}/gone.jsonl"
    for call in (storage.read_bytes, storage.size, storage.fingerprint, lambda p: list(storage.open_lines(p)),
                 lambda p: storage.open_read(p).read()):
        with pytest.raises(FileNotFoundError, match=f"{missing}: not found in the bucket") as e:
            call(missing)
        assert isinstance(e.value, storage.StorageError) and e.value.errno == 2 and e.value.filename == missing
    path = f"gs://{bucket}/here.jsonl"
    storage.write_text(path, '{"a": 1}\n' * 3)
    assert storage.exists(path) and list(storage.open_lines(path)) == [b'{"a": 1}'] * 3
    # what the emulator cannot answer, the client's own exceptions stand for (403, 503 after retries)
    blob_cls = type(gcs.blob(path))
    monkeypatch.setattr(blob_cls, "download_as_bytes", lambda self, **kw: (_ for _ in ()).throw(
        gexc.Forbidden("caller does not have storage.objects.get access")))
    with pytest.raises(PermissionError, match=f"{path}: access denied .*storage.objects.get"):
        storage.read_bytes(path)
    monkeypatch.setattr(blob_cls, "download_as_bytes", lambda self, **kw: (_ for _ in ()).throw(
        gexc.ServiceUnavailable("backend error")))
    with pytest.raises(storage.StorageError, match="ServiceUnavailable after the storage client's retries"):
        storage.read_bytes(path)
    monkeypatch.setattr(blob_cls, "download_as_bytes", lambda self, **kw: (_ for _ in ()).throw(KeyError("x")))
    with pytest.raises(KeyError):  # not a storage error: a bug keeps its own type
        storage.read_bytes(path)


def test_validate_names_a_release_file_deleted_after_listing(bucket, monkeypatch, capsys, bpe_tokenizer_path):
    """`bft validate gs://...` on a file deleted after it was listed: a problem in the one report, exit 1
    (was a NotFound traceback)."""
    from bft import cli
    from lifecycle import release
    from tests.helpers.assemble import run, write_root

    root = write_root(f"gs://{bucket}/run", bpe_tokenizer_path)
    folder = f"{root}/sft/{run(root, version='v1')['version']}"
    real = storage.list_files

    def list_then_delete(prefix):
        names = real(prefix)
        storage.delete(f"{folder}/README.md")
        return names

    monkeypatch.setattr(storage, "list_files", list_then_delete)
    with pytest.raises(release.ReleaseError, match="README.md: cannot be read .*not found in the bucket"):
        release.validate(folder)
    assert cli.main(["validate", folder]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "README.md: " in err
