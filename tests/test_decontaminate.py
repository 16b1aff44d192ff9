"""bft assemble's decontamination (--decontaminate: pairs sharing a 13-word n-gram with an evaluation
prompt) and near-duplicate instructions (MinHash LSH, the highest score kept), on the literal run of
tests/helpers/assemble.py, and `bft eval`'s warning when its questions were not used to decontaminate."""
import json
import os
import random

import pyarrow as pa
import pytest

from beam_pipelines.assemble import decontaminate
from beam_pipelines.assemble.decontaminate import DecontaminationError, Member
from bft import cli
from schemas.errors import user_error_message
from generation import evaluate
from tests.helpers.assemble import read_release, run, write_root
from tests.helpers.decontamination import ALPACA, IN_INSTRUCTION, IN_RESPONSE, MT_BENCH, plant

# MT-Bench's second turn has 11 words: it is one n-gram, its whole word sequence
SHORT_PROMPT = "OK: rewrite your previous response! Start every sentence with the letter A, as asked."
# only 12 words of the first turn in a row
TWELVE_WORDS = "compose an engaging travel blog post about a recent trip to Hawaii today, said the editor."


@pytest.fixture
def root(tmp_path, bpe_tokenizer_path):
    return write_root(str(tmp_path / "run"), bpe_tokenizer_path)


def web_ids(root, version):
    _, splits = read_release(root, version)
    return sorted(i for split in splits.values() for i, o in zip(split.id, split.origin) if o == "web")


# ---- reading evaluation sets --------------------------------------------------------------------

def test_alpacaeval_and_mtbench_question_files_read_as_they_are(eval_files, tmp_path):
    alpaca, mt = (decontaminate.eval_set(p, None, 13) for p in eval_files)
    assert alpaca.name == "alpaca_eval" and alpaca.prompts == [ALPACA[0]["instruction"]]
    assert alpaca.ignored == ["hi"] and alpaca.summary()["ignored_prompts"] == 1   # under 4 words
    assert mt.name == "question" and mt.prompts == MT_BENCH[0]["turns"]      # one prompt per turn
    # 19 words: 7 n-grams; the 11-word turn: one n-gram, its whole word sequence
    assert len(alpaca.hashes) == 7 and alpaca.short_prompts == 0 and alpaca.lengths == (13,)
    assert len(mt.hashes) == 7 + 1 and mt.lengths == (11, 13)
    assert len(alpaca.sha256) == 64 and alpaca.content["bytes"] == os.path.getsize(eval_files[0])
    # a named field; a missing one names the file and line
    other = tmp_path / "held_out.jsonl"
    other.write_text(json.dumps({"question": "What is a monad?"}) + "\n")
    assert decontaminate.eval_set(str(other), "question", 13).prompts == ["What is a monad?"]
    with pytest.raises(DecontaminationError, match=r"held_out\.jsonl:1: no one of the fields instruction, turns"):
        decontaminate.eval_set(str(other), None, 13)
    with pytest.raises(DecontaminationError, match="two files are named 'question'"):
        decontaminate.read_eval_sets([eval_files[1], eval_files[1]], None, 13)


def test_thirteen_shared_words_match_after_normalization_and_twelve_do_not(eval_files):
    sets = decontaminate.read_eval_sets(list(eval_files), None, 13)
    instructions = ["Explain the weather.", IN_INSTRUCTION, "Explain the sea.", "Explain rain.", "Say hi!"]
    responses = [IN_RESPONSE, "Fine.", SHORT_PROMPT, TWELVE_WORDS, "This"]
    matches = decontaminate.contamination(pa.array(instructions), pa.array(responses), sets)
    found = {m.row: (m.set, m.field, m.ngram) for m in matches}
    assert found[0] == ("question", "response", "compose an engaging travel blog post about a recent trip to "
                                                 "hawaii highlighting")
    assert found[1] == ("alpaca_eval", "instruction", "write a detailed essay about the economic consequences of "
                                                     "the industrial revolution in")
    assert found[2] == ("question", "response", "rewrite your previous response start every sentence with the "
                                                "letter a")
    assert 3 not in found                    # 12 words of a 20-word prompt: not contaminated
    assert 4 not in found                    # "hi", a prompt of under 4 words, is ignored


# ---- near-duplicate instructions: the rule ---------------------------------------------------------

def test_the_dominated_instructions_do_not_depend_on_the_order_of_a_band_group():
    texts = ["describe how the water cycle moves moisture from the oceans to the high mountains and back to the sea",
             "describe how the water cycle moves moisture from the oceans to the high mountains and back to the coast",
             "describe how the water cycle moves moisture from the oceans to the high mountains and back to the sea now",
             "a completely different question about cooking pasta at home"]
    sets = decontaminate.ngram_sets(pa.array(texts), decontaminate.SHINGLE_WORDS)
    assert decontaminate.jaccard(sets[0], sets[1]) > 0.88 and decontaminate.jaccard(sets[0], sets[3]) == 0
    members = [Member(decontaminate.rank_of(i, score), i, 0, s.tobytes())
               for i, score, s in zip(["b", "a", "c", "d"], [5.0, 4.0, 5.0, None], sets)]
    expected = [("c", "b"), ("a", "b")]   # b: the highest score, then the smallest id; a's id is smaller
    for seed in range(5):
        random.Random(seed).shuffle(members)
        assert [(x.id, y.id) for x, y in decontaminate.dominated(members, 0.8)] == expected
    keys = decontaminate.band_keys(sets)
    assert (keys[0] == keys[1]).any() and not (keys[0] == keys[3]).any()


