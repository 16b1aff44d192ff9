"""Parsers on literal strings (the failure cases of the papers' prompt formats included) and the templates."""
import pytest

from generation import parsing
from generation.templates import DEFAULTS, Template, llama2_format, load_template


@pytest.mark.parametrize("text, score, error", [
    ("The answer is complete.\nScore: 5", 5.0, None),
    ("reasoning... score:4", 4.0, None),
    ("Score: 2 at first. After thought, Score: 5/5.", 5.0, None),
    ("SCORE : 3.", 3.0, None),
    ("Score: **4**", 4.0, None),
    ("Score: 8", None, "out_of_range"),
    ("Score: 10", None, "out_of_range"),
    ("Score: 91", None, "out_of_range"),
    ("Score: 10502", None, "out_of_range"),
    ("Score: 0", None, "out_of_range"),
    ("Score: 4.5", None, "out_of_range"),
    ("Score: 3/10", None, "out_of_range"),     # another scale: never read as 3
    ("Score: 4-5", None, "ambiguous"),         # a range: never read as 4
    ("Score: 2 – 3", None, "ambiguous"),
    ("Score: 5.0", 5.0, None),
    ("**Score**: 5", 5.0, None),
    ("Reasoning.\n__Score__: 4/5", 4.0, None),
    ("I would rate it highly.", None, "no_match"),
    ("", None, "no_match"),
])
def test_parse_score_takes_the_last_score_and_never_guesses(text, score, error):
    fields, err = parsing.parse_score(text, "stop")
    assert (fields["score"], err) == (score, error)


def test_a_score_missing_from_a_cut_output_is_truncated():
    assert parsing.parse_score("The answer is good because", "length") == (
        {"score": None, "reasoning": "The answer is good because"}, "truncated")
    assert parsing.parse_score("Fine.\nScore: 5", "stop")[0]["reasoning"] == "Fine."


def test_a_non_finite_digit_probability_is_a_parse_failure():
    """A NaN weight or a NaN logprob from a server gives NaN probabilities: never a score."""
    nan = float("nan")
    assert parsing.score_from_probs({"1": nan, "5": 0.5}) == ({"score": None, "reasoning": None},
                                                              "non_finite_probability")
    assert parsing.score_from_probs({"5": float("inf")})[1] == "non_finite_probability"


def test_score_from_probs_gives_expectation_and_argmax():
    fields, err = parsing.score_from_probs({"4": 0.2, "5": 0.6, "1": 0.0})
    assert err is None and fields["score"] == pytest.approx((4 * 0.2 + 5 * 0.6) / 0.8, abs=1e-4)
    assert fields["reasoning"].startswith("argmax=5")
    assert parsing.score_from_probs({}) == ({"score": None, "reasoning": None}, "no_digit_probability")


@pytest.mark.parametrize("text, finish, stopped, response, error", [
    ("Sure! [RES] The improved answer. [/RES]", "stop", False, "The improved answer.", None),
    # one rule: the first complete block is the answer, kept without a parse_error
    ("[RES]first[/RES] and [RES]second[/RES]", "stop", False, "first", None),
    ("[RES] an answer that was cut", "length", False, None, "truncated"),
    ("[RES] an answer without its close", "stop", False, None, "unclosed"),
    ("Here is the rewrite: no tags at all", "stop", False, None, "unparsed"),
    ("[RES]   [/RES]", "stop", False, None, "empty"),
    ("[RES] a [RES] b [/RES]", "stop", False, "b", None),  # the text after the last [RES] before [/RES]
    ("[RES] done [/RES]\nAnd then the model went on until it ran out", "length", False, "done", None),  # whole
    # ended at the stop string [/RES], which the server left out of the text
    ("Sure! [RES] The improved answer. ", "stop", True, "The improved answer.", None),
    ("[RES] a [RES] b", "stop", True, "b", None),
    ("[RES]  ", "stop", True, None, "empty"),
    ("no tags, then the stop string", "stop", True, None, "unparsed"),
    # a server that names no stop reason: its "stop" ended the answer (stop string or end of sequence)
    ("[RES] The improved answer.", "stop", None, "The improved answer.", None),
    ("[RES] The improved answer, cut", "length", None, None, "truncated"),
])
def test_parse_rewrite(text, finish, stopped, response, error):
    assert parsing.parse_rewrite(text, finish, stopped) == ({"response": response}, error)


