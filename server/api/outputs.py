"""What the server answers, as typed objects: completions, chat completions and their chunks, log-probabilities,
tool calls, Responses objects and their stream events, in the shapes of OpenAI's published schemas.

Every field is written, null included, as OpenAI writes them, except those declared `Omitted`: left out when None
(a delta's absent keys, a message's tool_calls when it has none, usage until the last chunk).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import Response
from pydantic import BaseModel, Field

from .schemas import ToolCall  # a call in an answer has the shape of one in a request's history
from .streaming import sse


def _none(value: Any) -> bool:
    return value is None


def Omitted() -> Any:  # noqa: N802 (a field declaration, like Field)
    """A field left out of the JSON when it is None."""
    return Field(None, exclude_if=_none)


def json_response(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose keys and values came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Omitted()  # where the server has a prefix cache


# -- log-probabilities ---------------------------------------------------------------------------------------------
class CompletionLogprobs(BaseModel):
    """The legacy completions shape; a prompt's first token (echo) has no log-probability, as OpenAI writes it."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


# -- /v1/completions -----------------------------------------------------------------------------------------------
class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A completion, or one chunk of a streamed one (the same object; usage only in the last chunk, if asked)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Omitted()


# -- /v1/chat/completions ------------------------------------------------------------------------------------------
class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = Omitted()


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = Omitted()
    arguments: str | None = Omitted()


class ToolCallDelta(BaseModel):
    """A call's first delta has its id, type and name; the later ones pieces of its arguments."""

    index: int
    id: str | None = Omitted()
    type: Literal["function"] | None = Omitted()
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = Omitted()
    content: str | None = Omitted()
    tool_calls: list[ToolCallDelta] | None = Omitted()


NO_USAGE = {"usage"}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One chunk. With include_usage, `usage` is null in each chunk and set in an extra last one (as OpenAI sends it);
    without, the chunks are written without it (`sse(chunk, exclude=NO_USAGE)`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# -- /v1/models, /tokenize, /detokenize ----------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "polyglot-server"
    family: str
    max_model_len: int
    dtype: str
    checkpoint_dtype: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
    token_bytes: list[list[int]] | None = Omitted()


class Detokenized(BaseModel):
    prompt: str


# -- /v1/responses -------------------------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: str
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


OutputItem = MessageItem | FunctionCallItem


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0, "cache_write_tokens": 0})
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseTool(BaseModel):
    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseObject(BaseModel):
    """A Response: what the request asked for, then its status and output. Usage once it is done."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    model: str
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: None = None
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[ResponseTool]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    user: str | None = Omitted()
    status: str
    output: list[OutputItem]
    error: ResponseError | None = None
    completed_at: int | None = None
    incomplete_details: dict[str, str] | None = None
    usage: ResponseUsage | None = Omitted()


class Deleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class Event(BaseModel):
    """A Responses stream event: its type and its number in the stream; the subclasses add their type's fields."""

    type: str
    sequence_number: int

    def sse(self) -> str:
        return f"event: {self.type}\n" + sse(self)


class ResponseEvent(Event):  # response.created, .in_progress, .completed, .failed
    response: ResponseObject


class ItemEvent(Event):  # response.output_item.added, .done
    output_index: int
    item: OutputItem


class PartEvent(Event):  # response.content_part.added, .done
    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class _TextEvent(Event):
    item_id: str
    output_index: int
    content_index: int = 0
    logprobs: list[Any] = Field(default_factory=list)


class TextDelta(_TextEvent):  # response.output_text.delta
    delta: str


class TextDone(_TextEvent):  # response.output_text.done
    text: str


class ArgumentsDelta(Event):  # response.function_call_arguments.delta
    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(Event):  # response.function_call_arguments.done
    item_id: str
    output_index: int
    name: str
    arguments: str
