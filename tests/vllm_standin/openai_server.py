"""A STAND-IN for vLLM 0.33.0's OpenAI-compatible server (`vllm serve`), for tests: what `transformers
serve` cannot show (BOS handling, logprobs, finish reasons other than stop/length). Not vLLM: an
http.server on loopback over the vLLM stand-in's `LLM` (tests/vllm_standin/vllm). Mirrored from
vllm/entrypoints/openai/ (completion/protocol.py, chat_completion/protocol.py, models/serving.py):

- GET /v1/models lists the served model with its `max_model_len`.
- POST /v1/completions: the prompt is tokenized WITH special tokens unless `add_special_tokens` is
  false (so a prompt that already starts with the BOS text gets a second BOS, as in vLLM);
  `logprobs: N` gives `choices[0].logprobs.{tokens, token_logprobs, top_logprobs: [{token: lp}]}`.
- POST /v1/chat/completions: the model's chat template renders the messages
  (`add_generation_prompt` true by default, `continue_final_message` prefills the last assistant
  message; both at once is a 400), then tokenized WITHOUT special tokens (vLLM's default for chat);
  `logprobs: true, top_logprobs: N` gives `choices[0].logprobs.content[i].{token, logprob, top_logprobs}`.
- `max_tokens` beyond what the context leaves is clamped, not refused: vLLM 0.33.0's server takes
  min(max_tokens, max_model_len - prompt tokens) (vllm/entrypoints/serve/utils/api_utils.py,
  `get_max_tokens`), so our budget is what keeps prompt + max_tokens within the context.
- POST /tokenize (at the root, vllm/entrypoints/serve/tokenize/): chat messages or a prompt ->
  {"count", "max_model_len", "tokens"}, the same template and flags as the generation endpoints.
- A request's omitted sampling fields (repetition_penalty, presence/frequency_penalty, temperature,
  top_p, top_k, min_p) take the model's generation_config.json values, else vLLM's neutral defaults
  (`to_sampling_params`: "user -> server default -> OpenAI default").
- A prompt the engine rejects (max_model_len tokens or more, empty) is a 400 with vLLM's error body
  {"error": {"message", "type": "BadRequestError", "code": 400}}. `usage` counts prompt and output tokens.

Test hooks (not vLLM): `plan`, a list of answers that the next POSTs get instead of a normal one:
{"status": 429, "headers": {...}, "body": ...}, {"raw": b"..."} (a 200 with that body), {"hang": True}
(never answers), {"choice": {...}} (fields merged into a normal choice, e.g. a finish_reason);
`requests` records each POST's path, body and the token ids the engine saw, with its arrival time.
`refuse`: a predicate on a POST's body; where it holds, the answer is a 200 whose choice has empty
text and finish_reason "content_filter", as hosted OpenAI-compatible endpoints (Azure OpenAI, gateways
in front of vLLM) answer a prompt their content filter blocks: the same prompt is refused every time.
`answer`: a function of a POST's body giving the text the model "writes" (finish_reason stop) or None
for the model's own output: scripted answers a random tiny model cannot give. Either way a request's
`stop` strings end the text before the first of them, which is left out (include_stop_str_in_output
false, vLLM's default), and the choice's `stop_reason` names it (null when none ended it).
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.vllm_standin.vllm import LLM, SamplingParams, VLLMValidationError


# CompletionRequest/ChatCompletionRequest._DEFAULT_SAMPLING_PARAMS (vLLM 0.33.0)
DEFAULT_SAMPLING_PARAMS = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                           "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}



def send_json(handler: BaseHTTPRequestHandler, status: int, body, headers: dict | None = None) -> None:
    """An HTTP answer of a stand-in: JSON (or bytes as they are), with its length and extra headers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(data)

