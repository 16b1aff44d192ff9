"""The method's prompts, verbatim from the papers (each with its source below), and how they are rendered.

A template is a (system, user) pair with markers `<response>`, `<instruction>`, `<input>` (and
`<answer_a>`, `<answer_b>` for the judge). Any
template can be replaced by a file (`--template FILE`: the user text; a first line `SYSTEM: ...`
sets the system text). Rendering: a model with its own chat template gets the user text (and system)
as chat messages through that template; otherwise the Llama-2 format (meta-llama/llama
generation.py): `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from schemas.examples import SEED_TAG, WEB_TAG  # noqa: F401 (section 6 below)

# 1. Backtranslation (backward model), Nguyen et al. 2024 App. A.2 / Li et al. 2023a. T=1.0, top_p=0.9
BACKTRANSLATE = (
    "Below is a candidate answer to a question or instruction from an user. Write the most likely question "
    "to which the text below would be a great answer.\n\n<response>\n\nAnswer in the style of an AI Assistant.\n"
)

# 2. Self-curation score (forward model), Li et al. 2023a (Humpback). T=1.0, top_p=0.9
SCORE = (
    "Below is an instruction from an user and a candidate answer. Evaluate whether or not the answer is a good "
    "example of how AI Assistant should respond to the user's instruction. Please assign a score using the "
    "following 5-point scale:\n"
    "1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked "
    "for. For example, some content seems missing, numbered list does not start from the beginning, the opening "
    "sentence repeats user's question. Or the response is from another person's perspective with their personal "
    "experience (e.g. taken from blog posts), or looks like an answer from a forum. Or it contains promotional "
    "text, navigation text, or other irrelevant information.\n"
    "2: It means the answer addresses most of the asks from the user. It does not directly address the user's "
    "question. For example, it only provides a high-level methodology instead of the exact solution to user's "
    "question.\n"
    "3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic asks from "
    "the user. It is complete and self contained with the drawback that the response is not written from an AI "
    "assistant's perspective, but from other people's perspective. The content looks like an excerpt from a blog "
    "post, web page, or web search results. For example, it contains personal experience or opinion, mentions "
    "comments section, or share on social media, etc.\n"
    "4: It means the answer is written from an AI assistant's perspective with a clear focus of addressing the "
    "instruction. It provide a complete, clear, and comprehensive response to user's question or instruction "
    "without missing or irrelevant information. It is well organized, self-contained, and written in a helpful "
    "tone. It has minor room for improvement, e.g. more concise and focused.\n"
    "5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a helpful AI "
    "Assistant, where the response looks like intentionally written to address the user's question or "
    "instruction without any irrelevant sentences. The answer provides high quality content, demonstrating "
    "expert knowledge in the area, is very well written, logical, easy-to-follow, engaging and insightful.\n\n"
    "Please first provide a brief reasoning you used to derive the rating score, and then write \"Score: "
    "<rating>\" in the last line.\n\n<instruction>\n<response>"
)

# 3. Rewriting (aligned chat model), Nguyen et al. 2024 App. A.2. T=1.0, top_p=0.9
REWRITE = (
    "Given the draft response to the provided question below, rewrite the draft to improve it, so it is a high "
    "quality response to the given question.\n\nDraft Response: <response>\n\nQuestion: <instruction>\n\n"
    "Given the above question, rewrite the draft response to be an improvement over the draft response. It "
    "should be as similar as possible, copying text where possible, while making the flow more clear, useful, "
    "relevant and providing a direct answer to the question. It should be written to be impeccably tailored to "
    "the user's question as if written by an AI Assistant, without extraneous information, reflecting expert "
    "knowledge, and demonstrating a high-quality, engaging, and insightful answer. Try not to add new facts that "
    "are not already in the draft response. Return the rewritten response between [RES] and [/RES]."
)

# 4. Distillation baseline, Nguyen et al. 2024 Sec. 5.1: the chat model answers the instruction itself.
DISTILL = "<instruction>"

# 5. AlpaGasus rating, Chen et al. 2023 Fig. 4, dimension "accuracy"; keep >= 4.5. As in the paper's
# Figure 4, the Instruction/Input/Response block is part of the SYSTEM prompt and the user prompt is the
# rating request. (AlpaGasus, Chen et al. 2023, Fig. 4, and its released rating script put the block in the user
# turn, the script as "###Instruction:\n...\n\n### Input:..."; `--template` with a file gives that
# variant.) Sampling, from that script: temperature 0.0, top_p 1.0, 256 new tokens (StageSpec "rate").
RATE_SYSTEM = ("We would like to request your feedback on the performance of AI assistant in response to the "
               "instruction and the given input displayed following.\n\nInstruction: <instruction>\n\n"
               "Input: <input>\n\nResponse: <response>")
RATE = (
    "Please rate according to the accuracy of the response to the instruction and the input. Each assistant "
    "receives a score on a scale of 0 to 5, where a higher score indicates higher level of the accuracy. Please "
    "first output a single line containing the value indicating the scores. In the subsequent line, please "
    "provide a comprehensive explanation of your evaluation, avoiding any potential bias."
)

# 6. Data-source tags for SFT, Li et al. 2023a; Nguyen et al. 2024 App. A.3: SEED_TAG and WEB_TAG, owned
# by the release's contract (schemas/examples.py) and imported above.
# At evaluation the paper adds these to the question; `bft eval generate` sends them as the system turn,
# the place where training puts the data-source tag (training/data.py), so a model sees its tag where
# it learned it.
EVAL_TAG = "Answer in the style of an AI Assistant."
EVAL_TAG_WEB = "Answer in the style of an AI Assistant, with knowledge from web search if needed."

# 7. The Llama-2 chat format as a Hugging Face chat template (meta-llama/llama generation.py): the
# system block merged into the first user turn; each assistant turn ends with </s>. `bft train` gives
# it to a model that has no chat template, so that training and generation render prompts alike.
# `{% generation %}` marks the assistant turn (answer and </s>) for transformers' assistant-token mask,
# which TRL's SFTTrainer(assistant_only_loss=True) trains on; the markers render nothing.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] | trim + ' [/INST]' }}"
    "{% else %}{% generation %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)

# Pairwise judge for `bft eval judge`: MT-Bench "pair-v2" (Zheng et al. 2023, FastChat
# fastchat/llm_judge/data/judge_prompts.jsonl). Verdict: the last [[A]], [[B]] or [[C]] (tie).
JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)
JUDGE = (
    "[User Question]\n<instruction>\n\n[The Start of Assistant A's Answer]\n<answer_a>\n[The End of Assistant A's "
    "Answer]\n\n[The Start of Assistant B's Answer]\n<answer_b>\n[The End of Assistant B's Answer]"
)


@dataclass(frozen=True)
class Template:
    user: str
    system: str | None = None

    def fill(self, **values: str) -> tuple[str | None, str]:
        """(system, user) with the markers replaced, in one pass (a value's own text is never re-scanned)."""
        def sub(text: str) -> str:
            return _MARKER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), text)

        return (sub(self.system) if self.system else None), sub(self.user)


