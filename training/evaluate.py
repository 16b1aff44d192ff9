"""`bft eval`: answer an AlpacaEval-format question set, and judge two answer sets pairwise.

    bft eval generate --model DIR --questions FILE --output FILE [--engine hf|vllm|openai]
    bft eval judge --a FILE --b FILE --judge-model M --engine hf|vllm|openai [--output FILE]

generate: T=0.7, top_p=0.9 (PROMPTS.md section 8), the evaluation suffix of section 6 appended to
each question; writes [{instruction, output, generator, dataset}], which the `alpaca_eval` CLI takes
as --model_outputs.

judge: every item is judged twice, A/B then B/A, with MT-Bench's pairwise prompt (greedy), to cancel
position bias. Per item, for model a: win = wins twice, or wins once and ties once; tie = ties twice,
or wins once and loses once; anything else is a loss. A judgment without a verdict counts as a tie
(and is reported). Win rate = (wins + ties / 2) / items, with the standard error of that mean.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import storage
from schemas.errors import UserError
from schemas.layout import RunLayout
from schemas.options import option, required
from schemas.keys import row_seed
from generation.engines import Request, make_engine
from generation.prompting import render
from generation.templates import DEFAULTS, EVAL_SUFFIX, EVAL_SUFFIX_WEB, messages

SUFFIXES = {"assistant": EVAL_SUFFIX, "web": EVAL_SUFFIX_WEB, "none": ""}
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


class EvalError(UserError):
    pass


ENGINES = ["hf", "vllm", "openai"]


@dataclass
class EngineOptions:
    """How `bft eval` runs its model (the engines of bft generate)."""

    engine: str = option("hf", "the generation engine", choices=ENGINES)
    base_url: str | None = option(None, "openai engine: e.g. http://localhost:8000/v1")
    api: str | None = option(None, "openai engine endpoint", choices=["completions", "chat"])
    batch_size: int | None = option(None, "hf engine: prompts per generate call")
    max_model_len: int | None = option(None, "context length (default: the model's)")
    tensor_parallel_size: int | None = option(None, "vllm engine: GPUs per model")
    dtype: str | None = option(None, "weights' dtype", choices=["auto", "bf16", "fp16", "fp32"])
    max_new_tokens: int | None = option(None, "new-token cap (default: 1024 for answers, 512 for judgments)")

    def load_engine(self, model: str):
        opts = {k: getattr(self, k) for k in ("base_url", "api", "batch_size", "max_model_len",
                                              "tensor_parallel_size", "dtype") if getattr(self, k) is not None}
        return make_engine(self.engine, model, **opts)


@dataclass(kw_only=True)
class EvalGenerateConfig(EngineOptions):
    """The options of `bft eval generate`."""

    model: str = required("model folder (or served name) that answers")
    questions: str = required("JSON list of {instruction, ...} (AlpacaEval format)")
    root: str | None = option(None, "run root: --output defaults to ROOT/eval/GENERATOR.json")
    output: str | None = option(None, "JSON file of answers")
    generator: str | None = option(None, "name in the output (default: the model folder's name)")
    suffix: str = option("assistant", "appended to each question: PROMPTS.md section 6", choices=sorted(SUFFIXES))
    seed: int = option(0, "seed of the sampling seeds")

    def check(self) -> None:
        self.generator = self.generator or os.path.basename(self.model.rstrip("/"))
        if self.output is None:
            if self.root is None:
                raise EvalError("give --root or --output")
            self.output = RunLayout(self.root).eval_file(self.generator)


@dataclass(kw_only=True)
class EvalJudgeConfig(EngineOptions):
    """The options of `bft eval judge`."""

    a: str = required("answers of model a (bft eval generate output)")
    b: str = required("answers of model b")
    judge_model: str = required("the judge (model folder or served name)")
    root: str | None = option(None, "run root: --output defaults to ROOT/eval/judge.json")
    output: str | None = option(None, "JSON file: summary and per-item verdicts")

    def check(self) -> None:
        if self.output is None and self.root is not None:
            self.output = RunLayout(self.root).eval_file("judge")


def read_answers(path: str, what: str) -> list[dict]:
    try:
        items = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not JSON ({e})") from e
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("instruction"), str)
                                              for i in items):
        raise EvalError(f"{path}: expected a JSON list of objects with an 'instruction' ({what})")
    return items


def question_text(instruction: str, suffix: str) -> str:
    return f"{instruction.rstrip()}\n\n{suffix}" if suffix else instruction


def generate(engine, questions: list[dict], generator: str, suffix: str = EVAL_SUFFIX, max_new_tokens: int = 1024,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> list[dict]:
    requests = []
    for q in questions:
        user = question_text(q["instruction"], suffix)
        requests.append(Request(render(engine.tokenizer, None, user), messages(None, user), max_new_tokens,
                                temperature, top_p, row_seed(q["instruction"], "eval", seed)))
    outputs = engine.generate(requests)
    return [{"instruction": q["instruction"], "output": o.text.strip() if o.finish_reason != "error" else "",
             "generator": generator, "dataset": q.get("dataset", "bft"), "finish_reason": o.finish_reason}
            for q, o in zip(questions, outputs)]


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (tie) from the judge's last [[X]]; None when it gave none."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


def outcome(first: str | None, second: str | None) -> str:
    """The item's verdict for model a, from (a shown as A) and (a shown as B) judgments."""
    as_a = {"A": "win", "B": "loss"}.get(first, "tie")
    as_b = {"B": "win", "A": "loss"}.get(second, "tie")
    both = sorted([as_a, as_b])
    if both in (["win", "win"], ["tie", "win"]):
        return "win"
    if both in (["tie", "tie"], ["loss", "win"]):
        return "tie"
    return "loss"


