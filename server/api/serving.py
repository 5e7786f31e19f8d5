"""Turns validated OpenAI requests into engine requests, and engine outputs into OpenAI responses."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.engine import Engine, EngineError, RequestStream
from ..engine.params import InvalidRequest, SamplingParams
from ..engine.request import SeqOutput, TokenLogprob
from .errors import APIError, error_body
from .schemas import MAX_BEAMS, ChatCompletionRequest, CompletionRequest, _Request
from .streaming import sse, sse_done

SAMPLING_EPS = 1e-5  # temperatures below this decode greedily


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Job:
    """One OpenAI request fanned out to engine requests (one per prompt), with its choices."""

    id: str
    created: int
    model: str
    streams: list[RequestStream]
    prompt_tokens: int
    n: int
    choices: dict[int, Choice] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # by prompt index

    def usage(self) -> dict[str, int]:
        completion = sum(c.tokens for c in self.choices.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion}

    async def events(self) -> AsyncIterator[tuple[int, SeqOutput]]:
        """(choice index, what it produced) as the engine produces it, all prompts merged."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump(p: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    if out.prompt_logprobs is not None:
                        self.prompt_logprobs[p] = out.prompt_logprobs
                    for o in out.outputs:
                        await queue.put((p * self.n + o.index, o))
            except EngineError as e:
                await queue.put(e)
            await queue.put(None)

        tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(self.streams)]
        try:
            for _ in range(len(tasks)):
                while (item := await queue.get()) is not None:
                    if isinstance(item, EngineError):
                        raise item
                    index, out = item
                    choice = self.choices.setdefault(index, Choice())
                    choice.text += out.text
                    choice.tokens += len(out.token_ids)
                    choice.finish_reason = out.finish_reason
                    choice.logprobs += out.logprobs or []
                    yield index, out
        finally:
            for t in tasks:
                t.cancel()


