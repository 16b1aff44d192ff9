"""bft prepare end to end on Beam's local runner (and the portable runner, and GCS via the emulator)."""
import dataclasses
import json
import os

import pandas as pd
import pyarrow.parquet as pq
import apache_beam as beam
import pytest
from tokenizers import Tokenizer

import storage
from beam_pipelines import prepare
from beam_pipelines.prepare import PrepareConfig, UnreadableFileError
from schemas.errors import UserError
from tests.conftest import LOCAL, dolma_line, write_dolma_file
from tests.helpers.corpora import bad_lines_corpus
from tests.helpers.shards import assign_in_one_process


@pytest.fixture
def corpus(tmp_path, fixture_texts):
    return bad_lines_corpus(tmp_path, fixture_texts)


def run_prepare(corpus, root, tok, beam_args=LOCAL, **kw):
    cfg = PrepareConfig(input=[corpus], root=str(root), tokenizer=tok, max_tokens=kw.pop("max_tokens", 4000),
                        num_shards=kw.pop("num_shards", 4), reject_shards=2, **kw)
    cfg.check()
    return prepare.run(cfg, beam_args)


def read_dir(folder, prefix):
    files = sorted(f for f in os.listdir(folder) if f.startswith(prefix))
    return files, pd.concat([pd.read_parquet(os.path.join(folder, f)) for f in files], ignore_index=True)


def test_every_record_is_accounted_for(corpus, tmp_path, bpe_tokenizer_path, fixture_texts):
    stats = run_prepare(corpus, tmp_path / "out", bpe_tokenizer_path)
    out = tmp_path / "out" / "candidates"
    assert stats["input_records"] == 80 + 9 + 2 + 25
    assert stats["input_records"] == stats["kept"] + sum(stats["dropped"].values())
    d = stats["dropped"]
    assert d["other_split"] == 25
    for reason in ("malformed_json", "not_an_object", "missing_text", "blank_text", "invalid_utf8",
                   "empty_line", "too_large", "conflicting_id", "duplicate"):   # h001 twice, another text
        assert d[reason] >= 1, reason

    files, cands = read_dir(out, "candidates-")
    assert files == [f"candidates-0000{k}-of-00004.parquet" for k in range(4)]
    assert len(cands) == stats["kept"] and cands["id"].is_unique
    # lineage: Dolma's `created` (the crawl date) where the line has one
    assert cands.set_index("id")["crawl_date"].dropna().to_dict() == {"h010": "2019-09-15T00:00:00.000Z"}
    # the length filter kept texts uncounted by their upper bound, or (the longer texts, whose bound
    # exceeds the limit) by the chunk caches' bounds (after a share of their missed chunks is counted)
    # or a prefix's count and the rest's bound: which depends on how warm the process's caches are
    # (earlier tests in this worker); every kept text fits by full tokenization
    tok = Tokenizer.from_file(bpe_tokenizer_path)
    uncounted = cands["n_tokens"].isna()
    lf = stats["length_filter"]
    assert 0 < uncounted.sum() and lf["kept_by_prefix"] + lf["kept_by_chunks"] + lf["kept_by_share"] > 0
    for text, n in zip(cands["text"], cands["n_tokens"]):
        full = len(tok.encode(text, add_special_tokens=False).ids)
        assert full == n <= 4000 if not pd.isna(n) else full <= 4000
    # balanced by bytes: no kept document carries a count, whichever way it was decided
    assert stats["tokens"]["uncounted_documents"] == uncounted.sum() == stats["kept"]
    assert stats["tokens"]["counted_documents"] == (~uncounted).sum()
    assert stats["tokens"]["total"] == cands["n_tokens"].sum()
    # balanced by UTF-8 bytes, every document alike (a count of some and a bound of others would not mix)
    from beam_pipelines.prepare import shards

    assert stats["shards"]["balanced_by"] == "utf8_bytes"
    weights = [len(t.encode()) for t in cands["text"]]
    assert dict(zip(cands["id"], cands["shard"])) == assign_in_one_process(zip(cands["id"], weights), 4)
    assert stats["shards"]["balance_max_over_mean"] == round(shards.balance(
        [sum(w for w, k in zip(weights, cands["shard"]) if k == s) for s in range(4)]), 6)
    # dedup keeps the document that ranks first in the sample; the id collision keeps one document
    from schemas.keys import sample_key

    for pair in (["a-dup-of-h005", "h005"], ["z-dup-of-h006", "h006"]):
        winner, loser = sorted(pair, key=lambda i: (sample_key(i, 0), i))
        assert winner in set(cands["id"]) and loser not in set(cands["id"])
    assert (cands["id"] == "h001").sum() == 1
    # rows sorted by (n_tokens, id) inside each shard, the uncounted first; shard column matches the file
    for k, f in enumerate(files):
        t = pd.read_parquet(out / f)
        key = list(zip(t["n_tokens"].fillna(-1), t["id"]))
        assert key == sorted(key) and set(t["shard"]) <= {k}

    _, rejects = read_dir(out / "rejects", "rejects-")
    assert len(rejects) == stats["rejects"]["rows"]
    by_reason = rejects.groupby("reason")
    assert set(by_reason.get_group("duplicate")["id"]) == {
        max(pair, key=lambda i: (sample_key(i, 0), i)) for pair in (["a-dup-of-h005", "h005"], ["z-dup-of-h006", "h006"])}
    bad = rejects[rejects.reason == "malformed_json"].iloc[0]
    assert bad["file"].endswith("cc_en_head-0000.json.gz") and bad["line"] == 41 and bad["raw"] == b'{"id": "bad-json", "text": "x'
    assert rejects[rejects.reason == "too_long"]["id"].tolist() == ["long"]
    assert rejects[rejects.reason == "too_long"]["raw"].isna().all()  # filtered docs: id and reason, no text
    assert not os.path.exists(out / "_tmp") or not os.listdir(out / "_tmp")