def summarize(verdicts: list[str]) -> dict:
    n = len(verdicts)
    wins, ties, losses = (verdicts.count(v) for v in ("win", "tie", "loss"))
    scores = [1.0 if v == "win" else 0.5 if v == "tie" else 0.0 for v in verdicts]
    rate = sum(scores) / n if n else float("nan")
    var = sum((s - rate) ** 2 for s in scores) / (n - 1) if n > 1 else float("nan")
    return {"items": n, "win": wins, "tie": ties, "loss": losses, "win_rate": rate,
            "standard_error": math.sqrt(var / n) if n > 1 else float("nan")}


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


def judge(engine, pairs: list[tuple[dict, dict]], max_new_tokens: int = 512) -> tuple[dict, list[dict]]:
    template = DEFAULTS["judge"]
    requests = []
    for a, b in pairs:
        for first, second in ((a, b), (b, a)):
            system, user = template.fill(instruction=a["instruction"], answer_a=first["output"], answer_b=second["output"])
            requests.append(Request(render(engine.tokenizer, system, user), messages(system, user), max_new_tokens,
                                    temperature=0.0, top_p=1.0, seed=0))
    outputs = engine.generate(requests)
    items = []
    for i, (a, b) in enumerate(pairs):
        o1, o2 = outputs[2 * i], outputs[2 * i + 1]
        v1, v2 = parse_verdict(o1.text), parse_verdict(o2.text)
        items.append({"instruction": a["instruction"], "verdict": outcome(v1, v2), "a_first": v1, "b_first": v2,
                      "judge_outputs": [o1.text, o2.text]})
    summary = summarize([it["verdict"] for it in items])
    summary["judgments_without_verdict"] = sum((it["a_first"] is None) + (it["b_first"] is None) for it in items)
    return summary, items


def run_generate(cfg: EvalGenerateConfig) -> list[dict]:
    questions = read_answers(cfg.questions, "questions")
    with cfg.load_engine(cfg.model) as engine:
        out = generate(engine, questions, cfg.generator, SUFFIXES[cfg.suffix],
                       max_new_tokens=cfg.max_new_tokens or 1024, seed=cfg.seed)
    storage.write_text(cfg.output, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return out


def run_judge(cfg: EvalJudgeConfig) -> dict:
    pairs = pair_up(read_answers(cfg.a, "answers"), read_answers(cfg.b, "answers"), cfg.a, cfg.b)
    with cfg.load_engine(cfg.judge_model) as engine:
        summary, items = judge(engine, pairs, max_new_tokens=cfg.max_new_tokens or 512)
    summary.update(a=cfg.a, b=cfg.b, judge_model=cfg.judge_model)
    if cfg.output:
        storage.write_text(cfg.output, json.dumps({"summary": summary, "items": items}, indent=2,
                                                  ensure_ascii=False) + "\n")
    return summary
