"""Sampling as pure functions of tensors: greedy and sampled rows share one batch."""

from __future__ import annotations

import torch

SHORTLIST = 1024  # top-k/top-p look here first; the full sort runs only if the nucleus is not inside
BLOCK = 256  # the inverse-CDF draw sums blocks of this many tokens, then scans one block


def truncate(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_k: int | None = None,
             nucleus: bool = True) -> torch.Tensor:
    """Zero the probabilities outside each row's top-k (0 = off) and top-p nucleus; the best token always survives.
    `max_k`: the largest top_k, and `nucleus`: whether any row has top_p < 1, where the caller knows them."""
    vocab = probs.shape[-1]
    width = min(vocab, max(SHORTLIST, int(top_k.max()) if max_k is None else max_k))
    vals, idx = probs.topk(width, dim=-1)
    # a nucleus the shortlist does not hold needs the full sort: a data-dependent check, one wait for the device
    if nucleus and width < vocab and bool(((top_p < 1) & (vals.sum(dim=-1) < top_p)).any()):
        vals, idx = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vals.shape[-1], device=probs.device).unsqueeze(0)
    cut = ranks >= torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    cut |= (vals.cumsum(dim=-1) - vals) >= top_p.unsqueeze(1)
    return torch.zeros_like(probs).scatter_(1, idx, vals.masked_fill(cut, 0.0))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    generators: list[torch.Generator | None],
    min_p: torch.Tensor | None = None,
    host: list[tuple[float, float, int, float]] | None = None,
) -> torch.Tensor:
    """Next token per row. Rows with temperature 0 take the argmax; the others are drawn from
    softmax(logits / temperature) after top-k/top-p and min-p, by inverse CDF with one uniform number per
    row, from the row's own generator when it has one (a seeded row draws the same whatever the batch).
    `host`: each row's (temperature, top_p, top_k, min_p) as numbers, where the caller has them: then which rows
    sample, truncate or cut by min-p is read from them, not from the device."""
    if host is None:
        host = list(zip(temperature.tolist(), top_p.tolist(), top_k.tolist(),
                        min_p.tolist() if min_p is not None else [0.0] * len(temperature), strict=True))
    sampled = [i for i, h in enumerate(host) if h[0] > 0]
    if not sampled:
        return logits.argmax(dim=-1)
    every = len(sampled) == logits.shape[0]
    rows = torch.tensor(sampled, device=logits.device)
    probs = distribution(logits if every else logits[rows], temperature[rows], top_p[rows], top_k[rows],
                         min_p[rows] if min_p is not None else None, [host[i] for i in sampled])
    uniform = torch.rand(len(sampled), dtype=torch.float64, device=logits.device)
    for i, row in enumerate(sampled):
        if generators[row] is not None:
            uniform[i] = torch.rand(1, dtype=torch.float64, generator=generators[row], device=logits.device)[0]
    drawn = inverse_cdf(probs, uniform)
    if every:
        return drawn
    tokens = logits.argmax(dim=-1)
    tokens[rows] = drawn
    return tokens


def distribution(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                 min_p: torch.Tensor | None, host: list[tuple[float, float, int, float]]) -> torch.Tensor:
    """softmax(logits / temperature) after top-k/top-p and min-p, for rows that sample (temperature > 0); `host`:
    the same rows' (temperature, top_p, top_k, min_p) as numbers."""
    probs = (logits.float() / temperature.unsqueeze(1)).softmax(dim=-1)
    cut_rows = [i for i, h in enumerate(host) if h[2] > 0 or h[1] < 1]
    if cut_rows:
        cut = torch.tensor(cut_rows, device=logits.device)
        probs[cut] = truncate(probs[cut], top_k[cut], top_p[cut], max(int(host[i][2]) for i in cut_rows),
                              any(host[i][1] < 1 for i in cut_rows))
    if min_p is not None and any(h[3] > 0 for h in host):
        # min-p: drop tokens less likely than min_p times the most likely one
        probs = probs * (probs >= min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values)
    return probs


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token where each row's cumulative probability passes uniform x total. A running sum over the whole
    vocabulary is a slow sequential scan on CPU, so it runs over block sums first, then inside one block."""
    rows, vocab = probs.shape
    blocks = -(-vocab // BLOCK)
    padded = torch.nn.functional.pad(probs, (0, blocks * BLOCK - vocab)).view(rows, blocks, BLOCK)
    block_cdf = padded.sum(dim=-1).double().cumsum(dim=-1)
    target = (uniform * block_cdf[:, -1]).unsqueeze(1)
    block = torch.searchsorted(block_cdf, target, right=True).clamp(max=blocks - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    inside = padded.gather(1, block.unsqueeze(2).expand(rows, 1, BLOCK)).squeeze(1)
    cdf = inside.double().cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, target - before, right=True)
    # rounding can land past the block's last token; a token of zero probability is never drawn
    last = (inside > 0).long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    return (block * BLOCK + torch.minimum(drawn, last)).squeeze(1)


def token_logprobs(
    logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and each row's `num_top` best, under softmax(logits / temperature)
    (temperature 1 for greedy rows), so a greedy token always has the top log-probability."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).unsqueeze(1)
    lp = (logits.float() / t).log_softmax(dim=-1)
    top = lp.topk(num_top, dim=-1)
    return lp.gather(1, tokens.unsqueeze(1)).squeeze(1), top.indices, top.values
