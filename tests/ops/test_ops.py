"""Operations on a real server: API keys, CORS, request ids, JSON logs, health, readiness, version."""

import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def locked(ops_servers):
    """Two API keys, CORS for one origin, JSON logs."""
    return ops_servers["locked"]


def test_api_key_required_on_v1_with_openai_shaped_401(locked, validate):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"}):
        r = httpx.post(locked.url + "/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 401
        validate("ErrorResponse", r.json())
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(locked.url + "/v1/models").status_code == 401
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        assert httpx.post(locked.url + path, json=body).status_code == 401
        assert httpx.post(locked.url + path, json=body, headers={"Authorization": "Bearer key-one"}).status_code == 200


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
    secret = {**CHAT, "messages": [{"role": "user", "content": "violet harbor"}], "stream": True}
    r = httpx.post(locked.url + "/v1/chat/completions", json=secret, headers={**auth, "X-Request-ID": "trace-abc.123"})
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
    assert "violet harbor" not in locked.log_path.read_text()  # prompt text is not logged unless asked


def test_log_prompts_adds_the_prompt_text_to_the_request_line(ops_servers):
    server = ops_servers["log_prompts"]
    httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "zebra quartz", "max_tokens": 2})
    httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "violet harbor"}]})
    time.sleep(0.3)
    lines = [line for line in server.log_path.read_text().splitlines() if "server.requests" in line]
    assert any("POST /v1/completions 200" in line and "prompt='zebra quartz'" in line for line in lines), lines
    assert any("POST /v1/chat/completions 200" in line and "violet harbor" in line for line in lines), lines


def test_version_and_readiness(tiny_server):
    v = httpx.get(tiny_server.url + "/version").json()
    assert v["version"] and v["model"] == "tiny" and v["torch"] and v["transformers"]
    assert httpx.get(tiny_server.url + "/ready").json() == {"status": "ready", "model": "tiny"}


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_requests_tokens_and_latencies(ops_servers):
    server = ops_servers["counted"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    out = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            stream=True)
    list(stream)
    httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -1})  # a 400
    time.sleep(0.5)
    m = _samples(httpx.get(server.url + "/metrics").text)
    assert m['polyglot_requests_total{endpoint="/v1/completions",status="200"}'] == 1
    assert m['polyglot_requests_total{endpoint="/v1/chat/completions",status="200"}'] == 1
    assert m['polyglot_requests_total{endpoint="/v1/completions",status="400"}'] == 1
    assert m["polyglot_prompt_tokens_total"] >= out.usage.prompt_tokens + 2
    assert m["polyglot_generation_tokens_total"] >= 5 + 4
    assert m["polyglot_time_to_first_token_seconds_count"] == 2
    assert m["polyglot_inter_token_latency_seconds_count"] == 4 + 3
    assert m["polyglot_request_latency_seconds_count"] == 2
    assert m["polyglot_cancelled_requests_total"] == 0
    assert m["polyglot_failed_requests_total"] == 0
    for gauge in ("running_requests", "waiting_requests", "batch_rows", "kv_cache_tokens", "kv_cache_bytes"):
        assert f"polyglot_{gauge}" in m
    assert m["polyglot_running_requests"] == 0 and m["polyglot_batch_rows"] == 0
    # vLLM's names, as the Inference Gateway, KEDA and Grafana dashboards read them, parsed by Prometheus's parser
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    tiny = {"model_name": "tiny"}

    def value(name, suffix="", **labels):
        return next(x.value for x in families[name].samples if x.name == name + suffix and x.labels == {**tiny, **labels})

    assert value("vllm:num_requests_running") == 0 and value("vllm:num_requests_waiting") == 0
    assert value("vllm:kv_cache_usage_perc") == 0
    assert value("vllm:prompt_tokens", "_total") == m["polyglot_prompt_tokens_total"]
    assert value("vllm:generation_tokens", "_total") == m["polyglot_generation_tokens_total"]
    assert value("vllm:request_success", "_total", finished_reason="length") == 2
    assert value("vllm:time_to_first_token_seconds", "_count") == 2
    assert value("vllm:inter_token_latency_seconds", "_count") == 4 + 3
    assert value("vllm:e2e_request_latency_seconds", "_count") == 2
    buckets = [x.labels["le"] for x in families["vllm:time_to_first_token_seconds"].samples if "le" in x.labels]
    assert len(buckets) == 23 and buckets[0] == "0.001" and buckets[-2] == "2560.0"  # vLLM's 22, and +Inf


def _idle(server) -> dict[str, float]:
    """Metrics once the shared server has finished what earlier tests left running."""
    for _ in range(100):
        m = _samples(httpx.get(server.url + "/metrics").text)
        if m["polyglot_running_requests"] == 0 and m["polyglot_waiting_requests"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError("the server did not go idle")


def test_metrics_show_the_running_batch_its_cache_and_a_client_that_left(default_server):
    idle = _idle(default_server)
    before = idle["polyglot_cancelled_requests_total"]
    before_aborted = idle.get('vllm:request_success_total{finished_reason="abort",model_name="SmolLM2-135M-Instruct"}', 0)
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 200, "n": 3,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", default_server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)  # held open: a discarded iterator closes the connection
        first = next(lines)
        assert r.status_code == 200 and '"text"' in first, first
        for _ in range(20):  # scraped while the request runs (it has 200 tokens to go)
            during = _samples(httpx.get(default_server.url + "/metrics").text)
            if during["polyglot_batch_rows"] == 3:
                break
            time.sleep(0.1)
    assert during["polyglot_running_requests"] == 1 and during["polyglot_batch_rows"] == 3
    assert during["polyglot_kv_cache_tokens"] >= 3 * 5 and during["polyglot_kv_cache_bytes"] > 0
    assert 0 < during['vllm:kv_cache_usage_perc{model_name="SmolLM2-135M-Instruct"}'] <= 1
    after = _idle(default_server)
    assert after["polyglot_cancelled_requests_total"] == before + 1
    aborted = 'vllm:request_success_total{finished_reason="abort",model_name="SmolLM2-135M-Instruct"}'
    assert after[aborted] >= before_aborted + 3  # the three choices of the request its client left


def test_body_over_the_limit_is_413(ops_servers, validate):
    server = ops_servers["log_prompts"]
    big = {"model": "tiny", "prompt": "word " * 1000, "max_tokens": 1}
    r = httpx.post(server.url + "/v1/completions", json=big)
    assert r.status_code == 413
    validate("ErrorResponse", r.json())
    assert "--max-body-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"word " * 10
        yield b'", "max_tokens": 1}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "word", "max_tokens": 1})
    assert ok.status_code == 200
