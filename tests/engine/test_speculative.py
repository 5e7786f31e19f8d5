"""Speculative decoding by prompt lookup (speculative.py): the drafts, the acceptance rule measured against the
distribution it must follow, and on tiny real models (Llama, GPT-2, BLOOM, fp32) the greedy tokens transformers
makes one at a time, with drafts kept and rejected inside a shared batch."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.engine import Engine, EngineConfig
from server.engine.params import SamplingParams
from server.engine.speculative import PromptLookup, accept
from tests.engine.test_engine import hf_greedy


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_longest_suffix():
    lookup = PromptLookup([5, 6, 7, 8, 9, 1, 6, 7, 3, 4])
    assert lookup.draft(3) == []  # the suffix (3, 4) never occurred before
    lookup.extend([0, 6, 7])
    assert lookup.draft(3) == [3, 4, 0]  # (6, 7) last occurred before 3; the trigram (0, 6, 7) never did
    lookup.extend([8])
    assert lookup.draft(2) == [9, 1]  # (6, 7, 8) occurred: the longest match wins over (7, 8)
    assert lookup.draft(10) == [9, 1, 6, 7, 3, 4, 0, 6, 7, 8]
    assert PromptLookup([1, 2, 1]).draft(4) == []  # one token is too short a match


def test_kept_drafts_and_the_tokens_after_them_follow_the_models_distribution():
    """Many copies of one row (temperature 0.8, top-k 5) with a two-token draft: the first token taken follows p at
    position 0 and, where the first draft token was kept, the second follows p at position 1, within sampling noise;
    a greedy row beside them keeps its draft exactly as far as it is the argmax."""
    torch.manual_seed(0)
    vocab, copies = 8, 40000
    logits = torch.randn(3, vocab) * 1.5
    drafts = torch.tensor([int(logits[0].argsort()[-2]), int(logits[1].argmax())])  # the first: not the likeliest
    temperature, top_k = 0.8, 5

    def p(pos):
        probs = (logits[pos] / temperature).softmax(-1)
        probs[probs.argsort()[: vocab - top_k]] = 0
        return probs / probs.sum()

    rows = copies + 1
    host = [(temperature, 1.0, top_k, 0.0)] * copies + [(0.0, 1.0, 0, 0.0)]
    kept, tokens = accept(logits.expand(rows, 3, vocab).clone(), drafts.expand(rows, 2).clone(),
                          torch.full((rows,), 2), torch.tensor([h[0] for h in host]), torch.ones(rows),
                          torch.tensor([h[2] for h in host]), torch.zeros(rows), host)
    greedy = logits.argmax(-1)
    g_kept = 0 if greedy[0] != drafts[0] else 1 if greedy[1] != drafts[1] else 2
    assert kept[-1] == g_kept and tokens[-1, : g_kept + 1].tolist() == greedy[: g_kept + 1].tolist()
    kept, tokens = kept[:copies], tokens[:copies]
    first = torch.bincount(tokens[:, 0], minlength=vocab).float() / copies
    assert (first - p(0)).abs().sum() / 2 < 0.015  # total variation
    assert abs(float((kept >= 1).float().mean()) - float(p(0)[drafts[0]])) < 0.015
    second = tokens[kept >= 1, 1]
    dist = torch.bincount(second, minlength=vocab).float() / len(second)
    assert len(second) > 5000 and (dist - p(1)).abs().sum() / 2 < 0.03
    assert ((kept == 2) == ((tokens[:, 0] == drafts[0]) & (tokens[:, 1] == drafts[1]))).all()


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir", "tiny_bloom_dir"])
def model(request):
    return AutoModelForCausalLM.from_pretrained(request.getfixturevalue(request.param), dtype=torch.float32).eval()


def test_greedy_rows_with_drafts_make_the_tokens_transformers_makes_one_at_a_time(model, tokenizer):
    """Prompts that repeat themselves (drafts found and kept), one that does not, rows joining a drafting batch,
    a stop at max_tokens inside a kept draft: every answer is transformers' greedy one, token for token."""
    engine = Engine(model, tokenizer, torch.device("cpu"), EngineConfig(max_model_len=400, max_batch_size=16))
    engine.start()
    texts = ["one two three four one two three four one two", "Copy: the cat sat on the mat. Copy: the cat",
             "北京是中国的首都。北京是", "Once upon a time"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]

    async def run(ids, rid, n=24, k=4):
        tokens = []
        async for out in engine.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, prompt_lookup=k), rid):
            assert out.error is None
            tokens += out.outputs[0].token_ids
        return tokens

    async def scenario():
        alone = await run(prompts[0], "alone")
        short = await run(prompts[1], "short", n=7, k=8)

        async def late(i, ids):
            await asyncio.sleep(0.02 * i)
            return await run(ids, f"late{i}", k=2 + i)

        return alone, short, await asyncio.gather(*[late(i, ids) for i, ids in enumerate(prompts)])

    try:
        alone, short, joined = asyncio.run(scenario())
    finally:
        engine.stop()
    assert alone == hf_greedy(model, prompts[0], 24)
    assert short == hf_greedy(model, prompts[1], 7)
    for ids, got in zip(prompts, joined, strict=True):
        assert got == hf_greedy(model, ids, 24)
    assert 0 < engine.accepted <= engine.drafted
