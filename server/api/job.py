"""One OpenAI request fanned out to engine requests (one per prompt), and its choices as they grow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..engine.client import EngineError, RequestStream
from ..engine.request import SeqOutput, TokenLogprob
from .errors import APIError
from .metrics import Metrics
from .outputs import PromptTokensDetails, Usage


class JobTimeout(Exception):
    """The job ran past --request-timeout."""


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
    metrics: Metrics | None = None
    timeout: float | None = None  # seconds the whole job may take
    choices: dict[int, Choice] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # by prompt index
    started: float = field(default_factory=time.perf_counter)
    last_token: dict[int, float] = field(default_factory=dict)  # by choice: when its last token came
    cached_tokens: dict[int, int] = field(default_factory=dict)  # by prompt: prompt tokens the prefix cache gave

    def _observe(self, index: int, tokens: int) -> None:
        now = time.perf_counter()
        if not self.last_token:
            self.metrics.first_token(now - self.started)
        elif index in self.last_token:
            self.metrics.token_gap(now - self.last_token[index])
        self.last_token[index] = now
        self.metrics.generated(tokens)

    async def _next(self, queue: asyncio.Queue) -> Any:
        if self.timeout is None:
            return await queue.get()
        try:  # not wait_for: on Python 3.11 it drops a cancel (the client left) that comes as the item does
            async with asyncio.timeout(self.started + self.timeout - time.perf_counter()):
                return await queue.get()
        except TimeoutError:
            raise JobTimeout(f"The request ran past this server's limit of {self.timeout:g} s (--request-timeout) "
                             "and was stopped.") from None

    def finished(self) -> bool:
        return len(self.choices) == len(self.streams) * self.n and all(c.finish_reason for c in self.choices.values())

    def usage(self) -> Usage:
        completion = sum(c.tokens for c in self.choices.values())
        details = PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())) if self.cached_tokens else None
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion, prompt_tokens_details=details)

    async def events(self) -> AsyncIterator[tuple[int, SeqOutput]]:
        """(choice index, what it produced) as the engine produces it, all prompts merged."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump(p: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    if out.prompt_logprobs is not None:
                        self.prompt_logprobs[p] = out.prompt_logprobs
                    if out.cached_tokens is not None:
                        self.cached_tokens[p] = out.cached_tokens
                    for o in out.outputs:
                        await queue.put((p * self.n + o.index, o))
            except EngineError as e:
                await queue.put(e)
            await queue.put(None)

        tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(self.streams)]
        failed = False
        try:
            for _ in range(len(tasks)):
                while (item := await self._next(queue)) is not None:
                    if isinstance(item, EngineError):
                        failed = True
                        raise item
                    index, out = item
                    if self.metrics is not None and out.token_ids:
                        self._observe(index, len(out.token_ids))
                    choice = self.choices.setdefault(index, Choice())
                    choice.text += out.text
                    choice.tokens += len(out.token_ids)
                    choice.finish_reason = out.finish_reason
                    choice.logprobs += out.logprobs or []
                    yield index, out
        except JobTimeout:
            failed = True
            raise
        finally:
            for t in tasks:
                t.cancel()
            if self.metrics is not None:
                if not self.finished():
                    (self.metrics.failed if failed else self.metrics.cancelled).inc()
                for i in range(len(self.streams) * self.n if not failed else 0):
                    reason = self.choices[i].finish_reason if i in self.choices else None
                    self.metrics.choice_done(reason or "abort")

    def best(self, n: int, num_prompts: int) -> list[tuple[int, Choice]]:
        """Per prompt, the n choices with the highest mean token log-probability (all of them when n == rows)."""
        out = []
        for p in range(num_prompts):
            candidates = [(i, self.choices[i]) for i in range(p * self.n, (p + 1) * self.n)]
            if self.n > n:
                candidates.sort(key=lambda ic: sum(e.logprob for e in ic[1].logprobs) / max(len(ic[1].logprobs), 1), reverse=True)
            out += candidates[:n]
        return out

    def echo(self, index: int, echo: list[str] | None) -> tuple[str, list[TokenLogprob]]:
        """The prompt text and prompt-token log-probabilities a choice starts with (echo), or nothing."""
        if echo is None:
            return "", []
        prompt = index // self.n
        return echo[prompt], self.prompt_logprobs.get(prompt, [])


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
        except JobTimeout as e:
            raise APIError(504, str(e), code="timeout") from e
        return True
    work.cancel()
    return False
