"""OpenAI request bodies (fields in the order of OpenAI's reference), validated before queueing.

Unknown fields are ignored, as OpenAI-compatible servers do; known fields that this server does
not implement are rejected with a 400 when set to anything but their neutral value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine.params import InvalidRequest

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TokenIds = list[Annotated[int, Field(ge=0)]]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MAX_BEAMS = 8

# field -> value that means "not used"; anything else gets a 400 naming the field
UNSUPPORTED_COMMON: dict[str, tuple] = {}
UNSUPPORTED_COMPLETION = {"suffix": (None, "")}
UNSUPPORTED_CHAT = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    _unsupported: dict[str, tuple] = UNSUPPORTED_COMMON

    model: str | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    presence_penalty: Penalty | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | None = None
    # extensions, named as in vLLM
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    num_beams: Annotated[int, Field(ge=1, le=MAX_BEAMS)] | None = None
    length_penalty: Annotated[float, Field(ge=-10.0, le=10.0)] | None = None
    early_stopping: bool | Literal["never"] | None = None
    use_beam_search: bool | None = None  # vLLM's form: the width is best_of (or n)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        return v

    def check(self) -> None:
        """Cross-field rules, raised with the field's name."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")
        values = {**(self.model_extra or {}), **self.__dict__}
        for name, neutral in self._unsupported.items():
            if name in values and values[name] not in neutral:
                raise InvalidRequest(f"'{name}' is not supported by this server yet", name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Request):
    _unsupported = {**UNSUPPORTED_COMMON, **UNSUPPORTED_COMPLETION}

    prompt: str | list[str] | TokenIds | list[TokenIds]
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of < self.n:
            raise InvalidRequest(f"best_of ({self.best_of}) must be at least n ({self.n})", "best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream and not self.use_beam_search:
            raise InvalidRequest("best_of cannot be used with stream", "best_of")

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("prompt token lists must not be empty")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        for part in v if isinstance(v, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content parts of type {kind!r} are not supported; only 'text' parts are")
        return v

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    _unsupported = {**UNSUPPORTED_COMMON, **UNSUPPORTED_CHAT}

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool | None = False
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs to be true", "top_logprobs")

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