def test_output_is_deterministic_and_reruns_skip(corpus, tmp_path, bpe_tokenizer_path):
    a = run_prepare(corpus, tmp_path / "a", bpe_tokenizer_path)
    b = run_prepare(corpus, tmp_path / "b", bpe_tokenizer_path)
    fa, ta = read_dir(tmp_path / "a" / "candidates", "candidates-")
    fb, tb = read_dir(tmp_path / "b" / "candidates", "candidates-")
    assert fa == fb and ta.equals(tb)
    assert a["shards"]["balance_max_over_mean"] == b["shards"]["balance_max_over_mean"]
    stamp = os.path.getmtime(tmp_path / "a" / "candidates" / "stats.json")
    assert run_prepare(corpus, tmp_path / "a", bpe_tokenizer_path) == {**a, "reused": True}  # complete: skipped
    assert os.path.getmtime(tmp_path / "a" / "candidates" / "stats.json") == stamp
    # an input or the tokenizer's file edited in place (same size) is a change: prepare runs again
    tok = tmp_path / "tok.json"
    tok.write_bytes(open(bpe_tokenizer_path, "rb").read())
    first = run_prepare(corpus, tmp_path / "c", str(tok))
    assert first["tokenizer_file"]["checksum"].startswith("xxh3_128:")
    tok.write_bytes(tok.read_bytes().rstrip() + b"\t" if tok.read_bytes().endswith(b"\n") else tok.read_bytes() + b" ")
    assert "reused" not in run_prepare(corpus, tmp_path / "c", str(tok))
    middle = corpus.replace("*/*.json.gz", "cc_en_middle/cc_en_middle-0000.json.gz")
    data = bytearray(open(middle, "rb").read())
    data[-5] ^= 1  # the gzip trailer's size field: the same byte count, other bytes
    open(middle, "wb").write(bytes(data))
    with pytest.raises(Exception, match="cc_en_middle-0000.json.gz: unreadable"):  # read again, not reused
        run_prepare(corpus, tmp_path / "c", str(tok))


def test_sample_to_target_docs_is_exact_and_stable(corpus, tmp_path, bpe_tokenizer_path):
    s = run_prepare(corpus, tmp_path / "s", bpe_tokenizer_path, target_docs=30, seed=3)
    assert s["kept"] == 30 and s["dropped"]["not_sampled"] > 0
    _, kept = read_dir(tmp_path / "s" / "candidates", "candidates-")
    full = run_prepare(corpus, tmp_path / "f", bpe_tokenizer_path, seed=3)
    _, all_kept = read_dir(tmp_path / "f" / "candidates", "candidates-")
    from schemas.keys import sample_key

    expected = sorted(all_kept["id"], key=lambda i: (sample_key(i, 3), i))[:30]
    assert sorted(kept["id"]) == sorted(expected)
    assert s["input_records"] == full["input_records"]
    assert s["length_filter"]["measured"] <= full["length_filter"]["measured"]  # 30 + margin: all 84 here


def mixed_corpus(folder, fixture_texts, seed):
    """400 documents in 4 plain files, 85% too long (for max_tokens 400), 5% duplicates of others."""
    import random

    rng = random.Random(seed)
    lines, texts = [], []
    for i in range(400):
        roll = rng.random()
        if roll < 0.85:
            text = " ".join(fixture_texts[rng.randrange(200)] for _ in range(4))  # too long
        elif roll < 0.9 and texts:
            text = "  " + rng.choice(texts).replace(" ", "\n ")  # a duplicate of an earlier text
        else:
            text = fixture_texts[rng.randrange(200)][:300] + f" doc {i}"
            texts.append(text)
        lines.append(dolma_line(f"d{rng.randrange(10**6):06d}-{i}", text))
    for k in range(4):
        write_dolma_file(str(folder / "cc_en_head" / f"part-{k}.jsonl"), lines[k::4])
    return str(folder / "*" / "*.jsonl")


def bottom_of_full(glob, root, tok, seed, n):
    """The bottom n by sample key of the full computation's kept documents (and its stats)."""
    from schemas.keys import sample_key

    full = run_prepare(glob, root, tok, seed=seed, max_tokens=400)
    _, every = read_dir(root / "candidates", "candidates-")
    return every.assign(rank=[(sample_key(i, seed), i) for i in every["id"]]).sort_values("rank").head(n), full


SAMPLE_COLUMNS = ["id", "text", "n_tokens", "text_hash"]


