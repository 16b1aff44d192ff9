"""What a request looks like to each kind of OpenAI-compatible server: its body per API and server
kind (`Dialect`), the kind itself (`server_kind`), the BOS text, the logprobs asked for, the bytes an
answer may hold (`answer_cap`) and the context length. Pure: no I/O but a local config.json.

- BOS: servers tokenize a completions prompt WITH special tokens (vLLM: `add_special_tokens` defaults
  to true), and the chat template already wrote BOS, so the body says `add_special_tokens: false`
  (vLLM's and SGLang's parameter): the server sees exactly the tokens counted here. Taking the BOS
  text off the prompt instead is not exact: a sentencepiece that prepends "▁" to the first text then
  tokenizes the start differently. A server that refuses the parameter (transformers serve answers 422
  "Unexpected fields") gets, from then on, the prompt without its leading BOS text when the tokenizer
  adds BOS itself: one BOS again, the first token possibly tokenized differently.
- Server kinds (`server`, SERVERS): OpenAI's API answers 400 "Unrecognized request argument supplied"
  to a field it does not know, so each kind is sent only what it accepts. `auto` decides from the URL
  (api.openai.com, Azure OpenAI hosts: openai) and GET /models (vLLM's model cards say `owned_by:
  vllm`; OpenAI's `openai`, `system`, `openai-internal`), else `generic`. vllm: the fields above
  (`add_special_tokens`, `continue_final_message`, `add_generation_prompt`), `max_tokens`, up to 20
  logprobs (vLLM's default --max-logprobs) and its /tokenize. openai: only the documented fields;
  chat takes `max_completion_tokens` (`max_tokens` is deprecated there and refused by reasoning
  models), completions `max_tokens`; completions `logprobs` <= 5, chat `top_logprobs` <= 20; the BOS
  text is taken off a completions prompt. generic (SGLang, TGI, transformers serve, gateways): the
  documented fields with `max_tokens` (what most servers read), 5 completion logprobs, the BOS text
  taken off when the local tokenizer adds it; `--server vllm` sends vLLM's fields to a server that
  takes them.
- Logprob score mode: the prompt ends where the digit token begins (prompting.score_prompt; it needs a
  tokenizer); on the chat API the assistant turn is prefilled (`continue_final_message`, vLLM's
  parameter) and the first generated position that is not whitespace is read, as a server may strip
  the prefill's trailing space. Only the five digits matter, so OpenAI's 5 completion logprobs do:
  the prompt ends where the digit begins, and a digit outside the five most likely tokens has less
  probability than each of them (it counts as 0, as one outside vLLM's 20 does). OpenAI's chat API
  and a generic server have no assistant prefill, so the answer cannot be made to begin at the digit:
  the stage refuses logprob mode there in one line (`logprob_problem`) instead of scoring whatever
  the model writes first.
- Stop strings (a stage's `stop`: rewrite's `[/RES]`) go to vllm and generic servers, online and in
  batch files; the text comes back without them (vLLM's include_stop_str_in_output is false by
  default, OpenAI's API never includes them). OpenAI's own API gets no stop strings: its reasoning
  models answer 400 "Unsupported parameter: 'stop'", which would fail every request and batch line;
  an answer there is paid up to the model's end of turn, as before.
- Context length: --max-model-len, else the server's listing (`max_model_len`, as vLLM returns it),
  else the local model folder's config.json; it is asked of the user only when the server lists the
  model without one.
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass

from generation.engines.base import Request, model_context_length

# /completions `logprobs` each kind of server accepts at most (OpenAI's API reference: 5; vLLM's
# default --max-logprobs: 20); chat `top_logprobs` is at most 20 on both.
COMPLETION_LOGPROBS = {"vllm": 20, "openai": 5, "generic": 5}
CHAT_TOP_LOGPROBS = 20
# Hosts of OpenAI's own API (and Azure OpenAI's, which validates requests the same way).
OPENAI_HOSTS = re.compile(r"(^|\.)(api\.openai\.com|openai\.azure\.com|services\.ai\.azure\.com|"
                          r"cognitiveservices\.azure\.com)$")
OPENAI_OWNERS = {"openai", "system", "openai-internal"}
# An answer's body may hold at most this much (`answer_cap`): its new tokens at BYTES_PER_TOKEN each (a
# token is a few bytes of text; JSON's \u escapes, six bytes a character, logprobs and the fields around
# it fit in the rest) plus BODY_MARGIN for the envelope (id, usage, the prompt's logprobs of a score prefill).
BYTES_PER_TOKEN = 64
BODY_MARGIN = 64 * 1024


def server_kind(option: str, base_url: str, models: list, model: str) -> str:
    """The kind of server (SERVERS) behind `base_url`: the option when it is not auto, else OpenAI's
    hosts by name, else the `owned_by` of the /models listing (our model's card if listed, else any)."""
    if option != "auto":
        return option
    if OPENAI_HOSTS.search(urllib.parse.urlsplit(base_url).hostname or ""):
        return "openai"
    cards = [m for m in models if isinstance(m, dict)]
    owners = {m.get("owned_by") for m in ([m for m in cards if m.get("id") == model] or cards)}
    if "vllm" in owners:
        return "vllm"
    if owners & OPENAI_OWNERS:
        return "openai"
    return "generic"


def answer_cap(r: Request) -> int:
    """The most bytes an answer's body to `r` may hold (BYTES_PER_TOKEN, BODY_MARGIN)."""
    return r.max_new_tokens * BYTES_PER_TOKEN + BODY_MARGIN


@dataclass(frozen=True)
class Dialect:
    """The request bodies of one served model, API and kind of server. `strip_bos`: the BOS text taken
    off a completions prompt; None sends `add_special_tokens: false` instead (vllm), and a server that
    refuses it gets a new Dialect with the text (`added_bos`) from then on."""

    model: str
    api: str                    # completions | chat
    server: str = "generic"     # vllm | openai | generic (SERVERS, decided when the engine loads)
    strip_bos: str | None = None

    def body(self, r: Request) -> tuple[str, dict]:
        """(path, body) of a request, with only the fields this kind of server accepts (module docstring)."""
        vllm = self.server == "vllm"
        cap = "max_completion_tokens" if self.api == "chat" and self.server == "openai" else "max_tokens"
        body: dict = {"model": self.model, cap: r.max_new_tokens,   # what the prompt's budget reserved
                      "temperature": r.temperature, "top_p": r.top_p}
        if r.seed is not None:
            body["seed"] = r.seed
        if r.stop and self.server != "openai":   # OpenAI's reasoning models refuse `stop` (module docstring)
            body["stop"] = r.stop
        if self.api == "chat":
            body["messages"] = r.messages
            if vllm and r.messages and r.messages[-1]["role"] == "assistant":  # a prefill the model continues
                body.update(continue_final_message=True, add_generation_prompt=False)
            if r.digit_probs:
                body.update(logprobs=True, top_logprobs=CHAT_TOP_LOGPROBS, temperature=0.0)
            return "/chat/completions", body
        if vllm and self.strip_bos is None:
            body.update(prompt=r.prompt, add_special_tokens=False)
        else:
            bos = self.strip_bos
            body["prompt"] = r.prompt[len(bos):] if bos and r.prompt.startswith(bos) else r.prompt
        if r.digit_probs:
            body.update(logprobs=COMPLETION_LOGPROBS[self.server], temperature=0.0)
        return "/completions", body

    def batch_line(self, custom_id: str, r: Request) -> dict:
        """A line of a batch input file (OpenAI's Batch API, `vllm run-batch`): the request's body as it
        would be sent online to this kind of server."""
        path, body = self.body(r)
        return {"custom_id": custom_id, "method": "POST", "url": "/v1" + path, "body": body}

    def logprob_problem(self) -> str | None:
        """Why the logprob score mode cannot run on this API and server (module docstring), or None."""
        if self.api == "chat" and self.server != "vllm":
            return (f"the {self.server} server's chat API has no assistant prefill (vLLM's continue_final_message), "
                    "so the answer cannot begin at the score digit after 'Score:'; use --api completions, "
                    "--score-mode generate, or --server vllm for a server that takes vLLM's parameters")
        return None


def bos_to_strip(server: str, tokenizer) -> str | None:
    """The first `Dialect.strip_bos` of a kind of server: None for vllm (told add_special_tokens) and
    without a tokenizer (chat); OpenAI's models add no BOS, so its text is taken off; a generic server
    that tokenizes with special tokens adds it again, so the text it adds is taken off."""
    if tokenizer is None or server == "vllm":
        return None
    if server == "openai":
        return tokenizer.bos_token or ""
    return added_bos(tokenizer)


def added_bos(tokenizer) -> str:
    """The BOS text a server adds again when it tokenizes with special tokens, or ""."""
    if not tokenizer.bos_token:
        return ""
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else ""


def served_context(models: list[dict], model: str) -> int | None:
    """The served `max_model_len` of `model` (vLLM lists it), or None."""
    for m in models:
        if m.get("id") == model and isinstance(m.get("max_model_len"), int):
            return m["max_model_len"]
    return None


def local_context_length(model: str) -> int | None:
    """The context length from a local model folder's config.json; None for a remote model."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return None
    from transformers import PretrainedConfig

    with open(path) as f:
        return model_context_length(PretrainedConfig(**json.load(f)))
