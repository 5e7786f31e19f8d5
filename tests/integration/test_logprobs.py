"""logprobs through both endpoints, streamed and not, checked against the spec and against each other."""

import math

import httpx
import openai
import pytest

from tests.integration.test_openai_sdk import dump

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smol(default_server):
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0)


def test_completion_logprobs_greedy(smol, validate):
    r = smol.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=3)
    validate("CreateCompletionResponse", dump(r))
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens).startswith(r.choices[0].text)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))  # greedy tokens have the top log-probability
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = [c.choices[0].logprobs for c in smol.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=3, stream=True)]
    assert [t for s in streamed if s for t in s.tokens] == lp.tokens
    assert [o for s in streamed if s for o in s.text_offset] == lp.text_offset
    assert [v for s in streamed if s for v in s.token_logprobs] == pytest.approx(lp.token_logprobs)


def first_top(smol, **kw):
    r = smol.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                     max_tokens=1, logprobs=True, top_logprobs=5, seed=0, **kw)
    return r.choices[0].logprobs.content[0]


def test_chat_logprobs_follow_temperature_and_bias(smol, validate, tokenizer):
    cold = first_top(smol, temperature=0)
    assert cold.logprob == pytest.approx(cold.top_logprobs[0].logprob)
    assert [t.logprob for t in cold.top_logprobs] == sorted((t.logprob for t in cold.top_logprobs), reverse=True)
    assert bytes(cold.bytes).decode() == cold.token
    hot = first_top(smol, temperature=2.0)
    assert hot.top_logprobs[0].logprob < cold.top_logprobs[0].logprob  # a flatter distribution
    second = cold.top_logprobs[1]
    second_id = tokenizer(second.token, add_special_tokens=False)["input_ids"][0]
    biased = first_top(smol, temperature=0, logit_bias={str(second_id): 5})
    assert biased.token == second.token and biased.logprob > second.logprob  # bias applies before log-probabilities


def test_chat_logprobs_stream_matches_non_stream(smol, validate):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Say hello in French."}], max_tokens=10,
                  temperature=0, logprobs=True, top_logprobs=2)
    full = smol.chat.completions.create(**kwargs)
    validate("CreateChatCompletionResponse", dump(full))
    chunks = list(smol.chat.completions.create(**kwargs, stream=True))
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", dump(c))
    tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in full.choices[0].logprobs.content]
    assert len(tokens) == full.usage.completion_tokens
    plain = smol.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_logprobs_out_of_range(tiny_server, validate, path, body, param):
    r = httpx.post(tiny_server.url + path, json=body)
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param


def test_echo_text_and_prompt_logprobs(smol):
    base = smol.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    r = smol.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2, echo=True)
    assert r.choices[0].text == "The capital of France is" + base.choices[0].text
    lp = r.choices[0].logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first token
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.token_logprobs[n_prompt:] == pytest.approx(base.choices[0].logprobs.token_logprobs, abs=1e-4)
    # a prompt token's log-probability is the model's for that token after the tokens before it
    longer = smol.completions.create(model=MODEL, prompt="The capital of France is" + base.choices[0].text,
                                     max_tokens=1, temperature=0, logprobs=0, echo=True)
    assert longer.choices[0].logprobs.token_logprobs[n_prompt] == pytest.approx(lp.token_logprobs[n_prompt], abs=1e-3)


def test_echo_streamed_and_several_prompts(smol):
    kwargs = dict(model=MODEL, prompt=["Hello there", "Bonjour"], max_tokens=5, temperature=0, echo=True, n=2)
    full = smol.completions.create(**kwargs)
    texts = {}
    for c in smol.completions.create(**kwargs, stream=True):
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert texts == {c.index: c.text for c in full.choices}
    assert all(c.text.startswith(["Hello there", "Bonjour"][c.index // 2]) for c in full.choices)


def test_best_of_returns_the_most_likely_candidates(smol, tokenizer):
    kwargs = dict(model=MODEL, prompt="My favourite animal is", max_tokens=6, temperature=1.0, seed=3)
    pool = smol.completions.create(**kwargs, n=5, logprobs=0)
    def mean(c):
        return sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)
    ranked = sorted(pool.choices, key=mean, reverse=True)
    best = smol.completions.create(**kwargs, n=2, best_of=5)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.choices[0].logprobs is None  # scored internally, returned only when asked
    assert best.usage.completion_tokens == pool.usage.completion_tokens  # every candidate counts


@pytest.mark.parametrize("body", [{"best_of": 1, "n": 2}, {"best_of": 3, "stream": True}])
def test_best_of_rules(tiny_server, validate, body):
    r = httpx.post(tiny_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    validate("ErrorResponse", r.json())