_MARKER = re.compile(r"<(response|instruction|input|answer_a|answer_b)>")

DEFAULTS = {
    "backtranslate": Template(BACKTRANSLATE),
    "score": Template(SCORE),
    "rewrite": Template(REWRITE),
    "distill": Template(DISTILL),
    "rate": Template(RATE, RATE_SYSTEM),
    "judge": Template(JUDGE, JUDGE_SYSTEM),
}


TEMPLATE_LIMIT = 16 << 20   # bytes of a --template file (a prompt template is a few KiB)


def load_template(stage: str, path: str | None = None) -> Template:
    """The stage's default template, or the one in file `path` (first line `SYSTEM: ...` optional): a
    regular file of at most TEMPLATE_LIMIT bytes of UTF-8 (else a UserError of one line)."""
    if not path:
        return DEFAULTS[stage]
    import storage
    from schemas.errors import UserError

    try:
        text = storage.read_input(path, TEMPLATE_LIMIT, "--template").decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(str(e) if isinstance(e, storage.NotAnInput) else f"{path}: cannot read the template ({e})") from e
    if text.startswith("SYSTEM:"):
        first, _, rest = text.partition("\n")
        return Template(rest, first[len("SYSTEM:"):].strip())
    return Template(text)


def llama2_format(system: str | None, user: str) -> str:
    """The Llama-2 chat format for models without a chat template (meta-llama/llama, generation.py)."""
    sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
    return f"[INST] {sys_block}{user.strip()} [/INST]" if not user.endswith("\n") else f"[INST] {sys_block}{user}[/INST]"


def messages(system: str | None, user: str) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user", "content": user}]
