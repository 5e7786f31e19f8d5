"""What the API layer knows of an engine, without torch: the served model's description, the engine's limits, the
stream a request's outputs come on, and the interface every engine offers (`EngineClient`). The real one is
`engine.Engine`; anything with the same methods (a small fake in the API tests) serves the same routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..families import Family
from .params import SamplingParams
from .request import RequestOutput

if TYPE_CHECKING:
    from .grammar import GrammarCompiler


class EngineError(RuntimeError):
    """The engine failed while running a request."""


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    max_batch_size: int = 64
    max_batch_tokens: int = 131072
    max_waiting: int = 256
    prefill_chunk: int = 64  # prompt tokens fed per step while streams run
    eos_token_ids: tuple[int, ...] = ()  # end tokens besides the model's and tokenizer's (a family's)
    fuse_prefill: bool = True  # decode and prefill chunks in one forward, where the model passes the check
    native_decode: bool = True  # on CPU, Llama-shaped models decode through llama.py, where they pass the check
    prefix_cache_bytes: int = 0  # the prefix cache's pool (prefix.py); 0: no prefix caching
    onednn_min_tokens: int = 0  # on CPU: forwards of fewer tokens run their bf16 matmuls without oneDNN (cpu.py)
    prompt_lookup: int = 0  # draft tokens a step for requests that do not say (speculative.py); 0: none


@dataclass(frozen=True)
class ModelInfo:
    """The served model as clients see it."""

    name: str  # the id clients send
    family: Family
    max_model_len: int
    dtype: str = ""  # served in
    checkpoint_dtype: str = ""  # the weights as stored
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # for fields a request leaves unset


class RequestStream:
    """What `generate_all` returns per request: iterate it for RequestOutputs; leaving early aborts the request.
    The engine puts outputs on `queue` from any thread, with the loop's call_soon_threadsafe."""

    def __init__(self, engine: EngineClient, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await self.queue.get()
                if out.error is not None:
                    finished = True
                    raise EngineError(out.error)
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.engine.abort(self.request_id)


class EngineClient(Protocol):
    """The engine as the API layer uses it."""

    tokenizer: Any  # a Hugging Face tokenizer
    config: EngineConfig
    broken: str | None  # why the device can no longer run steps, or None
    devices: list[Any]  # the CUDA devices the model is on, for /metrics (none on CPU)

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def is_alive(self) -> bool: ...

    def stalled_for(self) -> float:
        """Seconds the engine has had work without finishing a step (0 when idle or moving)."""

    def prefix_cache_stats(self) -> tuple[int, int, int] | None:
        """Prompt tokens looked up in the prefix cache, tokens found, bytes the pool holds; None without one."""

    def cache_usage(self) -> tuple[int, int, int]:
        """Rows running, the tokens their KV cache spans, and the bytes of KV buffers allocated."""

    def check_prompt_count(self, count: int) -> None:
        """InvalidRequest if one call may not hold `count` prompts."""

    def generate_all(self, prompts: list[tuple[list[int], SamplingParams, str]]) -> list[RequestStream]:
        """Queue one API call's requests (prompt ids, params, request id) together or none of them: raises
        InvalidRequest or QueueFullError at once. Called on the event loop."""

    def abort(self, request_id: str) -> None: ...

    def fail_all(self, message: str) -> None:
        """End every request, running or waiting, with an EngineError."""

    def grammars(self) -> GrammarCompiler | str:
        """The constraint compiler for this model's tokenizer, or why there cannot be one."""
