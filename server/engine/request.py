"""A request and its rows (one Sequence per choice), plus what the engine reports per step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .detokenizer import IncrementalDetokenizer, StopChecker
from .params import SamplingParams

if TYPE_CHECKING:
    from .decoding import DecodePipeline


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float | None  # None for a prompt's first token, which has nothing before it
    top: list[tuple[int, float]]  # the best alternatives, most likely first


@dataclass(slots=True)
class SeqOutput:
    """What one choice produced in one step: new text, new token ids, and whether it ended."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    outputs: list[SeqOutput]
    prompt_tokens: int
    finished: bool
    error: str | None = None  # set when the engine failed this request
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first output, when asked
    cached_tokens: int | None = None  # prompt tokens whose keys and values came from the prefix cache (None: off)


class Sequence:
    """One batch row: the tokens and text of one choice of a request."""

    def __init__(self, request: Request, index: int, detok: IncrementalDetokenizer | None,
                 pipeline: DecodePipeline | None = None) -> None:
        from .decoding import DecodePipeline

        self.request = request
        self.index = index
        self.token_ids: list[int] = []
        self.detok = detok
        self.stopper = StopChecker(request.params.stop)
        self.pipeline = pipeline or DecodePipeline(request.params, set())  # its processors and stop rules
        self.finish_reason: str | None = None
        self.generator: Any = None  # a torch.Generator for seeded sampling, set by the engine
        self.lookup: Any = None  # its tokens indexed for drafts (speculative.PromptLookup), where it takes drafts

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.token_ids)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[RequestOutput], None]  # called on the engine thread
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    sequences: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # set by the prefill, sent once
    failed: bool = False  # ended by an error of its own (NaN logits, an exception in its decoding)
    beam: Any = None  # a BeamSearch when params.num_beams > 1; its rows are beam slots, not choices
    cached_tokens: int | None = None  # set at admission where a prefix cache is on (scheduler.py)

    @property
    def num_rows(self) -> int:
        return max(self.params.n, self.params.num_beams)

    @property
    def reserved_len(self) -> int:
        """The longest this request's rows can grow: prompt plus every token it may generate."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return bool(self.sequences) and all(s.finished for s in self.sequences)
