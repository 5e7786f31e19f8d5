"""POST /v1/chat/completions: messages (and tools) in, an assistant message out, whole or as server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from . import tools
from .job import Job, finish_unless_disconnected
from .outputs import (NO_USAGE, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatMessage, ChunkChoice, Delta,
                      json_response)
from .schemas import ChatCompletionRequest
from .serving import OpenAIServing, streaming_response
from .streaming import sse


async def start_chat(s: OpenAIServing, req: ChatCompletionRequest, raw: Request, prefix: str
                     ) -> tuple[Job, tools.ToolPlan | None]:
    """Queue a chat (also what /v1/responses runs): the job, and the tool plan whose calls its answer may hold."""
    req.check()
    s.check_model(req)
    req = s.with_defaults(req)
    plan = s.tool_plan(req)
    ids, text = await asyncio.to_thread(s.chat_prompt, req, plan)
    if s.log_prompts:
        raw.state.prompt = text
    grammar = await asyncio.to_thread(s.grammar, req, plan)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    job = s.start([ids], [s.params(req, max_tokens, len(ids), grammar)], prefix, raw)
    return job, plan if plan is not None and plan.active else None


async def create_chat_completion(s: OpenAIServing, req: ChatCompletionRequest, raw: Request) -> Response:
    job, plan = await start_chat(s, req, raw, "chatcmpl")
    if req.stream:
        return streaming_response(chat_chunks(s, job, req.include_usage, plan))
    if not await finish_unless_disconnected(job, raw):
        return Response(status_code=499)
    choices = []
    for i, c in sorted(job.choices.items()):
        message, finish = ChatMessage(content=c.text), c.finish_reason
        if plan is not None:
            content, calls = tools.parse(c.text, plan)
            if calls:
                message, finish = ChatMessage(content=content, tool_calls=calls), "tool_calls"
        choices.append(ChatChoice(index=i, message=message, finish_reason=finish,
                                  logprobs=s.logprobs.chat(c.logprobs if req.logprobs else None)))
    return json_response(ChatCompletion(id=job.id, created=job.created, model=job.model, choices=choices,
                                        usage=job.usage()))


async def chat_chunks(s: OpenAIServing, job: Job, include_usage: bool, plan: tools.ToolPlan | None) -> AsyncIterator[str]:
    head = {"id": job.id, "created": job.created, "model": job.model}
    exclude = None if include_usage else NO_USAGE
    for i in range(job.n):
        first = ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
        yield sse(ChatCompletionChunk(**head, choices=[first]), exclude)
    calls = {i: tools.ToolStream(plan) for i in range(job.n)} if plan is not None else {}
    async for index, out in job.events():
        finish = out.finish_reason
        if index in calls:  # text turned into content and tool_calls deltas
            deltas = calls[index].feed(out.text, final=finish is not None)
            if calls[index].called and finish == "stop":
                finish = "tool_calls"
        else:
            deltas = [{"content": out.text}] if out.text else []
        if not deltas and (finish or out.logprobs):
            deltas = [{}]
        for k, delta in enumerate(deltas):
            last = k == len(deltas) - 1
            choice = ChunkChoice(index=index, delta=Delta(**delta), finish_reason=finish if last else None,
                                 logprobs=s.logprobs.chat(out.logprobs) if k == 0 else None)
            yield sse(ChatCompletionChunk(**head, choices=[choice]), exclude)
    if include_usage:
        yield sse(ChatCompletionChunk(**head, choices=[], usage=job.usage()))
