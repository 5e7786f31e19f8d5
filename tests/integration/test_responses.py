"""/v1/responses over a real port with the official SDK: objects and every streamed event validated against
OpenAI's schemas, the same tokens as the equivalent chat, function calls and their outputs, the bounded store."""

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from server.api.errors import APIError
from server.api.responses import ResponseStore

EVENTS = {"response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
          "response.completed": "ResponseCompletedEvent", "response.failed": "ResponseFailedEvent",
          "response.output_item.added": "ResponseOutputItemAddedEvent",
          "response.output_item.done": "ResponseOutputItemDoneEvent",
          "response.content_part.added": "ResponseContentPartAddedEvent",
          "response.content_part.done": "ResponseContentPartDoneEvent",
          "response.output_text.delta": "ResponseTextDeltaEvent", "response.output_text.done": "ResponseTextDoneEvent",
          "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
          "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent"}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}, "strict": True}


@pytest.fixture
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x")


def raw_stream(server, body):
    with httpx.stream("POST", server.url + "/v1/responses", json={"model": "tiny", "stream": True, **body},
                      timeout=120) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_create_and_stream_validate_and_joined_deltas_equal_the_text(tiny_server, client, validate):
    r = client.responses.create(model="tiny", input="Hello", max_output_tokens=8)
    body = r.model_dump(exclude_unset=True)
    validate("Response", body)
    assert r.id.startswith("resp_") and r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 8 and r.output_text
    for text in ("北京是中国的首都。", "ปักกิ่งเป็นเมืองหลวง", "بكين هي عاصمة الصين."):
        events = raw_stream(tiny_server, {"input": text, "max_output_tokens": 12, "temperature": 0})
        for e in events:
            validate(EVENTS[e["type"]], e)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
        joined = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        final = events[-1]["response"]
        assert joined == final["output"][0]["content"][0]["text"] and joined
        done = next(e for e in events if e["type"] == "response.output_text.done")
        assert done["text"] == joined
    with client.responses.stream(model="tiny", input="Hi", max_output_tokens=6) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == deltas and final.usage.output_tokens == 6


def test_same_tokens_as_the_equivalent_chat(tiny_server, client):
    greedy = {"temperature": 0, "max_output_tokens": 16}
    r = client.responses.create(model="tiny", instructions="Be brief.", input="北京是", **greedy)
    chat = httpx.post(tiny_server.url + "/v1/chat/completions", json={
        "model": "tiny", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "北京是"}]}).json()
    assert r.output_text == chat["choices"][0]["message"]["content"]
    assert r.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert r.usage.output_tokens == chat["usage"]["completion_tokens"]


def test_parse_with_a_pydantic_model(client):
    class City(BaseModel):
        name: str = Field(max_length=10)
        population: int = Field(ge=0, le=99)

    r = client.responses.parse(model="tiny", input="A city card", text_format=City, max_output_tokens=80,
                               temperature=0)
    assert r.status == "completed" and isinstance(r.output_parsed, City)


def test_function_call_round_trip_stored_and_stateless(tiny_server, client, validate):
    first = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=80, temperature=0)
    validate("Response", first.model_dump(exclude_unset=True))
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    assert set(json.loads(calls[0].arguments)) == {"city"}
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}
    stored = client.responses.create(model="tiny", previous_response_id=first.id, input=[result], tools=[WEATHER],
                                     max_output_tokens=8, temperature=0)
    stateless = client.responses.create(model="tiny", tools=[WEATHER], max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        result])
    assert stored.usage.input_tokens == stateless.usage.input_tokens > first.usage.input_tokens
    assert stored.output_text == stateless.output_text
    events = raw_stream(tiny_server, {"input": "Weather?", "tools": [WEATHER], "max_output_tokens": 80,
                                      "tool_choice": {"type": "function", "name": "get_weather"}})
    for e in events:
        validate(EVENTS[e["type"]], e)
    pieces = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert len(pieces) > 1 and "".join(pieces) == done["arguments"] and json.loads(done["arguments"])["city"] is not None
    assert events[-1]["response"]["output"][-1]["arguments"] == done["arguments"]


def test_store_get_delete_and_store_false(tiny_server, client):
    kept = client.responses.create(model="tiny", input="Hi", max_output_tokens=4)
    assert client.responses.retrieve(kept.id).output_text == kept.output_text
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    unstored = client.responses.create(model="tiny", input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="tiny", input="again", previous_response_id=unstored.id)
    assert e.value.body["code"] == "previous_response_not_found" and e.value.body["param"] == "previous_response_id"


def test_the_store_evicts_the_least_recently_used():
    store = ResponseStore(2)
    for rid in ("a", "b"):
        store.put(rid, [], {"id": rid})
    store.get("a")  # used: b is now the oldest
    store.put("c", [], {"id": "c"})
    assert store.get("a")[1]["id"] == "a" and store.get("c")[1]["id"] == "c"
    with pytest.raises(APIError) as e:
        store.get("b")
    assert e.value.status == 404 and e.value.code == "previous_response_not_found"
    assert len(store.items) == 2


@pytest.mark.parametrize("body, param", [
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [{"type": "mcp", "server_label": "a"}]}, "tools"),
    ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": []}, "input"),
])
def test_what_cannot_be_served_is_a_400_naming_the_field(tiny_server, validate, body, param):
    r = httpx.post(tiny_server.url + "/v1/responses", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param, r.json()
