"""POST /v1/responses (and GET/DELETE by id): OpenAI's Responses API, run as the equivalent chat.

A request's `instructions` and `input` items become chat messages, its function tools and `text.format` the chat's
tools and response_format, so the family prompt formats and chat templates apply exactly as for chat and the two
give the same tokens. Stored responses (`store`, the API's default) live in a bounded in-memory store, least
recently used evicted: per process, gone on restart, not shared between replicas.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from ..engine.client import EngineError
from ..engine.params import InvalidRequest
from . import tools
from .chat import start_chat
from .errors import APIError
from .job import Job, JobTimeout, finish_unless_disconnected
from .outputs import (ArgumentsDelta, ArgumentsDone, Deleted, Event, FunctionCallItem, ItemEvent, MessageItem,
                      OutputItem, OutputText, PartEvent, ResponseError, ResponseEvent, ResponseObject, ResponseTool,
                      ResponseUsage, TextDelta, TextDone, json_response)
from .schemas import ChatCompletionRequest, _Request
from .serving import OpenAIServing, event_stream

# Responses fields with no chat equivalent here: a 400 naming them when set to anything else
UNSUPPORTED = {"n": (1,), "background": (None, False), "conversation": (None,), "prompt": (None,),
               "truncation": (None, "disabled"), "top_logprobs": (None, 0), "max_tool_calls": (None,),
               "stream_options": (None,)}
HOSTED_TOOLS = "web search, file search, computer use, code interpreter, image generation, MCP and shell tools"
# sampling and decoding fields a Responses request passes to the chat it runs as
PASSED = [name for name in _Request.model_fields if name not in ("model", "n", "stream", "stream_options",
                                                                     "response_format", "user")]


class TextFormat(BaseModel):
    type: str
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(BaseModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Request):
    _unsupported = UNSUPPORTED

    input: str | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    text: TextConfig | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = True
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None


class ResponseStore:
    """Stored responses by id, with the conversation that led to each (input items, then output items); at most
    `size` of them, the least recently used evicted first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, tuple[list[dict], ResponseObject]] = OrderedDict()

    def put(self, rid: str, history: list[dict], response: ResponseObject) -> None:
        if self.size <= 0:
            return
        self.items[rid] = (history, response)
        self.items.move_to_end(rid)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def get(self, rid: str, param: str = "previous_response_id") -> tuple[list[dict], ResponseObject]:
        if rid not in self.items:
            raise APIError(404, f"Previous response with id '{rid}' not found: it was not stored (store: false), "
                                "or this server restarted or evicted it (--responses-store-size), or another replica "
                                "served it.", param, "previous_response_not_found")
        self.items.move_to_end(rid)
        return self.items[rid]

    def delete(self, rid: str) -> None:
        self.get(rid, "response_id")
        del self.items[rid]


# -- request -> chat ---------------------------------------------------------------------------------------------
def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of text parts", "input")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}: content parts of type {kind!r} are not supported; only input_text and "
                                 "output_text parts are", "input")
        out.append(part["text"])
    return "".join(out)


