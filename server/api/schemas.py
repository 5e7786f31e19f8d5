"""OpenAI request bodies (fields in the order of OpenAI's reference), validated before queueing.

Unknown fields are ignored, as OpenAI-compatible servers do; known fields that this server does
not implement are rejected with a 400 when set to anything but their neutral value.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine.params import InvalidRequest

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TokenIds = list[Annotated[int, Field(ge=0)]]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MAX_BEAMS = 8

# field -> value that means "not used"; anything else gets a 400 naming the field
UNSUPPORTED_COMMON: dict[str, tuple] = {}
UNSUPPORTED_COMPLETION = {"suffix": (None, "")}
UNSUPPORTED_CHAT: dict[str, tuple] = {}
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's field: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class Constraint(BaseModel):
    """What the answer must follow: kind (json_schema, json_object, regex, choice, grammar), its spec, whether
    unsupported schema keywords are an error, and the request field it came from."""

    kind: str
    spec: Any = None
    strict: bool = False
    param: str


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
    prompt_lookup: Annotated[int, Field(ge=0, le=16)] | None = None  # draft tokens a step (None: the server's --prompt-lookup)
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None

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

    def constraint(self) -> Constraint | None:
        """The one constraint the request sets, if any; two at once are a 400 naming the second."""
        found: list[Constraint] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(Constraint(kind="json_object", param="response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise InvalidRequest("response_format of type json_schema needs a json_schema object", "response_format")
            spec = rf.json_schema.schema_
            found.append(Constraint(kind="json_schema" if spec else "json_object", spec=spec,
                                    strict=bool(rf.json_schema.strict), param="response_format"))
        so = self.structured_outputs
        if so is not None:
            given = [(k, v) for k, v in (("json_schema", so.json_), ("regex", so.regex), ("choice", so.choice),
                                         ("grammar", so.grammar)) if v is not None]
            given += [("json_object", None)] if so.json_object else []
            if len(given) != 1:
                raise InvalidRequest("structured_outputs takes exactly one of json, regex, choice, grammar and "
                                     "json_object", "structured_outputs")
            found.append(Constraint(kind=given[0][0], spec=given[0][1], param="structured_outputs"))
        for name, kind in GUIDED.items():
            value = getattr(self, name)
            if value is not None:
                found.append(Constraint(kind=kind, spec=value, param=name))
        if len(found) > 1:
            raise InvalidRequest(f"'{found[1].param}' cannot be combined with '{found[0].param}': send one "
                                 "constraint", found[1].param)
        if not found:
            return None
        c = found[0]
        if c.kind == "json_schema" and isinstance(c.spec, str):
            try:
                c.spec = json.loads(c.spec)
            except json.JSONDecodeError as e:
                raise InvalidRequest(f"'{c.param}' is not valid JSON: {e}", c.param) from e
            if not isinstance(c.spec, dict):
                raise InvalidRequest(f"'{c.param}' must be a JSON Schema object", c.param)
        return c

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


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # the call a tool message answers

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

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


class FunctionDefinition(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Request):
    _unsupported = {**UNSUPPORTED_COMMON, **UNSUPPORTED_CHAT}

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
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


class TokenizeRequest(BaseModel):
    """POST /tokenize, in vLLM's two forms: a prompt, or chat messages rendered as /v1/chat/completions renders them."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # default: True for a prompt; for messages, what the chat route does
    return_token_strs: bool = False  # the vocabulary's strings for the tokens (vLLM)
    return_token_bytes: bool = False  # each token's exact bytes (a CJK character may span several tokens)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: TokenIds
