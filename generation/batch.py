"""A stage's requests as batch files instead of one HTTP request per row: OpenAI's Batch API
(`--batch openai`: the same requests at half the price, answered within 24 h) and vLLM's offline
batch runner (`--batch vllm`: `vllm run-batch -i IN -o OUT --model M` on a GPU box, no server).

Both read and write the same JSONL: an input line is `{"custom_id": <row id>, "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions", "body": <the body the online path sends to that kind of
server>}` (the engine's `Dialect.batch_line`); an output line is `{"id", "custom_id", "response":
{"status_code", "request_id", "body": <the online answer>}, "error": null | {"code", "message"}}`, read
by the same code that reads an online answer (engines/openai/reader.py: `batch_outcome` -> `outcome`),
so a row made from a batch is the row the online path writes for the same answer: same fields, same
final or transient outcome (schemas/outcomes.py). The Batch API's calls, its limits and the reading of
its files are generation/batch_api.py's; here is what a stage does with them.

The runner hands a shard's rows to send (those not reused, as online) to `BatchDispatch.shard`, which
1. collects every batch of the shard that ended (completed, failed, expired, cancelled): its output and
   error files' answers become rows (emitted, so the runner checkpoints them as it does online ones);
   a row missing from both files, or whose line is transient (429, 5xx, no response: the batch
   expired or was cancelled before it ran), is submitted again, up to MAX_ROUNDS batches, after which
   it is written as a transient failure (engine_error) that the next run resends, as online;
2. submits the rows that are neither answered nor in a batch still running, split to the documented
   limits (batch_api.split: MAX_REQUESTS requests and MAX_BYTES bytes per input file);
3. records the shard's batches in its state file (`generations/<stage>/_batches/<shard>.json`: batch
   ids, the rows each holds with their input hashes, the config key), written after the answered
   rows are checkpointed, when an input file is uploaded (before its batch is created: a run killed
   in between finds the batch made from that file in GET /batches, or creates it from the same file)
   and after each submission, so no row is submitted twice while a batch holding it runs, and an
   answer is used only for the prompt it was made for. A create is never retried blind: after a try
   whose fate is unknown (a timeout, a dropped connection, a 5xx: the server may have made the batch,
   or may still be making it) the run only looks for a batch made from that input file in the listing
   and adopts it; one not found stays recorded as submitting (its rows wait, as in a running batch)
   and is looked for by the next invocations, which create it from the same file only CREATE_SETTLE_S
   after the last try. At most one batch per input file.
A shard is written, as online, once every row is answered; until then the stage reports pending
shards, `bft generate` exits 75 (EX_TEMPFAIL, as for external workers) and a later invocation (or
`--wait`, which polls every `--poll-s`) collects them. State of another stage config is dropped
(its batches are left to finish unread).

vLLM's runner: each pending shard's input is written to `_batches/<shard>.input.jsonl` with the command
that runs it; the operator (or a GPU job) writes `<shard>.output.jsonl` beside it, which the next
invocation reads as a completed batch's output file.
"""
from __future__ import annotations

import json
import logging
import shlex
import time
import uuid

import orjson

import storage
from lifecycle import state as stored
from schemas.errors import EX_TEMPFAIL, UserError
from schemas.layout import shard_name
from generation.batch_api import LINE_MARGIN, BatchAPI, BatchError, read_jsonl, split
from generation.engines.openai.dialect import answer_cap
from generation.engines.openai.reader import batch_outcome

log = logging.getLogger("bft.batch")
MAX_ROUNDS = 3                    # batches a row is submitted in before a transient failure is written
# A create whose fate stayed unknown (timeouts, 5xx) is looked for in the listing on later invocations;
# one still not listed this long after its last try is taken as never made, and created again.
CREATE_SETTLE_S = 600.0
ENDED = {"completed", "failed", "expired", "cancelled"}
# a shard's state file, as read back (lifecycle.state: a damaged one is set aside and the shard starts anew)
STATE = {"config": str, "rounds": stored.MapOf(int),
         "batches": [{"id": stored.Maybe(str), "status": stored.Maybe(str), "input_file_id": stored.Maybe(str),
                      "endpoint": stored.Maybe(str), "rows": stored.MapOf(str)}]}


class BatchesPending(UserError):
    """Some shards wait for their batches: the stage is not done yet (exit 75, EX_TEMPFAIL)."""

    exit_status = EX_TEMPFAIL

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def state_path(layout, stage: str, k: int, n: int) -> str:
    """The state file of shard k's batches (module docstring)."""
    return storage.join(layout.generation_batches(stage), shard_name(stage, k, n, "json"))


