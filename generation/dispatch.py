"""How a stage's requests go out and its answers come back as rows, mixed into StageRunner (whose
engine, job, layout and counters it uses).

Requests are dispatched as a stream (Engine.stream): prompts are prepared in batches (one batched
tokenizer call per PREPARE_CHUNK rows) while answers come back. On a `continuous` engine (openai,
vllm: a freed slot takes the next request at once, and an answer depends on its request alone) the
worker's pending shards share ONE stream, their requests in shard order, so the slots that shard k's
tail frees take shard k+1's rows instead of draining at the boundary; each shard (a PendingShard) is
written whole when its last request is answered, whatever the order of the answers, its rows in
candidates order. Other engines (hf: a batch's seed shapes its rows) get one stream per shard, so that
a shard's rows never depend on the shards pending beside it. With --batch, a shard's requests go
through batch files instead (generation/batch.py). Where the machine has cores to spare and the
stage is not small, the prompts are prepared in worker processes (generation/preparing.py): the same
prompts, in the same order.
"""
from __future__ import annotations

import logging
import threading

import pyarrow as pa

import storage
from generation import parsing
from generation.batch import BatchDispatch
from generation.engines import Completion, Request
from generation.job import GenerationError
from generation.progress import StageProgress
from generation.prompting import fit_prompts, n_tokens
from generation.shard import PendingShard
from schemas.keys import row_seed
from schemas.outcomes import REFUSALS, category, engine_error, is_engine_error, refused

log = logging.getLogger("bft.generate")

PREPARE_CHUNK = 64      # rows whose prompts are built and counted in one batched tokenizer call
# A gs:// root's lock is asked (one metadata read) at most this often between requests; each write asks it
# anyway (storage's fencing), and a lock known lost stops the next request and the next answer's take.
FENCE_CHECK_S = 1.0


