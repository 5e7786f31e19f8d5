"""Automatic prefix caching (prefix.py): the pool's matching and eviction without a model, the scheduler's groups
with a stand-in lookup, and on tiny real models (Llama, GPT-2, BLOOM, fp32) the same greedy tokens with a cached
prefix as without one."""

import asyncio
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.engine import Engine, EngineConfig
from server.engine.params import SamplingParams
from server.engine.prefix import BLOCK, PrefixCache
from server.engine.request import Request
from server.engine.scheduler import Scheduler
from tests.engine.test_engine import hf_greedy


def layers_for(ids, layers=2, heads=2, dim=4, first=0):
    """Per layer (kv heads, columns, head size) keys and values whose every entry names its token and layer."""
    cols = first + len(ids)
    out = []
    for layer in range(layers):
        k = torch.zeros((heads, cols, dim))
        k[:, first:] = torch.tensor(ids, dtype=torch.float32)[None, :, None] + 1000 * layer
        out.append((k, -k))
    return out


def test_a_prompt_matches_the_blocks_it_starts_with_and_leaves_its_last_token_to_compute():
    cache = PrefixCache(capacity=10**9)
    ids = list(range(100, 150))  # 3 full blocks and 2 tokens
    cache.store(ids, layers_for(ids, first=5), first=5)
    assert len(cache.blocks) == 3 and cache.nbytes == 3 * 2 * (2 * 2 * BLOCK * 4 * 4)
    hit = cache.match(ids + [7, 8, 9])
    assert hit.tokens == 48
    kv = hit.kv(1, 40)  # layer 1, the first 40 tokens: keys then values
    assert kv.shape == (2, 2, 40, 4)
    assert torch.equal(kv[0, 0, :, 0], torch.tensor(ids[:40], dtype=torch.float32) + 1000)
    assert torch.equal(kv[1], -kv[0])
    assert cache.match(ids[:48]).tokens == 32  # 48 tokens: the third block holds the last one, computed anew
    assert cache.match(ids[:17]).tokens == 16
    assert cache.match([1] + ids[1:]).tokens == 0  # the first block differs: later equal blocks are not that prefix
    assert cache.match(ids[16:]).tokens == 0  # the same tokens at another place in the prompt are not the same keys