# ---- in bft assemble -----------------------------------------------------------------------------

def test_contaminated_pairs_are_dropped_listed_and_recorded(root, eval_files):
    # filter+rewrite keeps a0, b2, b4, b5 (b0 is a duplicate of a0)
    plant(root, instructions={"b4": IN_INSTRUCTION},
          responses={"a0": SHORT_PROMPT, "b2": IN_RESPONSE, "b5": TWELVE_WORDS})
    stats = run(root, version="clean", decontaminate=list(eval_files))
    assert web_ids(root, "clean") == ["b0", "b5"]
    f = stats["funnel"]
    assert f["dropped"]["contaminated:alpaca_eval"] == 1 and f["dropped"]["contaminated:question"] == 2
    assert f["candidates"] == f["web_examples"] + sum(f["dropped"].values())
    # b0, a0's exact duplicate, now survives the dedup (a0 was dropped before it)
    assert "duplicate_instruction" not in f["dropped"]
    d = stats["decontamination"]
    assert d["ngram"] == 13 and d["dropped"] == {"alpaca_eval": 1, "question": 2}
    assert [(s["prompts"], s["ignored_prompts"]) for s in d["sets"]] == [(1, 1), (2, 0)]
    assert [(p["id"], p["set"], p["field"]) for p in d["pairs"]] == [
        ("a0", "question", "response"), ("b2", "question", "response"), ("b4", "alpaca_eval", "instruction")]
    assert d["pairs"][2]["ngram"] == "write a detailed essay about the economic consequences of the industrial revolution in"
    folder = os.path.join(root, "sft", "clean")
    report = open(os.path.join(folder, "report.html")).read()
    assert "<h2>Decontamination</h2>" in report and "decontamination (--decontaminate)" in report
    assert "prompts ignored (under 4 words)" in report and "1: &#x27;hi&#x27;" in report
    assert "compose an engaging travel blog post about a recent trip to hawaii highlighting" in report
    assert "Decontamination: pairs sharing a 13-word n-gram" in open(os.path.join(folder, "README.md")).read()
    manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())
    assert [u["sha256"] for u in manifest["inputs"]["decontaminate"]] == [s["sha256"] for s in d["sets"]]
    # another content of an evaluation file is another release
    first = run(root, decontaminate=list(eval_files))
    with open(eval_files[1], "a") as out:
        out.write(json.dumps({"question_id": 82, "turns": ["Draft a professional email."]}) + "\n")
    assert run(root, decontaminate=list(eval_files))["version"] != first["version"]


def test_without_evaluation_files_the_report_says_so(root):
    stats = run(root, version="v1")
    assert stats["decontamination"] == {"ngram": 13, "sets": [], "dropped": {}, "pairs": []}
    report = open(os.path.join(root, "sft", "v1", "report.html")).read()
    assert "not checked against any benchmark" in report


NEAR = "Describe how the water cycle moves moisture from the oceans to the high mountains and back to the {}"


def test_near_duplicate_instructions_keep_the_highest_score_with_one_or_two_workers(root, eval_files):
    # the filter recipe at score >= 3 keeps a0, a3, a5, b0, b2, b3, b4, b5; a0, b2, b3 are near-duplicates
    plant(root, instructions={"a0": NEAR.format("sea"), "b2": NEAR.format("coast"), "b3": NEAR.format("sea now"),
                              "b0": "Tell me a story about a lighthouse keeper and his cat.",
                              "b5": IN_INSTRUCTION},
          scores={"a0": 4.0, "b2": 5.0, "b3": 5.0})
    kw = dict(recipe="filter", min_score=3.0, decontaminate=list(eval_files))
    one = run(root, version="one", **kw)
    two = assemble_with(root, ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"],
                        version="two", **kw)
    assert web_ids(root, "one") == web_ids(root, "two") == ["a3", "a5", "b0", "b2", "b4"]
    f = one["funnel"]
    assert f["dropped"]["near_duplicate_instruction"] == 2 and f["candidates"] == f["web_examples"] + sum(f["dropped"].values())
    for key in ("funnel", "decontamination", "near_duplicate_instructions"):
        assert one[key] == two[key]
    assert one["examples"]["dropped"]["near_duplicate_instruction"][0]["detail"] == "near duplicate of b2"
    assert "curation: near-duplicate instructions" in open(os.path.join(root, "sft", "one", "report.html")).read()
    # 0 turns it off: the near-duplicates stay
    off = run(root, version="off", near_dup_instruction_threshold=0.0, **kw)
    assert "near_duplicate_instruction" not in off["funnel"]["dropped"] and len(web_ids(root, "off")) == 7


