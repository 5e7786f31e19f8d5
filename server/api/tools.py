"""Tool calling: how the model sees the tools, the grammar that forces a call, and the parser of what it wrote.

Two prompt formats:
- the model's own: a chat template that takes `tools` (transformers' `apply_chat_template(tools=...)`) renders
  them, and the answer's calls are read in Hermes' format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  the format of the templates that take tools: Qwen, Hermes, SmolLM3) or in the generic envelope;
- the generic one, for every other template (PolyLM's and BLOOMZ's family formats included): a system paragraph
  lists the functions and asks for one JSON envelope, `{"tool_calls": [{"name": ..., "arguments": {...}}]}`.
`tool_choice` "required" or a named function forces the envelope with a grammar (the same machinery as
structured outputs), so its arguments follow the function's parameters schema; "auto" leaves the choice to the
model and reads what it wrote; "none" shows the model no tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..engine.params import InvalidRequest

MARKER = "<tool_call>"
ENVELOPE_START = '{"tool_calls"'
ARGUMENT_KEYS = ("arguments", "parameters")  # Llama's templates write "parameters"

TOOLS_PARAGRAPH = (
    "You can call functions. Each one is given here as JSON, with a JSON Schema of its arguments:\n{functions}\n\n"
    "To call functions, answer with this JSON and nothing else:\n"
    '{{"tool_calls": [{{"name": "<function name>", "arguments": {{<its arguments>}}}}]}}\n'
    "{rule}"
)
RULES = {
    "auto": "If no function is needed, answer the user directly, in plain text.",
    "required": "Call at least one of these functions.",
    "named": "Call the function {name}.",
}


@dataclass
class ToolPlan:
    """What this request asks of tools: the function definitions, the choice, and the prompt format."""

    functions: list[dict]  # {"name", "description", "parameters", "strict"}
    choice: str  # "none", "auto", "required" or "named"
    name: str | None = None  # the function a named choice forces
    parallel: bool = True
    own_template: bool = False  # the chat template renders the tools itself
    names: set[str] = field(default_factory=set)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def active(self) -> bool:
        """Whether the answer may hold calls (then it is parsed)."""
        return self.choice != "none" and bool(self.functions)


def plan(tools: list | None, tool_choice: Any, parallel: bool | None, template: str | None) -> ToolPlan | None:
    """The request's ToolPlan, or None without tools; a tool_choice that cannot be honoured is a 400."""
    functions = [t.function.model_dump(by_alias=True) for t in tools or []]
    names = [f["name"] for f in functions]
    if len(set(names)) < len(names):
        raise InvalidRequest("tools: function names must be unique", "tools")
    choice, name = "auto" if functions else "none", None
    if isinstance(tool_choice, str):
        choice = tool_choice
    elif tool_choice is not None:
        choice, name = "named", tool_choice.function.name
    if not functions:
        if choice not in ("none", "auto"):
            raise InvalidRequest(f"tool_choice {json.dumps(tool_choice if isinstance(tool_choice, str) else name)} "
                                 "needs tools, and the request has none", "tool_choice")
        return None
    if choice == "named" and name not in names:
        raise InvalidRequest(f"tool_choice names the function '{name}', which is not among the tools "
                             f"({', '.join(names)})", "tool_choice")
    own = bool(template) and re.search(r"\btools\b", template or "") is not None
    return ToolPlan(functions, choice, name, parallel is not False, own, set(names))


