"""Sampling functions on hand-made logits."""

import torch

from server.engine.sampling import BLOCK, SHORTLIST, inverse_cdf, sample, truncate


def params(rows, temperature=1.0, top_p=1.0, top_k=0):
    return (torch.full((rows,), temperature), torch.full((rows,), top_p), torch.full((rows,), top_k, dtype=torch.long))


def test_greedy_rows_take_argmax_next_to_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 0.0]])
    t, p, k = params(2)
    t[0] = 0.0
    gens = [None, torch.Generator().manual_seed(0)]
    assert sample(logits, t, p, k, gens)[0] == 1


def test_top_k_and_top_p_cut():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = truncate(probs, torch.tensor([2]), torch.tensor([1.0]))
    assert (kept > 0).tolist() == [[True, True, False, False]]
    kept = truncate(probs, torch.tensor([0]), torch.tensor([0.7]))
    assert (kept > 0).tolist() == [[True, True, False, False]]
    kept = truncate(probs, torch.tensor([0]), torch.tensor([0.1]))
    assert (kept > 0).tolist() == [[True, False, False, False]]  # the best token always survives


def test_nucleus_wider_than_the_shortlist_is_exact():
    vocab = 4 * SHORTLIST
    probs = torch.full((1, vocab), 1.0 / vocab)  # flat: a 0.9 nucleus needs 90% of the vocabulary
    kept = truncate(probs, torch.tensor([0]), torch.tensor([0.9]))
    assert abs(int((kept > 0).sum()) - 0.9 * vocab) <= 2  # far past the shortlist: the full sort ran


def test_sampled_tokens_stay_inside_top_k():
    logits = torch.randn(64, 100)
    t, p, k = params(64, top_k=3)
    tokens = sample(logits, t, p, k, [None] * 64)
    top3 = logits.topk(3).indices
    assert all(tok in row for tok, row in zip(tokens.tolist(), top3.tolist()))


def test_seeded_rows_reproduce_whatever_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    t, p, k = params(4)

    def draw(rows):
        gens = [torch.Generator().manual_seed(7) if i == 2 else None for i in range(len(rows))]
        return sample(logits[rows], t[: len(rows)], p[: len(rows)], k[: len(rows)], gens)[2].item()

    alone = [draw([0, 1, 2]) for _ in range(3)]
    batched = draw([1, 3, 2, 0])
    assert len(set(alone)) == 1 and batched == alone[0]


def test_distribution_follows_temperature():
    logits = torch.tensor([[2.0, 0.0]]).repeat(4000, 1)
    t, p, k = params(4000, temperature=1.0)
    frac = (sample(logits, t, p, k, [None] * 4000) == 0).float().mean().item()
    assert abs(frac - torch.softmax(torch.tensor([2.0, 0.0]), 0)[0].item()) < 0.04
    t, _, _ = params(4000, temperature=0.25)
    frac_cold = (sample(logits, t, p, k, [None] * 4000) == 0).float().mean().item()
    assert frac_cold > 0.99


def test_min_p_keeps_only_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    t, p, k = params(2000)
    drawn = sample(logits, t, p, k, [None] * 2000, min_p=torch.full((2000,), 0.5))
    assert set(drawn.tolist()) == {0, 1}  # 0.15 and 0.05 are below 0.5 x 0.5


def test_inverse_cdf_draws_by_blocks_exactly():
    """The draw through block sums lands on the same token as one running sum over the whole vocabulary, on
    vocabularies that do and don't fill the last block, with zero-probability tokens around block edges."""
    torch.manual_seed(3)
    for vocab in (BLOCK * 3, BLOCK * 3 + 17, 5):
        probs = torch.rand(64, vocab) * (torch.rand(64, vocab) > 0.3)
        probs[:, :BLOCK] = 0.0 if vocab > BLOCK else probs[:, :BLOCK]
        probs[0] = 0.0
        probs[0, -1] = 1.0  # all the mass on the very last token
        uniform = torch.rand(64, dtype=torch.float64)
        uniform[1] = 0.0
        cdf = probs.double().cumsum(dim=-1)
        expected = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        drawn = inverse_cdf(probs, uniform)
        assert torch.equal(drawn, expected)
        assert bool((probs.gather(1, drawn.unsqueeze(1)) > 0).all())
