"""`bft eval`: answer an AlpacaEval-format question set, and judge two answer sets pairwise.

    bft eval generate --model DIR --questions FILE --output FILE [--engine hf|vllm|openai]
    bft eval judge --a FILE --b FILE --judge-model M --engine hf|vllm|openai [--output FILE]

generate: T=0.7, top_p=0.9 (Nguyen et al. 2024, App. A.4). The data-source tag is the system turn, exactly
where `bft train` puts it (training/data.py: the release's `messages` carry it as a system message):
`--tag assistant` is "Answer in the style of an AI Assistant." (the seed tag: Li et al. 2023, Nguyen et al.
2024 App. A.3),
`--tag web` its web variant, `--tag none` no system turn. Writes [{instruction, output, generator,
dataset}], which the `alpaca_eval` CLI takes as --model_outputs. When the model was trained on a
release (its bft_train.json names it) whose manifest does not list the questions file among the files
`bft assemble --decontaminate` used (compared by sha256), it warns: the questions may be in the
training data (`decontamination_warning`).

judge: every item is judged twice, A/B then B/A, with MT-Bench's pairwise prompt (greedy), to cancel
position bias, and aggregated as MT-Bench does (FastChat llm_judge: `show_result.py`
display_result_pairwise): a model wins an item only when both orders name it; a tie in either order
or two verdicts that disagree (inconsistent) is a tie. An item with a judgment that has no verdict
(no [[A]]/[[B]]/[[C]], e.g. cut off by the new-token cap) is neither: it is counted apart as
`no_verdict` and left out of the win rate, as FastChat leaves out its "error" judgments; a judgment
the engine failed (an error row) is counted apart too (`items_failed`). Both answers are cut at their
ends (the longer first) to fit the judge's context less the new-token cap (`fit_judgment`), so long
answers are judged rather than lost to over-long prompts (`items_with_answers_cut`).
Win rate = (wins + ties / 2) / judged items, with the standard error of that mean; `win_rate_all_items`
counts every item, those without a verdict as ties. The judge gets
2048 new tokens by default (FastChat's GPT-4 judge setting); judgments cut by the cap
(finish_reason "length") are counted. The verdicts are also written in alpaca_eval's annotation
format (output_1 = b, the reference; output_2 = a; preference 2 = a wins, 1 = b wins, 1.5 = tie,
null = no verdict), so alpaca_eval's own analysis tools read them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass

import storage
from schemas.errors import UserError
from lifecycle.release import MANIFEST, sha256_of
from schemas.layout import RunLayout
from schemas.options import option, required
from schemas.keys import row_seed
from generation.engines import Request, load_engine
from generation.engines.base import ENGINES, EngineOptions
from generation.prompting import n_tokens, prompt_bound, render
from generation.templates import DEFAULTS, EVAL_TAG, EVAL_TAG_WEB, messages

log = logging.getLogger("bft.eval")

TAGS = {"assistant": EVAL_TAG, "web": EVAL_TAG_WEB, "none": None}
TRAIN_RECORD = "bft_train.json"                      # what bft train writes into a model folder
_RELEASE_SOURCE = re.compile(r"^release (\S+) \((.+)\)$")  # its `data` when it trained on a release
JUDGE_MAX_NEW_TOKENS = 2048
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


class EvalError(UserError):
    pass


@dataclass(frozen=True, kw_only=True)
class EvalOptions(EngineOptions):
    """How `bft eval` runs its model: the engines of bft generate, with their options (EngineOptions)."""

    engine: str = option("hf", "the generation engine", choices=list(ENGINES))
    max_new_tokens: int | None = option(None, "new-token cap (default: 1024 for answers, 2048 for judgments)")

    def load_engine(self, model: str):
        return load_engine(self.for_engine(self.engine, model))


@dataclass(frozen=True, kw_only=True)
class EvalGenerateConfig(EvalOptions):
    """The options of `bft eval generate`."""

    model: str = required("model folder (or served name) that answers")
    questions: str = required("JSON list of {instruction, ...} (AlpacaEval format)")
    root: str | None = option(None, "run root: --output defaults to ROOT/eval/GENERATOR.json")
    output: str | None = option(None, "JSON file of answers")
    generator: str | None = option(None, "name in the output (default: the model folder's name)")
    tag: str = option("assistant", "data-source tag, sent as the system turn as in training (Li et al. 2023; "
                                   "Nguyen et al. 2024 App. A.3)",
                      choices=sorted(TAGS))
    seed: int = option(0, "seed of the sampling seeds")

    def __post_init__(self) -> None:
        # the defaults that other options decide, set as the config is built (it is frozen)
        generator = self.generator or os.path.basename(self.model.rstrip("/"))
        object.__setattr__(self, "generator", generator)
        if self.output is None and self.root is not None:
            object.__setattr__(self, "output", RunLayout(self.root).eval_file(generator))

    def check(self) -> None:
        if self.output is None:
            raise EvalError("give --root or --output")


@dataclass(frozen=True, kw_only=True)
class EvalJudgeConfig(EvalOptions):
    """The options of `bft eval judge`."""

    a: str = required("answers of model a (bft eval generate output)")
    b: str = required("answers of model b")
    judge_model: str = required("the judge (model folder or served name)")
    root: str | None = option(None, "run root: --output defaults to ROOT/eval/judge.json")
    output: str | None = option(None, "JSON file: summary and per-item verdicts (alpaca_eval annotations beside "
                                "it: NAME.annotations.json)")

    def __post_init__(self) -> None:
        if self.output is None and self.root is not None:   # a default set as the config is built (frozen)
            object.__setattr__(self, "output", RunLayout(self.root).eval_file("judge"))


def read_answers(path: str, what: str) -> list[dict]:
    try:
        items = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not JSON ({e})") from e
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("instruction"), str)
                                              for i in items):
        raise EvalError(f"{path}: expected a JSON list of objects with an 'instruction' ({what})")
    return items


def generate(engine, questions: list[dict], generator: str, tag: str | None = EVAL_TAG, max_new_tokens: int = 1024,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> list[dict]:
    """Answers to `questions`; `tag` is the system turn (None: no system turn), as in training."""
    requests = []
    for q in questions:
        user = q["instruction"]
        requests.append(Request(render(engine.tokenizer, tag, user), messages(tag, user), max_new_tokens,
                                temperature, top_p, row_seed(q["instruction"], "eval", seed)))
    outputs = engine.generate(requests)
    return [{"instruction": q["instruction"], "output": o.text.strip() if o.finish_reason != "error" else "",
             "generator": generator, "dataset": q.get("dataset", "bft"), "finish_reason": o.finish_reason}
            for q, o in zip(questions, outputs)]


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (tie) from the judge's last [[X]]; None when it gave none."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


NO_VERDICT = "no_verdict"


def outcome(first: str | None, second: str | None) -> str:
    """The item's verdict for model a, from (a shown as A) and (a shown as B) judgments, as MT-Bench
    aggregates them: the same winner in both orders wins; a tie or disagreement is a tie; a missing
    verdict in either order makes the item `no_verdict`."""
    if first is None or second is None:
        return NO_VERDICT
    g1 = {"A": "a", "B": "b"}.get(first, "tie")
    g2 = {"B": "a", "A": "b"}.get(second, "tie")
    if g1 == "tie" or g1 != g2:
        return "tie"
    return "win" if g1 == "a" else "loss"


def summarize(verdicts: list[str]) -> dict:
    """Counts and the win rate of model a over the items with a verdict (no_verdict items apart)."""
    judged = [v for v in verdicts if v != NO_VERDICT]
    n = len(judged)
    wins, ties, losses = (judged.count(v) for v in ("win", "tie", "loss"))
    scores = [1.0 if v == "win" else 0.5 if v == "tie" else 0.0 for v in judged]
    rate = sum(scores) / n if n else float("nan")
    var = sum((s - rate) ** 2 for s in scores) / (n - 1) if n > 1 else float("nan")
    return {"items": len(verdicts), "judged": n, "win": wins, "tie": ties, "loss": losses,
            NO_VERDICT: len(verdicts) - n, "win_rate": rate,
            "standard_error": math.sqrt(var / n) if n > 1 else float("nan")}


ALPACA_PREFERENCE = {"win": 2.0, "loss": 1.0, "tie": 1.5, NO_VERDICT: None}


def alpaca_eval_annotations(pairs: list[tuple[dict, dict]], items: list[dict], judge_model: str) -> list[dict]:
    """The verdicts in alpaca_eval's annotation format: output_1/generator_1 the reference (b),
    output_2/generator_2 the model evaluated (a); preference 1 = reference wins, 2 = a wins, 1.5 =
    draw, None = no verdict (alpaca_eval drops non-preferences from its win rate)."""
    return [{"instruction": a["instruction"], "output_1": b.get("output"), "generator_1": b.get("generator", "b"),
             "output_2": a.get("output"), "generator_2": a.get("generator", "a"), "annotator": judge_model,
             "preference": ALPACA_PREFERENCE[item["verdict"]], "raw_completion": item["judge_outputs"]}
            for (a, b), item in zip(pairs, items)]


def pair_up(a: list[dict], b: list[dict], a_path: str, b_path: str) -> list[tuple[dict, dict]]:
    by_b = {}
    for item in b:
        by_b.setdefault(item["instruction"], item)
    missing = [i["instruction"] for i in a if i["instruction"] not in by_b]
    extra = {i["instruction"] for i in b} - {i["instruction"] for i in a}
    if missing or extra:
        raise EvalError(f"{a_path} and {b_path} answer different questions: {len(missing)} only in a, "
                        f"{len(extra)} only in b (first: {(missing or sorted(extra))[0][:80]!r})")
    return [(i, by_b[i["instruction"]]) for i in a]


def fit_judgment(tokenizer, budget: int | None, instruction: str, first: str, second: str) -> tuple[str, list[dict], bool]:
    """(prompt, messages, cut) of one judgment that fits `budget` tokens (the context less the new-token
    cap; by the byte bound without a tokenizer, as generation.prompting does): when the two answers do
    not fit, the longer is cut first, then both, to equal shares, at their ends. Without a fit an
    over-long judgment would be an engine error and the item would leave the win rate (long answers
    most often: a bias)."""
    template = DEFAULTS["judge"]

    def build(x: str, y: str) -> tuple[str, list[dict]]:
        system, user = template.fill(instruction=instruction, answer_a=x, answer_b=y)
        return render(tokenizer, system, user), messages(system, user)

    prompt, msgs = build(first, second)
    if budget is None:
        return prompt, msgs, False

    def length(text: str) -> int:
        return n_tokens(tokenizer, text) if tokenizer is not None else len(text.encode("utf-8", "surrogatepass"))

    if prompt_bound(tokenizer, prompt, msgs) <= budget:
        return prompt, msgs, False
    room = max(0, budget - prompt_bound(tokenizer, *build("", "")))
    la, lb = length(first), length(second)
    share_a = min(la, max(room // 2, room - lb))      # the shorter keeps what it needs, up to half
    share_b = min(lb, room - share_a)
    for _ in range(4):  # re-tokenization at a cut can shift a token or two
        prompt, msgs = build(_cut_to(tokenizer, first, share_a), _cut_to(tokenizer, second, share_b))
        over = prompt_bound(tokenizer, prompt, msgs) - budget
        if over <= 0:
            break
        if share_a >= share_b:  # the longer share gives up what is still over
            share_a = max(0, share_a - over - 2)
        else:
            share_b = max(0, share_b - over - 2)
    return prompt, msgs, True


def _cut_to(tokenizer, text: str, keep: int) -> str:
    if tokenizer is None:
        return text.encode("utf-8", "surrogatepass")[:keep].decode("utf-8", "ignore")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= keep else tokenizer.decode(ids[:keep], skip_special_tokens=True)


def judge(engine, pairs: list[tuple[dict, dict]], max_new_tokens: int = JUDGE_MAX_NEW_TOKENS) -> tuple[dict, list[dict]]:
    """Each pair judged in both orders; the summary counts the items whose judgments failed (an engine
    error) apart from those the judge answered without a verdict, and gives the win rate over the
    judged items and over every item (a failed or verdict-less item counted as a tie)."""
    context = getattr(engine, "max_model_len", None)
    budget = context - max_new_tokens if context else None
    requests, cut = [], []
    for a, b in pairs:
        for first, second in ((a, b), (b, a)):
            prompt, msgs, was_cut = fit_judgment(engine.tokenizer, budget, a["instruction"], first["output"],
                                                 second["output"])
            requests.append(Request(prompt, msgs, max_new_tokens, temperature=0.0, top_p=1.0, seed=0))
            cut.append(was_cut)
    outputs = engine.generate(requests)
    items = []
    for i, (a, b) in enumerate(pairs):
        o1, o2 = outputs[2 * i], outputs[2 * i + 1]
        v1, v2 = parse_verdict(o1.text), parse_verdict(o2.text)
        failed = [o.error or "error" for o in (o1, o2) if o.finish_reason == "error"]
        items.append({"instruction": a["instruction"], "verdict": outcome(v1, v2), "a_first": v1, "b_first": v2,
                      "judge_outputs": [o1.text, o2.text], "finish_reasons": [o1.finish_reason, o2.finish_reason],
                      "answers_cut": cut[2 * i] or cut[2 * i + 1], "judge_errors": failed})
    summary = summarize([it["verdict"] for it in items])
    summary["judgments_without_verdict"] = sum((it["a_first"] is None) + (it["b_first"] is None) for it in items)
    summary["judgments_cut_off"] = sum(r == "length" for it in items for r in it["finish_reasons"])
    summary["items_failed"] = sum(bool(it["judge_errors"]) for it in items)       # engine errors: not judged
    summary["items_with_answers_cut"] = sum(it["answers_cut"] for it in items)
    judged = summary["judged"]
    all_items = summary["items"]
    summary["win_rate_all_items"] = ((summary["win_rate"] * judged + 0.5 * (all_items - judged)) / all_items
                                     if all_items and judged else (0.5 if all_items else float("nan")))
    summary["max_new_tokens"] = max_new_tokens
    return summary, items


def decontamination_warning(model: str, questions: str) -> str | None:
    """Why the release `model` was trained on may hold the questions (its manifest does not list a
    --decontaminate file with the questions file's sha256), or None: when it does, or when the model
    was not trained on a release (a base model, a served name, a file of pairs)."""
    record = os.path.join(os.path.expanduser(model), TRAIN_RECORD)
    if model.startswith("gs://") or not os.path.exists(record):
        return None
    with open(record) as f:
        found = _RELEASE_SOURCE.match(str(json.load(f).get("data") or ""))
    manifest_path = storage.join(found.group(2), MANIFEST) if found else None
    if manifest_path is None or not storage.exists(manifest_path):
        return None
    used = json.loads(storage.read_text(manifest_path)).get("inputs", {}).get("decontaminate") or []
    if sha256_of(questions) in {u.get("sha256") for u in used}:
        return None
    listed = ", ".join(u["path"] for u in used) or "none"
    return (f"{questions} was not used to decontaminate release {found.group(1)}, which {model} was trained on "
            f"(its --decontaminate files: {listed}): the questions may be in the training data; rerun bft "
            f"assemble with --decontaminate {questions}")


def run_generate(cfg: EvalGenerateConfig) -> list[dict]:
    questions = read_answers(cfg.questions, "questions")
    warning = decontamination_warning(cfg.model, cfg.questions)
    if warning:
        log.warning(warning)
    with cfg.load_engine(cfg.model) as engine:
        out = generate(engine, questions, cfg.generator, TAGS[cfg.tag],
                       max_new_tokens=cfg.max_new_tokens or 1024, seed=cfg.seed)
    storage.write_text(cfg.output, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return out


def run_judge(cfg: EvalJudgeConfig) -> dict:
    pairs = pair_up(read_answers(cfg.a, "answers"), read_answers(cfg.b, "answers"), cfg.a, cfg.b)
    with cfg.load_engine(cfg.judge_model) as engine:
        summary, items = judge(engine, pairs, max_new_tokens=cfg.max_new_tokens or JUDGE_MAX_NEW_TOKENS)
    summary.update(a=cfg.a, b=cfg.b, judge_model=cfg.judge_model)
    if cfg.output:
        storage.write_text(cfg.output, json.dumps({"summary": summary, "items": items}, indent=2,
                                                  ensure_ascii=False) + "\n")
        storage.write_text(annotations_path(cfg.output), json.dumps(
            alpaca_eval_annotations(pairs, items, cfg.judge_model), indent=2, ensure_ascii=False) + "\n")
    return summary


def annotations_path(output: str) -> str:
    """judge.json -> judge.annotations.json (alpaca_eval's format), beside the summary."""
    return (output[:-5] if output.endswith(".json") else output) + ".annotations.json"