class ShardDispatch:
    """StageRunner's requests and answers: `_requests` prepares them, `stream_shards` and `batch_shard`
    send them, `_take` turns each answer into its shard's row (`_row`) and counts what was paid."""

    def _requests(self, todo: list[tuple[dict, dict]]):
        """((row, truncated, request), request) for each (row, template values), prepared PREPARE_CHUNK
        at a time (prompting.fit_prompts: one batched tokenizer call), lazily: the engine draws from it;
        in the run's PreparePool when it has one (generation/preparing.py: the same prompts, in order)."""
        eng, job = self.engine, self.job
        budget = eng.max_model_len - job.max_new_tokens
        chunks = [todo[start:start + PREPARE_CHUNK] for start in range(0, len(todo), PREPARE_CHUNK)]
        values = ([v for _, v in chunk] for chunk in chunks)
        if self._pool is not None:
            fitted_chunks = self._pool.fit(job.template, values, self.spec.doc_field, budget,
                                           job.logprob_prefix or "")
        else:
            fitted_chunks = (fit_prompts(eng.tokenizer, job.template, v, self.spec.doc_field, budget,
                                         job.logprob_prefix or "", count=getattr(eng, "count_messages", None))
                             for v in values)
        for chunk, fitted in zip(chunks, fitted_chunks):
            for (row, _), (prompt, msgs, truncated, count) in zip(chunk, fitted):
                storage.check_fences(self.layout.root, FENCE_CHECK_S)   # a holder that lost the root's lock stops
                req = Request(prompt, msgs, job.max_new_tokens, job.temperature, job.top_p,
                              row_seed(row["id"], self.cfg.stage, self.cfg.seed), stop=list(job.stop),
                              digit_probs=job.logprob_prefix is not None, prompt_tokens=count)
                yield (row, truncated, req), req


    def stream_shards(self, work: list[tuple], progress: StageProgress, done) -> None:
        """Writes the shards of `work` (open_shard's arguments each) through ONE Engine.stream: their
        requests in shard order, a shard opened (its inputs read) only when the stream draws its first
        request, and written (data, marker; `done(k, metrics)`; a pilot's: `done(k, rows)`, PilotShard)
        as soon as its last request is answered, while the next shards' requests keep the engine busy. A shard with
        nothing to send is written when the stream reaches it. The openai engine draws requests on a
        thread of its own and answers on its event loop's, hence the lock around what they share."""
        lock = threading.Lock()
        opened: list[PendingShard] = []

        def finish(shard: PendingShard) -> None:   # with the lock held
            opened.remove(shard)   # a write that fails does not flush its buffered rows (a kill would not)
            done(shard.k, shard.write())

        def items():
            for w in work:
                shard, todo = self.open_shard(*w)
                with lock:
                    progress.skip(shard.rows - len(todo))
                    opened.append(shard)
                    if not todo:
                        finish(shard)
                for (row, truncated, req), request in self._requests(todo):
                    yield (shard, row, truncated, req), request

        def emit(key, comp: Completion) -> None:
            shard, row, truncated, req = key
            with lock:
                if self._take(shard, row, truncated, req, comp, progress):
                    finish(shard)

        try:
            self.engine.stream(items(), emit, self.cfg.chunk_rows)
        except BaseException:
            for shard in opened:
                shard.ckpt.flush()  # an interrupt or an engine that broke keeps what was answered
            raise
        if opened:  # an engine that answered too few requests: never a short shard
            raise GenerationError(f"{opened[0].out}: the engine answered {len(opened[0].answered)} of its "
                                  f"{opened[0].sent} requests; not written")

    def batch_shard(self, k: int, n: int, inputs: dict[str, str], made: dict, out: str, previous: pa.Table | None,
                    progress: StageProgress, batches: BatchDispatch) -> dict | None:
        """--batch: shard k's rows to send go through batch files (generation/batch.py): the answers of
        ended batches are taken (and checkpointed) and the rest submitted; the shard is written (its
        metrics returned) once every row is answered, None while some rows still wait in a batch."""
        shard, todo = self.open_shard(k, n, inputs, made, out, previous)
        progress.skip(shard.rows - len(todo))

        def emit(key, comp: Completion) -> None:
            self._take(shard, *key, comp, progress)

        try:
            if batches.shard(k, n, self._requests(todo), emit, shard.ckpt.flush):
                shard.ckpt.flush()
                return None
        except BaseException:
            shard.ckpt.flush()
            raise
        if len(shard.answered) != shard.sent:
            raise GenerationError(f"{out}: the batches answered {len(shard.answered)} of {shard.sent} requests; "
                                  "not written")
        metrics = shard.write()
        batches.clear(k, n)
        return metrics

    def _take(self, shard: "PendingShard", row: dict, truncated: bool, req: Request, comp: Completion,
              progress: StageProgress) -> bool:
        """`comp` as the shard's row, counted and checkpointed; True when it was the shard's last answer."""
        answered = self._row(row, req, comp, truncated, None)
        error, kind = is_engine_error(answered["parse_error"]), category(answered["parse_error"])
        progress.answer(comp.output_tokens or 0, error, kind in REFUSALS)
        self.paid["requests_sent"] += 1
        self.paid["transient_errors"] += error
        if kind in REFUSALS:
            self.paid["refusals"][kind] = self.paid["refusals"].get(kind, 0) + 1
        if self.on_paid is not None:
            self.on_paid(self.paid)
        # on the event loop's thread: no read of a gs:// lock here (FENCE_CHECK_S paces those), only
        # whether it is known lost, which stops the stream (every request in flight is cancelled)
        storage.check_fences(self.layout.root, float("inf"))
        return shard.answer(answered, comp.output_tokens or 0)

    def _row(self, row: dict, req: Request | None, comp: Completion | None, truncated: bool, reason: str | None) -> dict:
        base = {"id": row["id"], "stage": self.cfg.stage, "model": self.cfg.model, "prompt_tokens": None,
                "output_tokens": None, "finish_reason": None, "raw_output": None, "instruction": None,
                "score": None, "reasoning": None, "response": None, "parse_error": reason,
                "input_truncated": truncated, "seed": req.seed if req else None, "input_hash": row["input_hash"],
                **self.spec.carried(row)}
        if comp is None:
            return base
        if comp.served_model and comp.served_model != self.cfg.model and comp.served_model not in self._served:
            log.warning("the server says %r answered, not %r (--model)", comp.served_model, self.cfg.model)
        if comp.served_model:
            self._served.add(comp.served_model)
        prompt_tokens = comp.prompt_tokens if comp.prompt_tokens is not None else req.prompt_tokens
        base.update(prompt_tokens=prompt_tokens if prompt_tokens is not None else n_tokens(self.engine.tokenizer,
                                                                                             req.prompt),
                    output_tokens=comp.output_tokens, finish_reason=comp.finish_reason, raw_output=comp.text)
        if comp.finish_reason == "error":
            if comp.refusal:
                base["finish_reason"] = comp.refusal
                base["parse_error"] = refused(comp.refusal, comp.error or comp.refusal)
            else:
                base["parse_error"] = engine_error(comp.error)
            return base
        if self.job.logprob_prefix:
            fields, error = parsing.score_from_probs(comp.digit_probs or {})
        else:
            fields, error = self.spec.format_output(comp.text, row, comp.finish_reason, comp.stopped)
        base.update(fields)
        base["parse_error"] = error
        return base


