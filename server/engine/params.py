"""Per-request generation parameters. Torch-free, so the API layer can build them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # Hugging Face: divide (or multiply, if negative) logits of prompt and output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); -100 bans, +100 forces
    min_tokens: int = 0  # no end-of-sequence or stop token before this many tokens
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: off; k: the chosen token's log-probability and the k best
    prompt_logprobs: int | None = None  # the same for every prompt token (echo)
    num_beams: int = 1  # > 1: beam search with this many beams (Hugging Face's rules)
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    prompt_lookup: int | None = None  # speculative decoding: up to this many draft tokens a step (None: the server's)
    grammar: Any = None  # a grammar.Grammar the answer must follow (structured outputs, forced tool calls)


class InvalidRequest(ValueError):
    """A request the engine can never run; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""