def submitted(layout, stage: str, shards: list[tuple[int, int]], config_key: str) -> dict[int, list[dict]]:
    """{k: the batches shard k's state file records for `config_key`} for the shards that have any:
    requests sent and perhaps paid for, whose answers only `--batch` collects. An unreadable state
    file counts as none here (the batch path names it)."""
    out = {}
    for k, n in shards:
        path = state_path(layout, stage, k, n)
        if not storage.exists(path):
            continue
        try:
            state = json.loads(storage.read_text(path))
        except ValueError:
            continue
        batches = state.get("batches") if isinstance(state, dict) and state.get("config") == config_key else None
        if isinstance(batches, list) and batches:
            out[k] = [b for b in batches if isinstance(b, dict)]
    return out


class BatchDispatch:
    """A stage's shards through batch files (module docstring). `mode`: "openai" (the Batch API at the
    engine's --base-url) or "vllm" (files for `vllm run-batch`)."""

    def __init__(self, engine, layout, stage: str, config_key: str, mode: str, model: str):
        self.engine, self.layout, self.stage, self.key, self.mode, self.model = \
            engine, layout, stage, config_key, mode, model
        self.api = BatchAPI(engine.endpoint) if mode == "openai" else None
        self.submitted = 0          # requests submitted by this invocation
        self.commands: list[str] = []   # vllm: what runs each pending input file

    def close(self) -> None:
        if self.api is not None:
            self.api.close()

    # ---- the shard's state file --------------------------------------------------------------------
    def folder(self) -> str:
        return self.layout.generation_batches(self.stage)

    def state_path(self, k: int, n: int) -> str:
        return state_path(self.layout, self.stage, k, n)

    def load(self, k: int, n: int) -> dict:
        path = self.state_path(k, n)
        state = stored.read_json(self.layout, path, STATE)
        if state is None or state.get("config") != self.key:
            if state and state.get("batches"):
                log.warning("%s: batches of another stage config are left unread: %s", path,
                            [b["id"] for b in state["batches"]])
            state = {"config": self.key, "batches": [], "rounds": {}}
        return state

    def save(self, k: int, n: int, state: dict) -> None:
        storage.write_text(self.state_path(k, n), json.dumps(state, indent=1) + "\n")

    def clear(self, k: int, n: int) -> None:
        for path in (self.state_path(k, n), self._vllm_path(k, n, "input"), self._vllm_path(k, n, "output")):
            if storage.exists(path):
                storage.delete(path)

    # ---- one shard ---------------------------------------------------------------------------------
    def shard(self, k: int, n: int, items, emit, flush) -> int:
        """Collects the shard's ended batches (answers -> `emit(key, completion)`, then `flush()` so
        they are checkpointed before the state forgets the batch), submits what is left; returns the
        number of rows still in a running batch (0: every row was emitted)."""
        from generation.engines.base import failed

        items = list(items)
        todo = {key[0]["id"]: (key, req) for key, req in items}
        state = self.load(k, n)
        unsure = [b for b in state["batches"] if b.get("id") is None]
        for batch in unsure:
            self._created(batch, k, n)
        if unsure:
            self.save(k, n, state)
        running: set[str] = set()
        kept = []
        for batch in state["batches"]:
            info = self._status(batch, k, n) if batch.get("id") is not None else {"status": "submitting"}
            if info["status"] not in ENDED:   # running, or a create whose fate is still unknown
                batch["status"] = info["status"]
                running.update(i for i, h in batch["rows"].items() if i in todo and todo[i][0][0]["input_hash"] == h)
                kept.append(batch)
                continue
            cap = max((answer_cap(req) for _, req in todo.values()), default=0) + LINE_MARGIN
            lines = {**self._lines(info.get("error_file_id"), batch, k, n, "error", cap),
                     **self._lines(info.get("output_file_id"), batch, k, n, "output", cap)}
            why = f"batch {batch['id']} {info['status']}" + _errors(info)
            for row_id, hashed in batch["rows"].items():
                if row_id not in todo or todo[row_id][0][0]["input_hash"] != hashed:
                    continue   # no longer to be sent, or sent for another prompt
                key, req = todo[row_id]
                comp = batch_outcome(lines.get(row_id), req, self.engine.dialect.api)
                if comp is None:
                    rounds = state["rounds"].get(row_id, 0) + 1
                    state["rounds"][row_id] = rounds
                    if rounds < MAX_ROUNDS:
                        continue        # submitted again below
                    line = lines.get(row_id)
                    comp = failed(f"no answer after {rounds} batches; last: {why}"
                                  + (f", {json.dumps(line)[:300]}" if line else ", the row was missing from its output"))
                emit(key, comp)
                del todo[row_id]
                state["rounds"].pop(row_id, None)
            log.info("%s: collected %s (%s)", self.state_path(k, n), batch["id"], info["status"])
        flush()
        ended = len(state["batches"]) > len(kept)
        state["batches"] = kept
        self.save(k, n, state)
        if ended and self.mode == "vllm":   # read and checkpointed: a new round writes new files
            for kind in ("input", "output"):
                if storage.exists(self._vllm_path(k, n, kind)):
                    storage.delete(self._vllm_path(k, n, kind))
        send = [(row_id, key, req) for row_id, (key, req) in todo.items() if row_id not in running]
        if send:
            self._submit(k, n, state, send)
        return len(todo)

    def _metadata(self, k: int, n: int) -> dict:
        return {"bft_stage": self.stage, "bft_shard": f"{k}-of-{n}", "bft_config": self.key}

    def _created(self, batch: dict, k: int, n: int) -> None:
        """A batch recorded as submitting (the run stopped between uploading its input file and
        creating it, or before it saved the id, or its create's fate stayed unknown): the batch made
        from that file if the listing has one; else it is created now, from the same file, unless a
        create of it was tried less than CREATE_SETTLE_S ago (the server may still be making it)."""
        info = self.api.find(batch["input_file_id"])
        if info is None and time.time() - batch.get("create_tried", 0) < CREATE_SETTLE_S:
            return
        self._create(batch, k, n, info)

    def _create(self, batch: dict, k: int, n: int, info: dict | None = None) -> None:
        """Creates the batch of a recorded input file (unless `info` is it already); one whose create's
        fate stays unknown keeps no id and the time of the try (`_created` looks for it later)."""
        if info is None:
            batch["create_tried"] = time.time()
            info = self.api.create(batch["input_file_id"], batch["endpoint"], self._metadata(k, n))
        if info is None:
            log.warning("%s: the create of a batch from %s may or may not have been made; it is looked for "
                        "again on the next invocation, never made twice", self.state_path(k, n),
                        batch["input_file_id"])
            return
        batch.pop("create_tried", None)
        batch.update(id=info["id"], status=info.get("status"))

    def _status(self, batch: dict, k: int, n: int) -> dict:
        if self.mode == "openai":
            return self.api.get(batch["id"])
        done = storage.exists(self._vllm_path(k, n, "output"))
        return {"status": "completed" if done else "in_progress"}

    def _lines(self, file_id: str | None, batch: dict, k: int, n: int, kind: str, cap: int) -> dict[str, dict]:
        if self.mode == "openai":
            if not file_id:
                return {}
            try:
                return read_jsonl(self.api.content(file_id), cap)
            except BatchError as e:
                if e.status != 404:
                    raise
                # deleted (by hand, or past the provider's retention): its rows count as missing and are
                # submitted again, and the other shards go on
                log.warning("%s: the %s file %s of batch %s is gone (HTTP 404); its rows are submitted again",
                            self.state_path(k, n), kind, file_id, batch["id"])
                return {}
        if kind == "error":
            return {}
        with storage.open_read(self._vllm_path(k, n, "output")) as f:
            return read_jsonl(iter(lambda: f.read(1 << 20), b""), cap)

    def _submit(self, k: int, n: int, state: dict, send: list) -> None:
        lines = [orjson.dumps(self.engine.dialect.batch_line(row_id, req)) + b"\n" for row_id, _, req in send]
        hashes = [key[0]["input_hash"] for _, key, _ in send]
        endpoint = json.loads(lines[0])["url"]
        if self.mode == "vllm":
            path = self._vllm_path(k, n, "input")
            storage.write_bytes(path, b"".join(lines))
            out = self._vllm_path(k, n, "output")
            command = (f"vllm run-batch -i {shlex.quote(path)} -o {shlex.quote(out)} --model {shlex.quote(self.model)}")
            state["batches"] = [{"id": f"vllm-run-batch-{uuid.uuid4().hex[:12]}", "status": "in_progress",
                                 "rows": {row_id: h for (row_id, _, _), h in zip(send, hashes)},
                                 "command": command}]
            self.save(k, n, state)
            self.commands.append(command)
            self.submitted += len(send)
            return
        start = 0
        for part in split(lines):
            ids = send[start:start + len(part)]
            name = f"{shard_name(self.stage, k, n, 'jsonl')}"
            file_id = self.api.upload(b"".join(part), name)
            # recorded before the batch is created: a run killed between the two finds the batch by its
            # input file (`_created`) instead of submitting the rows again
            entry = {"id": None, "status": "submitting", "input_file_id": file_id, "endpoint": endpoint,
                     "rows": {row_id: h for (row_id, _, _), h in zip(ids, hashes[start:start + len(part)])}}
            state["batches"].append(entry)
            self.save(k, n, state)
            self._create(entry, k, n)
            self.save(k, n, state)   # at once: a kill after this never submits these rows again
            start += len(part)
            self.submitted += len(part)

    def _vllm_path(self, k: int, n: int, kind: str) -> str:
        return storage.join(self.folder(), shard_name(self.stage, k, n, f"{kind}.jsonl"))


def _errors(info: dict) -> str:
    data = (info.get("errors") or {}).get("data") if isinstance(info.get("errors"), dict) else None
    return f" ({'; '.join(str(e.get('message'))[:120] for e in data[:3])})" if data else ""
