"""Batch join (extend) and leave/duplicate (select) on a tiny real model: every row's next-token logits
must match the row run alone, whatever padding the join put in front of it."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.params import SamplingParams
from server.engine.request import Request, Sequence
from server.engine.runner import ModelRunner


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir", "tiny_bloom_dir"])
def runner(request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(request.param), dtype=torch.float32).eval()
    return ModelRunner(model, torch.device("cpu"))


def make(ids, n=1):
    r = Request(str(ids), ids, SamplingParams(max_tokens=8, temperature=0.0, n=n), emit=lambda out: None)
    r.sequences = [Sequence(r, i, detok=None) for i in range(n)]
    return r


def step(runner, batch, steps=3):
    """Greedy-decode a few steps; return the logits of the last one."""
    logits = None
    for _ in range(steps):
        logits = runner.decode(batch)
        batch.next_tokens = logits.argmax(-1)
    return logits


def alone(runner, ids, first_token, steps=3):
    batch, _ = runner.prefill([make(ids)])
    batch.next_tokens = torch.tensor([first_token])
    return step(runner, batch, steps)[0]


def test_join_pads_left_and_keeps_each_row_exact(runner):
    short, long, mid = [5, 6], [7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17]
    a, logits_a = runner.prefill([make(long)])
    a.next_tokens = logits_a.argmax(-1)
    step(runner, a, 2)  # the running batch is 2 steps ahead
    b, logits_b = runner.prefill([make(short), make(mid)])
    b.next_tokens = logits_b.argmax(-1)
    first_tokens = a.next_tokens.tolist() + b.next_tokens.tolist()
    a.extend(b)
    assert len(a) == 3 and a.width == len(long) + 2
    assert a.attention_mask.sum(dim=1).tolist() == [len(long) + 2, len(short), len(mid)]
    assert a.cache.layers[0].keys.shape[2] == a.width
    joined = step(runner, a, 3)
    # row 0 went 2 steps before the join, then 3: compare with 5 steps alone from the same first token
    reference = [alone(runner, long, logits_a.argmax(-1).item(), 5), alone(runner, short, first_tokens[1]),
                 alone(runner, mid, first_tokens[2])]
    for row, ref in enumerate(reference):
        torch.testing.assert_close(joined[row], ref, atol=1e-4, rtol=1e-4)


def test_leave_trims_padding_and_n_rows_share_a_prefill(runner):
    long, short = [7, 8, 9, 10, 11, 12, 13, 14], [5, 6, 7]
    batch, logits = runner.prefill([make(long), make(short, n=2)])
    assert len(batch) == 3 and len(batch.seqs) == 3  # n=2 duplicated the short prompt's row
    batch.next_tokens = logits.argmax(-1)
    torch.testing.assert_close(logits[1], logits[2])
    batch.select([1, 2])  # the long row leaves: its padding columns go with it
    assert batch.width == len(short)
    assert batch.cache.layers[0].keys.shape[2] == len(short)
    after = step(runner, batch, 2)
    ref = alone(runner, short, logits[1].argmax().item(), 2)
    torch.testing.assert_close(after[0], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after[1], ref, atol=1e-4, rtol=1e-4)


def test_cache_written_in_place_survives_leaves_wider_joins_and_growth(runner):
    """Rows leave from the middle (the last rows move into their places), a batch with a wider timeline joins
    (the cache opens columns on the left), and decoding runs past the spare columns (the cache reallocates):
    every row still matches the same prompt decoded alone."""
    prompts = [[5 + i, 6 + i, 7 + i] for i in range(6)]
    batch, logits = runner.prefill([make(p) for p in prompts])
    batch.next_tokens = logits.argmax(-1)
    firsts = {tuple(p): t for p, t in zip(prompts, logits.argmax(-1).tolist(), strict=True)}
    layer = batch.cache.layers[0]
    buffer, mask, positions = layer.kbuf, batch._mask, batch.positions
    step(runner, batch, 2)
    # two more columns fit: the cache, the mask and the positions are written in place, nothing allocated anew
    assert layer.kbuf is buffer and batch._mask is mask and batch.positions is positions
    assert batch.attention_mask.sum(dim=1).tolist() == [5] * 6 and batch.positions.tolist() == [5] * 6
    batch.drop([1, 2])
    assert [s.request.prompt_ids for s in batch.seqs] == [prompts[0], prompts[4], prompts[5], prompts[3]]
    wide = [[20 + i for i in range(12)], [40, 41]]
    other, other_logits = runner.prefill([make(p) for p in wide])
    other.next_tokens = other_logits.argmax(-1)
    firsts.update({tuple(p): t for p, t in zip(wide, other_logits.argmax(-1).tolist(), strict=True)})
    batch.extend(other)
    assert batch.width == 12 and layer.width == 12
    steps = 40  # past the 32 spare columns
    out = step(runner, batch, steps)
    assert layer.kbuf is not buffer and layer.width == batch.width
    assert batch.attention_mask.shape == (6, 12 + steps) and batch.attention_mask[:, -steps:].all()
    done = {tuple(p): 2 + steps for p in prompts} | {tuple(p): steps for p in wide}
    for row, seq in enumerate(batch.seqs):
        ids = seq.request.prompt_ids
        ref = alone(runner, ids, firsts[tuple(ids)], done[tuple(ids)])
        torch.testing.assert_close(out[row], ref, atol=1e-4, rtol=1e-4)


def test_sampling_parameters_move_with_their_rows(runner):
    """Made once, then carried through joins, leaves, duplicates and reorders: always equal to the rows' own."""
    from server.engine.batch import RowParams

    def req(ids, **params):
        r = Request(str(ids), ids, SamplingParams(max_tokens=8, **params), emit=lambda out: None)
        r.sequences = [Sequence(r, 0, detok=None)]
        return r

    def same(batch):
        made, fresh = batch.params, RowParams.of(batch.seqs, torch.device("cpu"))
        for got, want in zip(made.tensors(), fresh.tensors(), strict=True):
            assert torch.equal(got, want)
        assert made.host == fresh.host

    a, _ = runner.prefill([req([5, 6], temperature=0.7, top_k=5), req([7, 8, 9], temperature=0.0, min_p=0.1)])
    same(a)
    b, _ = runner.prefill([req([10, 11], top_p=0.5)])
    same(b)
    a.extend(b)
    same(a)
    assert a.params.top_p.tolist() == [1.0, 1.0, 0.5] and a.params.top_k.tolist() == [5, 0, 0]
    a.select([2, 0, 0, 1])
    same(a)
    a.drop([1])
    same(a)
    assert a.params.temperature.tolist() == pytest.approx([1.0, 0.0, 0.7])  # the last row filled the hole
