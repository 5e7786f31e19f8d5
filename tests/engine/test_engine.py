"""The engine on tiny real models: batching must not change greedy output, rows join and leave."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.engine import Engine, EngineConfig
from server.engine.params import SamplingParams

PROMPTS = [
    "Hello",
    "The capital of France is a city called",
    "1 2 3",
    "Once upon a time, in a land far away, there lived a",
    "北京是",
    "def main():",
    "A",
    "The quick brown fox jumps over the lazy dog and then",
]


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir", "tiny_bloom_dir"])
def model_and_engine(request, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(request.param), dtype=torch.float32).eval()
    engine = Engine(model, tokenizer, torch.device("cpu"), EngineConfig(max_model_len=256, max_batch_size=16))
    engine.start()
    yield model, engine
    engine.stop()


async def collect(engine, ids, params, rid):
    texts, tokens, finish = {}, {}, {}
    async for out in engine.generate(ids, params, rid):
        for o in out.outputs:
            texts[o.index] = texts.get(o.index, "") + o.text
            tokens.setdefault(o.index, []).extend(o.token_ids)
            finish[o.index] = o.finish_reason
    return texts, tokens, finish


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_alone_batched_and_joining_match_hf(model_and_engine, tokenizer):
    model, engine = model_and_engine
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    greedy = SamplingParams(max_tokens=12, temperature=0.0)

    async def scenario():
        alone = [await collect(engine, x, greedy, f"alone{i}") for i, x in enumerate(ids)]
        batched = await asyncio.gather(*[collect(engine, x, greedy, f"batch{i}") for i, x in enumerate(ids)])

        async def late(i, x):  # join a running batch at different steps
            await asyncio.sleep(0.01 * i)
            return await collect(engine, x, greedy, f"late{i}")

        joined = await asyncio.gather(*[late(i, x) for i, x in enumerate(ids)])
        return alone, batched, joined

    alone, batched, joined = asyncio.run(scenario())
    for i, x in enumerate(ids):
        reference = hf_greedy(model, x, 12)
        assert alone[i][1][0] == reference, PROMPTS[i]
        assert batched[i][1][0] == reference, PROMPTS[i]
        assert joined[i][1][0] == reference, PROMPTS[i]
        assert alone[i][2][0] == "length"
    assert engine.batch is None and not engine.scheduler.running  # every row left, the cache is gone


def test_n_choices_seeded_reproducible(model_and_engine, tokenizer):
    _, engine = model_and_engine
    ids = tokenizer("Tell me a story")["input_ids"]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, n=3)

    async def twice():
        first = await collect(engine, ids, params, "s1")
        # the second run shares the batch with other requests
        others = [collect(engine, tokenizer(p)["input_ids"], SamplingParams(max_tokens=8), f"o{i}") for i, p in enumerate(PROMPTS[:4])]
        second, *_ = await asyncio.gather(collect(engine, ids, params, "s2"), *others)
        return first, second

    first, second = asyncio.run(twice())
    assert sorted(first[1]) == [0, 1, 2]
    assert first[1] == second[1]
    assert len({tuple(t) for t in first[1].values()}) > 1  # the choices are drawn independently


def test_abort_frees_rows(model_and_engine, tokenizer):
    _, engine = model_and_engine
    ids = tokenizer("Count forever")["input_ids"]

    async def scenario():
        stream = engine.generate(ids, SamplingParams(max_tokens=200, temperature=0.0, n=2), "abort-me")
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break  # leaving the loop aborts the request
        for _ in range(100):
            if engine.batch is None and not engine.scheduler.running:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(scenario())


def test_stop_string_and_eos(model_and_engine, tokenizer):
    _, engine = model_and_engine
    ids = tokenizer("Once upon a time")["input_ids"]
    full = asyncio.run(collect(engine, ids, SamplingParams(max_tokens=16, temperature=0.0), "full"))[0][0]
    stop = full[len(full) // 3 : len(full) // 3 + 3]
    assert stop.strip(), f"no usable stop string in {full!r}"
    texts, tokens, finish = asyncio.run(collect(engine, ids, SamplingParams(max_tokens=16, temperature=0.0, stop=(stop,)), "stop"))
    assert texts[0] == full[: full.index(stop)]
    assert finish[0] == "stop"


def test_long_prompts_join_in_chunks_while_streams_run(model_and_engine, tokenizer):
    """A long prompt is fed 16 tokens a step: the running stream keeps getting a token every step meanwhile,
    and chunking changes no output."""
    model, _ = model_and_engine
    engine = Engine(model, tokenizer, torch.device("cpu"), EngineConfig(max_model_len=256, max_batch_size=16, prefill_chunk=48))
    engine.start()
    short = tokenizer("Once upon a time")["input_ids"]
    long = [tokenizer(" ".join(PROMPTS * k))["input_ids"][:90 + 7 * k] for k in range(1, 4)]
    events: list[str] = []

    async def watch(ids, params, rid):
        tokens = []
        async for out in engine.generate(ids, params, rid):
            events.append(rid)
            tokens += [t for o in out.outputs for t in o.token_ids]
        return tokens

    async def scenario():
        stream = asyncio.create_task(watch(short, SamplingParams(max_tokens=60, temperature=0.0), "stream"))
        while "stream" not in events:
            await asyncio.sleep(0.001)
        joined = await asyncio.gather(*[watch(x, SamplingParams(max_tokens=8, temperature=0.0), f"long{i}")
                                        for i, x in enumerate(long)])
        return await stream, joined

    try:
        streamed, joined = asyncio.run(scenario())
    finally:
        engine.stop()
    assert streamed == hf_greedy(model, short, 60)
    for x, got in zip(long, joined, strict=True):
        assert got == hf_greedy(model, x, 8)
    # the three prompts (111 columns once padded) took 7 steps of 16 columns; the stream got a token in each
    first_long = min(events.index(f"long{i}") for i in range(3))
    assert events[:first_long].count("stream") >= 7


def test_short_prompt_overtakes_a_long_prefill(model_and_engine, tokenizer):
    """A short prompt that arrives while a long one is being fed in chunks gets its own group and is fed first
    (in the same forward as the stream's decode and the long prompt's chunk, where the model allows it), so it
    does not wait for the long prompt. With two forwards a step (BLOOM), groups go one at a time."""
    model, _ = model_and_engine
    engine = Engine(model, tokenizer, torch.device("cpu"), EngineConfig(max_model_len=256, max_batch_size=16, prefill_chunk=32))
    engine.start()
    stream_ids = tokenizer("Once upon a time")["input_ids"]
    long = tokenizer(" ".join(PROMPTS * 4))["input_ids"][:200]
    short = tokenizer("The capital of France is")["input_ids"]
    events: list[str] = []

    async def watch(ids, max_tokens, rid):
        tokens = []
        async for out in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), rid):
            events.append(rid)
            tokens += [t for o in out.outputs for t in o.token_ids]
        return tokens

    async def scenario():
        stream = asyncio.create_task(watch(stream_ids, 40, "stream"))
        while "stream" not in events:
            await asyncio.sleep(0.001)
        slow = asyncio.create_task(watch(long, 4, "long"))
        while not (engine.scheduler.prefilling and engine.scheduler.prefilling[0].done > 0):  # the long prompt's first chunk is in
            await asyncio.sleep(0.001)
        fast = await watch(short, 4, "short")
        return await stream, await slow, fast

    try:
        streamed, slow, fast = asyncio.run(scenario())
    finally:
        engine.stop()
    assert streamed == hf_greedy(model, stream_ids, 40)
    assert slow == hf_greedy(model, long, 4) and fast == hf_greedy(model, short, 4)
    assert (events.index("short") < events.index("long")) is engine.runner.fused


def test_prompts_are_grouped_by_length():
    from server.engine.scheduler import by_length
    from server.engine.request import Request

    requests = [Request(str(n), [1] * n, SamplingParams(max_tokens=1), emit=lambda _: None) for n in (300, 5, 20, 40, 41, 100)]
    assert [[len(r.prompt_ids) for r in g] for g in by_length(requests)] == [[5, 20], [40, 41], [100], [300]]


def test_an_exception_in_one_requests_decoding_fails_only_that_request(model_and_engine, tokenizer, monkeypatch):
    """Fault injection: the detokenizer raises for one request's rows. That request ends with an error; the one
    sharing its batch still gets HF greedy's tokens."""
    from server.engine.detokenizer import IncrementalDetokenizer

    model, engine = model_and_engine
    broken_prompt = tokenizer("Break me")["input_ids"]
    add = IncrementalDetokenizer.add

    def add_or_raise(self, token):
        if self.ids[: len(broken_prompt)] == broken_prompt:
            raise ValueError("detokenizer exploded")
        return add(self, token)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add_or_raise)
    good = tokenizer("Once upon a time")["input_ids"]

    async def both():
        return await asyncio.gather(collect(engine, good, SamplingParams(max_tokens=12, temperature=0.0), "good"),
                                    collect(engine, broken_prompt, SamplingParams(max_tokens=12, temperature=0.0), "bad"),
                                    return_exceptions=True)

    ok, failed = asyncio.run(both())
    assert ok[1][0] == hf_greedy(model, good, 12)
    assert "detokenizer exploded" in str(failed)
    assert engine.is_alive() and engine.num_running == 0


def test_a_sticky_device_error_marks_the_engine_dead_and_fails_what_comes(tokenizer, tiny_llama_dir, monkeypatch):
    """An illegal memory access sticks to a CUDA context: every later step would fail. The engine says so
    (is_alive() turns False, so /health answers 503 and the pod is restarted) and ends new requests at once."""
    from server.engine.engine import EngineError

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    engine = Engine(model, tokenizer, torch.device("cpu"), EngineConfig(max_model_len=64, max_batch_size=4))

    def broken_step():
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine, "step", broken_step)
    engine.start()
    try:
        async def one(rid):
            with pytest.raises(EngineError, match="illegal memory access"):
                await collect(engine, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0), rid)

        asyncio.run(one("first"))
        assert not engine.is_alive() and "illegal memory access" in engine.broken
        asyncio.run(asyncio.wait_for(one("later"), 10))  # ended, not left waiting
    finally:
        engine.stop()
