"""Fuzzing the HTTP API with hypothesis: bodies built from the real field names with values of any type and size.
No answer may be a 5xx, every 4xx must be OpenAI's error shape, nothing may hang, and the server must still
answer afterwards."""

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "best_of", "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs", "echo", "logit_bias",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens", "num_beams",
          "length_penalty", "early_stopping", "ignore_eos", "stop_token_ids", "suffix", "user", "response_format",
          "tools", "tool_choice"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x", 3]),
                                 "content": st.one_of(st.text(max_size=60), values)})
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8).flatmap(
    lambda base: st.fixed_dictionaries({}, optional={"messages": st.lists(message, max_size=3),
                                                     "prompt": st.one_of(st.text(max_size=80), values)}).map(
        lambda extra: {"model": "tiny", "max_tokens": 4, **base, **extra}))


@pytest.fixture(scope="module")
def client(start_server, tiny_llama_dir):
    server = start_server("--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--request-timeout", "30")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_no_body_gets_a_5xx(client, body, path):
    try:
        r = client.post(path, json=body)
    except ValueError:  # NaN/inf is not JSON: send it the way a sloppy client would
        import json

        r = client.post(path, content=json.dumps(body, allow_nan=True), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["type"]


def test_still_serving_after_the_fuzz(client):
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200