def call_schema(function: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def envelope_schema(p: ToolPlan) -> dict:
    """The JSON Schema of the envelope the plan allows: calls of its functions (of the named one only), one call
    unless parallel calls are allowed."""
    functions = [f for f in p.functions if p.choice != "named" or f["name"] == p.name]
    items = call_schema(functions[0]) if len(functions) == 1 else {"anyOf": [call_schema(f) for f in functions]}
    calls: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not p.parallel or p.choice == "named":
        calls["maxItems"] = 1
    return {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
            "additionalProperties": False}


def strict(p: ToolPlan) -> bool:
    """A function with strict: true makes the forced grammar strict (unsupported keywords are a 400)."""
    return any(f.get("strict") for f in p.functions)


def paragraph(p: ToolPlan) -> str:
    functions = "\n".join(json.dumps({k: f[k] for k in ("name", "description", "parameters") if f.get(k) is not None},
                                     ensure_ascii=False) for f in p.functions)
    return TOOLS_PARAGRAPH.format(functions=functions, rule=RULES[p.choice].format(name=p.name))


def envelope(calls: list[dict]) -> str:
    """An assistant message's calls as the generic format writes them."""
    out = []
    for c in calls:
        try:
            arguments = json.loads(c["function"]["arguments"])
        except (json.JSONDecodeError, TypeError):
            arguments = c["function"]["arguments"]
        out.append({"name": c["function"]["name"], "arguments": arguments})
    return json.dumps({"tool_calls": out}, ensure_ascii=False)


def chat_messages(messages: list, p: ToolPlan | None) -> tuple[list[dict], dict[str, Any]]:
    """The conversation for the chat template, and the keyword arguments it takes (`tools` for a template that
    renders them). With the generic format, past calls are written as envelopes and tool results as user turns."""
    own = p is not None and p.own_template
    names = {c.id: c.function.name for m in messages for c in m.tool_calls or []}
    out: list[dict] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        calls = [c.model_dump() for c in m.tool_calls or []]
        if own and calls:
            out.append({"role": role, "content": m.text, "tool_calls": [
                {"type": "function", "id": c["id"], "function": {
                    "name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}} for c in calls]})
        elif calls:
            out.append({"role": role, "content": (m.text + "\n" if m.text else "") + envelope(calls)})
        elif role == "tool" and not own:
            name = names.get(m.tool_call_id, "a function")
            out.append({"role": "user", "content": f"Result of {name} (call {m.tool_call_id}):\n{m.text}"})
        elif role == "tool":
            out.append({"role": "tool", "content": m.text, "tool_call_id": m.tool_call_id,
                        "name": names.get(m.tool_call_id)})
        else:
            out.append({"role": role, "content": m.text})
    if p is None or p.choice == "none":
        return out, {}
    if own:
        return out, {"tools": [{"type": "function", "function": {k: v for k, v in f.items() if v is not None}}
                               for f in p.functions]}
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + paragraph(p)}
    else:
        out.insert(0, {"role": "system", "content": paragraph(p)})
    return out, {}


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


# -- reading the answer ---------------------------------------------------------------------------------------------
@dataclass
class Call:
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None  # past the arguments value, once it is complete


def scan(text: str, start: int) -> list[Call]:
    """The call objects ({"name": ..., "arguments": ...}) in `text` from `start`, complete or still growing:
    every JSON object outside another call's arguments that has a "name" string and an arguments value. Text
    between objects (Hermes' tags) is skipped."""
    calls: list[Call] = []
    stack: list[dict] = []  # open objects and arrays
    i, n = start, len(text)
    while i < n:
        ch = text[i]
        top = stack[-1] if stack else None
        if top is None and ch != "{":
            i += 1
            continue
        if ch == '"':
            end = _string_end(text, i)
            if end is None:
                return [c for c in calls if c.name is not None]
            value = _loads(text[i : end + 1])
            if top["kind"] == "{" and top["expect_key"]:
                top["key"], top["expect_key"] = value, False
            elif top["kind"] == "{" and top["call"] is not None:
                if top["key"] == "name" and isinstance(value, str):
                    top["call"].name = value
                elif top["key"] in ARGUMENT_KEYS:
                    top["call"].args_start, top["call"].args_end = i, end + 1
            i = end + 1
            continue
        if ch in "{[":
            args_of = top["call"] if top is not None and top["kind"] == "{" and top["key"] in ARGUMENT_KEYS \
                and top["call"] is not None and not top["expect_key"] else None
            if args_of is not None:
                args_of.args_start = i
            inside = top is not None and (top["inside"] or args_of is not None)
            frame = {"kind": ch, "key": None, "expect_key": ch == "{", "inside": inside, "args_of": args_of,
                     "call": None}
            if ch == "{" and not inside:
                frame["call"] = Call()
                calls.append(frame["call"])
            stack.append(frame)
        elif ch in "}]":
            frame = stack.pop()
            if frame["args_of"] is not None:
                frame["args_of"].args_end = i + 1
        elif ch == "," and top["kind"] == "{":
            top["expect_key"] = True
        elif ch not in " \t\r\n:" and top["kind"] == "{" and top["key"] in ARGUMENT_KEYS and top["call"] is not None:
            # a bare literal as the arguments (null, a number): up to the next delimiter
            end = re.compile(r"[,}\]\s]").search(text, i)
            top["call"].args_start, top["call"].args_end = i, end.start() if end else None
            i = end.start() if end else n
            continue
        i += 1
    return [c for c in calls if c.name is not None]


def _string_end(text: str, start: int) -> int | None:
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i
        else:
            i += 1
    return None


def call_start(text: str, p: ToolPlan) -> int | None:
    """Where the answer's calls begin: an envelope opening the answer, or (own templates) Hermes' first tag."""
    head = re.sub(r"\s", "", text[:64])
    if head.startswith(ENVELOPE_START):
        return 0
    if p.own_template and MARKER in text:
        return text.index(MARKER)
    return None


def may_start(text: str, p: ToolPlan) -> bool:
    """Whether the answer so far could still turn out to open with calls (a stream holds it back until it knows)."""
    head = re.sub(r"\s", "", text)
    return ENVELOPE_START.startswith(head) or (p.own_template and MARKER.startswith(head))


def new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def arguments_text(text: str, c: Call) -> str:
    """A complete call's arguments as a JSON string (a string value is taken as the JSON it holds)."""
    raw = text[c.args_start : c.args_end]
    value = json.loads(raw)
    if isinstance(value, str):
        value = json.loads(value)
    return json.dumps(value, ensure_ascii=False)


def parse(text: str, p: ToolPlan) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer. Without complete calls of known functions whose arguments are
    JSON, it is all content."""
    start = call_start(text, p)
    if start is None:
        return text, []
    calls = []
    for c in scan(text, start):
        if c.name not in p.names or c.args_start is None or c.args_end is None:
            return text, []
        try:
            arguments = arguments_text(text, c)
        except json.JSONDecodeError:
            return text, []
        calls.append({"id": new_id(), "type": "function", "function": {"name": c.name, "arguments": arguments}})
    if not calls:
        return text, []
    if not p.parallel:
        calls = calls[:1]
    return text[:start].strip() or None, calls


class ToolStream:
    """One streamed choice's text turned into deltas: content while it is plain text, `tool_calls` pieces (id,
    type and name in a call's first delta, then its argument text as it grows) once calls begin."""

    def __init__(self, p: ToolPlan) -> None:
        self.plan = p
        self.text = ""
        self.sent = 0  # content characters sent
        self.start: int | None = None  # where calls begin, once known
        self.calls: list[dict] = []  # per call streamed: its id and the argument characters sent

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def feed(self, delta: str, final: bool = False) -> list[dict]:
        self.text += delta
        if self.start is None:
            self.start = call_start(self.text, self.plan)
        if self.start is None:
            hold = not final and may_start(self.text, self.plan)
            end = self.sent if hold else len(self.text) - (0 if final else self._marker_tail())
            return self._content(end)
        out = self._content(self.start, strip=True)
        for k, c in enumerate(scan(self.text, self.start)):
            if k >= len(self.calls):
                if c.name not in self.plan.names or c.args_start is None or (k and not self.plan.parallel):
                    break
                self.calls.append({"id": new_id(), "args": 0})
                out.append({"tool_calls": [{"index": k, "id": self.calls[k]["id"], "type": "function",
                                            "function": {"name": c.name, "arguments": ""}}]})
            piece = self._arguments(c, self.calls[k])
            if piece:
                out.append({"tool_calls": [{"index": k, "function": {"arguments": piece}}]})
        return out

    def _arguments(self, c: Call, state: dict) -> str:
        if self.text[c.args_start] == '"':  # a string holding the JSON: sent whole once complete
            if c.args_end is None or state["args"]:
                return ""
            state["args"] = 1
            return arguments_text(self.text, c)
        end = c.args_end if c.args_end is not None else len(self.text)
        piece = self.text[c.args_start + state["args"] : end]
        state["args"] += len(piece)
        return piece

    def _marker_tail(self) -> int:
        if not self.plan.own_template:
            return 0
        for k in range(min(len(MARKER) - 1, len(self.text)), 0, -1):
            if MARKER.startswith(self.text[-k:]):
                return k
        return 0

    def _content(self, end: int, strip: bool = False) -> list[dict]:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        if strip and not self.text[:end].strip():
            return []
        return [{"content": piece}] if piece else []
