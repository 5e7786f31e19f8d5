"""The engine: one thread owns the model and runs plan -> forward -> sample -> update, step after step.

The asyncio side talks to it through `generate()` (returns a RequestStream to iterate) and `abort()`;
results cross back with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import time
from typing import Any

import torch

from .batch import Batch
from .beam import BeamSearch
from .client import EngineConfig, EngineError, RequestStream
from .decoding import DecodePipeline
from .detokenizer import IncrementalDetokenizer
from .grammar import GrammarCompiler
from .memory import cuda_devices
from .params import InvalidRequest, QueueFullError, SamplingParams
from .prefix import BLOCK, PrefixCache
from .request import Request, RequestOutput, Sequence, SeqOutput, TokenLogprob
from .runner import ModelRunner
from .scheduler import Scheduler
from .speculative import PromptLookup

log = logging.getLogger(__name__)

MAX_VERIFY_TOKENS = 8  # prompt lookup drafts only while rows x (draft + 1) stays within this (speculative.py)
TRIM_SECONDS = 60.0  # how often, while busy, freed memory goes back to the OS (and always when the engine idles)


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere. Tensors of every shape come and go each step; glibc keeps the freed
    memory in its heaps and arenas, and a server under mixed load holds hundreds of MiB it no longer uses."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()

__all__ = ["Engine", "EngineConfig", "EngineError", "QueueFullError", "RequestStream"]


def _device_lost(e: Exception) -> bool:
    """A CUDA error that sticks to the context (illegal memory access, device-side assert): every later kernel
    fails too, so only a restart helps. Out-of-memory is not one of them."""
    if isinstance(e, torch.OutOfMemoryError):
        return False
    text = str(e)
    return isinstance(e, torch.AcceleratorError) or "CUDA error" in text or "device-side assert" in text


class Engine:
    """The EngineClient (client.py) that runs a model."""

    def __init__(self, model: Any, tokenizer: Any, device: Any, config: EngineConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        prefix = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes else None
        self.runner = ModelRunner(model, device, len(tokenizer), config.max_batch_size, config.max_model_len, prefix,
                                  config.onednn_min_tokens)
        self.scheduler = Scheduler(config.max_batch_size, config.max_batch_tokens, config.prefill_chunk,
                                   lookup=prefix.match if prefix is not None else None,
                                   cut_block=BLOCK if _weights_dtype(model) in (torch.bfloat16, torch.float16) else 0)
        self.eos_ids = eos_token_ids(model, tokenizer) | set(config.eos_token_ids)
        self.batch: Batch | None = None
        self._cv = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: set[str] = set()
        self._requests: dict[str, Request] = {}
        self._stopping = False
        self._failing: str | None = None
        self.broken: str | None = None  # why the device can no longer run steps (then /health is 503)
        self.last_step = time.monotonic()  # when the engine last finished a step (or went idle)
        self._trimmed = self.last_step
        self._trim = MALLOC_TRIM is not None and torch.device(device).type == "cpu"
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.devices = cuda_devices(model)
        self.drafted = self.accepted = 0  # speculative decoding: draft tokens proposed, and kept
        self._grammars: GrammarCompiler | str | None = None  # or why it cannot be built
        self._grammars_lock = threading.Lock()

    # -- the asyncio side ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        # the compiler indexes the whole vocabulary once (0.4 s for 49,152 tokens): done now, off the event loop
        threading.Thread(target=self.grammars, name="grammar-compiler", daemon=True).start()

    def grammars(self) -> GrammarCompiler | str:
        with self._grammars_lock:
            if self._grammars is None:
                try:
                    self._grammars = GrammarCompiler(self.tokenizer, self.eos_ids, self.runner.vocab_size)
                except Exception as e:  # a tokenizer llguidance cannot read
                    self._grammars = f"{type(e).__name__}: {e}"
            return self._grammars

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def is_alive(self) -> bool:
        """The thread runs and the device still works (a sticky CUDA error makes every later step fail)."""
        return self._thread.is_alive() and self.broken is None

    def cache_usage(self) -> tuple[int, int, int]:
        """Rows in the running batch, the tokens its KV cache spans (rows x width), and the bytes of every KV
        buffer allocated (running batch and prompts being prefilled). Read from another thread: a snapshot."""
        batch, groups = self.batch, list(self.scheduler.prefilling)
        caches = ([batch.cache] if batch is not None else []) + [g.state.cache for g in groups if g.state is not None]
        allocated = sum(c.nbytes for c in caches)
        return (len(batch), len(batch) * batch.width, allocated) if batch is not None else (0, 0, allocated)

    def prefix_cache_stats(self) -> tuple[int, int, int] | None:
        prefix = self.runner.prefix
        return None if prefix is None else (prefix.queries, prefix.hits, prefix.nbytes)

    def stalled_for(self) -> float:
        """Seconds the engine has had work without finishing a step (0 when idle or moving)."""
        with self._cv:
            busy = bool(self._inbox) or self.scheduler.has_work()
        return time.monotonic() - self.last_step if busy else 0.0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> RequestStream:
        """Queue a request; raises InvalidRequest or QueueFullError at once rather than later."""
        return self.generate_all([(prompt_ids, params, request_id)])[0]

    def generate_all(self, prompts: list[tuple[list[int], SamplingParams, str]]) -> list[RequestStream]:
        """Queue the requests of one API call (one per prompt) together, or none of them: each must fit the
        context, and all of them the batch limits and the waiting room at once, so that a call the server can
        never take is a 400, not a 503 to retry forever."""
        loop = asyncio.get_running_loop()
        streams = [RequestStream(self, rid) for _, _, rid in prompts]
        requests = [Request(rid, list(ids), params, lambda out, q=stream.queue: loop.call_soon_threadsafe(q.put_nowait, out))
                    for (ids, params, rid), stream in zip(prompts, streams, strict=True)]
        self.check_prompt_count(len(requests))
        for request in requests:
            self._check(request)
        if not self.scheduler.fits_alone(*requests):
            rows = sum(r.num_rows for r in requests)
            raise InvalidRequest(
                f"the request needs {rows} rows ({len(requests)} prompts x {requests[0].num_rows}) of up to "
                f"{max(r.reserved_len for r in requests)} tokens, more than this server's batch limits "
                f"(max_batch_size={self.config.max_batch_size}, max_batch_tokens={self.config.max_batch_tokens})",
                "n" if requests[0].num_rows > 1 else "prompt")
        with self._cv:
            if self.num_waiting + len(requests) > self.config.max_waiting:
                raise QueueFullError(f"the server is at capacity ({self.config.max_waiting} requests waiting); retry later")
            self._inbox += requests
            self._cv.notify()
        return streams

    def check_prompt_count(self, count: int) -> None:
        if count > self.config.max_waiting:
            raise InvalidRequest(f"a request may hold at most {self.config.max_waiting} prompts (the server's "
                                 f"max_waiting), not {count}", "prompt")

    def fail_all(self, message: str) -> None:
        """End every request, running or waiting, with an error (the server is shutting down)."""
        with self._cv:
            self._failing = message
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    def _check(self, request: Request) -> None:
        total = request.reserved_len
        if total > self.config.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.config.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(request.prompt_ids)} in the prompt, {request.params.max_tokens} for the "
                f"completion). Please reduce the prompt or max_tokens.",
                "max_tokens",
            )
        if not self.scheduler.fits_alone(request):
            raise InvalidRequest(
                f"the request needs {request.num_rows} row(s) of {total} tokens, more than this server's batch "
                f"limits (max_batch_size={self.config.max_batch_size}, max_batch_tokens={self.config.max_batch_tokens})",
                "num_beams" if request.params.num_beams > 1 else "n" if request.num_rows > 1 else "max_tokens",
            )

    # -- the engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        if self.config.native_decode:
            why = self.runner.enable_native()
            log.info("decode step: %s", "written out for the model (llama.py)" if why is None
                     else f"transformers' forward ({why})")
        if self.config.fuse_prefill:
            # checked here: forwards run on another thread first leave this one's OpenMP team half as fast
            fused = self.scheduler.fused = self.runner.enable_fused()
            log.info("decode and prefill chunks: %s", "one forward" if fused else "two forwards (model not supported)")
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopping or self._inbox or self._aborts or self._failing
                                  or self.scheduler.has_work())
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, set()
                failing, self._failing = self._failing, None
            for r in inbox:
                self._requests[r.request_id] = r
                self.scheduler.add(r)
            for rid in aborts:
                self._drop(rid)
            if failing or self.broken:
                self._fail(failing or self.broken, waiting=True)
            if self.scheduler.has_work():
                try:
                    self.step()
                except Exception as e:  # fail what was running, keep serving (all of it, if the device is lost)
                    log.exception("engine step failed")
                    if _device_lost(e):
                        self.broken = f"{type(e).__name__}: {e}"
                        log.critical("the device is in an error state; every request will fail until the process "
                                     "restarts (/health now answers 503)")
                    self._fail(f"{type(e).__name__}: {e}", waiting=self.broken is not None)
                self._release_memory()
            self.last_step = time.monotonic()

    def _release_memory(self) -> None:
        now = time.monotonic()
        # host memory only: on a GPU the tensors live in CUDA's caching allocator, and the ~30 ms stall would show
        # in the inter-token latency
        if self._trim and (not self.scheduler.has_work() or now - self._trimmed > TRIM_SECONDS):
            MALLOC_TRIM(0)
            self._trimmed = time.monotonic()
            log.debug("malloc_trim took %.1f ms", (self._trimmed - now) * 1000)

    def step(self) -> None:
        """One engine step, as the scheduler plans it (scheduler.py): the running batch decodes a token per row and
        prompt groups get their next chunks, in one forward where the model allows (fused.py); groups whose last
        chunk is in join the batch."""
        plan = self.scheduler.schedule()
        self._start(plan.admitted)
        drafts = self._drafts() if plan.decode and not plan.chunks else None
        if drafts is not None:
            self.scheduler.fed(plan)
            self._advance_drafted(self.batch, drafts)
            self._evict_finished()
            return
        logits, prefilled = self.runner.execute(plan, self.batch)
        self.scheduler.fed(plan)
        if logits is not None:
            self._advance(self.batch, logits)
            self._evict_finished()
        for batch, first_logits in prefilled:
            self._join(batch, first_logits)
        self._evict_finished()

    def _start(self, admitted: list[Request]) -> None:
        """Admitted requests' rows: a sequence per choice (or beam slot), a beam search where asked."""
        for r in admitted:
            r.sequences = [self._new_sequence(r, i) for i in range(r.num_rows)]
            if r.params.num_beams > 1:
                r.beam = BeamSearch(r, self.tokenizer, self.eos_ids)
            if r.cached_tokens is not None:
                self.runner.prefix.record(len(r.prompt_ids), r.cached_tokens)

    def _join(self, batch: Batch, logits) -> None:
        live = [i for i, s in enumerate(batch.seqs) if not s.finished]  # aborted while prefilling
        if len(live) < len(batch):
            batch.select(live)
            logits = logits[live]
        if len(batch):
            self._advance(batch, logits)
            if self.batch is None:
                self.batch = batch
            else:
                self.batch.extend(batch)

    def _advance(self, batch: Batch, logits) -> None:
        """Choose every row's next token: sampled or greedy rows directly, beam rows by their search,
        which may also reorder the beam rows (the cache rows follow their parents)."""
        tokens, logprobs, broken = self.runner.sample(batch, logits)
        for request in {batch.seqs[row].request for row in broken}:  # sampled from zeros; its rows leave now
            self._fail_request(request, "the model produced NaN logits for this request")
        groups: dict[Request, list[int]] = {}
        for row, seq in enumerate(batch.seqs):
            if seq.request.beam is not None and not seq.finished:
                groups.setdefault(seq.request, []).append(row)
        for rows in groups.values():  # rows move when others leave: slot i is the sequence with index i
            rows.sort(key=lambda row: batch.seqs[row].index)
        if groups:
            order = list(range(len(batch)))
            for request, rows in groups.items():
                try:
                    parents = request.beam.group.step(logits[rows])
                except Exception as e:  # this request's search broke: it fails, the batch goes on
                    self._fail_request(request, f"{type(e).__name__}: {e}", exc=True)
                    continue
                for i, row in enumerate(rows):
                    order[row] = rows[parents[i]]
                    tokens[row] = request.beam.group.running[i][-1]
                    # the slot now holds beam i: penalties and min_tokens read its history from here
                    batch.seqs[row].token_ids = list(request.beam.group.running[i])
            batch.select(order, batch.seqs)  # rows are beam slots: the slot stays, its content moved
            batch.next_tokens = batch.next_tokens.new_tensor(tokens)
        self._update(batch, tokens, logprobs)

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        params = request.params
        pipeline = DecodePipeline(params, self.eos_ids, self.config.max_model_len)
        seq = Sequence(request, index, IncrementalDetokenizer(self.tokenizer, request.prompt_ids), pipeline)
        if params.seed is not None:
            seq.generator = self.runner.new_generator((params.seed + index) % 2**64)
        # drafts for rows whose tokens come one at a time from the raw distribution: not with processors (their
        # state moves with each token), logprobs, beams, or a seed (its draws would depend on the batch)
        elif self._draft_len(params) and params.num_beams == 1 and params.logprobs is None and not pipeline.processors:
            seq.lookup = PromptLookup(request.prompt_ids)
        return seq

    def _draft_len(self, params: SamplingParams) -> int:
        return self.config.prompt_lookup if params.prompt_lookup is None else params.prompt_lookup

    def _drafts(self) -> list[list[int]] | None:
        """Each row's draft for this step, where every row can take one and some row has one (speculative.py);
        else None: the batch decodes a token per row."""
        batch = self.batch
        if batch is None or any(s.lookup is None for s in batch.seqs):
            return None
        drafts = []
        for seq in batch.seqs:
            missing = seq.num_tokens - len(seq.lookup.tokens)
            seq.lookup.extend(seq.token_ids[len(seq.token_ids) - missing :])
            # never past the row's last token, nor the timeline past the longest context
            room = min(seq.request.params.max_tokens - len(seq.token_ids) - 1,
                       self.config.max_model_len - batch.width - 1)
            drafts.append(seq.lookup.draft(min(self._draft_len(seq.request.params), room)) if room > 0 else [])
        # the check costs a forward of rows x (draft + 1) tokens: worth it while that stays small (on a 2-core CPU,
        # 8 rows lost 14% with 4-token drafts and 4 to 27% with 1-token ones, where one row gained up to 1.9x)
        k = min(max(len(d) for d in drafts), MAX_VERIFY_TOKENS // len(batch) - 1)
        if k < 1 or not any(drafts):
            return None
        return [d[:k] for d in drafts]

    def _advance_drafted(self, batch: Batch, drafts: list[list[int]]) -> None:
        """The rows' next tokens and drafts in one forward; each row takes its kept draft and one token more."""
        kept, taken, broken = self.runner.verify(batch, drafts)
        self.drafted += sum(len(d) for d in drafts)
        self.accepted += sum(kept)
        for request in {batch.seqs[row].request for row in broken}:
            self._fail_request(request, "the model produced NaN logits for this request")
        self._update(batch, taken, [None] * len(batch))

    def _update(self, batch: Batch, tokens: list[int] | list[list[int]], logprobs: list[TokenLogprob | None]) -> None:
        """Append each row's new token (or tokens), detokenize, check stops; report per request."""
        outputs: dict[Request, list[SeqOutput]] = {}
        for seq, token, lp in zip(batch.seqs, tokens, logprobs, strict=True):
            if seq.finished:  # its request failed in this step
                continue
            try:
                if seq.request.beam is not None:
                    if seq.request not in outputs:
                        outputs[seq.request] = self._beam_outputs(seq.request)
                    continue
                if isinstance(token, list):  # several tokens this step (a kept draft): up to the row's end
                    out = seq.pipeline.accept(seq, token[0])
                    for t in token[1:]:
                        if out.finish_reason is not None:
                            break
                        more = seq.pipeline.accept(seq, t)
                        out.text, out.finish_reason = out.text + more.text, more.finish_reason
                        out.token_ids += more.token_ids
                else:
                    out = seq.pipeline.accept(seq, token)
            except Exception as e:  # this request's decoding broke: it fails, the others go on
                self._fail_request(seq.request, f"{type(e).__name__}: {e}", exc=True)
                continue
            out.logprobs = None if lp is None else [lp]
            outputs.setdefault(seq.request, []).append(out)
        for request, outs in outputs.items():
            if request.failed:
                continue
            out = RequestOutput(request.request_id, outs, len(request.prompt_ids), request.finished,
                                cached_tokens=request.cached_tokens)
            out.prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None
            request.emit(out)

    def _beam_outputs(self, request: Request) -> list[SeqOutput]:
        outs = request.beam.outputs()
        if request.beam.group.done:
            for seq in request.sequences:
                seq.finish_reason = "stop"  # the search is over: every beam row leaves
        return outs

    def _fail_request(self, request: Request, message: str, exc: bool = False) -> None:
        """End one request with an error; its rows leave the batch at the next eviction."""
        log.error("request %s failed: %s", request.request_id, message, exc_info=exc)
        request.failed = True
        for seq in request.sequences:
            seq.finish_reason = seq.finish_reason or "error"
        request.emit(RequestOutput(request.request_id, [], len(request.prompt_ids), True, error=message))

    def _evict_finished(self) -> None:
        for r in [r for r in self.scheduler.running if r.finished]:
            self.scheduler.remove(r)
            self._requests.pop(r.request_id, None)
        if self.batch is not None:
            gone = [i for i, s in enumerate(self.batch.seqs) if s.finished]
            if self.runner.prefix is not None:
                self.runner.remember_rows(self.batch, [i for i in gone if self.batch.seqs[i].request.beam is None
                                                       and self.batch.seqs[i].finish_reason in ("stop", "length")])
            # a failed row may hold NaN keys: cleared, since masked cache slots must stay finite
            self.batch.clear([i for i in gone if self.batch.seqs[i].finish_reason == "error"])
            if len(gone) == len(self.batch):
                self.batch = None
            elif gone:
                self.batch.drop(gone)

    def _drop(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.sequences:
            seq.finish_reason = seq.finish_reason or "abort"
        self.scheduler.remove(request)
        self._evict_finished()

    def _fail(self, message: str, waiting: bool = False) -> None:
        for r in list(self.scheduler.running) + (list(self.scheduler.waiting) if waiting else []):
            r.emit(RequestOutput(r.request_id, [], len(r.prompt_ids), True, error=message))
            self.scheduler.remove(r)
            self._requests.pop(r.request_id, None)
        self.batch = None
        self.scheduler.prefilling = []


def _weights_dtype(model: Any) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    return ids
