"""bft assemble: the recipes on literal generation shards, curation, seed mixing, statistics, the
versioned release (manifest, _SUCCESS, LATEST) and `bft validate`, locally and on GCS."""
import json
import shutil
import os

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nltk import ngrams
from nltk.tokenize import wordpunct_tokenize

import schemas
from beam_pipelines.assemble import corpus_stats
from beam_pipelines.assemble import recipes
from lifecycle import release
from beam_pipelines.assemble.config import AssembleConfig, AssembleError, Split, resolve
from beam_pipelines.assemble.seed import read_seed_table
import storage
from bft import cli
from schemas.errors import UserError
from schemas.keys import instruction_key
from schemas.layout import RunLayout, release_split_of
from schemas.recipes import Gate, resolve_gate
from generation.templates import SEED_TAG, WEB_TAG
from tests.helpers.assemble import (INSTRUCTION, SHARDS, doc, gen_row, read_release, rewrite_shard, run,
                                    write_marker, write_root, write_seed)

EXPECTED_KEPT = {
    "filter+rewrite": ["a0", "b2", "b4", "b5"],
    "filter": ["a0", "a5", "b2", "b3", "b4", "b5"],
    "rewrite": ["a0", "a3", "a4", "b2", "b4", "b5"],
    "filter+distill": ["a0", "b2", "b4", "b5"],
    "alpagasus": ["a0", "a3", "a4", "a5", "b2", "b3", "b5"],
}


@pytest.fixture
def root(tmp_path, bpe_tokenizer_path):
    return write_root(str(tmp_path / "run"), bpe_tokenizer_path)


# ---- the recipes as pure functions -----------------------------------------------------------------

@pytest.mark.parametrize("recipe", sorted(EXPECTED_KEPT))
def test_recipe_keeps_exactly_the_expected_rows(root, recipe):
    r = recipes.RECIPES[recipe]
    kept = []
    for k in range(2):
        cands = storage.read_parquet(RunLayout(root).candidates_shard(k, 2))
        stages = {s: storage.read_parquet(RunLayout(root).generation_shard(s, k, 2)) for s in r.stages}
        joined = recipes.join_stages(cands, stages)
        keep = pa.compute.is_null(recipes.verdicts(joined, r, recipes.Curation(10, 800), resolve_gate(r.gate)))
        web = recipes.web_examples(joined, keep, r, WEB_TAG, lambda texts: [len(t.split()) for t in texts])
        kept += web.to_pylist()
    # b0 survives the recipe; it is dropped later as a duplicate instruction of a0
    survivors = sorted(EXPECTED_KEPT[recipe] + ["b0"])
    assert sorted(e["id"] for e in kept) == survivors
    for e in kept:
        if r.answer:
            assert e["response"] == f"{r.answer.title()} answer for {e['id']}."
        else:
            assert e["response"] == doc(e["id"]).strip() and e["n_tokens_response"] == 30
        assert e["messages"] == [{"role": "system", "content": WEB_TAG}, {"role": "user", "content": e["instruction"]},
                                 {"role": "assistant", "content": e["response"]}]
        assert e["origin"] == "web" and e["recipe"] == recipe


def test_a_document_prepare_kept_uncounted_gets_its_response_tokens_counted(root):
    """Without an answering stage the document is the response: its n_tokens_response is prepare's
    count, or, where prepare kept the document uncounted by its upper bound (n_tokens null), counted
    here; no null and no bound goes into the SFT rows."""
    r = next(x for x in recipes.RECIPES.values() if not x.answer)
    cands = storage.read_parquet(RunLayout(root).candidates_shard(0, 2))
    uncounted = set(cands["id"].to_pylist()[::2])
    cands = cands.set_column(cands.schema.get_field_index("n_tokens"), "n_tokens", pa.array(
        [None if i in uncounted else 30 for i in cands["id"].to_pylist()], pa.int32()))
    stages = {s: storage.read_parquet(RunLayout(root).generation_shard(s, 0, 2)) for s in r.stages}
    joined = recipes.join_stages(cands, stages)
    keep = pa.compute.is_null(recipes.verdicts(joined, r, recipes.Curation(10, 800), resolve_gate(r.gate)))
    web = recipes.web_examples(joined, keep, r, WEB_TAG, lambda texts: [len(t.split()) for t in texts]).to_pylist()
    assert {e["id"] for e in web} & uncounted and {e["id"] for e in web} - uncounted
    for e in web:
        assert e["n_tokens_response"] == (len(e["response"].split()) if e["id"] in uncounted else 30)


