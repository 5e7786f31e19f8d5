"""POST /v1/completions: a prompt (or several) in, text completions out, whole or as server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import Response

from .job import Job, finish_unless_disconnected
from .outputs import Completion, CompletionChoice, json_response
from .schemas import CompletionRequest
from .serving import OpenAIServing, streaming_response
from .streaming import sse


async def create_completion(s: OpenAIServing, req: CompletionRequest, raw: Request) -> Response:
    req.check()
    s.check_model(req)
    req = s.with_defaults(req)
    prompts = await asyncio.to_thread(s.prompts, req.prompt)
    ids = [p for p, _ in prompts]
    if s.log_prompts:
        raw.state.prompt = [text for _, text in prompts] if len(prompts) > 1 else prompts[0][1]
    grammar = await asyncio.to_thread(s.grammar, req, None)
    params = [s.params(req, req.max_tokens, len(p), grammar) for p in ids]
    best_of = req.n if req.use_beam_search or (req.num_beams or 1) > 1 else req.best_of or req.n
    if best_of > req.n:  # draw best_of candidates, each scored by its tokens' log-probabilities
        logprobs = req.logprobs if req.logprobs is not None else 0
        params = [replace(p, n=best_of, logprobs=logprobs) for p in params]
    job = s.start(ids, params, "cmpl", raw)
    echo = [text for _, text in prompts] if req.echo else None
    if req.stream:
        return streaming_response(completion_chunks(s, job, req.include_usage, echo))
    if not await finish_unless_disconnected(job, raw):
        return Response(status_code=499)
    choices = []
    for i, c in job.best(req.n, len(ids)):
        head, head_lps = job.echo(i, echo)
        logprobs = s.logprobs.completion(head_lps + c.logprobs) if req.logprobs is not None else None
        choices.append(CompletionChoice(index=len(choices), text=head + c.text, logprobs=logprobs,
                                        finish_reason=c.finish_reason))
    return json_response(Completion(id=job.id, created=job.created, model=job.model, choices=choices,
                                    usage=job.usage()))


async def completion_chunks(s: OpenAIServing, job: Job, include_usage: bool, echo: list[str] | None) -> AsyncIterator[str]:
    head = {"id": job.id, "created": job.created, "model": job.model}
    offsets: dict[int, int] = {}
    async for index, out in job.events():
        text, entries = out.text, out.logprobs
        if index not in offsets:  # a choice's first chunk carries the echoed prompt
            prompt_text, prompt_lps = job.echo(index, echo)
            text = prompt_text + text
            entries = None if entries is None else prompt_lps + entries
            offsets[index] = 0
        if text or out.finish_reason or entries:
            logprobs = s.logprobs.completion(entries, offsets[index])
            if logprobs is not None and logprobs.tokens:
                offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=out.finish_reason)
            yield sse(Completion(**head, choices=[choice]))
    if include_usage:
        yield sse(Completion(**head, choices=[], usage=job.usage()))
