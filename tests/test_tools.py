"""The tool-call reader on hand-written answers (what a model may write, whole and streamed in pieces), and the
prompts each format gives the model. No model: the server tests cover the model's side."""

import json

import pytest

from server.api import tools
from server.api.schemas import ChatCompletionRequest

FUNCTIONS = [{"name": "get_weather", "parameters": {"type": "object"}}, {"name": "get_time"}]
ENVELOPE = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "北京", "nested": [1, {"x": "}]\\""}]}}, '
            '{"name": "get_time", "arguments": {}}]}')
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>')


def plan(choice="auto", own=False, parallel=True):
    return tools.ToolPlan(FUNCTIONS, choice, parallel=parallel, own_template=own, names={"get_weather", "get_time"})


def pieces(text, p, size):
    stream, deltas = tools.ToolStream(p), []
    for i in range(0, len(text), size):
        deltas += stream.feed(text[i : i + size])
    return deltas + stream.feed("", final=True)


def joined(deltas):
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            call = calls.setdefault(c["index"], {"name": c["function"].get("name"), "id": c.get("id"), "arguments": ""})
            call["arguments"] += c["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("text, own, content", [(ENVELOPE, False, None), (HERMES, True, "Let me check.")])
def test_whole_and_streamed_answers_give_the_same_calls(text, own, content):
    got_content, calls = tools.parse(text, plan(own=own))
    assert got_content == content
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    args = [json.loads(c["function"]["arguments"]) for c in calls]
    assert args[0]["city"] in ("北京", "Paris") and args[1] in ({}, {"city": "Paris"})
    for size in (1, 3, 17):
        streamed_content, streamed = joined(pieces(text, plan(own=own), size))
        assert streamed_content.strip() == (content or "")
        assert [c["name"] for c in streamed] == ["get_weather", "get_time"]
        assert all(c["id"].startswith("call_") for c in streamed)
        assert [json.loads(c["arguments"]) for c in streamed] == args


def test_text_stays_text():
    for text in ("Hello {there}", '{"answer": 42}', "The weather is <tool_call fine.", ""):
        assert tools.parse(text, plan(own=True)) == (text, [])
        content, calls = joined(pieces(text, plan(own=True), 2))
        assert content == text and calls == []


def test_unknown_functions_and_broken_arguments_are_not_calls():
    for text in ('{"tool_calls": [{"name": "launch", "arguments": {}}]}',
                 '{"tool_calls": [{"name": "get_time", "arguments": {"a": }}]}',
                 '{"tool_calls": [{"name": "get_time", "arguments": {"a": 1'):
        assert tools.parse(text, plan()) == (text, [])


def test_one_call_unless_parallel():
    _, calls = tools.parse(ENVELOPE, plan(parallel=False))
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    _, streamed = joined(pieces(ENVELOPE, plan(parallel=False), 5))
    assert [c["name"] for c in streamed] == ["get_weather"]


def test_envelope_schema_follows_the_choice():
    schema = tools.envelope_schema(tools.ToolPlan(FUNCTIONS, "named", "get_time", names={"get_weather", "get_time"}))
    calls = schema["properties"]["tool_calls"]
    assert calls["maxItems"] == 1 and calls["items"]["properties"]["name"] == {"const": "get_time"}
    schema = tools.envelope_schema(plan("required", parallel=True))
    assert "maxItems" not in schema["properties"]["tool_calls"]
    assert len(schema["properties"]["tool_calls"]["items"]["anyOf"]) == 2


HERMES_TEMPLATE = (
    "{%- if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}({{ c.function.arguments.city }})</tool_call>"
    "{%- endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]


def request(**kw):
    return ChatCompletionRequest(messages=TURNS, tools=[{"type": "function", "function": f} for f in FUNCTIONS], **kw)


def test_the_models_own_template_gets_the_tools(tokenizer):
    req = request()
    p = tools.plan(req.tools, req.tool_choice, req.parallel_tool_calls, HERMES_TEMPLATE)
    assert p.own_template
    messages, extra = tools.chat_messages(req.messages, p)
    text = tokenizer.apply_chat_template(messages, chat_template=HERMES_TEMPLATE, tokenize=False, **extra)
    assert "<tools>get_weather;get_time;</tools>" in text
    assert "<tool_call>get_weather(Paris)</tool_call>" in text  # arguments reach the template as a mapping
    assert "<|im_start|>tool\n21 C" in text


@pytest.mark.parametrize("choice, rule", [("auto", "plain text"), ("required", "at least one"),
                                          ({"type": "function", "function": {"name": "get_time"}}, "get_time.")])
def test_the_generic_format(choice, rule):
    req = request(tool_choice=choice)
    p = tools.plan(req.tools, req.tool_choice, req.parallel_tool_calls, "{{ messages }}")
    messages, extra = tools.chat_messages(req.messages, p)
    assert extra == {} and not p.own_template
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\nYou can call functions.")
    assert '{"name": "get_weather", "parameters": {"type": "object"}}' in messages[0]["content"]
    assert rule in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'}
    assert messages[3] == {"role": "user", "content": "Result of get_weather (call call_1):\n21 C"}
    none = tools.plan(req.tools, "none", None, "{{ messages }}")
    assert "You can call" not in tools.chat_messages(req.messages, none)[0][0]["content"]
