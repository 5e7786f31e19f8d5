"""Beam search over HTTP and the openai SDK (extra_body), streamed and not."""

import asyncio

import httpx
import openai
import pytest

from tests.integration.test_openai_sdk import dump

MODEL = "SmolLM2-135M-Instruct"
BEAMS = {"num_beams": 4, "early_stopping": True}


@pytest.fixture(scope="module")
def smol(default_server):
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_beams_streamed_equals_not(smol, validate):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Write a sentence about the sea."}], max_tokens=24)
    full = smol.chat.completions.create(**kwargs, extra_body=BEAMS)
    validate("CreateChatCompletionResponse", dump(full))
    greedy = smol.chat.completions.create(**kwargs, temperature=0)
    assert full.choices[0].message.content != greedy.choices[0].message.content  # the search did something
    chunks = list(smol.chat.completions.create(**kwargs, stream=True, extra_body=BEAMS))
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", dump(c))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == full.choices[0].message.content
    assert sum(1 for p in pieces if p) > 2  # settled text streamed before the search ended
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_hypotheses_best_first_and_vllm_form(smol):
    kwargs = dict(model=MODEL, prompt="The best thing about Paris is", max_tokens=12)
    r = smol.completions.create(**kwargs, n=3, extra_body=BEAMS)
    texts = [c.text for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3
    vllm = smol.completions.create(**kwargs, n=3, extra_body={"use_beam_search": True, "best_of": 4, "early_stopping": True})
    assert [c.text for c in vllm.choices] == texts
    one = smol.completions.create(**kwargs, extra_body=BEAMS)
    assert one.choices[0].text == texts[0]


def test_stop_strings_apply_to_beams(smol):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=16)
    full = smol.completions.create(**kwargs, extra_body=BEAMS).choices[0].text
    stop = full.split()[3]
    cut = smol.completions.create(**kwargs, stop=[stop], extra_body=BEAMS).choices[0]
    assert stop not in cut.text and cut.finish_reason == "stop"
    assert full.startswith(cut.text)


@pytest.mark.parametrize("extra, param", [
    ({"num_beams": 4, "temperature": 0.7}, "temperature"),
    ({"num_beams": 4, "top_p": 0.5}, "top_p"),
    ({"num_beams": 2, "n": 3}, "n"),
    ({"num_beams": 4, "logprobs": 1}, "logprobs"),
    ({"num_beams": 9}, "num_beams"),
    ({"num_beams": 4, "best_of": 3}, "best_of"),
    ({"use_beam_search": True, "best_of": 12}, "num_beams"),
    ({"num_beams": 4, "early_stopping": "sometimes"}, "early_stopping"),
])
def test_beam_combinations_rejected(tiny_server, validate, extra, param):
    r = httpx.post(tiny_server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param


def test_beam_request_waits_for_room(start_server, tiny_llama_dir):
    # 4 beam rows in a batch of 4: the second beam request queues instead of failing
    server = start_server("--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--max-batch-size", "4")

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 30, "num_beams": 4}
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(3)])

    assert [r.status_code for r in asyncio.run(scenario())] == [200, 200, 200]
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4, "num_beams": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_beams"


def test_min_tokens_and_penalties_see_each_beams_own_tokens(smol):
    france = [{"role": "user", "content": "What is the capital of France?"}]
    plain = smol.chat.completions.create(model=MODEL, messages=france, max_tokens=40, extra_body=BEAMS)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 9
    held = smol.chat.completions.create(model=MODEL, messages=france, max_tokens=40,
                                        extra_body={**BEAMS, "min_tokens": 9})
    # the end token is banned only until the beam holds 9 tokens, then the search may end
    assert 9 <= held.usage.completion_tokens < 40 and held.choices[0].finish_reason == "stop"
    kwargs = dict(model=MODEL, prompt="ha ha ha ha ha ha ha ha ha ha", max_tokens=12)
    laugh = smol.completions.create(**kwargs, extra_body=BEAMS).choices[0].text
    penalised = smol.completions.create(**kwargs, frequency_penalty=2.0, extra_body=BEAMS).choices[0].text
    assert penalised.count("ha") < laugh.count("ha")
