"""A padded vocabulary (BLOOMZ: 250,880 ids in the config, 250,680 in the tokenizer): the ids past the tokenizer
are never sampled, never beams, never in log-probabilities, even where the model scores them highest."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from server.engine.engine import Engine, EngineConfig
from server.engine.params import SamplingParams

PROMPT = "Pekin, Çin'in başkentidir."


async def run(engine, ids, params, rid):
    tokens, logprobs, prompt_logprobs = [], [], []
    async for out in engine.generate(ids, params, rid):
        prompt_logprobs += out.prompt_logprobs or []
        for o in out.outputs:
            tokens += o.token_ids
            logprobs += o.logprobs or []
    return tokens, logprobs, prompt_logprobs


@pytest.fixture(scope="module")
def engines(family_models):
    """The BLOOMZ copy as published, and the same model with its padded tail made to outscore every real token."""
    path = family_models["bloomz-560m"]
    tokenizer = TokenizersBackend.from_pretrained(path)
    real = len(tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    trapped = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        greedy = plain.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=3)[0, len(ids):]
        # tied embeddings: tail row i scores 3x what the i-th greedy token scores, where that token leads
        emb = trapped.get_input_embeddings().weight
        for i, t in enumerate(greedy.tolist()):
            emb[real + i] = 3 * emb[t]
        first = trapped(torch.tensor([ids])).logits[0, -1]
    assert emb.shape[0] == real + 200 and int(first.argmax()) >= real  # unguarded, the tail would win
    out = {}
    for name, model in (("plain", plain), ("trapped", trapped)):
        out[name] = Engine(model, tokenizer, torch.device("cpu"), EngineConfig(max_model_len=256, max_batch_size=8))
        out[name].start()
    yield out, ids, real
    for engine in out.values():
        engine.stop()


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, prompt_logprobs=5),
    SamplingParams(max_tokens=12, temperature=1.5, seed=3, logprobs=5),
    SamplingParams(max_tokens=12, temperature=0.0, num_beams=4, early_stopping=True),
], ids=["greedy", "sampled", "beams"])
def test_padded_ids_never_come_out(engines, params):
    (engines, ids, real) = engines
    plain = asyncio.run(run(engines["plain"], ids, params, "plain"))
    trapped = asyncio.run(run(engines["trapped"], ids, params, "trapped"))
    tokens, logprobs, prompt_logprobs = trapped
    assert tokens and all(t < real for t in tokens)
    assert all(alt < real for lp in logprobs + prompt_logprobs[1:] for alt, _ in lp.top)
    # the real ids' scores are untouched, so everything equals the unmodified model's output
    assert tokens == plain[0]
    assert [(lp.token_id, round(lp.logprob, 4)) for lp in logprobs] == [(lp.token_id, round(lp.logprob, 4))
                                                                        for lp in plain[1]]