def input_items(value: str | list[dict]) -> list[dict]:
    """The request's input as items, each checked: messages, function calls and their outputs."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    items = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            if item.get("role") not in ("user", "system", "developer", "assistant"):
                raise InvalidRequest(f"{where}.role must be user, system, developer or assistant", "input")
            items.append({"type": "message", "role": item["role"], "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise InvalidRequest(f"{where}: a function_call item needs call_id, name and arguments strings", "input")
            items.append({k: item[k] for k in ("type", "call_id", "name", "arguments")})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or "output" not in item:
                raise InvalidRequest(f"{where}: a function_call_output item needs call_id and output", "input")
            items.append({"type": kind, "call_id": item["call_id"], "output": _text(item["output"], where)})
        else:
            raise InvalidRequest(f"{where}: items of type {kind!r} are not supported; send message, function_call "
                                 "and function_call_output items", "input")
    return items


def _messages(items: list[dict], instructions: str | None) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        if item["type"] == "message":
            messages.append({"role": item["role"], "content": item["content"]})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def _tools(req: ResponsesRequest) -> list[dict] | None:
    if req.tools is None:
        return None
    out = []
    for i, t in enumerate(req.tools):
        if t.get("type") != "function":
            raise InvalidRequest(f"tools[{i}]: tools of type {t.get('type')!r} are not supported; this server runs "
                                 f"function tools only ({HOSTED_TOOLS} are not available)", "tools")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                     if k in t}})
    return out


def _tool_choice(choice: str | dict | None) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest(f"tool_choice of type {choice.get('type')!r} cannot be honoured: this server runs function "
                         "tools only ('none', 'auto', 'required' or {'type': 'function', 'name': ...})", "tool_choice")


def _response_format(text: TextConfig | None) -> dict | None:
    f = text.format if text is not None else None
    if f is None or f.type == "text":
        return None
    if f.type == "json_object":
        return {"type": "json_object"}
    if f.type == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": f.name or "response", "schema": f.schema_,
                                                       "strict": f.strict, "description": f.description}}
    raise InvalidRequest(f"text.format of type {f.type!r} is not supported: send text, json_object or json_schema",
                         "text")


def to_chat(req: ResponsesRequest, items: list[dict]) -> ChatCompletionRequest:
    body: dict[str, Any] = {name: getattr(req, name) for name in PASSED if name in req.model_fields_set}
    body.update(model=req.model, messages=_messages(items, req.instructions), tools=_tools(req),
                tool_choice=_tool_choice(req.tool_choice), response_format=_response_format(req.text))
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    body = {k: v for k, v in body.items() if v is not None}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise InvalidRequest(f"the input cannot be run as a conversation: {e.errors()[0]['msg']}", "input") from e


# -- the response ------------------------------------------------------------------------------------------------
def _new(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(item_id: str, text: str, status: str) -> MessageItem:
    return MessageItem(id=item_id, status=status, content=[OutputText(text=text)] if text else [])


class Shell:
    """The parts of a Response that do not depend on its output (what the request asked for), and the conversation
    that led to it."""

    def __init__(self, req: ResponsesRequest, job: Job, items: list[dict]) -> None:
        self.req, self.job, self.items = req, job, items
        self.id = "resp_" + job.id.split("-", 1)[1]  # OpenAI's form of a response id
        f = req.text.format if req.text is not None and req.text.format is not None else None
        fmt = {"type": "text"} if f is None else {k: v for k, v in {
            "type": f.type, "name": f.name, "schema": f.schema_, "strict": f.strict, "description": f.description,
        }.items() if v is not None}
        self.base = dict(
            id=self.id, created_at=job.created, model=job.model, instructions=req.instructions,
            max_output_tokens=req.max_output_tokens, metadata=req.metadata or {},
            parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
            store=req.store is not False, temperature=1.0 if req.temperature is None else req.temperature,
            text={"format": fmt}, tool_choice=req.tool_choice or "auto",
            tools=[ResponseTool(**{k: t.get(k) for k in ("name", "description", "parameters", "strict")})
                   for t in req.tools or []],
            top_p=1.0 if req.top_p is None else req.top_p,
            **({"user": req.user} if req.user is not None else {}),
        )

    def response(self, status: str, output: list[OutputItem], finish: str | None = None,
                 error: ResponseError | None = None) -> ResponseObject:
        body = ResponseObject(**self.base, status=status, output=output, error=error,
                              completed_at=int(time.time()) if status == "completed" else None,
                              incomplete_details={"reason": "max_output_tokens"} if finish == "length" else None)
        if status in ("completed", "incomplete", "failed"):
            usage = self.job.usage()
            body.usage = ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                                       total_tokens=usage.total_tokens)
            if usage.prompt_tokens_details is not None:
                body.usage.input_tokens_details["cached_tokens"] = usage.prompt_tokens_details.cached_tokens
        return body

    def finish(self, store: ResponseStore, output: list[OutputItem], finish: str | None) -> ResponseObject:
        """The finished Response, kept in the store unless the request said store: false."""
        body = self.response("incomplete" if finish == "length" else "completed", output, finish)
        if self.req.store is not False:
            store.put(self.id, self.items + _as_inputs(output), body)
        return body


def _as_inputs(output: list[OutputItem]) -> list[dict]:
    """A response's output items as the input items of the next turn."""
    out = []
    for o in output:
        if isinstance(o, MessageItem):
            out.append({"type": "message", "role": "assistant", "content": "".join(p.text for p in o.content)})
        else:
            out.append({"type": "function_call", "call_id": o.call_id, "name": o.name, "arguments": o.arguments})
    return out


# -- endpoints ---------------------------------------------------------------------------------------------------
async def create_response(s: OpenAIServing, req: ResponsesRequest, raw: Request) -> Response:
    req.check()
    history = list(s.responses.get(req.previous_response_id)[0]) if req.previous_response_id else []
    items = history + input_items(req.input)
    chat = to_chat(req, items)
    job, plan = await start_chat(s, chat, raw, "resp")
    shell = Shell(req, job, items)
    if req.stream:
        return event_stream(_events(s, shell, plan))
    if not await finish_unless_disconnected(job, raw):
        return Response(status_code=499)
    choice = job.choices[0]
    content, calls = tools.parse(choice.text, plan) if plan is not None else (choice.text, [])
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    output: list[OutputItem] = [message_item(_new("msg"), content, status)] if content else []
    output += [FunctionCallItem(id=_new("fc"), call_id=c["id"], name=c["function"]["name"],
                                arguments=c["function"]["arguments"], status="completed") for c in calls]
    return json_response(shell.finish(s.responses, output, choice.finish_reason))


