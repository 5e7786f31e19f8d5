"""Sampling as pure functions of tensors: greedy and sampled rows share one batch."""

from __future__ import annotations

import torch


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k (0 = off) and top-p nucleus; the best token always survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    cut = ranks >= k
    probs = sorted_logits.softmax(dim=-1)
    cut |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    generators: list[torch.Generator | None],
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row. Rows with temperature 0 take the argmax; the others are drawn from
    softmax(logits / temperature) after top-k/top-p and min-p, with the row's own generator when it has one
    (a seeded row draws the same noise whatever else is in the batch)."""
    tokens = logits.argmax(dim=-1)
    rows = (temperature > 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return tokens
    scaled = logits[rows].float() / temperature[rows].unsqueeze(1)
    if bool((top_k[rows] > 0).any()) or bool((top_p[rows] < 1).any()):
        scaled = top_k_top_p_filter(scaled, top_k[rows], top_p[rows])
    probs = scaled.softmax(dim=-1)
    if min_p is not None and bool((min_p[rows] > 0).any()):
        # min-p: drop tokens less likely than min_p times the most likely one
        keep = probs >= min_p[rows].unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs * keep
    # Exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) draws from p.
    noise = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows.tolist()):
        if generators[row] is not None:
            noise[i].exponential_(generator=generators[row])
    tokens[rows] = (probs / noise.clamp_(min=1e-30)).argmax(dim=-1)
    return tokens


def token_logprobs(
    logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and each row's `num_top` best, under softmax(logits / temperature)
    (temperature 1 for greedy rows), so a greedy token always has the top log-probability."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).unsqueeze(1)
    lp = (logits.float() / t).log_softmax(dim=-1)
    top = lp.topk(num_top, dim=-1)
    return lp.gather(1, tokens.unsqueeze(1)).squeeze(1), top.indices, top.values