def test_verdicts_name_the_first_reason_in_pipeline_order(root):
    cands = pa.concat_tables(storage.read_parquet(RunLayout(root).candidates_shard(k, 2))
                             for k in range(2))
    stages = {s: pa.concat_tables(storage.read_parquet(RunLayout(root).generation_shard(s, k, 2)) for k in range(2))
              for s in ("backtranslate", "score", "rewrite")}
    joined = recipes.join_stages(cands, stages)
    reasons = dict(zip(joined["id"].to_pylist(),
                       recipes.verdicts(joined, recipes.RECIPES["filter+rewrite"], recipes.Curation(10, 800),
                                        Gate("score", 5.0)).to_pylist()))
    assert reasons == {"a0": None, "a1": "backtranslate:echo", "a2": "instruction_too_short",
                       "a3": "score_below_threshold", "a4": "score:no_match", "a5": "rewrite:truncated",
                       "b0": None, "b1": "backtranslate:engine_error", "b2": None, "b3": "empty_response",
                       "b4": None, "b5": None}
    # a fractional threshold (logprob scores) and the instruction bounds are parameters
    strict = recipes.verdicts(joined, recipes.RECIPES["filter+rewrite"], recipes.Curation(10, 30), Gate("score", 4.5))
    assert dict(zip(joined["id"].to_pylist(), strict.to_pylist()))["a0"] == "instruction_too_long"


def test_the_default_instruction_cap_keeps_the_papers_longest_instructions():
    """The paper's instructions reach 514 tokens (~2,100 characters of English); the default cap must
    not drop them (it was 800 characters)."""
    longest = "Explain " + "the trade-offs of this design " * 72
    assert 2100 < len(longest) < AssembleConfig(root="/r").curation().max_instruction_chars


def test_assemble_keeps_the_rewrites_the_parser_keeps():
    """One rule for a rewrite: assemble keeps exactly what parse_rewrite parses whole,
    whatever the output did after its [/RES] (later blocks, running on to the cap), and drops only
    what it does not, with the parser's reason."""
    from generation.parsing import parse_rewrite

    outputs = {"c0": ("[RES] Whole answer c0. [/RES] and then the model ran on", "length", False),
               "c1": ("[RES]First answer c1.[/RES] [RES]A second block.[/RES]", "stop", False),
               "c2": ("[RES] Stopped at the stop string c2. ", "stop", True),
               "c3": ("[RES] An answer the cap cut", "length", False),
               "c4": ("[RES] An answer the model never closed", "stop", False)}
    ids = sorted(outputs)
    cands = pa.table({"id": ids, "text": [doc(i) for i in ids], "n_tokens": [30] * 5, "url": [""] * 5,
                      "crawl_date": pa.array([None] * 5, pa.string())})
    backtranslate = [gen_row(i, "backtranslate", instruction=INSTRUCTION.format(i)) for i in ids]
    rewrite = []
    for i, (text, finish, stopped) in outputs.items():
        fields, error = parse_rewrite(text, finish, stopped)
        rewrite.append(gen_row(i, "rewrite", raw_output=text, finish_reason=finish, parse_error=error, **fields))
    joined = recipes.join_stages(cands, {"backtranslate": schemas.to_table(backtranslate, schemas.GENERATION),
                                         "rewrite": schemas.to_table(rewrite, schemas.GENERATION)})
    reasons = recipes.verdicts(joined, recipes.RECIPES["rewrite"], recipes.Curation(10, 800), None).to_pylist()
    assert dict(zip(ids, reasons)) == {"c0": None, "c1": None, "c2": None, "c3": "rewrite:truncated",
                                       "c4": "rewrite:unclosed"}
    assert joined["rewrite.response"].to_pylist()[:3] == ["Whole answer c0.", "First answer c1.",
                                                          "Stopped at the stop string c2."]


def test_instruction_key_ignores_case_and_layout():
    assert instruction_key("Explain  this\nplease") == instruction_key(" explain this please ")
    assert instruction_key("Explain this") != instruction_key("Explain that")


def test_trigram_counts_equal_nltk():
    texts = ["Hello, world! Don't stop... now?!", "Café au lait — naïve résumé 42x", "a b", "", "a b c a b c",
             "Über straße ÉCOLE", "  \n ", "x y z", "hello , world !"]
    expected = set()
    for t in texts:
        expected |= set(ngrams(wordpunct_tokenize(t.lower()), 3))
    assert len(corpus_stats.trigram_hashes(pa.array(texts))) == len(expected)
    merged = corpus_stats.Uniques(corpus_stats.trigram_hashes(pa.array(texts[:4]))).merge(
        corpus_stats.Uniques(corpus_stats.trigram_hashes(pa.array(texts[4:]))))
    assert len(merged) == len(expected)


def test_histograms_and_merge():
    assert corpus_stats.histogram(pa.array([1.0, 5.0, 5.0, 4.5, None]), corpus_stats.SCORE_EDGES)[2] == 1
    assert corpus_stats.histogram(pa.array([7, 8, 9000]), [8, 16]) == [1, 1, 1]
    assert corpus_stats.merge({"a": 1, "h": [1, 2], "d": {"x": 1}}, {"a": 2, "h": [0, 1], "d": {"y": 3}}) == \
        {"a": 3, "h": [1, 3], "d": {"x": 1, "y": 3}}


# ---- the pipeline, the release, validate -------------------------------------------------------------