def retrieve_response(s: OpenAIServing, rid: str) -> Response:
    return json_response(s.responses.get(rid, "response_id")[1])


def delete_response(s: OpenAIServing, rid: str) -> Response:
    s.responses.delete(rid)
    return json_response(Deleted(id=rid))


class Events:
    """Numbered Responses stream events."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, cls: type[Event], kind: str, **fields: Any) -> str:
        self.n += 1
        return cls(type=kind, sequence_number=self.n - 1, **fields).sse()


async def _events(s: OpenAIServing, shell: Shell, plan: tools.ToolPlan | None) -> AsyncIterator[str]:
    """A Response as its stream of events: lifecycle, then each output item as it is written."""
    event = Events()
    yield event(ResponseEvent, "response.created", response=shell.response("in_progress", []))
    yield event(ResponseEvent, "response.in_progress", response=shell.response("in_progress", []))
    output: list[OutputItem] = []  # items done
    message: tuple[MessageItem, int, list[str]] | None = None  # the message being written: item, index, text
    calls: dict[int, tuple[FunctionCallItem, int]] = {}  # the calls being written, by their index in the answer
    stream = tools.ToolStream(plan) if plan is not None else None
    finish = None

    def close_text() -> list[str]:
        nonlocal message
        if message is None:
            return []
        (item, idx, pieces), message = message, None
        text = "".join(pieces)
        done = message_item(item.id, text, "completed")
        output.append(done)
        return [event(TextDone, "response.output_text.done", item_id=item.id, output_index=idx, text=text),
                event(PartEvent, "response.content_part.done", item_id=item.id, output_index=idx,
                      part=OutputText(text=text)),
                event(ItemEvent, "response.output_item.done", output_index=idx, item=done)]

    try:
        async for _, out in shell.job.events():
            finish = out.finish_reason
            deltas = stream.feed(out.text, final=finish is not None) if stream else (
                [{"content": out.text}] if out.text else [])
            for d in deltas:
                if "content" in d:
                    if message is None:
                        message = (message_item(_new("msg"), "", "in_progress"), len(output) + len(calls), [])
                        item, idx, _ = message
                        yield event(ItemEvent, "response.output_item.added", output_index=idx, item=item)
                        yield event(PartEvent, "response.content_part.added", item_id=item.id, output_index=idx,
                                    part=OutputText(text=""))
                    item, idx, pieces = message
                    pieces.append(d["content"])
                    yield event(TextDelta, "response.output_text.delta", item_id=item.id, output_index=idx,
                                delta=d["content"])
                    continue
                for tc in d["tool_calls"]:
                    if "id" in tc:  # a new call: whatever text came before it is done
                        for e in close_text():
                            yield e
                        call = FunctionCallItem(id=_new("fc"), call_id=tc["id"], name=tc["function"]["name"],
                                                arguments="", status="in_progress")
                        calls[tc["index"]] = (call, len(output) + len(calls))
                        yield event(ItemEvent, "response.output_item.added", output_index=calls[tc["index"]][1],
                                    item=call)
                    call, idx = calls[tc["index"]]
                    if piece := tc["function"].get("arguments", ""):
                        call.arguments += piece
                        yield event(ArgumentsDelta, "response.function_call_arguments.delta", item_id=call.id,
                                    output_index=idx, delta=piece)
        for e in close_text():
            yield e
        for call, idx in calls.values():
            call.status = "completed"
            output.append(call)
            yield event(ArgumentsDone, "response.function_call_arguments.done", item_id=call.id, output_index=idx,
                        name=call.name, arguments=call.arguments)
            yield event(ItemEvent, "response.output_item.done", output_index=idx, item=call)
        final = shell.finish(s.responses, output, finish)
        # response.completed even when max_output_tokens cut the answer (its status then says incomplete): the
        # SDK's stream helpers wait for that event alone
        yield event(ResponseEvent, "response.completed", response=final)
    except (EngineError, JobTimeout) as e:
        # the spec's ResponseErrorCode has no timeout: server_error, with the message saying what ran out
        failed = shell.response("failed", output, error=ResponseError(code="server_error", message=str(e)))
        yield event(ResponseEvent, "response.failed", response=failed)