def test_the_pool_stays_in_its_bytes_and_evicts_a_prefixs_last_blocks_first():
    block_bytes = 2 * 2 * (2 * 2 * BLOCK * 4 * 4)  # two layers of keys and values
    cache = PrefixCache(capacity=3 * block_bytes // 2)  # 3 blocks
    a, b = list(range(0, 33)), list(range(500, 533))
    cache.store(a, layers_for(a), first=0)
    cache.store(b, layers_for(b), first=0)  # 4 blocks: one goes, a's second (its first is older but extended)
    assert cache.nbytes == 3 * block_bytes // 2 <= cache.capacity
    assert cache.match(b + [1]).tokens == 32 and cache.match(a + [1]).tokens == 16
    assert cache.match(b).tokens == 32  # the match made b's blocks the most recent
    cache.store(a, layers_for(a), first=0)  # a's second block again: b's last one goes
    assert cache.match(a + [1]).tokens == 32 and cache.match(b + [1]).tokens == 16


def test_a_hit_keeps_its_blocks_when_they_are_evicted_before_the_copy():
    cache = PrefixCache(capacity=2 * 2 * (2 * 2 * BLOCK * 4 * 4))  # 2 blocks
    a = list(range(40))
    cache.store(a, layers_for(a), first=0)
    hit = cache.match(a)
    other = list(range(900, 940))
    cache.store(other, layers_for(other), first=0)  # a's blocks leave the pool
    assert cache.match(a).tokens == 0
    assert torch.equal(hit.kv(0, 32)[0, 0, :, 0], torch.tensor(a[:32], dtype=torch.float32))


def test_groups_are_formed_by_the_tokens_left_to_compute_and_start_where_a_row_has_not_cached():
    cached = {40: 32, 45: 32, 70: 64, 12: 0}  # prompt length -> tokens its hit holds

    def request(length, echo=False):
        params = SamplingParams(max_tokens=4, prompt_logprobs=0 if echo else None)
        return Request(f"r{length}{echo}", list(range(length)), params, emit=lambda _: None)

    s = Scheduler(16, 10**6, lookup=lambda ids: SimpleNamespace(tokens=cached[len(ids)]), cut_block=BLOCK)
    r40, r45, r70, r12, echo = request(40), request(45), request(70), request(12), request(40, echo=True)
    for r in (r40, r45, r70, r12, echo):
        s.add(r)
    plan = s.schedule()
    # 8, 13, 6 and 12 tokens left: one group (padded to 70 columns) that starts at column 70 - 13 = 57
    g = next(g for g in s.prefilling if r70 in g.requests)
    assert set(g.requests) == {r40, r45, r70, r12} and g.width == 70 and g.done == 57
    assert (r70.cached_tokens, r45.cached_tokens, r40.cached_tokens, r12.cached_tokens) == (57, 32, 27, 0)
    e = next(g for g in s.prefilling if echo in g.requests)  # prompt log-probabilities need every position
    assert e.done == 0 and echo.cached_tokens == 0 and e.hits == [None] and e.cut == 0
    # r70's last full block ends at column 64: the 6 columns after it are fed in a chunk of their own
    assert g.cut == 64
    assert [(c.group, c.start, c.end) for c in plan.chunks] == [(e, 0, 40)]  # fewer tokens left: the echo, whole
    s.fed(plan)
    for span in ((57, 64), (64, 70)):
        plan = s.schedule()
        assert [(c.group, c.start, c.end) for c in plan.chunks] == [(g, *span)]
        s.fed(plan)
    assert not s.prefilling


def test_a_prompt_sent_again_repeats_its_answer_in_bf16(tokenizer, default_model_dir):
    """In bf16 a token's numbers depend on how many tokens are computed with it. The same prompt sent again finds
    its full blocks cached and computes only its last partial block, which the first one computed in a chunk of
    its own: the same log-probabilities to the last bit, so the same answer. (A chat's first run starts after the
    system prompt's cached block; fed as one chunk, "Name three colours." gave another 5th token on the next run.)"""
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16).eval()
    engine = Engine(model, tokenizer, torch.device("cpu"),
                    EngineConfig(max_model_len=400, max_batch_size=8, prefix_cache_bytes=2**26))
    engine.start()
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2)

    async def run(ids, rid):
        out, cached = [], None
        async for o in engine.generate(ids, params, rid):
            cached = o.cached_tokens if cached is None else cached
            out += [(t, lp.logprob, lp.top) for c in o.outputs for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
        return out, cached

    async def scenario():
        results = []
        for n, text in enumerate(["Translate to Chinese: Beijing is the capital of China.", "Name three colours.",
                                  "Write a greeting in Japanese.", "Fill in the card: a city, a name and a number."]):
            chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
            results.append((len(ids), await run(ids, f"a{n}"), await run(ids, f"b{n}")))
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        engine.stop()
    for length, (first, cached_first), (again, cached_again) in results:
        assert cached_again == (length - 1) // BLOCK * BLOCK > 0
        assert again == first
    assert any(cached_first for _, (_, cached_first), _ in results)  # chats after the first share its first block


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir", "tiny_bloom_dir"])
def model(request):
    return AutoModelForCausalLM.from_pretrained(request.getfixturevalue(request.param), dtype=torch.float32).eval()


def test_a_cached_prefix_gives_the_greedy_tokens_an_uncached_one_does(model, tokenizer):
    """Shared system prompts joining a running stream (fused steps where the model allows), a chat's turns built
    on the previous answers, n > 1 and prompt log-probabilities: every output equals transformers' greedy one."""
    engine = Engine(model, tokenizer, torch.device("cpu"),
                    EngineConfig(max_model_len=400, max_batch_size=16, prefill_chunk=32, prefix_cache_bytes=2**26))
    engine.start()
    system = tokenizer(" ".join(["Answer briefly and in French, please."] * 6))["input_ids"]
    questions = [tokenizer(q)["input_ids"] for q in (" Why?", " What is the capital of Italy?", " 北京是", " 1 2 3")]
    greedy = SamplingParams(max_tokens=10, temperature=0.0)

    async def run(ids, rid, params=greedy):
        """Each choice's tokens, and the cached prompt tokens the first output reports."""
        tokens, cached = {}, []
        async for out in engine.generate(ids, params, rid):
            cached.append(out.cached_tokens)
            for o in out.outputs:
                tokens.setdefault(o.index, []).extend(o.token_ids)
        return tokens, cached[0]

    async def scenario():
        first = await run(system + questions[0], "first")
        stream = asyncio.create_task(run(tokenizer("Once upon a time")["input_ids"], "stream",
                                         SamplingParams(max_tokens=40, temperature=0.0)))
        await asyncio.sleep(0.05)
        shared = await asyncio.gather(*[run(system + q, f"shared{i}") for i, q in enumerate(questions)])
        turns, ids = [], system + questions[1]
        for t in range(3):
            tokens, cached = await run(ids, f"turn{t}")
            turns.append((ids, tokens[0], cached))
            ids = ids + tokens[0] + questions[(t + 2) % 4]
        two = await run(system + questions[2], "two", SamplingParams(max_tokens=10, temperature=0.0, n=2))
        echo = await run(system + questions[3], "echo", SamplingParams(max_tokens=10, temperature=0.0,
                                                                          prompt_logprobs=1))
        return first, await stream, shared, turns, two, echo

    try:
        first, stream, shared, turns, two, echo = asyncio.run(scenario())
    finally:
        engine.stop()
    assert first[1] == 0
    for q, (tokens, cached) in zip(questions, shared, strict=True):
        assert tokens[0] == hf_greedy(model, system + q, 10)
        assert cached >= len(system) - BLOCK - 3  # the system prompt's blocks, less what the group's padding asks
    for t, (ids, tokens, cached) in enumerate(turns):
        assert tokens == hf_greedy(model, ids, 10)
        if t:  # the previous turn's prompt and answer were kept when it finished
            assert cached >= len(turns[t - 1][0]) + 9 - BLOCK
    assert two[0][0] == two[0][1] == hf_greedy(model, system + questions[2], 10) and two[1] > 0
    assert echo[0][0] == hf_greedy(model, system + questions[3], 10) and echo[1] == 0
    queries, hits, nbytes = engine.prefix_cache_stats()
    assert 0 < hits < queries and 0 < nbytes <= 2**26
