"""Bad input gets OpenAI-shaped 4xx errors over a real port, and never disturbs other requests."""

import asyncio
import time

import httpx
import pytest

from tests.conftest import start_side_by_side

GOOD_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
GOOD_COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 4}

BAD = [
    ("/v1/completions", {**GOOD_COMPLETION, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD_COMPLETION, "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {**GOOD_COMPLETION, "temperature": -0.1}, 400, "temperature"),
    ("/v1/completions", {**GOOD_COMPLETION, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**GOOD_COMPLETION, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {**GOOD_COMPLETION, "n": 0}, 400, "n"),
    ("/v1/completions", {**GOOD_COMPLETION, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**GOOD_COMPLETION, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**GOOD_COMPLETION, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {**GOOD_COMPLETION, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {**GOOD_COMPLETION, "suffix": "after"}, 400, "suffix"),
    ("/v1/completions", {**GOOD_COMPLETION, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {**GOOD_CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**GOOD_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {**GOOD_CHAT, "stream": False, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {**GOOD_CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**GOOD_CHAT, "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {**GOOD_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    # structured outputs and tools: what cannot be compiled or honoured names its field
    ("/v1/chat/completions", {**GOOD_CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/chat/completions", {**GOOD_CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, 400, "response_format"),
    ("/v1/chat/completions", {**GOOD_CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "format": "weird"}, "strict": True}}}, 400, "response_format"),
    ("/v1/completions", {**GOOD_COMPLETION, "guided_regex": "[a-"}, 400, "guided_regex"),
    ("/v1/completions", {**GOOD_COMPLETION, "guided_json": "{not json"}, 400, "guided_json"),
    ("/v1/completions", {**GOOD_COMPLETION, "structured_outputs": {}}, 400, "structured_outputs"),
    ("/v1/completions", {**GOOD_COMPLETION, "guided_choice": ["a"], "response_format": {"type": "json_object"}}, 400,
     "guided_choice"),
    ("/v1/chat/completions", {**GOOD_CHAT, "num_beams": 4, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("/v1/chat/completions", {**GOOD_CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**GOOD_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("/v1/chat/completions", {**GOOD_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": "required", "guided_regex": "a+"}, 400, "guided_regex"),
    ("/v1/chat/completions", {**GOOD_CHAT, "messages": [{"role": "tool", "content": "42"}]}, 400, "messages"),
]


def check_error(r, status, validate, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    validate("ErrorResponse", body)
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_values(tiny_server, validate, path, body, status, param):
    check_error(httpx.post(tiny_server.url + path, json=body, timeout=30), status, validate, param)


def test_malformed_json_and_unknown_route(tiny_server, validate):
    r = httpx.post(tiny_server.url + "/v1/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    assert "JSON" in check_error(r, 400, validate)["message"]
    r = httpx.post(tiny_server.url + "/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    check_error(r, 400, validate)
    check_error(httpx.get(tiny_server.url + "/v1/nothing-here"), 404, validate)


def test_body_is_json_whatever_the_content_type(tiny_server):
    # curl -d sends application/x-www-form-urlencoded; the body is still JSON
    r = httpx.post(tiny_server.url + "/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_context_overflow_names_both_numbers(tiny_server, validate):
    # the tiny model's context is 512 tokens
    err = check_error(httpx.post(tiny_server.url + "/v1/completions", json={**GOOD_COMPLETION, "max_tokens": 600}), 400, validate)
    assert "512" in err["message"] and "600" in err["message"]
    long_prompt = "word " * 600
    err = check_error(httpx.post(tiny_server.url + "/v1/chat/completions",
                                 json={**GOOD_CHAT, "messages": [{"role": "user", "content": long_prompt}], "max_tokens": None}),
                      400, validate)
    assert "512" in err["message"]


@pytest.fixture(scope="module")
def servers(start_server, tiny_gpt2_dir):
    """A model without a chat template, and the default model with room for one request running and one waiting."""
    return start_side_by_side(start_server, no_template=("--model", str(tiny_gpt2_dir), "--served-model-name", "gpt2ish"),
                              one_row=("--max-batch-size", "1", "--max-waiting", "1"))


def test_chat_without_template_is_400(servers, validate):
    server = servers["no_template"]
    r = httpx.post(server.url + "/v1/chat/completions", json={**GOOD_CHAT, "model": "gpt2ish"}, timeout=30)
    assert "chat template" in check_error(r, 400, validate, "messages")["message"]
    ok = httpx.post(server.url + "/v1/completions", json={**GOOD_COMPLETION, "model": "gpt2ish"}, timeout=30)
    assert ok.status_code == 200


EXTREME = [
    {"seed": 2**64 - 1, "n": 2},
    {"seed": -(2**63)},
    {"top_k": 10**30},
    {"temperature": 1e-30},
    {"stop": ["", "x" * 500]},
]


@pytest.mark.parametrize("extra", EXTREME)
def test_extreme_but_valid_values_run(tiny_server, extra):
    r = httpx.post(tiny_server.url + "/v1/completions", json={**GOOD_COMPLETION, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.get(tiny_server.url + "/health").json()["status"] == "ok"


def test_out_of_range_seed_is_400(tiny_server, validate):
    r = httpx.post(tiny_server.url + "/v1/completions", json={**GOOD_COMPLETION, "seed": 2**64}, timeout=30)
    check_error(r, 400, validate, "seed")


def test_bad_requests_do_not_disturb_the_batch(tiny_server, validate):
    good = {"model": "tiny", "prompt": "Steady as she goes", "max_tokens": 30, "temperature": 0}

    async def scenario():
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=60) as c:
            alone = (await c.post("/v1/completions", json=good)).json()["choices"][0]["text"]
            goods = [c.post("/v1/completions", json=good) for _ in range(4)]
            bads = [c.post(path, json=body) for path, body, _, _ in BAD] * 2
            results = await asyncio.gather(*goods, *bads)
            return alone, results[:4], results[4:]

    alone, goods, bads = asyncio.run(scenario())
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] == alone for r in goods)
    assert all(400 <= r.status_code < 500 for r in bads)


def running(server):
    return httpx.get(server.url + "/health").json()["running"]


def wait_idle(server, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if running(server) == 0:
            return True
        time.sleep(0.05)
    return False


def test_disconnect_cancels_stream_and_plain_request(tiny_server):
    body = {"model": "tiny", "prompt": "Go on and on", "max_tokens": 400, "temperature": 0}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert running(tiny_server) == 1
    assert wait_idle(tiny_server), "streamed request still running after the client left"
    # 4 choices x 500 tokens take the tiny model well over a second even on a quick machine
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + "/v1/completions", json={**body, "max_tokens": 500, "n": 4}, timeout=0.3)
    assert wait_idle(tiny_server), "request still running after the client left"


def test_a_cancel_that_comes_with_a_token_is_not_lost():
    """The client leaves just as a token arrives: the job's wait for the token must still end in a cancel, or the
    request runs to max_tokens for nobody (Python 3.11's wait_for dropped such a cancel)."""
    from server.api.job import Job

    async def scenario():
        job = Job("j", 0, "tiny", [], 1, 1, timeout=600)
        queue: asyncio.Queue = asyncio.Queue()
        waiting = asyncio.create_task(job._next(queue))
        await asyncio.sleep(0.01)  # the job is waiting for its next token
        queue.put_nowait("a token")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(scenario())


def test_queue_full_is_503(servers, validate):
    # the default model: slow enough on any machine that the first request is still running when the third arrives
    server = servers["one_row"]
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Long", "max_tokens": 40, "temperature": 0, "ignore_eos": True}

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(8)])

    results = asyncio.run(scenario())
    codes = sorted(r.status_code for r in results)
    # one runs, at most one waits (it may be rejected too if it arrived before the first left the queue)
    assert codes.count(200) >= 1 and 503 in codes and set(codes) == {200, 503}, codes
    for r in results:
        if r.status_code == 503:
            assert check_error(r, 503, validate)["code"] == "queue_full"
            assert r.headers.get("retry-after")