@pytest.fixture(scope="module")
def mixed_full(tmp_path_factory, bpe_tokenizer_path, fixture_texts):
    """mixed_corpus(seed) and the bottom 20 of its full computation, made once per seed and module
    (the inputs are only read; each test samples into its own root)."""
    made = {}

    def get(seed):
        if seed not in made:
            folder = tmp_path_factory.mktemp(f"mixed{seed}")
            glob = mixed_corpus(folder / "in", fixture_texts, seed)
            made[seed] = (glob, *bottom_of_full(glob, folder / "f", bpe_tokenizer_path, seed, 20))
        return made[seed]
    return get


def same_rows(a, b):
    return a.sort_values("id")[SAMPLE_COLUMNS].reset_index(drop=True).equals(
        b.sort_values("id")[SAMPLE_COLUMNS].reset_index(drop=True))


@pytest.mark.parametrize("seed", [0, 5])
def test_the_sample_measures_few_widens_when_few_survive_and_equals_the_full_computation(
        tmp_path, bpe_tokenizer_path, mixed_full, seed):
    """400 documents, 85% too long, 5% duplicates of others: target 20 needs a wider second round;
    the kept documents and their shards' rows equal the bottom 20 of the full computation's survivors."""
    glob, bottom, full = mixed_full(seed)
    sampled = run_prepare(glob, tmp_path / "s", bpe_tokenizer_path, target_docs=20, seed=seed, max_tokens=400)
    _, kept = read_dir(tmp_path / "s" / "candidates", "candidates-")
    assert sorted(kept["id"]) == sorted(bottom["id"]) and same_rows(kept, bottom)
    lf = sampled["length_filter"]
    assert lf["sample_rounds"] >= 2  # round 0 (~107 of 400) finds ~11 survivors at ~10%
    assert lf["measured"] < 400 == full["length_filter"]["measured"]
    assert sampled["kept"] == 20 and sampled["input_records"] == 400
    assert sum(sampled["dropped"].values()) == 380


def test_a_file_whose_kept_text_passes_the_part_limit_is_written_in_several_parts(corpus, tmp_path,
                                                                                 bpe_tokenizer_path, monkeypatch):
    """WriteParts holds at most PART_CHARS of text: with a tiny limit it writes many parts per file, and
    the shards are the same as with one part per file and shard."""
    from schemas.layout import RunLayout

    run_prepare(corpus, tmp_path / "one", bpe_tokenizer_path)
    parts = []
    real = RunLayout.prepare_part
    monkeypatch.setattr(RunLayout, "prepare_part", lambda self, *a: parts.append(a) or real(self, *a))
    monkeypatch.setattr(prepare.records, "PART_CHARS", 2000)
    run_prepare(corpus, tmp_path / "many", bpe_tokenizer_path)
    _, one = read_dir(tmp_path / "one" / "candidates", "candidates-")
    _, many = read_dir(tmp_path / "many" / "candidates", "candidates-")
    assert one.equals(many)
    assert len(parts) > 2 * len({(shard, tag.split("-")[0]) for _, shard, tag in parts})  # several per file and shard


@pytest.mark.parametrize("estimate", [10**9, 2000, 1])
def test_the_sample_is_exact_however_far_off_the_round0_estimate_is(
        tmp_path, bpe_tokenizer_path, mixed_full, monkeypatch, estimate):
    """The driver's estimate of the ranked documents only sets round 0's key limit: far too many
    (a limit 5 or ~10^7 times too low: the later rounds widen) or far too few (every document measured
    in the first read) give the same sample as the full computation."""
    glob, bottom, _ = mixed_full(1)
    monkeypatch.setattr(prepare.sample, "estimate_ranked", lambda files, sizes, cfg: estimate)
    sampled = run_prepare(glob, tmp_path / "s", bpe_tokenizer_path, target_docs=20, seed=1, max_tokens=400)
    _, kept = read_dir(tmp_path / "s" / "candidates", "candidates-")
    assert same_rows(kept, bottom)
    lf = sampled["length_filter"]
    if estimate == 1:
        assert lf["sample_rounds"] == 1 and lf["measured"] == 400 and sampled["dropped"]["not_sampled"] > 0
    else:
        assert lf["sample_rounds"] >= 2


def test_the_sample_measures_what_it_needs_and_lists_no_not_sampled_rejects(tmp_path, bpe_tokenizer_path,
                                                                            monkeypatch):
    """3000 short unique documents in 3 .gz files, target 25: round 0 (fused into the first read, its
    limit from the driver's estimate) measures ~25 x 1.25 + 4 x 5 + 64 of them and is enough; the
    2975 unsampled documents are counted in stats, not written as reject rows; each input file is read
    once (the sample's shards are written from the measured documents' stash)."""
    for k in range(3):
        write_dolma_file(str(tmp_path / "in" / "cc_en_head" / f"p{k}.json.gz"),
                         [dolma_line(f"doc-{k}-{i}", f"short text number {i} of file {k}") for i in range(1000)]
                         + [b"not json"])
    glob = str(tmp_path / "in" / "*" / "*.json.gz")
    opened = []
    real_open = storage.open_lines
    monkeypatch.setattr(storage, "open_lines", lambda path: opened.append(path) or real_open(path))
    stats = run_prepare(glob, tmp_path / "s", bpe_tokenizer_path, target_docs=25)
    assert sorted(opened) == sorted(prepare.list_inputs([glob]))
    assert stats["kept"] == 25 and stats["dropped"]["not_sampled"] == 3000 - 25
    lf = stats["length_filter"]
    assert lf["sample_rounds"] == 1 and 25 <= lf["measured"] <= 4 * 116
    _, rejects = read_dir(tmp_path / "s" / "candidates" / "rejects", "rejects-")
    assert sorted(rejects["reason"]) == ["malformed_json"] * 3 == ["malformed_json"] * stats["rejects"]["rows"]


