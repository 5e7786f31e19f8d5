"""Beam search inside the batching engine equals Hugging Face generate(num_beams=4), token for token,
alone and with sampled requests sharing the batch."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.engine import Engine, EngineConfig
from server.engine.params import SamplingParams

QUESTIONS = ["What is the capital of France?", "Say hi.", "Name a colour.", "What is 2+2?"]


def run_engine(engine, prompts, params, others=()):
    async def one(ids, p, rid):
        tokens, text, finish = {}, {}, {}
        async for out in engine.generate(ids, p, rid):
            for o in out.outputs:
                tokens.setdefault(o.index, []).extend(o.token_ids)
                text[o.index] = text.get(o.index, "") + o.text
                finish[o.index] = o.finish_reason
        return tokens, text, finish

    async def scenario():
        jobs = [one(ids, params, f"beam{i}-{id(params)}") for i, ids in enumerate(prompts)]
        jobs += [one(ids, SamplingParams(max_tokens=10, temperature=0.9, seed=i), f"other{i}-{id(params)}")
                 for i, ids in enumerate(others)]
        return (await asyncio.gather(*jobs))[: len(prompts)]

    return asyncio.run(scenario())


def hf_beams(model, ids, max_new, early_stopping, length_penalty=1.0, n=1):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), num_beams=4,
                         early_stopping=early_stopping, do_sample=False, max_new_tokens=max_new,
                         length_penalty=length_penalty, num_return_sequences=n)
    eos = model.generation_config.eos_token_id
    result = []
    for row in out[:, len(ids):].tolist():
        result.append(row[: row.index(eos) + 1] if eos in row else row)  # generate pads after the end
    return result


def chat_ids(tokenizer, question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def smol(default_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    engine = Engine(model, tokenizer, torch.device("cpu"), EngineConfig(max_model_len=2048))
    engine.start()
    yield model, engine
    engine.stop()


@pytest.mark.parametrize("early_stopping, max_new", [(True, 12), (False, 12), ("never", 12)])
def test_default_model_matches_hf(smol, tokenizer, early_stopping, max_new):
    model, engine = smol
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    params = SamplingParams(max_tokens=max_new, temperature=0.0, num_beams=4, early_stopping=early_stopping)
    results = run_engine(engine, prompts, params, others=prompts[:2])
    finishes = set()
    for ids, (tokens, text, finish) in zip(prompts, results):
        assert tokens[0] == hf_beams(model, ids, max_new, early_stopping)[0]
        assert text[0] == tokenizer.decode(tokens[0], skip_special_tokens=True)
        finishes.add(finish[0])
    assert finishes == {"stop", "length"}  # some hypotheses ended on end-of-sequence, some on the limit


def test_n_best_hypotheses_and_length_penalty(smol, tokenizer):
    model, engine = smol
    ids = tokenizer("Once upon a time")["input_ids"]
    params = SamplingParams(max_tokens=10, temperature=0.0, num_beams=4, n=3, length_penalty=0.5, early_stopping=True)
    (tokens, _, _), = run_engine(engine, [ids], params)
    assert [tokens[i] for i in range(3)] == hf_beams(model, ids, 10, True, length_penalty=0.5, n=3)


@pytest.mark.parametrize("path", ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_bloom_dir"])
def test_tiny_models_match_hf(request, tokenizer, path):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(path), dtype=torch.float32).eval()
    engine = Engine(model, tokenizer, torch.device("cpu"), EngineConfig(max_model_len=256))
    engine.start()
    try:
        prompts = [tokenizer(p)["input_ids"] for p in ["Hello", "A much longer prompt than the others here", "北京"]]
        results = run_engine(engine, prompts, SamplingParams(max_tokens=8, temperature=0.0, num_beams=4, early_stopping=True),
                             others=prompts)
        for ids, (tokens, _, _) in zip(prompts, results):
            assert tokens[0] == hf_beams(model, ids, 8, True)[0]
        assert engine.batch is None  # beam rows left with their request
    finally:
        engine.stop()
