"""The lineage each example carries and `bft show ID`, on the shared published release (tests/conftest.py
`published`: tests/helpers/assemble.py's generation shards, recipe filter+rewrite)."""
import json
import os

import pyarrow as pa
import pytest

from bft import cli
from lifecycle import release
from tests.helpers.assemble import crawl_date   # what write_root gives each candidate


def show(capsys, *args):
    code = cli.main(["show", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_web_example_carries_its_source_page_and_the_configs_that_made_it(published):
    manifest, tables = release.load(published)
    makers = manifest["inputs"]["made_by"]
    rows = pa.concat_tables(tables.values()).to_pylist()
    assert sorted(r["id"] for r in rows) == ["a0", "b2", "b4", "b5"]
    for r in rows:
        assert r["url"] == f"https://example.org/{r['id']}" and r["crawl_date"] == crawl_date(r["id"])
        assert [(makers[k]["stage"], makers[k]["model"]) for k in r["made_by"]] == [
            ("backtranslate", "tiny-backtranslate"), ("score", "tiny-score"), ("rewrite", "tiny-rewrite")]
        assert makers[r["made_by"][1]]["config"] == {"model": "tiny-score"}   # the shard's recorded config


def test_show_tells_a_kept_examples_whole_history(published, capsys):
    code, out, _ = show(capsys, "a0", "--root", published, "--format", "json")
    h = json.loads(out)
    assert code == 0 and h["release"] == "v1" and h["verdict"].startswith("kept in ")
    assert h["document"]["url"] == "https://example.org/a0" and h["document"]["crawl_date"] == crawl_date("a0")
    assert h["document"]["text_head"].startswith("Document a0 is about the weather")
    assert h["stages"]["backtranslate"]["instruction"] == "Explain the topic of document a0 please."
    assert (h["stages"]["score"]["score"], h["stages"]["score"]["reasoning"]) == (5.0, "fine")
    assert h["stages"]["rewrite"]["response"] == "Rewrite answer for a0."
    assert [m["model"] for m in h["example"]["made_by"].values()] == ["tiny-backtranslate", "tiny-score", "tiny-rewrite"]
    assert h["notes"] == []
    code, text, _ = show(capsys, "a0", "--release", os.path.join(published, "sft", "v1"))
    assert code == 0 and "a0 in release v1" in text and "score (tiny-score): score 5: fine" in text
    assert "https://example.org/a0, crawled 2019-09-10" in text and "rewrite (tiny-rewrite): response: Rewrite" in text


@pytest.mark.parametrize("doc_id,why", [
    ("a3", "dropped: score_below_threshold"),
    ("a1", "dropped: backtranslate:echo"),
    ("a5", "dropped: rewrite:truncated"),
    ("b0", "dropped: duplicate_instruction (the same instruction as a0, the smallest id, kept)"),
])
def test_show_says_why_an_example_was_dropped_by_assembles_rule(published, capsys, doc_id, why):
    code, out, _ = show(capsys, doc_id, "--root", published, "--format", "json")
    h = json.loads(out)
    assert code == 0 and h["verdict"] == why and h["example"] is None and h["document"]["url"].endswith(doc_id)


def test_show_names_a_changed_shard_and_an_unknown_id(published, capsys):
    from schemas.layout import RunLayout

    import pyarrow.parquet as pq

    path = RunLayout(published).generation_shard("score", 0, 2)
    rows = pq.read_table(path).to_pylist()
    rows[0]["reasoning"] = "rescored since"   # the score shard changed after v1: said, not passed off as v1's
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    code, out, _ = show(capsys, "a0", "--root", published, "--format", "json")
    h = json.loads(out)
    assert code == 0 and h["notes"] == [f"{path}: changed since the release was made; shown as it is now"]
    assert h["stages"]["score"]["reasoning"] == "rescored since"
    code, out, err = show(capsys, "nope", "--root", published)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "nope: not in release v1" in err and "check the id" in err
    # an id prepare dropped: its reject
    import schemas
    import storage

    reject = RunLayout(published).rejects_shard(0, 1)
    storage.write_parquet(schemas.to_table([{"file": "in/a.json.gz", "line": 7, "id": "long1", "reason": "too_long",
                                             "detail": "5000 tokens > 4000", "raw": None}], schemas.REJECT), reject)
    code, out, _ = show(capsys, "long1", "--root", published)
    assert code == 0 and out == (f"long1 in release v1 ({published}/sft/v1): dropped by prepare: too_long "
                                 "(5000 tokens > 4000; in/a.json.gz:7)\n")


def test_a_release_written_before_the_lineage_columns_still_validates_loads_and_shows(published, capsys):
    """The lineage columns are `schemas.added`: a release (or shard) written before them reads them as
    nulls, so no version bump makes every older file unreadable."""
    import hashlib

    import pyarrow.parquet as pq

    folder = os.path.join(published, "sft", "v1")
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    for entry in manifest["files"]:
        if entry.get("split"):
            path = os.path.join(folder, entry["path"])
            pq.write_table(pq.read_table(path).drop(["url", "crawl_date", "made_by"]), path)
            entry.update(bytes=os.path.getsize(path), sha256=hashlib.sha256(open(path, "rb").read()).digest().hex())
    del manifest["inputs"]["made_by"]
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with open(os.path.join(folder, "_SUCCESS"), "w") as f:
        f.write(release.success_line(folder))
    _, tables = release.load(folder)
    assert tables["train"]["url"].null_count == tables["train"].num_rows > 0
    code, out, _ = show(capsys, "a0", "--root", published, "--format", "json")
    h = json.loads(out)
    assert code == 0 and h["verdict"].startswith("kept in ") and h["example"]["made_by"] == {}
    assert h["document"]["url"] == "https://example.org/a0"   # from the candidates, as before
