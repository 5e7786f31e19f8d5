"""A small engine with the EngineClient interface (server/engine/client.py) and no model: it answers every prompt
with a fixed multilingual text, one token per tick, on the event loop. No torch is imported, so API tests that use
it start in a fraction of a second, and it can do what a real model will not on cue: fail mid-answer, be slow, or be
full.

Its answer follows the request's params: max_tokens (finish_reason "length" when the reply is longer), n choices,
logprobs for each token and, with echo, for the prompt. A prompt holding FAIL fails after two tokens; SLOW makes
each token take 0.2 s.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.engine.client import EngineConfig, RequestStream
from server.engine.params import InvalidRequest, QueueFullError, SamplingParams
from server.engine.request import RequestOutput, SeqOutput, TokenLogprob

REPLY = "Hello! 你好，世界。สวัสดีครับ مرحبا بالعالم 👋 Привет, мир."


class FakeEngine:
    def __init__(self, tokenizer: Any, config: EngineConfig | None = None, tick: float = 0.001) -> None:
        self.tokenizer = tokenizer
        self.config = config or EngineConfig(max_model_len=512, max_waiting=8)
        self.tick = tick
        self.broken: str | None = None
        self.devices: list[Any] = []
        self.reply = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
        self.full = False  # answer QueueFullError, as a server at capacity does
        self.tasks: dict[str, asyncio.Task] = {}
        self.aborted: list[str] = []
        self.failing: str | None = None

    # the EngineClient interface
    @property
    def num_running(self) -> int:
        return len(self.tasks)

    @property
    def num_waiting(self) -> int:
        return 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for t in self.tasks.values():
            t.cancel()

    def is_alive(self) -> bool:
        return self.broken is None

    def stalled_for(self) -> float:
        return 0.0

    def prefix_cache_stats(self) -> None:
        return None

    def cache_usage(self) -> tuple[int, int, int]:
        return len(self.tasks), 0, 0

    def check_prompt_count(self, count: int) -> None:
        if count > self.config.max_waiting:
            raise InvalidRequest(f"at most {self.config.max_waiting} prompts, not {count}", "prompt")

    def generate_all(self, prompts: list[tuple[list[int], SamplingParams, str]]) -> list[RequestStream]:
        self.check_prompt_count(len(prompts))
        for ids, params, _ in prompts:
            if len(ids) + params.max_tokens > self.config.max_model_len:
                raise InvalidRequest(f"{len(ids)} + {params.max_tokens} tokens exceed the context", "max_tokens")
        if self.full:
            raise QueueFullError("the server is at capacity; retry later")
        streams = []
        for ids, params, rid in prompts:
            stream = RequestStream(self, rid)
            self.tasks[rid] = asyncio.get_running_loop().create_task(self._run(stream, ids, params))
            streams.append(stream)
        return streams

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if task := self.tasks.pop(request_id, None):
            task.cancel()

    def fail_all(self, message: str) -> None:
        self.failing = message

    def grammars(self) -> str:
        return "the fake engine compiles no grammars"

    # the "model"
    def _logprob(self, token_id: int, k: int | None) -> TokenLogprob:
        return TokenLogprob(token_id, -0.25, [(token_id, -0.25), (token_id + 1, -1.5)][: k or 0])

    async def _run(self, stream: RequestStream, prompt: list[int], params: SamplingParams) -> None:
        text = self.tokenizer.decode(prompt)
        tokens = self.reply[: params.max_tokens]
        finish = "length" if len(self.reply) > params.max_tokens else "stop"
        echo = None
        if params.prompt_logprobs is not None:
            echo = [TokenLogprob(prompt[0], None, [])] + [self._logprob(t, params.prompt_logprobs) for t in prompt[1:]]
        sent = ""  # the text given out so far: a piece that ends inside a character waits for the next token
        try:
            for k, token in enumerate(tokens):
                await asyncio.sleep(0.2 if "SLOW" in text else self.tick)
                if ("FAIL" in text and k == 2) or self.failing:
                    stream.queue.put_nowait(RequestOutput(stream.request_id, [], len(prompt), True,
                                                          error=self.failing or "the fake device fell over"))
                    return
                last = k == len(tokens) - 1
                text_so_far = self.tokenizer.decode(tokens[: k + 1])
                piece = "" if text_so_far.endswith("\ufffd") and not last else text_so_far[len(sent):]
                sent += piece
                lps = [self._logprob(token, params.logprobs)] if params.logprobs is not None else None
                outs = [SeqOutput(i, piece, [token], finish if last else None, lps) for i in range(params.n)]
                stream.queue.put_nowait(RequestOutput(stream.request_id, outs, len(prompt), last,
                                                      prompt_logprobs=echo if k == 0 else None))
        finally:
            self.tasks.pop(stream.request_id, None)
