"""The API layer over the fake engine: the same routes, middleware and SDK as with a model, in this process, with
failures a real model does not make on cue (a device error mid-answer, a timeout, a full queue). Every body and
event is validated against OpenAI's schemas."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.api.conftest import MODEL
from tests.conftest import ROOT, sse_events
from tests.fake_engine import REPLY
from tests.integration.test_responses import EVENTS

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in five languages."}]}


def data_lines(r: httpx.Response) -> list[str]:
    return [line for line in r.text.splitlines() if line]


def responses_events(r: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


def test_the_api_layer_needs_no_torch(default_model_dir):
    """The app, its routes and middleware, built over an engine client that is not the model's, import no torch."""
    script = f"""
import sys
from fastapi.testclient import TestClient
from transformers import PreTrainedTokenizerFast
from server.api.app import create_app
from server.config import Settings
from tests.fake_engine import FakeEngine, REPLY
app = create_app(Settings(), FakeEngine(PreTrainedTokenizerFast.from_pretrained({str(default_model_dir)!r})))
with TestClient(app) as c:
    r = c.post("/v1/chat/completions", json={{"messages": [{{"role": "user", "content": "hi"}}]}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == REPLY, r.text
    assert c.get("/metrics").status_code == 200
assert "torch" not in sys.modules, "torch was imported"
print("no torch")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "no torch", done.stderr[-3000:]


def test_sdk_streams_in_every_script_validate_and_join_to_the_text(fake_server, validate):
    """The reply mixes Latin, CJK, Thai, Arabic, Cyrillic and an emoji split over byte tokens; every route's
    joined deltas equal the whole text, and every chunk and event has OpenAI's shape."""
    server = fake_server()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    chunks = list(client.chat.completions.create(**CHAT, stream=True, n=2, logprobs=True, top_logprobs=1,
                                                 stream_options={"include_usage": True}))
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i) == REPLY
    assert chunks[-1].usage.completion_tokens == 2 * len(server.engine.reply)

    # (echo with logprobs is left out: its first token's null log-probability, as OpenAI sends it, is not in the spec)
    for extra, head in [({"echo": True}, "Hello"), ({"logprobs": 1}, "")]:
        completions = list(client.completions.create(model=MODEL, prompt="Hello", stream=True, max_tokens=200,
                                                     **extra))
        for chunk in completions:
            validate("CreateCompletionStreamChunk", chunk.model_dump(exclude_unset=True))
        assert "".join(c.choices[0].text for c in completions) == head + REPLY

    with client.responses.stream(model=MODEL, input="Say hello.") as stream:
        events = list(stream)
        final = stream.get_final_response()
    for e in events:
        validate(EVENTS[e.type], e.model_dump(exclude_unset=True, warnings=False))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY == final.output_text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/v1/responses"])
def test_a_failure_mid_stream_ends_the_stream_in_the_routes_shape(fake_server, validate, route):
    server = fake_server()
    body = {"/v1/completions": {"prompt": "FAIL now"}, "/v1/chat/completions": {"messages": [
        {"role": "user", "content": "FAIL now"}]}, "/v1/responses": {"input": "FAIL now"}}[route]
    r = httpx.post(server.url + route, json={"model": MODEL, "stream": True, **body}, timeout=30)
    assert r.status_code == 200
    if route == "/v1/responses":
        events = responses_events(r)
        for e in events:
            validate(EVENTS[e["type"]], e)
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["error"] == {"code": "server_error", "message": "the fake device fell over"}
        assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")  # text came first
    else:
        events = sse_events(data_lines(r))
        error = events[-1]
        validate("ErrorResponse", error)
        assert error["error"]["message"] == "generation failed: the fake device fell over"
        assert "error" not in events[-2]


def test_a_failing_request_leaves_the_others_whole(fake_server, validate):
    """A 500 in OpenAI's shape for the request the engine failed; those beside it finish with the whole text."""
    server = fake_server()

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            contents = ["FAIL now", "hello", "FAIL again", "hello"]
            return await asyncio.gather(*(c.post("/v1/chat/completions", json={
                **CHAT, "messages": [{"role": "user", "content": text}]}) for text in contents))

    failed, good, failed2, good2 = asyncio.run(run())
    for r in (failed, failed2):
        assert r.status_code == 500
        validate("ErrorResponse", r.json())
    for r in (good, good2):
        assert r.status_code == 200
        validate("CreateChatCompletionResponse", r.json())
        assert r.json()["choices"][0]["message"]["content"] == REPLY


def test_a_request_past_the_timeout_is_a_504_or_a_failed_stream(fake_server, validate):
    server = fake_server(request_timeout=1)
    slow = {"messages": [{"role": "user", "content": "SLOW please"}]}
    started = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, **slow}, timeout=30)
    assert r.status_code == 504 and time.monotonic() - started < 5
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["code"] == "timeout"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "SLOW please", "stream": True},
                   timeout=30)
    events = sse_events(data_lines(r))
    validate("ErrorResponse", events[-1])
    assert events[-1]["error"]["code"] == "timeout" and events[0]["choices"][0]["text"]  # tokens, then the end
    r = httpx.post(server.url + "/v1/responses", json={"model": MODEL, "input": "SLOW please", "stream": True},
                   timeout=30)
    events = responses_events(r)
    for e in events:
        validate(EVENTS[e["type"]], e)
    assert events[-1]["type"] == "response.failed" and "--request-timeout" in events[-1]["response"]["error"]["message"]
    deadline = time.monotonic() + 5
    while server.engine.num_running and time.monotonic() < deadline:  # the engine was told to drop both
        time.sleep(0.05)
    assert server.engine.num_running == 0 and len(server.engine.aborted) == 3


def test_a_full_queue_is_a_503_to_retry(fake_server, validate):
    server = fake_server()
    server.engine.full = True
    for route, body in [("/v1/chat/completions", CHAT), ("/v1/responses", {"model": MODEL, "input": "hi"}),
                        ("/v1/completions", {"model": MODEL, "prompt": "hi"})]:
        r = httpx.post(server.url + route, json=body, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        validate("ErrorResponse", r.json())
        assert r.json()["error"]["code"] == "queue_full"
    server.engine.full = False
    assert httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_a_client_that_leaves_mid_stream_aborts_its_requests(fake_server):
    server = fake_server()
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": ["SLOW one", "SLOW two"], "stream": True}) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 5
    while len(server.engine.aborted) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.engine.aborted) == 2 and server.engine.num_running == 0
