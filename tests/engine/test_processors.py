"""The decode pipeline's processors on hand-made logits: each formula, and rows that ask for nothing stay untouched."""

import math

import torch

from server.engine.params import SamplingParams
from server.engine.decoding import DecodePipeline, apply_processors
from server.engine.request import Request, Sequence


def seq(prompt, output, eos_ids=frozenset({0}), **kw):
    r = Request("r", prompt, SamplingParams(max_tokens=10, **kw), emit=lambda out: None)
    s = Sequence(r, 0, detok=None, pipeline=DecodePipeline(r.params, set(eos_ids)))
    s.token_ids = list(output)
    return s


def test_openai_penalties_and_untouched_rows():
    logits = torch.zeros(2, 5)
    seqs = [seq([4], [1, 1, 2], presence_penalty=0.5, frequency_penalty=1.0), seq([4], [1, 1, 2])]
    out = apply_processors(logits, seqs)
    assert out[0].tolist() == [0.0, -2.5, -1.5, 0.0, 0.0]  # 2 x 1.0 + 0.5 and 1 x 1.0 + 0.5; prompt token 4 untouched
    assert out[1].tolist() == [0.0] * 5


def test_repetition_penalty_hf_formula():
    logits = torch.tensor([[2.0, -2.0, 2.0, 1.0]])
    out = apply_processors(logits, [seq([0], [1], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -4.0, 2.0, 1.0]]  # prompt and output tokens: positive / 2, negative x 2


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(1, 5)
    out = apply_processors(logits, [seq([1], [], logit_bias=((3, 5.0), (2, -100.0)), min_tokens=2, stop_token_ids=(4,))])
    assert out[0, 3] == 5.0 and math.isinf(out[0, 2])  # -100 bans
    assert math.isinf(out[0, 0]) and math.isinf(out[0, 4])  # no eos or stop token before min_tokens
    logits = torch.zeros(1, 5)
    out = apply_processors(logits, [seq([1], [3, 3], min_tokens=2)])
    assert out[0, 0] == 0.0  # reached min_tokens: eos allowed again