def test_assemble_publishes_a_complete_release(root, tmp_path):
    seed = write_seed(str(tmp_path / "seed.jsonl"))
    stats = run(root, seed_data=seed, validation_fraction=0.3, version="v1")
    folder, splits = read_release(root)
    assert folder.endswith("/sft/v1") and storage.read_text(os.path.join(root, "sft", "LATEST")).strip() == "v1"
    both = pd.concat([splits["train"], splits["validation"]])
    web = both[both.origin == "web"]
    assert sorted(web.id) == EXPECTED_KEPT["filter+rewrite"]              # b0 lost to a0 (smaller id)
    assert len(splits["validation"]) > 0 and len(splits["train"]) > 0
    assert set(splits["train"].id).isdisjoint(splits["validation"].id)
    seed_rows = both[both.origin == "seed"]
    assert len(seed_rows) == 5 and set(seed_rows.tag) == {SEED_TAG} and set(web.tag) == {WEB_TAG}
    assert set(splits["validation"].origin) == {"web"}    # seed pairs train unless --seed-in-validation
    assert list(seed_rows.iloc[0].messages[0].values()) == ["system", SEED_TAG]

    f = stats["funnel"]
    assert f["candidates"] == 12 == f["web_examples"] + sum(f["dropped"].values())
    assert f["dropped"]["duplicate_instruction"] == 1 and f["dropped"]["backtranslate:engine_error"] == 1
    assert f["seed"] == {"input": 6, "kept": 5, "dropped": {"empty": 1}}
    assert f["final"]["total"] == 9 and f["dolma"]["input_records"] == 20
    assert stats["stages"]["score"]["score_histogram"][10] == 10       # ten rows scored 5 (bin [5, 5.5))
    assert stats["stages"]["backtranslate"]["rows"] == 12 and stats["stages"]["backtranslate"]["pass_rate"] == round(10 / 12, 4)
    assert stats["by_origin"]["web"]["unique_trigrams_response"] > 0
    assert stats["by_origin"]["seed"]["avg_tokens_instruction"] > 0

    manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())
    listed = {e["path"] for e in manifest["files"]}
    assert {"data/split=train/part-00000-of-00002.parquet", "stats.json", "report.html",
            "README.md", "plots/funnel.png", "plots/scores.png"} <= listed
    # each split numbered on its own: the validation files are 0..n-1 of their own count
    val = sorted(p for p in listed if p.startswith("data/split=validation/"))
    assert val == [f"data/split=validation/part-{i:05d}-of-{len(val):05d}.parquet" for i in range(len(val))]
    assert manifest["counts"] == {"train": len(splits["train"]), "validation": len(splits["validation"])}
    assert manifest["config"]["recipe"] == "filter+rewrite" and manifest["code_revision"]
    assert len(manifest["inputs"]["generations"]["rewrite"]) == 2 and manifest["inputs"]["seed_data"]["path"] == seed
    assert os.path.exists(os.path.join(folder, "_SUCCESS"))
    card = open(os.path.join(folder, "README.md")).read()
    assert card.startswith("---\npretty_name: ") and "\nlicense: odc-by\n" in card and "path: data/split=train/*.parquet" in card
    assert "<img src=\"plots/funnel.png\"" in open(os.path.join(folder, "report.html")).read()
    assert not os.path.exists(os.path.join(root, "sft", "_tmp")) or not os.listdir(os.path.join(root, "sft", "_tmp"))

    # the files load in pyarrow, pandas and datasets, and match the sft schema
    ds = datasets.load_dataset("parquet", data_files={s: os.path.join(folder, "data", f"split={s}", "*.parquet")
                                                      for s in ("train", "validation")})
    assert ds["train"].num_rows == len(splits["train"]) and ds["train"][0]["messages"][1]["role"] == "user"
    assert pq.read_table(os.path.join(folder, "data", "split=train", "part-00000-of-00002.parquet")).schema.metadata[b"bft.kind"] == b"sft"


def test_rerun_is_a_no_op_and_releases_are_never_overwritten(root):
    first = run(root, version="v1")
    assert run(root, version="v1")["finished_at"] == first["finished_at"]
    with pytest.raises(release.ReleaseError, match="never overwritten"):
        run(root, version="v1", recipe="filter")
    # a default version is the UTC date + config hash: another config is another release
    other = run(root, recipe="filter")
    manifest = json.loads(open(os.path.join(root, "sft", other["version"], "manifest.json")).read())
    assert other["version"] == release.default_version(release.config_hash(manifest["config"], manifest["inputs"]))
    assert storage.read_text(os.path.join(root, "sft", "LATEST")).strip() == other["version"]


def test_debris_of_a_failed_run_is_cleared(root):
    folder = os.path.join(root, "sft", "v1")
    os.makedirs(os.path.join(folder, "data", "split=train"))
    open(os.path.join(folder, "data", "split=train", "part-00000-of-00009.parquet"), "w").write("half a file")
    run(root, version="v1")
    assert "part-00000-of-00009.parquet" not in os.listdir(os.path.join(folder, "data", "split=train"))
    release.validate(folder)