class OpenAIServing:
    def __init__(self, engine: Engine, model_name: str, max_model_len: int) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len

    # -- requests -> engine ----------------------------------------------------------------
    def _check_model(self, req: _Request) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.model_name}'", "model", "model_not_found")

    def _params(self, req: _Request, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_len
            if max_tokens < 1:
                raise InvalidRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens, and the prompt has {prompt_len}: no room for a completion.",
                    "messages",
                )
        num_beams = self._num_beams(req)
        temperature = 0.0 if num_beams > 1 else 1.0 if req.temperature is None else req.temperature
        if req.min_tokens and req.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens ({req.min_tokens}) is larger than max_tokens ({max_tokens})", "min_tokens")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if temperature < SAMPLING_EPS else temperature,  # 1e-30 would overflow the logits
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=min(max(req.top_k or 0, 0), len(self.tokenizer)),
            seed=req.seed,
            n=req.n,
            stop=req.stop_list,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            logit_bias=self._logit_bias(req.logit_bias or {}),
            min_tokens=req.min_tokens or 0,
            ignore_eos=bool(req.ignore_eos),
            stop_token_ids=tuple(self._token_ids(req.stop_token_ids or [], "stop_token_ids")),
            logprobs=req.num_logprobs,
            num_beams=num_beams,
            length_penalty=1.0 if req.length_penalty is None else req.length_penalty,
            early_stopping=False if req.early_stopping is None else req.early_stopping,
            prompt_logprobs=req.logprobs if getattr(req, "echo", False) and req.logprobs is not None else None,
        )

    @staticmethod
    def _num_beams(req: _Request) -> int:
        """The beam width, and a 400 naming any field that cannot go with beams."""
        width = req.num_beams or 1
        if req.use_beam_search:
            width = max(width, getattr(req, "best_of", None) or req.n, 2)
        if width == 1:
            return 1
        if width > MAX_BEAMS:
            raise InvalidRequest(f"at most {MAX_BEAMS} beams are allowed, not {width}", "num_beams")
        clashes = {
            "temperature": req.temperature not in (None, 0),
            "top_p": req.top_p not in (None, 1),
            "top_k": req.top_k not in (None, 0, -1),
            "min_p": bool(req.min_p),
            "logprobs": req.num_logprobs is not None,
            "n": req.n > width,
            "best_of": not req.use_beam_search and (getattr(req, "best_of", None) or 1) > 1,
        }
        for name, clash in clashes.items():
            if clash:
                raise InvalidRequest(f"'{name}' cannot be combined with beam search (num_beams={width})", name)
        return width

    def _token_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = len(self.tokenizer)
        for t in ids:
            if t >= vocab:
                raise InvalidRequest(f"token id {t} in '{param}' is outside the vocabulary (size {vocab})", param)
        return ids

    def _logit_bias(self, bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
        try:
            ids = [int(k) for k in bias]
        except ValueError as e:
            raise InvalidRequest("logit_bias keys must be token ids (integers as strings)", "logit_bias") from e
        return tuple(zip(self._token_ids(ids, "logit_bias"), bias.values(), strict=True))

    def _prompts(self, prompt: Any) -> list[tuple[list[int], str]]:
        """Each prompt as (token ids, text); the text is what `echo` returns."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = self.tokenizer(p)["input_ids"] if isinstance(p, str) else self._token_ids(p, "prompt")
            if not ids:
                raise InvalidRequest("prompt must not be empty", "prompt")
            out.append((ids, p if isinstance(p, str) else self.tokenizer.decode(ids)))
        return out

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(
                f"the model '{self.model_name}' has no chat template; use /v1/completions with a prompt instead", "messages"
            )
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may refuse a role order, for instance
            raise InvalidRequest(f"the chat template rejected these messages: {e}", "messages") from e
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _start(self, prompts: list[list[int]], params: list[SamplingParams], prefix: str) -> Job:
        rid = f"{prefix}-{uuid.uuid4().hex}"
        streams: list[RequestStream] = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
                streams.append(self.engine.generate(ids, p, f"{rid}-{i}"))
        except Exception:
            for s in streams:
                self.engine.abort(s.request_id)
            raise
        return Job(rid, int(time.time()), self.model_name, streams, sum(map(len, prompts)), params[0].n)

    # -- log-probabilities ----------------------------------------------------------------
    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(self, entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
        """OpenAI's legacy shape; text_offset counts from `offset` in the returned text."""
        if entries is None:
            return None
        tokens = [self._token(e.token_id) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else {self._token(i): lp for i, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def chat_logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None

        def item(token_id: int, logprob: float) -> dict:
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}

    # -- endpoints ------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        req.check()
        self._check_model(req)
        prompts = await asyncio.to_thread(self._prompts, req.prompt)
        ids = [p for p, _ in prompts]
        params = [self._params(req, req.max_tokens, len(p)) for p in ids]
        best_of = req.n if req.use_beam_search or (req.num_beams or 1) > 1 else req.best_of or req.n
        if best_of > req.n:  # draw best_of candidates, each scored by its tokens' log-probabilities
            logprobs = req.logprobs if req.logprobs is not None else 0
            params = [replace(p, n=best_of, logprobs=logprobs) for p in params]
        job = self._start(ids, params, "cmpl")
        echo = [text for _, text in prompts] if req.echo else None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return streaming_response(self._completion_chunks(job, include_usage, echo))
        if not await finish_unless_disconnected(job, raw):
            return Response(status_code=499)
        choices = []
        for i, c in self._best(job, req.n, len(ids)):
            head, head_lps = self._echo(job, i, echo)
            logprobs = self.completion_logprobs(head_lps + c.logprobs) if req.logprobs is not None else None
            choices.append({"index": len(choices), "text": head + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return JSONResponse(
            {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model, "choices": choices, "usage": job.usage()}
        )

    @staticmethod
    def _best(job: Job, n: int, num_prompts: int) -> list[tuple[int, Choice]]:
        """Per prompt, the n choices with the highest mean token log-probability (all of them when n == rows)."""
        out = []
        for p in range(num_prompts):
            candidates = [(i, job.choices[i]) for i in range(p * job.n, (p + 1) * job.n)]
            if job.n > n:
                candidates.sort(key=lambda ic: sum(e.logprob for e in ic[1].logprobs) / max(len(ic[1].logprobs), 1), reverse=True)
            out += candidates[:n]
        return out

    @staticmethod
    def _echo(job: Job, index: int, echo: list[str] | None) -> tuple[str, list[TokenLogprob]]:
        """The prompt text and prompt-token log-probabilities a choice starts with (echo), or nothing."""
        if echo is None:
            return "", []
        prompt = index // job.n
        return echo[prompt], job.prompt_logprobs.get(prompt, [])

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        req.check()
        self._check_model(req)
        ids = await asyncio.to_thread(self._chat_prompt, req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = self._start([ids], [self._params(req, max_tokens, len(ids))], "chatcmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return streaming_response(self._chat_chunks(job, include_usage))
        if not await finish_unless_disconnected(job, raw):
            return Response(status_code=499)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": self.chat_logprobs(c.logprobs if req.logprobs else None),
                "finish_reason": c.finish_reason,
            }
            for i, c in sorted(job.choices.items())
        ]
        return JSONResponse(
            {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model, "choices": choices, "usage": job.usage()}
        )

    # -- streams --------------------------------------------------------------------------
    async def _completion_chunks(self, job: Job, include_usage: bool, echo: list[str] | None) -> AsyncIterator[str]:
        head = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model}
        offsets: dict[int, int] = {}
        async for index, out in job.events():
            text, entries = out.text, out.logprobs
            if index not in offsets:  # a choice's first chunk carries the echoed prompt
                prompt_text, prompt_lps = self._echo(job, index, echo)
                text = prompt_text + text
                entries = None if entries is None else prompt_lps + entries
                offsets[index] = 0
            if text or out.finish_reason or entries:
                logprobs = self.completion_logprobs(entries, offsets[index])
                if logprobs:
                    offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
                yield sse({**head, "choices": [choice]})
        if include_usage:
            yield sse({**head, "choices": [], "usage": job.usage()})

    async def _chat_chunks(self, job: Job, include_usage: bool) -> AsyncIterator[str]:
        head: dict[str, Any] = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model}
        if include_usage:
            head["usage"] = None
        for i in range(job.n):
            delta = {"role": "assistant", "content": ""}
            yield sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]})
        async for index, out in job.events():
            if out.text or out.finish_reason or out.logprobs:
                delta = {"content": out.text} if out.text else {}
                choice = {"index": index, "delta": delta, "logprobs": self.chat_logprobs(out.logprobs),
                          "finish_reason": out.finish_reason}
                yield sse({**head, "choices": [choice]})
        if include_usage:
            yield sse({**head, "choices": [], "usage": job.usage()})


def streaming_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except EngineError as e:
            yield sse(error_body(500, f"generation failed: {e}"))
        yield sse_done()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def finish_unless_disconnected(job: Job, raw: Request) -> bool:
    """Run the job to the end; if the client goes away first, abort it and return False."""

    async def consume() -> None:
        async for _ in job.events():
            pass

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(consume()), asyncio.create_task(disconnected())
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if work in done:
        try:
            work.result()
        except EngineError as e:
            raise APIError(500, f"generation failed: {e}") from e
        return True
    work.cancel()
    return False