def assemble_with(root, beam_args, **kw):
    from beam_pipelines.assemble import driver as assemble
    from beam_pipelines.assemble.config import AssembleConfig

    return assemble.run(AssembleConfig(root=root, **kw), beam_args)


# ---- bft eval and the command line -----------------------------------------------------------------

def test_bft_eval_warns_when_its_questions_did_not_decontaminate_the_release(root, eval_files, tmp_path, caplog):
    run(root, version="clean", decontaminate=[eval_files[0]])
    model = tmp_path / "sft-model"
    model.mkdir()
    release = os.path.join(root, "sft", "clean")
    (model / "bft_train.json").write_text(json.dumps({"data": f"release clean ({release})"}))
    assert evaluate.decontamination_warning(str(model), eval_files[0]) is None
    warning = evaluate.decontamination_warning(str(model), eval_files[1])
    assert "question.jsonl was not used to decontaminate release clean" in warning and "alpaca_eval.json" in warning
    # a model not trained on a release (the base model) is not checked
    assert evaluate.decontamination_warning(str(tmp_path), eval_files[1]) is None
    # by content: a copy of the file under another name counts as used
    copy = tmp_path / "copy.json"
    copy.write_bytes(open(eval_files[0], "rb").read())
    assert evaluate.decontamination_warning(str(model), str(copy)) is None


def test_assemble_help_lists_the_new_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["assemble", "--help"])
    out = capsys.readouterr().out
    for flag in ("--decontaminate DECONTAMINATE", "--decontaminate-field", "--decontaminate-ngram",
                 "--near-dup-instruction-threshold"):
        assert flag in out
    assert "(default: 13)" in out and "(default: 0.8)" in out


# ---- hostile evaluation files -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["link-to-dev-zero", "fifo", "folder", "nested", "nested-line", "over-limit"])
def test_an_evaluation_file_that_is_no_regular_file_or_too_deep_is_one_line(tmp_path, kind, monkeypatch):
    """A link to /dev/zero was read until the process was killed for memory, a FIFO hung, a folder
    and 100K nested `[` gave tracebacks."""
    path = tmp_path / "held_out.json"
    if kind == "link-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "nested":
        path.write_text("[" * 100_000)
    elif kind == "nested-line":
        path = tmp_path / "held_out.jsonl"
        path.write_text('{"instruction": ' + "[" * 100_000 + "\n")
    else:
        path.write_text(json.dumps(ALPACA))
        monkeypatch.setattr(decontaminate, "EVAL_SET_LIMIT", 64)
    with pytest.raises((DecontaminationError, OSError)) as e:
        decontaminate.eval_set(str(path), None, 13)
    message = user_error_message(e.value)
    assert message and message.startswith(str(path)) and "\n" not in message, (kind, e.value)
    expected = {"link-to-dev-zero": "a device, not a regular file (--decontaminate); never read",
                "fifo": "a FIFO, not a regular file", "folder": "a folder, not a regular file",
                "nested": "nested too deeply", "nested-line": "nested too deeply",
                "over-limit": "over the 64-byte limit of --decontaminate"}[kind]
    assert expected in message


def test_a_question_of_one_word_is_ignored_with_a_warning_not_matched(tmp_path, caplog):
    """"the" as an evaluation prompt dropped every pair and published an empty release at exit 0."""
    path = tmp_path / "held_out.jsonl"
    path.write_text(json.dumps({"instruction": "the"}) + "\n" + json.dumps({"instruction": ALPACA[0]["instruction"]}))
    [held_out] = decontaminate.read_eval_sets([str(path)], None, 13)
    assert held_out.ignored == ["the"] and held_out.summary()["ignored_examples"] == ["the"]
    texts = pa.array(["Explain the weather to the class.", IN_INSTRUCTION])
    assert [m.row for m in decontaminate.contamination(texts, pa.array(["", ""]), [held_out])] == [1]
    assert any("1 evaluation prompt(s) of fewer than 4 words ignored (e.g. 'the')" in r.getMessage()
               for r in caplog.records)


def test_a_release_that_loses_over_a_fifth_of_its_pairs_to_decontamination_raises_an_alert():
    from beam_pipelines.report import changes

    def stats(contaminated, web):
        return {"funnel": {"web_examples": web, "dropped": {"contaminated:held_out": contaminated,
                                                            "duplicate_instruction": 2, "score_below": 50}}}
    assert changes.alerts(stats(20, 78), {}, 0) == []                         # 20 of 100: at the line
    [alert] = changes.alerts(stats(21, 77), {}, 0)
    assert alert.startswith("decontamination dropped 21 of the 100 pairs the recipe kept (21.0%, over 20%)")