def test_cap_keeps_a_deterministic_bottom_k_and_the_validation_split_beside_it(root):
    """--max-examples is the train split's count (as the paper's 12.8K/25.6K/51.2K); the validation
    split is taken beside it: cap + validation_size examples by sample key, the validation_size of them
    with the smallest validation keys held out."""
    from schemas.keys import sample_key, validation_key, validation_size

    stats = run(root, max_examples=2, version="capped")
    _, splits = read_release(root, "capped")
    assert validation_size(2, 0.02) == 1 and validation_size(12800, 0.02) == 262
    selected = sorted(EXPECTED_KEPT["filter+rewrite"], key=lambda i: (sample_key(i, 0), i))[:3]
    held_out = min(selected, key=lambda i: (validation_key(i, 0), i))
    assert sorted(splits["validation"].id) == [held_out]
    assert sorted(splits["train"].id) == sorted(set(selected) - {held_out})
    assert stats["funnel"]["dropped"]["over_cap"] == 1


def test_seed_pairs_are_in_validation_only_when_asked():
    from beam_pipelines.assemble.finalize import _in_validation

    ids = pa.chunked_array([[f"s{i}" for i in range(50)] + [f"w{i}" for i in range(50)]])
    is_web = pa.array([False] * 50 + [True] * 50)
    for rule in (("hash", None), ("capped", (2**63, "w"))):
        mask = _in_validation(ids, is_web, rule, Split(0, 0.5, False, None)).to_pylist()
        assert not any(mask[:50]) and 10 < sum(mask[50:]) < 40, rule
        asked = Split(0, 0.5, True, None)
        assert 10 < sum(_in_validation(ids, is_web, rule, asked).to_pylist()[:50]) < 40, rule


def test_missing_generation_shards_are_listed_or_reported(root):
    os.remove(RunLayout(root).generation_shard("rewrite", 1, 2))
    with pytest.raises(AssembleError, match=r"rewrite-00001-of-00002\.parquet"):
        run(root, version="p")
    stats = run(root, version="p", allow_partial=True)
    assert stats["missing_shards"] == [1] and stats["funnel"]["dropped"]["missing_generation_shard"] == 6
    assert "Partial release" in open(os.path.join(root, "sft", "p", "README.md")).read()


def test_a_shard_with_the_wrong_schema_is_named(root):
    path = RunLayout(root).generation_shard("score", 0, 2)
    pq.write_table(pa.table({"id": ["a0"], "score": [5]}), path)
    write_marker(root, "score", 0, 2)  # a marker that vouches for it: the schema check still names it
    with pytest.raises(schemas.SchemaError, match=r"score-00000-of-00002\.parquet"):
        run(root, version="bad")