def test_the_estimate_of_ranked_documents_is_close(tmp_path):
    """estimate_ranked: selected documents per stored byte of one file's head, times all the bytes, by
    compression."""
    lines = [dolma_line(f"d{i}", f"text {i} " * (i % 50 + 1), metadata={"bucket": str(i // 2 % 4)})
             for i in range(20000)]
    files = [write_dolma_file(str(tmp_path / f"p{k}.{ext}"), lines[k::2]) for k, ext in enumerate(["json.gz", "jsonl"])]
    cfg = PrepareConfig(input=["x"], root=str(tmp_path), tokenizer="t")
    for path in files:
        assert 0.8 * 10000 < prepare.sample.estimate_ranked([path], [os.path.getsize(path)], cfg) < 1.25 * 10000
    cfg = dataclasses.replace(cfg, select_where=["metadata.bucket=1"])
    sizes = [os.path.getsize(f) for f in files]
    assert 0.8 * 5000 < prepare.sample.estimate_ranked(files, sizes, cfg) < 1.25 * 5000
    cfg = dataclasses.replace(cfg, select_where=[])
    assert prepare.sample.estimate_ranked([], [], cfg) == 0


def test_an_output_made_before_exact_counts_existed_is_the_one_exact_counts_makes(tmp_path):
    """Every count of an output made before the option was exact and its shards balanced by tokens:
    the config of --exact-counts is the one recorded then, and the default reuses it too (a root
    prepared before the upgrade is not refused)."""
    from beam_pipelines.tokens.shape import TokenizerShape, UpperBound
    from beam_pipelines.prepare.config import config_differences

    recorded = {k: v for k, v in PrepareConfig(input=["x"], root=str(tmp_path), tokenizer="t").identity().items()
                if k != "exact_counts"}
    exact = PrepareConfig(input=["x"], root=str(tmp_path), tokenizer="t", exact_counts=True)
    bounded = PrepareConfig(input=["x"], root=str(tmp_path), tokenizer="t")
    assert exact.identity() == recorded
    assert config_differences(recorded, bounded.identity()) == ["exact_counts: None -> False"]
    assert bounded.differences_from(recorded) == [] and exact.differences_from(recorded) == []
    shape = TokenizerShape("chunks", "", 16, (), upper=UpperBound("raw", 1, 0, True))
    assert (exact.balanced_by(shape), bounded.balanced_by(shape)) == ("tokens", "utf8_bytes")
    assert bounded.balanced_by(TokenizerShape("full", "", 0, ())) == "tokens"  # no bound: every count exact


def test_exact_counts_counts_every_document_and_shards_are_balanced_by_tokens_bucket_by_bucket(
        corpus, tmp_path, bpe_tokenizer_path, monkeypatch):
    """--exact-counts: every kept document's exact count, and shards balanced by tokens; with buckets of
    10 documents the pipeline's assignment is the in-process one, shard by shard."""
    from beam_pipelines.prepare import shards

    monkeypatch.setattr(shards, "BUCKET_DOCS", 10)
    stats = run_prepare(corpus, tmp_path / "b", bpe_tokenizer_path, exact_counts=True)
    _, cands = read_dir(tmp_path / "b" / "candidates", "candidates-")
    tok = Tokenizer.from_file(bpe_tokenizer_path)
    assert list(cands["n_tokens"]) == [len(e.ids) for e in tok.encode_batch(list(cands["text"]),
                                                                             add_special_tokens=False)]
    assert stats["tokens"]["uncounted_documents"] == stats["length_filter"]["kept_by_bound"] == 0
    assert shards.num_buckets(len(cands)) == 8
    expected = assign_in_one_process(zip(cands["id"], cands["n_tokens"]), 4, 8)
    assert dict(zip(cands["id"], cands["shard"])) == expected
    assert stats["shards"]["balanced_by"] == "tokens"
    assert stats["shards"]["balance_max_over_mean"] < 1.2  # 72 documents, 4 shards


def test_a_corrupt_gzip_fails_naming_the_file_unless_skipped(corpus, tmp_path, bpe_tokenizer_path):
    good = corpus.replace("*/*.json.gz", "cc_en_head/cc_en_head-0000.json.gz")
    bad = good.replace("0000", "0002")
    data = open(good, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(Exception, match="cc_en_head-0002.json.gz: unreadable"):
        run_prepare(corpus, tmp_path / "x", bpe_tokenizer_path)
    stats = run_prepare(corpus, tmp_path / "y", bpe_tokenizer_path, skip_unreadable_files=True)
    assert [u["file"] for u in stats["unreadable_files"]] == [bad]
    assert stats["input_records"] == stats["kept"] + sum(stats["dropped"].values())
    assert UnreadableFileError.__name__ in UnreadableFileError.__qualname__


def test_selection_by_metadata_and_other_formats(tmp_path, bpe_tokenizer_path, fixture_texts):
    lines = [dolma_line(f"d{i}", fixture_texts[i], metadata={"bucket": "head" if i % 2 else "tail"})
             for i in range(20)]
    write_dolma_file(str(tmp_path / "in" / "a.jsonl.zst"), lines[:10])
    write_dolma_file(str(tmp_path / "in" / "b.jsonl"), lines[10:])
    stats = run_prepare(str(tmp_path / "in" / "*"), tmp_path / "o", bpe_tokenizer_path, splits=[],
                        select_where=["metadata.bucket=head"])
    assert stats["kept"] == 10 and stats["dropped"] == {"not_selected": 10}


def test_candidates_load_in_pyarrow_pandas_and_datasets(corpus, tmp_path, bpe_tokenizer_path):
    import datasets

    stats = run_prepare(corpus, tmp_path / "out", bpe_tokenizer_path)
    out = tmp_path / "out" / "candidates"
    files = sorted(str(p) for p in out.glob("candidates-*.parquet"))
    assert sum(pq.read_metadata(f).num_rows for f in files) == stats["kept"]
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == stats["kept"] and "n_tokens" in ds.column_names
    assert json.loads((out / "stats.json").read_text())["kept"] == stats["kept"]


def test_portable_runner_with_beams_python_job_service(corpus, tmp_path, bpe_tokenizer_path):
    args = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]
    local = run_prepare(corpus, tmp_path / "local", bpe_tokenizer_path)
    portable = run_prepare(corpus, tmp_path / "portable", bpe_tokenizer_path, beam_args=args)
    assert portable["kept"] == local["kept"] and portable["dropped"] == local["dropped"]
    assert read_dir(tmp_path / "portable" / "candidates", "candidates-")[1].equals(read_dir(tmp_path / "local" / "candidates", "candidates-")[1])


def test_gcs_input_and_output_through_the_emulator(corpus, tmp_path, bpe_tokenizer_path, gcs_emulator, bucket):
    import storage

    for path in sorted(p for p in (tmp_path / "dolma").rglob("*.json.gz")):
        rel = path.relative_to(tmp_path)
        storage.write_bytes(f"gs://{bucket}/{rel}", path.read_bytes())
    storage.write_bytes(f"gs://{bucket}/tok/tokenizer.json", open(bpe_tokenizer_path, "rb").read())
    stats = run_prepare(f"gs://{bucket}/dolma/documents/*/*.json.gz", f"gs://{bucket}/run",
                        f"gs://{bucket}/tok", beam_args=LOCAL)
    local = run_prepare(corpus, tmp_path / "local", bpe_tokenizer_path)
    assert stats["kept"] == local["kept"] and stats["dropped"] == local["dropped"]
    names = storage.list_files(f"gs://{bucket}/run/candidates")
    assert f"gs://{bucket}/run/candidates/stats.json" in names
    assert sum(1 for n in names if "/candidates-" in n) == 4
    assert not any("/_tmp/" in n for n in names)
    table = storage.read_parquet(f"gs://{bucket}/run/candidates/candidates-00000-of-00004.parquet")
    assert table.num_rows > 0


# ---- robustness (truncated .zst, BOM, unwritable output, _tmp, overwrite, kills) ---------------------

def prepare_cfg(corpus, root, tok, **kw):
    cfg = PrepareConfig(input=[corpus], root=str(root), tokenizer=tok, max_tokens=4000,
                        **{"num_shards": 4, "reject_shards": 2, **kw})
    cfg.check()
    return cfg


def test_a_truncated_zstd_fails_naming_the_file_unless_skipped(tmp_path, bpe_tokenizer_path, fixture_texts):
    """A .zst cut short used to read as a short file: documents vanished, exit 0."""
    lines = [dolma_line(f"d{i:03d}", fixture_texts[i % 200] + f" {i}") for i in range(300)]
    write_dolma_file(str(tmp_path / "in" / "a.jsonl.zst"), lines[:20])
    cut = write_dolma_file(str(tmp_path / "in" / "b.jsonl.zst"), lines[20:])
    data = open(cut, "rb").read()
    open(cut, "wb").write(data[:int(len(data) * 0.6)])
    with pytest.raises(UnreadableFileError, match=r"b\.jsonl\.zst: unreadable after \d+ lines.*truncated zstd"):
        prepare.run(prepare_cfg(str(tmp_path / "in" / "*"), tmp_path / "x", bpe_tokenizer_path, splits=[]), LOCAL)
    stats = prepare.run(prepare_cfg(str(tmp_path / "in" / "*"), tmp_path / "y", bpe_tokenizer_path, splits=[],
                                    skip_unreadable_files=True), LOCAL)
    assert [u["file"] for u in stats["unreadable_files"]] == [cut]
    assert "truncated" in stats["unreadable_files"][0]["error"]
    assert stats["input_records"] == stats["kept"] + sum(stats["dropped"].values())


def test_a_byte_order_mark_does_not_make_the_first_document_a_reject(tmp_path, bpe_tokenizer_path, fixture_texts):
    lines = [dolma_line(f"d{i}", fixture_texts[i]) for i in range(5)]
    lines[0] = b"\xef\xbb\xbf" + lines[0]
    write_dolma_file(str(tmp_path / "in" / "a.jsonl"), lines)
    stats = prepare.run(prepare_cfg(str(tmp_path / "in" / "*"), tmp_path / "o", bpe_tokenizer_path, splits=[]), LOCAL)
    assert stats["kept"] == 5 and stats["dropped"] == {}


def test_an_unwritable_output_fails_in_one_line_before_the_read_pass(corpus, tmp_path, bpe_tokenizer_path, capsys,
                                                                     monkeypatch):
    import storage
    from bft import cli

    monkeypatch.setattr(beam, "Pipeline", lambda *a, **k: pytest.fail("the read pass started"))
    a_file = tmp_path / "root-is-a-file"
    a_file.write_text("x")
    args = ["prepare", "--input", corpus, "--tokenizer", bpe_tokenizer_path]
    assert cli.main(args + ["--root", str(a_file)]) == 1
    err = capsys.readouterr().err.strip()
    # the root's lock is the first thing written: its folder names the file in the way
    assert len(err.splitlines()) == 1 and f"cannot write {a_file}/_lock" in err and "a file stands" in err
    # read-only: tests run as root, which writes anywhere, so the refusal a read-only folder gives is raised
    # in its place (PermissionError, errno 13, from the probe write)
    real = storage.write_bytes

    def read_only(path, data):
        if "/ro/" in path:
            raise PermissionError(13, "Permission denied", path)
        return real(path, data)

    monkeypatch.setattr(storage, "write_bytes", read_only)
    assert cli.main(args + ["--root", str(tmp_path / "ro")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write" in err and "Permission denied" in err


def test_a_killed_runs_tmp_with_document_texts_is_cleaned(corpus, tmp_path, bpe_tokenizer_path, monkeypatch):
    from schemas.layout import RunLayout
    from tests.conftest import SimulatedKill, kill_at

    layout = RunLayout(str(tmp_path / "o"))
    with kill_at(monkeypatch, r"candidates-00001-of-00004"):
        with pytest.raises(Exception, match="SimulatedKill|killed before"):
            prepare.run(prepare_cfg(corpus, layout.root, bpe_tokenizer_path), LOCAL)
    assert os.listdir(layout.prepare_tmp_root)  # the killed run's parts: full document texts
    prepare.run(prepare_cfg(corpus, layout.root, bpe_tokenizer_path), LOCAL)
    assert not os.path.exists(layout.prepare_tmp_root) or not os.listdir(layout.prepare_tmp_root)
    # a run killed after its marker (stats.json) but before removing _tmp/ is complete: the rerun that
    # reuses the output removes the texts too
    part = os.path.join(layout.prepare_tmp(SimulatedKill.__name__), "shard-00000", "part-x.parquet")
    os.makedirs(os.path.dirname(part))
    open(part, "wb").write(b"texts")
    assert prepare.run(prepare_cfg(corpus, layout.root, bpe_tokenizer_path), LOCAL)["reused"]
    assert not os.path.exists(layout.prepare_tmp_root)


def test_an_overwrite_killed_midway_leaves_no_complete_output_and_no_old_shards(corpus, tmp_path,
                                                                                 bpe_tokenizer_path, monkeypatch):
    """The old stats.json stayed while new shards replaced some old ones (ids in two shards);
    shard and reject files of another --num-shards stayed behind; another config was skipped silently."""
    from schemas.layout import LayoutError, RunLayout
    from tests.conftest import kill_at

    layout = RunLayout(str(tmp_path / "o"))
    old = prepare.run(prepare_cfg(corpus, layout.root, bpe_tokenizer_path, num_shards=4, reject_shards=3), LOCAL)
    with pytest.raises(UserError, match=r"another config \(num_shards: 4 -> 2; reject_shards: 3 -> 2\).*--overwrite"):
        prepare.run(prepare_cfg(corpus, layout.root, bpe_tokenizer_path, num_shards=2), LOCAL)
    with kill_at(monkeypatch, r"candidates-00001-of-00002"):
        with pytest.raises(Exception, match="killed before"):
            prepare.run(prepare_cfg(corpus, layout.root, bpe_tokenizer_path, num_shards=2, overwrite=True), LOCAL)
    assert not os.path.exists(layout.prepare_stats)  # not complete: assemble and generate refuse it
    with pytest.raises(LayoutError, match="no complete prepare output"):
        layout.candidate_shards()
    new = prepare.run(prepare_cfg(corpus, layout.root, bpe_tokenizer_path, num_shards=2), LOCAL)
    assert "reused" not in new and new["kept"] == old["kept"]
    names = sorted(os.listdir(layout.candidates)) + sorted(os.listdir(layout.rejects))
    assert names == ["candidates-00000-of-00002.parquet", "candidates-00001-of-00002.parquet", "rejects",
                     "stats.json", "rejects-00000-of-00002.parquet", "rejects-00001-of-00002.parquet"]
    _, table = read_dir(layout.candidates, "candidates-")
    assert table["id"].is_unique and len(table) == new["kept"]


PREPARE_KILL_POINTS = [r"/_tmp/.*/part-", r"candidates-00002-of-00004", r"rejects-00001-of-00002",
                       r"/candidates/stats\.json$"]  # the last: every data file written, the marker not


def test_prepare_killed_at_any_write_reruns_to_the_output_of_an_uninterrupted_run(corpus, tmp_path,
                                                                                   bpe_tokenizer_path, monkeypatch):
    from schemas.layout import RunLayout
    from tests.conftest import kill_at, snapshot

    layout = RunLayout(str(tmp_path / "o"))

    def stable(stats: dict) -> dict:  # less the time, and which way the length filter counted (timed,
        # and by the caches' state: only the bounds on the text alone are the same in every run)
        stats.pop("finished_at")
        for path in set(stats["length_filter"]) - {"measured", "rejected_by_bound", "kept_by_bound"}:
            stats["length_filter"].pop(path)
        return stats

    def output():
        return snapshot(layout.candidates, lambda rel, data: stable(json.loads(data)) if rel == "stats.json" else data)

    prepare.run(prepare_cfg(corpus, layout.root, bpe_tokenizer_path), LOCAL)
    expected = output()
    assert "stats.json" in expected and "rejects/rejects-00001-of-00002.parquet" in expected
    for point in PREPARE_KILL_POINTS:
        with kill_at(monkeypatch, point):
            with pytest.raises(Exception, match="killed before"):
                prepare.run(prepare_cfg(corpus, layout.root, bpe_tokenizer_path, overwrite=True), LOCAL)
        assert not os.path.exists(layout.prepare_stats), point
        rerun = prepare.run(prepare_cfg(corpus, layout.root, bpe_tokenizer_path), LOCAL)
        assert "reused" not in rerun and output() == expected, point


def test_local_runner_workers_end_when_the_driver_is_killed(tmp_path, bpe_tokenizer_path):
    """With the local runner's worker processes, a SIGKILLed driver's busy workers went on with their
    bundle (reading, then writing into the output the next run cleans), and idle ones stayed; they now
    all end at once."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    big = tmp_path / "in" / "big.jsonl"  # long enough to be read while the driver is killed
    big.parent.mkdir()
    with open(big, "wb") as f:
        for i in range(800_000):
            f.write(b'{"id": "d%d", "text": "document number %d of many"}\n' % (i, i))
    cmd = [sys.executable, "-m", "bft.cli", "prepare", "--input", str(big), "--root", str(tmp_path / "o"),
           "--tokenizer", bpe_tokenizer_path, "--splits", "", "--direct_num_workers=2",
           "--direct_running_mode=multi_processing"]
    driver = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def group():
        """Live (not zombie) processes of the driver's session other than the driver: its workers."""
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(stat[3]) == driver.pid and int(pid) != driver.pid and stat[0] != b"Z":
                out.append(int(pid))
        return out

    def readers():
        """Workers with the input open: they ran the DoFn's setup and are processing it."""
        out = set()
        for pid in group():
            try:
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(big) for fd in os.listdir(f"/proc/{pid}/fd")):
                    out.add(pid)
            except OSError:
                continue
        return out

    try:
        deadline = time.time() + 120
        while not (busy := readers()):
            assert driver.poll() is None and time.time() < deadline, "no worker read the input"
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 3  # the kernel kills them at once (driver_watch.boot); the old code's read on
        while group() and time.time() < deadline:  # for ~10 s, and an idle one stayed
            time.sleep(0.1)
        assert not busy & set(group()), "a worker went on after the driver was killed"
        assert group() == [], "an idle worker stayed after the driver was killed"
    finally:
        for pid in group():  # only this test's processes (its driver's session)
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("code, status", [("print('last words', end='')", 0), ("raise ValueError('boom')", 1)])
def test_a_local_worker_ends_at_once_at_a_clean_exit_and_keeps_a_failure_status(code, status):
    """driver_watch's quick exit: at a clean exit the interpreter's teardown is skipped (an exit handler
    registered before it, like the modules' own, does not run) and what the worker printed is flushed;
    an uncaught exception is not turned into success and tears down as usual."""
    import subprocess
    import sys

    from beam_pipelines.runtime.options import DRIVER_PID

    script = ("import atexit, os, sys\natexit.register(lambda: sys.stderr.write('teardown ran'))\n"
              f"from beam_pipelines.runtime import driver_watch\ndriver_watch.watch()\n{code}\n")
    env = {**os.environ, DRIVER_PID: str(os.getpid()), "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert ("last words" in done.stdout) == (status == 0)
    assert ("teardown ran" in done.stderr) == (status != 0)


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="PR_SET_PDEATHSIG")
def test_a_worker_started_through_the_boot_dies_with_its_driver_even_idle(tmp_path):
    """driver_watch.boot, through which the local runner starts its workers: a worker that runs no bft
    DoFn (idle, or still in its imports; the watch thread never starts there) is killed by the kernel
    when its driver is SIGKILLed."""
    import signal
    import subprocess
    import sys
    import time

    from beam_pipelines.runtime import driver_watch

    (tmp_path / "idle_worker.py").write_text("import sys, time\nopen(sys.argv[1], 'w').close()\ntime.sleep(60)\n")
    ready = tmp_path / "ready"
    start = (f"import subprocess, sys, time\nw = subprocess.Popen([sys.executable, '-m', '{driver_watch.BOOT}', "
             f"'idle_worker', {str(ready)!r}])\nprint(w.pid, flush=True)\ntime.sleep(60)\n")
    env = {k: v for k, v in os.environ.items() if k != driver_watch.DRIVER_PID}
    driver = subprocess.Popen([sys.executable, "-c", start], stdout=subprocess.PIPE, text=True,
                              env={**env, "PYTHONPATH": f"{os.getcwd()}:{tmp_path}"})
    worker = int(driver.stdout.readline())
    try:
        deadline = time.time() + 20
        while not ready.exists():   # the worker runs its module
            assert time.time() < deadline and driver_watch.alive(worker), "the worker did not start"
            time.sleep(0.01)
        driver.kill()
        driver.wait()
        deadline = time.time() + 5
        while driver_watch.alive(worker) and time.time() < deadline:
            time.sleep(0.01)
        assert not driver_watch.alive(worker), "the worker outlived its driver"
    finally:
        if driver_watch.alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_gcs_input_deleted_after_listing_is_unreadable_like_a_local_one(corpus, tmp_path, bpe_tokenizer_path,
                                                                          gcs_emulator, bucket, monkeypatch, capsys):
    """An input deleted between the listing and the read gave a NotFound traceback on
    gs://, and --skip-unreadable-files was ignored for it. Now: one line naming the file, or skipped
    and listed in stats.json's unreadable_files, as on local disk."""
    import storage
    from bft import cli

    for path in sorted(p for p in (tmp_path / "dolma").rglob("*.json.gz")):
        storage.write_bytes(f"gs://{bucket}/{path.relative_to(tmp_path)}", path.read_bytes())
    gone = f"gs://{bucket}/dolma/documents/cc_en_head/cc_en_head-0001.json.gz"
    real = prepare.list_inputs

    def list_then_delete(patterns):
        files = real(patterns)
        storage.delete(gone)
        return files

    monkeypatch.setattr(prepare.pipeline, "list_inputs", list_then_delete)
    pattern = f"gs://{bucket}/dolma/documents/*/*.json.gz"
    rc = cli.main(["prepare", "--input", pattern, "--root", str(tmp_path / "x"), "--tokenizer", bpe_tokenizer_path,
                   "--num-shards", "2", "--quiet", *LOCAL])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and f"{gone}: unreadable after 0 lines" in err, err
    storage.write_bytes(gone, b"")  # listed again by the next run, then deleted again
    stats = run_prepare(pattern, tmp_path / "y", bpe_tokenizer_path, skip_unreadable_files=True)
    assert [u["file"] for u in stats["unreadable_files"]] == [gone]
    assert "not found in the bucket" in stats["unreadable_files"][0]["error"]
    assert stats["input_records"] == stats["kept"] + sum(stats["dropped"].values())


def test_the_tokenizer_is_proved_once_in_the_driver_and_the_worker_threads_use_the_proof(corpus, tmp_path,
                                                                                        bpe_tokenizer_path,
                                                                                        monkeypatch):
    """With --target-docs (three measuring steps) on two worker threads, the tokenizer's
    shape is proved once, in the driver, and every worker's counter is built on that proof."""
    import threading

    from beam_pipelines.tokens import counter as counting
    from beam_pipelines.tokens import load

    from beam_pipelines.prepare import pipeline

    monkeypatch.setattr(load, "_LOADED", {})  # no copy loaded by an earlier test of this process
    drivers = []

    def prove(path):  # the driver's proof; then the process's copy is forgotten, so that a
        drivers.append(real_check(path))  # step not handed the proof would have to prove again
        load._LOADED.clear()
        return drivers[-1]

    real_check = pipeline.prove
    monkeypatch.setattr(pipeline, "prove", prove)
    proved = []
    real = load.tokenizer_shape
    for module in (load, counting):  # the two places a shape is proved: a shared copy, a counter
        monkeypatch.setattr(module, "tokenizer_shape",
                            lambda *a, **k: proved.append(threading.current_thread().name) or real(*a, **k))
    built = []
    counter = counting.TokenCounter.__init__

    def init(self, tokenizer, clock=counting.time.thread_time, proof=None):
        built.append(proof)
        counter(self, tokenizer, clock, proof)

    monkeypatch.setattr(counting.TokenCounter, "__init__", init)
    stats = prepare.run(prepare_cfg(corpus, tmp_path / "o", bpe_tokenizer_path, target_docs=20),
                        ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    assert stats["kept"] == 20
    assert proved == [threading.main_thread().name]
    assert len(drivers) == 1 and built and all(p == drivers[0] for p in built)  # a pickled copy of it


def test_a_pass_that_keeps_no_document_names_why_unless_allowed(corpus, tmp_path, bpe_tokenizer_path):
    """A --splits typo kept 0 documents at exit 0 and the night went on with nothing. Now one
    error names what took every record and the split folders the input has; --allow-empty accepts it
    (the empty output is complete: the next run reuses it)."""
    root = tmp_path / "run"
    with pytest.raises(UserError, match=r"prepare kept 0 of 116 input records \(116 other_split\); --splits "
                                        r"cc_en_heda matches none of the input's split folders \(cc_en_head: 2 "
                                        r"files, cc_en_middle: 1 files\); pass --allow-empty"):
        run_prepare(corpus, root, bpe_tokenizer_path, splits=["cc_en_heda"])
    stats = run_prepare(corpus, root, bpe_tokenizer_path, splits=["cc_en_heda"], allow_empty=True)
    assert stats["kept"] == 0 and stats["reused"]