@pytest.mark.parametrize("text, instruction, error", [
    ("How do I bake bread at home?", "How do I bake bread at home?", None),
    ("Question: What is BPE?", "What is BPE?", None),
    ('"Explain the water cycle."', "Explain the water cycle.", None),
    ("   ", None, "empty"),
    ("Write the most likely question to which the text below would be a great answer.", None, "echo"),
    ("[INST] something", None, "echo"),
])
def test_parse_instruction(text, instruction, error):
    assert parsing.parse_instruction(text, "Some document text that is long enough to compare.", "stop") == (
        {"instruction": instruction}, error)


def test_an_instruction_that_copies_the_document_is_an_echo():
    doc = "The water cycle describes how water evaporates, condenses into clouds and falls as rain again."
    assert parsing.parse_instruction(doc[:80], doc, "stop")[1] == "echo"
    assert parsing.parse_instruction("What is the water cycle", doc, "length") == (
        {"instruction": "What is the water cycle"}, "truncated")


@pytest.mark.parametrize("text, score, error", [
    ("4.5\nAccurate and complete.", 4.5, None),
    ("Score: 5\nGreat.", 5.0, None),
    ("**3**\nok", 3.0, None),
    ("7\nway off", None, "out_of_range"),
    ("The response is accurate.\n5", None, "no_match"),
    ("", None, "empty"),
    ("5/10\nout of ten", None, "out_of_range"),      # another scale than the prompt's 0-5
    ("4/10", None, "out_of_range"),
    ("3/4", None, "out_of_range"),
    ("4.5/5\nfine", 4.5, None),
])
def test_parse_rating_reads_the_first_line(text, score, error):
    assert (parsing.parse_rating(text, "stop")[0]["score"], parsing.parse_rating(text, "stop")[1]) == (score, error)


def test_parse_distill():
    assert parsing.parse_distill(" An answer. ", "stop") == ({"response": "An answer."}, None)
    assert parsing.parse_distill("An answ", "length") == ({"response": "An answ"}, "truncated")
    assert parsing.parse_distill("", "stop") == ({"response": None}, "empty")


def test_templates_are_the_papers_verbatim_in_llama2_form():
    bt = llama2_format(*DEFAULTS["backtranslate"].fill(response="DOC"))
    assert bt == ("[INST] Below is a candidate answer to a question or instruction from an user. Write the most likely "
                  "question to which the text below would be a great answer.\n\nDOC\n\nAnswer in the style of an AI "
                  "Assistant.\n[/INST]")
    rw = llama2_format(*DEFAULTS["rewrite"].fill(response="D", instruction="Q"))
    assert rw.startswith("[INST] Given the draft response") and rw.endswith("between [RES] and [/RES]. [/INST]")
    assert "Draft Response: D\n\nQuestion: Q\n\n" in rw
    # AlpaGasus Figure 4: the Instruction/Input/Response block is in the system prompt, the request in the user's
    system, user = DEFAULTS["rate"].fill(instruction="I", input="", response="R")
    assert system == ("We would like to request your feedback on the performance of AI assistant in response to the "
                      "instruction and the given input displayed following.\n\nInstruction: I\n\nInput: \n\n"
                      "Response: R")
    assert user.startswith("Please rate according to the accuracy")
    assert "Instruction:" not in user and user.endswith("avoiding any potential bias.")
    from generation.stages import STAGES

    assert (STAGES["rate"].temperature, STAGES["rate"].top_p, STAGES["rate"].max_new_tokens) == (0.0, 1.0, 256)
    assert DEFAULTS["score"].fill(instruction="I", response="R")[1].endswith('"Score: <rating>" in the last line.\n\nI\nR')


def test_fill_does_not_rescan_values_and_templates_load_from_files(tmp_path):
    assert Template("<instruction>|<response>").fill(instruction="<response>", response="x")[1] == "<response>|x"
    f = tmp_path / "t.txt"
    f.write_text("SYSTEM: be brief\nQ: <instruction>")
    assert load_template("distill", str(f)) == Template("Q: <instruction>", "be brief")