class StandinServer:
    def __init__(self, model: str, served_name: str | None = None, max_model_len: int | None = None):
        self.llm = LLM(model, max_model_len=max_model_len)
        self.tok = self.llm.get_tokenizer()
        self.name = served_name or model
        self.plan: list[dict] = []
        self.requests: list[dict] = []
        self.refuse = None
        self.answer = None
        self.tokenize = True            # test hook: False answers /tokenize with 404, as OpenAI's API would
        self.tokenize_calls: list[dict] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._http.shutdown()
        self._http.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body, headers: dict | None = None):
                send_json(self, status, body, headers)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": server.name, "object": "model", "owned_by": "vllm", "root": server.name,
                         "max_model_len": server.llm.llm_engine.model_config.max_model_len}]})
                else:
                    self._send(404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/tokenize":  # at the server's root, not under /v1; no plan step
                    if not server.tokenize:
                        return self._send(404, {"detail": "Not Found"})
                    try:
                        return self._send(200, server.count(body))
                    except (VLLMValidationError, ValueError, KeyError) as e:
                        return self._send(400, {"error": {"message": str(e), "type": "BadRequestError", "code": 400}})
                with server._lock:
                    step = server.plan.pop(0) if server.plan else {}
                    record = {"path": self.path, "body": body, "time": time.monotonic()}
                    server.requests.append(record)
                if step.get("hang"):
                    server._stopped.wait(120)
                    return
                if "status" in step:
                    return self._send(step["status"], step.get("body", {}), step.get("headers"))
                if "raw" in step:
                    return self._send(200, step["raw"])
                scripted = server.answer(body) if server.answer is not None else None
                if scripted is not None:   # the request's stop strings end it as they end the model's output
                    stop = body.get("stop")
                    hits = sorted((scripted.index(x), x) for x in ([stop] if isinstance(stop, str) else stop or [])
                                  if x in scripted)
                    scripted = scripted[: hits[0][0]] if hits else scripted
                    step = {"choice": {"text": scripted, "message": {"role": "assistant", "content": scripted},
                                       "finish_reason": "stop", "stop_reason": hits[0][1] if hits else None}}
                if server.refuse is not None and server.refuse(body):
                    step = {"choice": {"text": "", "message": {"role": "assistant", "content": ""},
                                       "finish_reason": "content_filter"}}
                try:
                    if self.path == "/v1/completions":
                        answer = server.completions(body, record)
                    elif self.path == "/v1/chat/completions":
                        answer = server.chat(body, record)
                    else:
                        return self._send(404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}})
                except (VLLMValidationError, ValueError) as e:
                    return self._send(400, {"error": {"message": str(e), "type": "BadRequestError", "code": 400}})
                answer["choices"][0].update(step.get("choice", {}))
                self._send(200, answer)

        return Handler

    def count(self, body: dict) -> dict:
        """POST /tokenize (serve/tokenize/protocol.py): TokenizeChatRequest (messages; add_generation_prompt
        true unless given, continue_final_message, both true is an error; add_special_tokens false) or
        TokenizeCompletionRequest (prompt; add_special_tokens true) -> {count, max_model_len, tokens}."""
        if "messages" in body:
            if body.get("continue_final_message") and body.get("add_generation_prompt"):
                raise VLLMValidationError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
            text = self.tok.apply_chat_template(body["messages"], tokenize=False,
                                                add_generation_prompt=body.get("add_generation_prompt", True),
                                                continue_final_message=body.get("continue_final_message", False))
            ids = self.tok(text, add_special_tokens=body.get("add_special_tokens", False))["input_ids"]
        else:
            ids = self.tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        self.tokenize_calls.append(body)
        return {"count": len(ids), "max_model_len": self.llm.llm_engine.model_config.max_model_len, "tokens": ids}

    def _run(self, ids: list[int], body: dict, record: dict):
        record["prompt_token_ids"] = ids
        top = body.get("top_logprobs") if isinstance(body.get("logprobs"), bool) else body.get("logprobs")
        # to_sampling_params (completion/protocol.py, chat_completion/protocol.py): "user -> server default
        # -> OpenAI default": an omitted field takes the model's generation_config value, else vLLM's
        defaults = self.llm.diff_sampling_param()
        picked = {name: body[name] if body.get(name) is not None else defaults.get(name, default)
                  for name, default in DEFAULT_SAMPLING_PARAMS.items()}
        sp = SamplingParams(**picked, max_tokens=body.get("max_tokens", 16), seed=body.get("seed"),
                            stop=body.get("stop"), logprobs=top or None)
        with self._lock:
            return self.llm.generate([{"prompt_token_ids": ids}], [sp], use_tqdm=False)[0]

    def _answer(self, obj: str, out, choice: dict) -> dict:
        o = out.outputs[0]
        choice.update(index=0, finish_reason=o.finish_reason, stop_reason=o.stop_reason)
        return {"id": "cmpl-standin", "object": obj, "created": int(time.time()), "model": self.name,
                "choices": [choice], "usage": {"prompt_tokens": len(out.prompt_token_ids),
                                               "completion_tokens": len(o.token_ids),
                                               "total_tokens": len(out.prompt_token_ids) + len(o.token_ids)}}

    def completions(self, body: dict, record: dict) -> dict:
        ids = self.tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        out = self._run(ids, body, record)
        o = out.outputs[0]
        logprobs = None
        if body.get("logprobs"):
            steps = o.logprobs or []
            chosen = [max(s.values(), key=lambda lp: lp.logprob) for s in steps]
            logprobs = {"tokens": [c.decoded_token for c in chosen], "token_logprobs": [c.logprob for c in chosen],
                        "top_logprobs": [{lp.decoded_token: lp.logprob for lp in s.values()} for s in steps],
                        "text_offset": [0] * len(steps)}
        return self._answer("text_completion", out, {"text": o.text, "logprobs": logprobs})

    def chat(self, body: dict, record: dict) -> dict:
        if body.get("continue_final_message") and body.get("add_generation_prompt", True):
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        text = self.tok.apply_chat_template(body["messages"], tokenize=False,
                                            add_generation_prompt=body.get("add_generation_prompt", True),
                                            continue_final_message=body.get("continue_final_message", False))
        ids = self.tok(text, add_special_tokens=body.get("add_special_tokens", False))["input_ids"]
        out = self._run(ids, body, record)
        o = out.outputs[0]
        logprobs = None
        if body.get("logprobs"):
            content = []
            for tid, s in zip(o.token_ids, o.logprobs or []):
                chosen = s.get(tid) or max(s.values(), key=lambda lp: lp.logprob)
                content.append({"token": chosen.decoded_token, "logprob": chosen.logprob,
                                "top_logprobs": [{"token": lp.decoded_token, "logprob": lp.logprob}
                                                 for lp in sorted(s.values(), key=lambda lp: lp.rank)]})
            logprobs = {"content": content}
        return self._answer("chat.completion", out, {"message": {"role": "assistant", "content": o.text},
                                                     "logprobs": logprobs})
