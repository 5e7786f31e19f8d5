"""POST /tokenize and /detokenize on the default model over a real port: exact round trips in every language of the
shipped text, chat counts equal to the chat route's, and clear 4xx errors."""

import httpx

from tests.conftest import ROOT, WEATHER_TOOL

MODEL = "SmolLM2-135M-Instruct"
TEXTS = [line for line in (ROOT / "scripts" / "data" / "multilingual.txt").read_text().splitlines() if line]
TEXTS += ["🤗🌊 媽 ไทย 👩‍👩‍👧"]  # emoji made of several code points, a character split over byte-level tokens


def post(server, path, body):
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=60)


def test_round_trips_are_exact_in_every_language(default_server):
    assert len(TEXTS) >= 12
    for text in TEXTS:
        r = post(default_server, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True,
                                               "return_token_bytes": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) == len(body["token_bytes"]) > 0
        assert body["max_model_len"] == httpx.get(default_server.url + "/v1/models").json()["data"][0]["max_model_len"]
        assert b"".join(bytes(b) for b in body["token_bytes"]) == text.encode()  # pieces split inside characters too
        back = post(default_server, "/detokenize", {"tokens": body["tokens"]})
        assert back.status_code == 200 and back.json() == {"prompt": text}
        done = post(default_server, "/v1/completions", {"prompt": text, "max_tokens": 1})
        assert done.json()["usage"]["prompt_tokens"] == body["count"]


def test_chat_counts_equal_the_chat_routes_prompt_tokens(default_server):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "ما هي عاصمة مصر؟"}]
    cases = [{}, {"tools": [WEATHER_TOOL]}, {"tools": [WEATHER_TOOL], "tool_choice": "none"}]
    counts = []
    for extra in cases:
        counted = post(default_server, "/tokenize", {"messages": messages, **extra}).json()
        chat = post(default_server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1, **extra}).json()
        assert counted["count"] == chat["usage"]["prompt_tokens"], (extra, counted, chat)
        counts.append(counted["count"])
    assert counts[1] > counts[0] == counts[2]  # the tools are in the prompt unless tool_choice is none
    no_prompt = post(default_server, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert no_prompt["count"] < counts[0]


def test_bad_input_gets_a_4xx_naming_the_field(default_server, validate):
    for path, body, status, param in [
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None),
        ("/tokenize", {}, 400, None),
        ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ]:
        r = httpx.post(default_server.url + path, json={"model": MODEL, **body}, timeout=30)
        assert r.status_code == status, (body, r.text)
        validate("ErrorResponse", r.json())
        if param:
            assert r.json()["error"]["param"] == param, r.json()
