"""The official openai SDK against a real server on a real port (tiny model), every body checked
against OpenAI's published schemas."""

import httpx
import openai
import pytest

from tests.conftest import sse_events


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


def dump(obj):
    return obj.model_dump(exclude_unset=True)


def test_models(client, tiny_server, validate):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    validate("ListModelsResponse", httpx.get(tiny_server.url + "/v1/models").json())
    assert client.models.retrieve("tiny").id == "tiny"


@pytest.mark.parametrize(
    "prompt, count",
    [("Hello there", 1), (["Hello", "Bonjour le monde"], 2), ([1, 2, 3], 1), ([[4, 5], [6, 7, 8]], 2)],
)
def test_completion_prompt_forms_and_exact_usage(client, tokenizer, validate, prompt, count):
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, n=2)
    validate("CreateCompletionResponse", dump(r))
    assert [c.index for c in r.choices] == list(range(2 * count))
    assert all(c.finish_reason == "length" for c in r.choices)
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) if isinstance(p, str) else len(p) for p in prompts)
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == 5 * 2 * count
    assert r.usage.total_tokens == prompt_tokens + 10 * count
    # greedy choices of one prompt are identical
    assert r.choices[0].text == r.choices[1].text


def test_stream_equals_non_stream_completion(client, validate):
    kwargs = dict(model="tiny", prompt="The weather today", max_tokens=20, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    for c in chunks:
        validate("CreateCompletionStreamChunk" if c.choices and c.choices[0].finish_reason is None else "CreateCompletionResponse", dump(c))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_and_chat_stream(client, validate):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi, "}, {"type": "text", "text": "who are you?"}]},
        {"role": "assistant", "content": "A model."},
        {"role": "user", "content": "Say more."},
    ]
    full = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=15, temperature=0)
    validate("CreateChatCompletionResponse", dump(full))
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 15
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0, stream=True,
                                                 n=2, stream_options={"include_usage": True}))
    for c in stream:
        validate("CreateChatCompletionStreamResponse", dump(c))
    for i in range(2):
        mine = [c.choices[0] for c in stream if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(ch.delta.content or "" for ch in mine) == full.choices[0].message.content
        assert mine[-1].finish_reason == "length" and all(ch.finish_reason is None for ch in mine[:-1])
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 30
    # the second call's prompt is the first's: its full blocks of 16 tokens come from the prefix cache
    assert full.usage.prompt_tokens >= 33
    assert stream[-1].usage.prompt_tokens_details.cached_tokens >= 32


def test_raw_sse_framing(tiny_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    assert all(block.startswith("data: ") for block in raw.strip().split("\n\n"))
    events = sse_events(raw.split("\n"))
    assert "usage" not in events[-1]  # no usage chunk unless asked


def test_stop_strings_streamed_and_not(client):
    kwargs = dict(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    assert stop.strip(), f"no usable stop string in {full!r}"
    cut = client.completions.create(**kwargs, stop=[stop, "never-appears"])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**kwargs, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    kwargs = dict(model="tiny", prompt="Random words:", max_tokens=12, temperature=1.0, seed=42)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    other = {client.completions.create(**{**kwargs, "seed": s}).choices[0].text for s in range(5)}
    assert len(other) > 1
