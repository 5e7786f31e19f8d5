"""Decoding fields through the server and the openai SDK (extra_body for the non-OpenAI ones),
each with a check that fails if the field were ignored."""

import json

import httpx
import openai
import pytest

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def smol(default_server):
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0)


def greedy_ids(client, tokenizer, **kw):
    text = client.completions.create(model="tiny", prompt="Hello world", max_tokens=4, temperature=0, **kw).choices[0].text
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def test_logit_bias_bans_and_forces(tiny, tokenizer):
    text, ids = greedy_ids(tiny, tokenizer)
    first = tokenizer(tokenizer.decode(ids[:1]), add_special_tokens=False)["input_ids"][0]
    banned, _ = greedy_ids(tiny, tokenizer, logit_bias={str(first): -100})
    assert not banned.startswith(tokenizer.decode([first])), (text, banned)
    forced = tokenizer("apple", add_special_tokens=False)["input_ids"][0]
    r = tiny.completions.create(model="tiny", prompt="Hello world", max_tokens=3, temperature=0.8,
                                logit_bias={str(forced): 100})
    assert r.choices[0].text == tokenizer.decode([forced] * 3)


def test_ignore_eos_gives_exactly_max_tokens(smol):
    plain = smol.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, max_tokens=40, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 40
    forced = smol.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 40 and forced.choices[0].finish_reason == "length"


def test_min_tokens_delays_the_end(smol):
    r = smol.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, max_tokens=60, temperature=0,
                                     extra_body={"min_tokens": 20})
    assert r.usage.completion_tokens >= 20


def test_stop_token_ids(smol, tokenizer):
    plain = smol.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3,", max_tokens=12, temperature=0)
    ids = tokenizer("1, 2, 3," + plain.choices[0].text, add_special_tokens=False)["input_ids"]
    prompt_len = len(tokenizer("1, 2, 3,", add_special_tokens=False)["input_ids"])
    stop_id = ids[prompt_len + 3]
    chunks = list(smol.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3,", max_tokens=12, temperature=0,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"stop_token_ids": [stop_id]}))
    usage = chunks[-1].usage
    first_hit = ids[prompt_len:].index(stop_id) + 1
    assert usage.completion_tokens == first_hit
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize("field", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                   {"extra_body": {"repetition_penalty": 1.8}}])
def test_penalties_change_a_repetitive_output(smol, field):
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt="ha ha ha ha ha ha ha ha ha ha", max_tokens=16, temperature=0)
    plain = smol.completions.create(**kwargs).choices[0].text
    assert plain.count("ha") >= 4  # the unpenalised model keeps laughing
    penalised = smol.completions.create(**kwargs, **field).choices[0].text
    assert penalised != plain and penalised.count("ha") < plain.count("ha")


def test_min_p_narrows_sampling(tiny):
    kwargs = dict(model="tiny", prompt="Pick:", max_tokens=1, temperature=1.0, n=16)
    wide = {c.text for s in range(3) for c in tiny.completions.create(**kwargs, seed=s).choices}
    narrow = {c.text for s in range(3) for c in tiny.completions.create(**kwargs, seed=s, extra_body={"min_p": 1.0}).choices}
    assert len(narrow) == 1 and len(wide) > 1


@pytest.mark.parametrize("body, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"12": 101}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt_lookup": 17}, "prompt_lookup"),
])
def test_out_of_range_is_400(tiny_server, validate, body, param):
    r = httpx.post(tiny_server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param


def test_prompt_lookup_keeps_drafts_and_gives_the_same_greedy_answer(fp32_server, validate):
    """A text to repeat: with drafts the greedy answer is the same, streamed or not (a step may bring several
    tokens), and /metrics counts draft tokens kept."""
    client = openai.OpenAI(base_url=fp32_server.url + "/v1", api_key="unused", max_retries=0)
    text = ("The library is open from nine to eight, Monday to Saturday. Books may be borrowed for three weeks and "
            "renewed twice, online or at the desk.")
    messages = [{"role": "user", "content": "Repeat the following text exactly, word for word:\n\n" + text}]

    def metric(name):
        lines = httpx.get(fp32_server.url + "/metrics").text.splitlines()
        return float(next(line.split()[-1] for line in lines if line.startswith(name + " ")))

    kept = metric("polyglot_spec_decode_num_accepted_tokens_total")
    answers = [client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=48,
                                              temperature=0, extra_body={"prompt_lookup": k}) for k in (0, 6)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.completion_tokens == answers[1].usage.completion_tokens
    assert metric("polyglot_spec_decode_num_accepted_tokens_total") - kept >= 10
    with httpx.stream("POST", fp32_server.url + "/v1/chat/completions",
                      json={"messages": messages, "max_tokens": 48, "temperature": 0, "stream": True,
                            "prompt_lookup": 6}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == answers[0].choices[0].message.content