def test_validate_finds_every_kind_of_damage(published, capsys):
    root = published
    folder = os.path.join(root, "sft", "v1")
    assert cli.main(["validate", root]) == 0 and "valid: release v1" in capsys.readouterr().out
    data = os.path.join(folder, "data", "split=train", "part-00000-of-00002.parquet")
    blob = bytearray(open(data, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(data, "wb").write(bytes(blob))
    open(os.path.join(folder, "extra.txt"), "w").write("x")
    gone = "data/split=train/" + sorted(os.listdir(os.path.join(folder, "data", "split=train")))[-1]
    os.remove(os.path.join(folder, gone))
    with pytest.raises(release.ReleaseError) as e:
        release.validate(folder)
    msg = str(e.value)
    assert "split=train/part-00000-of-00002.parquet: sha256" in msg and "extra.txt: present in the release but not listed" in msg
    assert f"{gone}: listed in manifest.json but missing" in msg
    os.remove(os.path.join(folder, "_SUCCESS"))
    assert cli.main(["validate", folder]) == 1
    assert "_SUCCESS missing" in capsys.readouterr().err


def test_assemble_on_gcs(gcs_emulator, bucket, bpe_tokenizer_path, tmp_path):
    root = write_root(f"gs://{bucket}/run", bpe_tokenizer_path, stages=("backtranslate", "score", "rewrite"))
    seed = write_seed(f"gs://{bucket}/seed.jsonl")
    stats = run(root, seed_data=seed)
    folder = f"{root}/sft/{stats['version']}"
    assert storage.read_text(f"{root}/sft/LATEST").strip() == stats["version"]
    assert storage.exists(f"{folder}/_SUCCESS") and storage.exists(f"{folder}/plots/funnel.png")
    manifest = release.validate(f"{root}/sft")
    assert manifest["counts"]["train"] + manifest["counts"]["validation"] == 4 + 5
    table = storage.read_parquet(f"{folder}/data/split=train/part-00000-of-00002.parquet")
    assert table.schema.metadata[b"bft.kind"] == b"sft"


def test_bad_seed_data_is_named(root, tmp_path):
    bad = tmp_path / "seed.jsonl"
    bad.write_text('{"instruction": "Q?", "response": "A."}\n{"instruction": \n')
    with pytest.raises(AssembleError, match=r"seed\.jsonl:2: not JSON"):
        read_seed_table(str(bad))
    bad.write_text('{"question": "Q?", "answer": "A."}\n')
    with pytest.raises(AssembleError, match=r"seed\.jsonl: seed data needs columns instruction and response"):
        read_seed_table(str(bad))


# ---- generation shards as generate writes them now: the gate, cut documents, provenance --------------

def reasons_of(root, recipe, **kw):
    layout = RunLayout(root)
    rules = resolve(AssembleConfig(root=root, recipe=recipe, **kw), layout, {"config": {"tokenizer": "t"}}).rules
    out = {}
    for k in range(2):
        cands = storage.read_parquet(layout.candidates_shard(k, 2))
        stages = {s: storage.read_parquet(layout.generation_shard(s, k, 2)) for s in rules.stages}
        joined = recipes.join_stages(cands, stages)
        reason = recipes.verdicts(joined, rules.recipe, rules.curation, rules.gate)
        out.update(zip(joined["id"].to_pylist(), reason.to_pylist()))
    return out


def test_rows_the_gate_kept_from_the_answering_stage_count_as_gate_drops(root):
    from schemas.outcomes import BELOW_GATE

    def not_sent(r):  # as `bft generate rewrite` writes the pairs whose score did not pass
        if r["id"] in ("a3", "a4"):
            r.update(finish_reason=None, response=None, raw_output=None, parse_error=BELOW_GATE)
    rewrite_shard(root, "rewrite", 0, not_sent)
    reasons = reasons_of(root, "filter+rewrite")
    assert reasons["a3"] == "score_below_threshold" and reasons["a4"] == "score:no_match"
    stats = run(root, version="gated")
    assert not [r for r in stats["funnel"]["dropped"] if r.startswith("rewrite:not_sent")]
    assert stats["funnel"]["dropped"]["score_below_threshold"] == 1
    # the rewrite-only recipe has no gate: rows generate did not send are missing answers there
    assert reasons_of(root, "rewrite")["a3"] == "rewrite:not_sent"


def test_rows_whose_gate_or_answer_saw_a_cut_document_are_dropped_by_reason(root):
    rewrite_shard(root, "score", 0, lambda r: r.update(input_truncated=True) if r["id"] == "a0" else None)
    rewrite_shard(root, "rewrite", 1, lambda r: r.update(input_truncated=True) if r["id"] == "b2" else None)
    rewrite_shard(root, "backtranslate", 1, lambda r: r.update(input_truncated=True) if r["id"] == "b4" else None)
    for stage in ("score", "rewrite"):      # their inputs changed: markers made from the new backtranslate shard
        write_marker(root, stage, 1, 2)
    reasons = reasons_of(root, "filter+rewrite")
    assert reasons["a0"] == "score:input_truncated" and reasons["b2"] == "rewrite:input_truncated"
    assert reasons["b4"] is None            # a cut document only made the instruction: no stage judged it
    assert reasons_of(root, "filter")["b2"] is None
    stats = run(root, version="cut")
    assert stats["funnel"]["dropped"]["score:input_truncated"] == 1
    assert stats["funnel"]["dropped"]["rewrite:input_truncated"] == 1


def test_same_ids_as_restricts_two_recipes_to_the_same_pairs(root):
    rewrite_shard(root, "distill", 1, lambda r: r.update(parse_error="empty", response=None) if r["id"] == "b4" else None)
    a = run(root, version="rw", same_ids_as="filter+distill", max_examples=2)
    b = run(root, version="di", recipe="filter+distill", same_ids_as="filter+rewrite", max_examples=2)
    ids = [sorted(read_release(root, v)[1]["train"].pipe(lambda t: t[t.origin == "web"]).id.tolist()
                  + read_release(root, v)[1]["validation"].pipe(lambda t: t[t.origin == "web"]).id.tolist())
           for v in ("rw", "di")]
    assert ids[0] == ids[1] and "b4" not in ids[0] and len(ids[0]) == 3   # 2 train + 1 validation beside the cap
    assert a["funnel"]["dropped"]["not_kept_by:filter+distill"] == 1
    assert "b4" not in b["funnel"]["dropped"] and b["funnel"]["dropped"]["distill:empty"] == 1
    with pytest.raises(UserError):
        AssembleConfig(root=root, same_ids_as="filter+distil").check()


def test_a_generation_shard_with_another_shards_ids_is_named(root):
    layout = RunLayout(root)
    for src, dst in ((layout.generation_shard("rewrite", 1, 2), layout.generation_shard("rewrite", 0, 2)),
                     (layout.generation_metrics("rewrite", 1, 2), layout.generation_metrics("rewrite", 0, 2))):
        storage.write_bytes(dst, storage.read_bytes(src))
    with pytest.raises(AssembleError, match=r"rewrite-00000-of-00002\.parquet"):
        run(root, version="copy")
    # even when its marker is made to vouch for the copy, the ids say it is another shard's
    write_marker(root, "rewrite", 0, 2)
    with pytest.raises(AssembleError, match=r"rewrite-00000-of-00002\.parquet: its ids are not those"):
        run(root, version="copy")
    assert not storage.exists(layout.latest)


@pytest.mark.parametrize("where", ["text", "middle", "footer"])
def test_a_flipped_byte_in_a_generation_shard_is_named(root, where):
    path = RunLayout(root).generation_shard("score", 1, 2)
    blob = bytearray(open(path, "rb").read())
    pos = {"text": blob.find(b"Explain"), "middle": len(blob) // 2, "footer": len(blob) - 12}[where]
    assert pos > 0
    blob[pos] ^= 0x01
    open(path, "wb").write(bytes(blob))
    with pytest.raises(AssembleError, match=r"score-00001-of-00002\.parquet: its bytes differ"):
        run(root, version="flip")


def test_stale_generation_rows_are_refused(root):
    # backtranslate shard 0 redone with other instructions: rewrite and score were made from the old one
    rewrite_shard(root, "backtranslate", 0, lambda r: r.update(instruction=r["instruction"] and r["instruction"] + "!"))
    with pytest.raises(AssembleError, match=r"score-00000-of-00002\.parquet: made from .*backtranslate.*stale"):
        run(root, version="stale")
    # a shard whose marker does not record its upstream: the carried instructions still tell
    layout = RunLayout(root)
    for stage in ("score", "rewrite"):
        write_marker(root, stage, 0, 2, inputs={"candidates": layout.candidates_shard(0, 2)})
    with pytest.raises(AssembleError, match=r"-00000-of-00002\.parquet: row a0 carries another instruction"):
        run(root, version="stale")


def test_a_shard_without_its_completion_marker_is_named(root):
    os.remove(RunLayout(root).generation_metrics("rewrite", 1, 2))
    with pytest.raises(AssembleError, match=r"rewrite-00001-of-00002\.parquet: no valid completion marker"):
        run(root, version="nomarker")


def test_scores_made_in_logprob_mode_default_to_humpbacks_4_5(root):
    """Logprob scores are expectations (below 5 unless p(5) = 1); when the score
    shards say they were made in logprob mode, assemble's default threshold is 4.5 (AlpaGasus's), not 5."""
    layout, n = RunLayout(root), len(SHARDS)
    for k in range(n):
        path = layout.generation_shard("score", k, n)
        rows = storage.read_parquet(path).to_pylist()
        for r in rows:
            if r["id"] == "a3":
                r["score"] = 4.6
        storage.write_parquet(schemas.to_table(rows, schemas.GENERATION, path), path)
        write_marker(root, "score", k, n)
        marker = layout.generation_metrics("score", k, n)
        metrics = json.loads(storage.read_text(marker))
        storage.write_text(marker, json.dumps({**metrics, "config": {"score_mode": "logprob"}}))
    stats = run(root, recipe="filter")
    _, splits = read_release(root)
    kept = set(splits["train"]["id"]) | set(splits["validation"]["id"])
    assert "a3" in kept and stats["config"]["min_score"] == 4.5


def test_the_job_is_resolved_once_and_frozen_with_its_gate_from_resolve_gate(tmp_path, monkeypatch):
    """The options resolve once into a frozen AssembleJob whose gate is schemas.recipes.resolve_gate's:
    4.5 where the score shards were made in logprob mode (recorded as the release's min_score, the
    caller's options left as they were), --min-score when given; --same-ids-as on the same stage shares it."""
    import dataclasses

    from beam_pipelines.assemble import config

    root = write_root(str(tmp_path / "run"), "prepares.json", stages=("backtranslate", "score"))
    layout = RunLayout(root)
    for k in range(2):
        marker = layout.generation_metrics("score", k, 2)
        storage.write_text(marker, json.dumps({**json.loads(storage.read_text(marker)),
                                               "config": {"score_mode": "logprob"}}))
    calls = []
    real = config.resolve_gate
    monkeypatch.setattr(config, "resolve_gate", lambda *a, **k: calls.append(a) or real(*a, **k))
    prep = {"config": {"tokenizer": "prepares.json"}}
    cfg = AssembleConfig(root=root, recipe="filter", same_ids_as="filter+rewrite")
    job = resolve(cfg, layout, prep)
    assert calls == [("score", "logprob", None)]
    assert job.rules.gate == Gate("score", 4.5) and job.rules.other_gate is job.rules.gate
    assert job.options.min_score == 4.5 and job.tokenizer == job.options.tokenizer == "prepares.json"
    assert cfg.min_score is None and cfg.tokenizer is None
    for part, field in ((job, "rules"), (job.rules, "gate"), (job.split, "seed")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, field, None)
    given = resolve(AssembleConfig(root=root, recipe="filter", min_score=4.0), layout, prep)
    assert calls[-1] == ("score", "logprob", 4.0) and given.rules.gate == Gate("score", 4.0)
    assert given.options.min_score == 4.0


def test_an_input_edited_in_place_with_the_same_size_makes_a_new_release(tmp_path, bpe_tokenizer_path):
    """`sed -i 's/Teh end/The end/' seed.jsonl` (same byte count) then a rebuild said
    the release was current. The lineage (and the config hash) records every input by content: seed
    data, candidates and generation shards by sha256 (read once per file; the shard checks read them
    anyway), the tokenizer by storage.fingerprint (a copy of it: the test edits it in place)."""
    tokenizer = str(tmp_path / "tokenizer.json")
    shutil.copy(bpe_tokenizer_path, tokenizer)
    root = write_root(str(tmp_path / "run"), tokenizer)
    seed = write_seed(str(tmp_path / "seed.jsonl"))
    first = run(root, seed_data=seed)
    again = run(root, seed_data=seed)
    assert again["reused"] and again["version"] == first["version"]
    text = open(seed).read()
    edited = text.replace("Seed answer 3.", "Seed answer 8.")
    assert len(edited) == len(text) and edited != text
    open(seed, "w").write(edited)
    second = run(root, seed_data=seed)
    assert "reused" not in second and second["version"] != first["version"]
    _, splits = read_release(root)
    responses = set(pd.concat(splits.values())["response"])
    assert "Seed answer 8." in responses and "Seed answer 3." not in responses
    manifest = json.loads(open(os.path.join(root, "sft", second["version"], "manifest.json")).read())
    lineage = manifest["inputs"]
    assert lineage["seed_data"]["sha256"] == release.sha256_of(seed)
    assert all(len(e["sha256"]) == 64 for e in lineage["candidates"] + lineage["generations"]["rewrite"])
    assert lineage["tokenizer"]["checksum"].startswith("xxh3_128:")
    # the tokenizer replaced in place by another of the same size is a change too
    tok = lineage["tokenizer"]["path"]
    assert tok == tokenizer
    data = open(tok, "rb").read()
    open(tok, "wb").write(data.replace(b'"unk_token"', b'"unk_tokeN"', 1) if b'"unk_token"' in data else data + b" ")
    assert "reused" not in run(root, seed_data=seed)


def test_a_run_never_deletes_a_live_runs_tmp_folder(root, tmp_path):
    """A second assemble deleted sft/_tmp while the first was writing there (a
    FileNotFoundError traceback in the first). Besides the root lock, each run claims its _tmp/<run>/
    folder; cleanup removes only folders of runs that are gone (or have no owner record)."""
    import subprocess
    import sys
    import time

    from storage import claims
    from storage.holder import holder_info

    tmp_root = os.path.join(root, "sft", "_tmp")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for name, pid in (("live", live.pid), ("dead", dead.pid)):
            os.makedirs(os.path.join(tmp_root, name))
            holder = dict(holder_info(), pid=pid)
            storage.write_text(os.path.join(tmp_root, name, claims.OWNER), json.dumps(holder))
            storage.write_text(os.path.join(tmp_root, name, "part-00000.parquet"), "x")
        os.makedirs(os.path.join(tmp_root, "unowned"))
        storage.write_text(os.path.join(tmp_root, "unowned", "part-00000.parquet"), "x")
        foreign = dict(holder_info(), host="elsewhere", host_id="other", started="2026-01-01T00:00:00Z")
        for name, started in (("foreign-old", "2026-01-01T00:00:00Z"),
                              ("foreign-new", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))):
            os.makedirs(os.path.join(tmp_root, name))
            storage.write_text(os.path.join(tmp_root, name, claims.OWNER), json.dumps(dict(foreign, started=started)))
        run(root, version="v1")
        assert sorted(os.listdir(tmp_root)) == ["foreign-new", "live"]   # the live runs' folders are kept
        assert os.path.exists(os.path.join(tmp_root, "live", "part-00000.parquet"))
    finally:
        live.kill()
        live.wait()
    assert claims.clear_dead_folders(tmp_root) == [os.path.join(tmp_root, "live")]   # gone now: cleared


@pytest.mark.parametrize("old_name", [lambda split, name: f"data/{split}-{name[5:]}",   # data/train-00000-of-00002
                                      lambda split, name: f"{split}-{name[5:]}"],       # beside the card
                         ids=["data-prefix", "beside-the-card"])
def test_a_release_of_an_older_layout_still_validates_and_loads(published, old_name):
    """Releases are written as data/split=<split>/part-*.parquet (tests/test_readers.py
    reads them with every reader). A release of an older layout (data/<split>-*.parquet before, or
    the data files beside the card) still validates and loads: the manifest lists each file by path,
    and its split is read from either form of path."""
    old = os.path.join(published, "sft", "v0")
    shutil.move(os.path.join(published, "sft", "v1"), old)
    manifest = json.load(open(os.path.join(old, "manifest.json")))
    for entry in manifest["files"]:
        split = release_split_of(entry["path"])
        if split:
            entry["path"] = old_name(split, entry["path"].rsplit("/", 1)[1])
            os.renames(os.path.join(old, "data", f"split={split}", entry["path"].rsplit("/", 1)[-1].replace(
                f"{split}-", "part-")), os.path.join(old, entry["path"]))
    manifest["version"] = "v0"
    storage.write_text(os.path.join(old, "manifest.json"), json.dumps(manifest))
    storage.write_text(os.path.join(old, "_SUCCESS"), release.success_line(old))
    assert release.validate(old)["counts"] == manifest["counts"]
    _, tables = release.load(old)
    assert {s: t.num_rows for s, t in tables.items()} == manifest["counts"] == {"train": 3, "validation": 1}


def test_bft_latest_prints_the_data_folder_of_the_latest_release(root, tmp_path, capsys):
    """One line per reader resolves sft/LATEST; `bft latest ROOT` prints the data path
    (shell: `pd.read_parquet("$(bft latest ROOT)")`; Python: lifecycle.release.latest_data(ROOT))."""
    from bft import cli

    assert cli.main(["latest", root]) == 1 and "no published release" in capsys.readouterr().err
    run(root, version="v1")
    assert cli.main(["latest", root, "--verify"]) == 0
    data = capsys.readouterr().out.strip()
    assert data == os.path.join(root, "sft", "v1", "data") == release.latest_data(os.path.join(root, "sft"))
    assert len(pd.read_parquet(data)) == sum(json.load(open(os.path.join(root, "sft", "v1", "manifest.json")))
                                             ["counts"].values())
    os.remove(os.path.join(root, "sft", "v1", "_SUCCESS"))
    assert cli.main(["latest", root]) == 1 and "_SUCCESS missing" in capsys.readouterr().err


def test_assemble_reads_each_input_file_once(root, monkeypatch):
    """The driver checked every generation shard's sha256 (reading it whole), then a
    worker read it again; now the driver reads only markers, and JoinShard checks each file's sha256
    while it reads it, once, before parsing (the flipped-byte and stale tests above prove the checks)."""
    import collections
    import glob as globlib

    layout = RunLayout(root)
    inputs = {p for _, _, p in layout.candidate_shards()} | set(
        globlib.glob(os.path.join(root, "generations", "*", "*.parquet")))
    assert len(inputs) > 4
    reads = collections.Counter()
    for name in ("open_read", "read_bytes", "read_parquet"):
        real = getattr(storage, name)
        monkeypatch.setattr(storage, name,
                            lambda path, *a, _real=real, **k: reads.update([path]) or _real(path, *a, **k))
    run(root, version="once")
    assert {p: reads[p] for p in sorted(inputs)} == {p: 1 for p in sorted(inputs)}


def test_the_new_releases_data_is_read_once_for_the_changes_and_the_paper_lengths(root, monkeypatch):
    """After the Beam pass the driver parsed every new data file twice for its figures (ids
    for the changes since the parent, then lengths in the paper's unit); one read_parquet serves both
    now (the publish protocol's checksums and validation read the bytes on their own), and the
    parent's ids come from the data files its manifest lists (release.data_files), not a listing."""
    import collections

    run(root, version="v0")
    open(os.path.join(root, "sft", "v0", "data", "stray.parquet"), "wb").write(b"not listed, never read")
    reads = collections.Counter()
    real = storage.read_parquet
    monkeypatch.setattr(storage, "read_parquet", lambda path, *a, **k: reads.update([path]) or real(path, *a, **k))
    stats = run(root, version="v1", recipe="filter")
    new = sorted(p for p in reads if "/sft/v1/" in p)
    old = sorted(p for p in reads if "/sft/v0/" in p)
    assert new and {reads[p] for p in new} == {1}, reads
    assert old == sorted(release.data_files(os.path.join(root, "sft", "v0"))) and {reads[p] for p in old} == {1}
    web = {"added": 2, "removed": 0, "kept": 4}   # filter keeps a5 and b3 besides filter+rewrite's four
    assert stats["changes"]["examples"]["web"] == web
    assert stats["paper_lengths"]["examples"] == len(EXPECTED_KEPT["filter"])


def test_an_empty_candidates_shard_flows_through_assemble(tmp_path, bpe_tokenizer_path, monkeypatch):
    """A candidates shard with no row (prepare keeps fewer documents than shards) and its empty
    generation shards are a state, not a crash: the release is the one without that shard."""
    from tests.helpers import assemble as module   # where write_root reads SHARDS

    monkeypatch.setattr(module, "SHARDS", [SHARDS[0], [], SHARDS[1]])
    root = write_root(str(tmp_path / "run"), bpe_tokenizer_path)
    stats = run(root, version="v1")
    _, splits = read_release(root, "v1")
    kept = sorted(splits["train"]["id"].tolist() + splits["validation"]["id"].tolist())
    assert kept == EXPECTED_KEPT["filter+rewrite"]
    assert stats["funnel"]["candidates"] == 12


def test_the_logprob_threshold_is_credited_to_alpagasus_and_the_differences_are_listed():
    """4.5 on expected scores is this project's option with AlpaGasus's threshold; Humpback gates integer
    scores (its A5 is score 5). README lists every default loss the paper does not have."""
    from tests.conftest import ROOT

    for name in ("README.md", "schemas/recipes.py", "beam_pipelines/assemble/pipeline.py", "bft/rebuild.py"):
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        assert "Humpback's 4.5" not in text and "A5) is" not in text and "set A5 is" not in text, name
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    differ = readme.split("## Where we differ from the paper")[1].split("\n## ")[0]
    for loss in ("--max-instruction-chars", "--near-dup-instruction-threshold", "--validation-fraction",
                 "--score-mode logprob", "AlpaGasus"):
        assert loss in differ, loss
