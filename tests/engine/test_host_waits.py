"""A decode step waits for the device once: the tensor calls that copy device data to the host (and so wait for
the device) are counted while the engine runs decode-only steps, and only one may come from the engine's own code per
step, whatever the rows ask (greedy, sampled with top-k/min-p, log-probabilities). Top-p adds one where the nucleus
may fall outside the shortlist (a data-dependent check); the model's own forward (transformers' mask check) is
not ours and is not counted. (NaN rows, found in the same copy, are tested end to end in tests/ops/test_isolation.py.)"""

import asyncio
import sys
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.engine import Engine, EngineConfig
from server.engine.params import SamplingParams

WAITS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu", "numpy")


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir", "tiny_bloom_dir"])
def model(request):
    return AutoModelForCausalLM.from_pretrained(request.getfixturevalue(request.param), dtype=torch.float32).eval()


def decode_waits(model, tokenizer, params: SamplingParams, rows: int = 16, steps: int = 8) -> Counter:
    """Run the engine's steps in this thread: admit and prefill, then count the waits of `steps` decode steps."""
    engine = Engine(model, tokenizer, torch.device("cpu"), EngineConfig(max_model_len=256, max_batch_size=rows))
    engine.scheduler.fused = engine.runner.enable_fused()
    counts, counting = Counter(), [False]
    originals = {name: getattr(torch.Tensor, name) for name in WAITS}

    def counted(name):
        def call(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if counting[0] and "/server/engine/" in caller:
                counts[f"{name} in {caller.rsplit('/', 1)[-1]}:{sys._getframe(1).f_lineno}"] += 1
            return originals[name](self, *args, **kwargs)
        return call

    async def run():
        engine.generate_all([(tokenizer(f"Story number {i}:")["input_ids"], params, f"r{i}") for i in range(rows)])
        for r in engine._inbox:
            engine._requests[r.request_id] = r
            engine.scheduler.add(r)
        engine._inbox = []
        while engine.scheduler.prefilling or engine.batch is None:
            engine.step()
        assert len(engine.batch) == rows
        counting[0] = True
        for _ in range(steps):
            engine.step()
        counting[0] = False

    try:
        for name in WAITS:
            setattr(torch.Tensor, name, counted(name))
        asyncio.run(run())
    finally:
        for name, f in originals.items():
            setattr(torch.Tensor, name, f)
    return Counter({k: v / steps for k, v in counts.items()})


@pytest.mark.parametrize("params, most", [
    (SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), 1),
    (SamplingParams(max_tokens=40, temperature=0.8, top_k=50, min_p=0.05, seed=1, ignore_eos=True), 1),
    (SamplingParams(max_tokens=40, temperature=0.0, logprobs=3, ignore_eos=True), 1),
    (SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, ignore_eos=True), 2),
], ids=["greedy", "sampled", "logprobs", "top_p"])
def test_a_decode_step_waits_for_the_device_once(model, tokenizer, params, most):
    waits = decode_waits(model, tokenizer, params)
    assert sum(waits.values()) <= most, dict(waits)
    assert sum(waits.values()) >= 1  # the tokens do come to the host
