"""Operations on a real server: API keys, CORS, request ids, JSON logs, health, readiness, version."""

import json
import time

import httpx
import openai
import pytest

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def locked(start_server, tiny_llama_dir):
    """Two API keys, CORS for one origin, JSON logs."""
    return start_server("--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--api-key", "key-one,key-two",
                        "--cors-origins", "https://app.example", "--log-format", "json")


def test_api_key_required_on_v1_with_openai_shaped_401(locked, validate):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"}):
        r = httpx.post(locked.url + "/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 401
        validate("ErrorResponse", r.json())
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(locked.url + "/v1/models").status_code == 401


def test_every_key_works_and_open_routes_stay_open(locked):
    for key in ("key-one", "key-two"):
        client = openai.OpenAI(base_url=locked.url + "/v1", api_key=key)
        assert client.chat.completions.create(**CHAT).choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=locked.url + "/v1", api_key="nope").models.list()
    for path in ("/health", "/ready", "/version"):
        assert httpx.get(locked.url + path).status_code == 200


def test_cors_for_the_configured_origin_only(locked):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(locked.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(locked.url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(locked.url + "/v1/chat/completions", json=CHAT,
                   headers={"Origin": "https://app.example", "Authorization": "Bearer key-one"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_no_cors_by_default(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_request_id_echoed_or_made_and_in_the_json_log_line(locked):
    auth = {"Authorization": "Bearer key-one"}
    r = httpx.post(locked.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                   headers={**auth, "X-Request-ID": "trace-abc.123"})
    assert r.headers["x-request-id"] == "trace-abc.123"
    made = httpx.get(locked.url + "/health").headers["x-request-id"]
    assert len(made) == 32 and made != "trace-abc.123"
    bad = httpx.get(locked.url + "/health", headers={"X-Request-ID": "no spaces or\tcontrol"}).headers["x-request-id"]
    assert len(bad) == 32  # not echoed: a made one instead
    time.sleep(0.3)
    lines = [json.loads(line) for line in locked.log_path.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line["request_id"] == "trace-abc.123"]
    assert mine, "no log line with the request id"
    summary = mine[-1]
    assert summary["path"] == "/v1/chat/completions" and summary["status"] == 200
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] == 3 and summary["latency_ms"] > 0
    assert all("Hi" not in line["message"] for line in lines)  # prompt text is not logged


def test_version_and_readiness(tiny_server):
    v = httpx.get(tiny_server.url + "/version").json()
    assert v["version"] and v["model"] == "tiny" and v["torch"] and v["transformers"]
    assert httpx.get(tiny_server.url + "/ready").json() == {"status": "ready", "model": "tiny"}
