"""Speculative decoding by prompt lookup: drafts from the row's own text, checked by the model in one forward.

Answers often repeat their prompt: a translation keeps names and numbers, a summary quotes, a code edit returns most
of the code. So a row's draft is what followed, earlier in its prompt or answer, the latest other occurrence of its
last few tokens (the longest n-gram from MAX_NGRAM down to MIN_NGRAM that occurred before). The running batch then
feeds every row its next token and its draft in one forward, which costs little more than one token on a CPU or a
GPU whose step is bound by reading the weights, and keeps as much of each draft as the model agrees with:

- a greedy row keeps draft tokens while they are the argmax, then takes the argmax where they part: exactly the
  tokens it would have made one at a time;
- a sampled row keeps draft token x with probability p(x), its distribution there (after temperature, top-k, top-p
  and min-p); at the first rejected token it draws from p with x taken out, renormalized; past a fully accepted draft
  it draws from the last position's p. Each token then follows p exactly (the standard acceptance rule, with a draft
  that puts all its mass on one token).

Each step a row gains 1 to k + 1 tokens. Rows whose processing needs one token at a time (penalties, biases,
grammars, logprobs, beams, seeds) take no draft.
"""

from __future__ import annotations

import torch

from .sampling import distribution

MAX_NGRAM = 3  # the longest suffix looked up
MIN_NGRAM = 2  # the shortest: a single token matches too often to be worth a draft


class PromptLookup:
    """A row's tokens (prompt and answer), indexed by n-gram: where each n-gram was last followed by a token."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token that followed it, latest
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            j = len(self.tokens)  # t's position: the n-grams ending just before it are followed by t
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if j >= n:
                    self.index[tuple(self.tokens[j - n : j])] = j
            self.tokens.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix found."""
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(self.tokens) > n:
                at = self.index.get(tuple(self.tokens[-n:]))
                if at is not None:
                    return self.tokens[at : at + k]
        return []


def accept(logits: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor, temperature: torch.Tensor,
           top_p: torch.Tensor, top_k: torch.Tensor, min_p: torch.Tensor,
           host: list[tuple[float, float, int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify each row's draft. `logits`: (rows, k + 1, vocab), position i after feeding the next token and the
    draft's first i tokens; `drafts`: (rows, k), of which the first `lengths[row]` are real. Returns the number of
    draft tokens each row keeps, (rows,), and the tokens it takes, (rows, k + 1): the kept draft, then one more (the
    correction or the token after a fully kept draft); the rest is padding."""
    _, width, vocab = logits.shape
    k = width - 1
    real = torch.arange(k, device=logits.device).unsqueeze(0) < lengths.unsqueeze(1)  # (rows, k)
    tokens = logits.argmax(dim=-1)  # greedy rows: the argmax everywhere
    agree = tokens[:, :k] == drafts
    sampled = [i for i, h in enumerate(host) if h[0] > 0]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        per_pos = [h for i in sampled for h in [host[i]] * width]
        rep = idx.repeat_interleave(width)
        probs = distribution(logits[idx].reshape(-1, vocab), temperature[rep], top_p[rep], top_k[rep], min_p[rep],
                             per_pos).view(len(sampled), width, vocab)
        probs /= probs.sum(dim=-1, keepdim=True)  # truncation leaves the kept mass as it was
        draft_p = probs[:, :k].gather(2, drafts[idx].unsqueeze(2)).squeeze(2)  # (sampled, k)
        uniform = torch.rand(draft_p.shape, dtype=torch.float64, device=logits.device)
        agree[idx] = uniform < draft_p.double()
        kept = _kept(agree[idx] & real[idx])  # (sampled,)
        # the token after the kept draft: from p there with the rejected draft token taken out, or from p itself
        # past a fully kept draft
        at = probs[torch.arange(len(sampled), device=logits.device), kept]  # (sampled, vocab)
        if k:
            rejected = drafts[idx].gather(1, kept.clamp(max=k - 1).unsqueeze(1))  # (sampled, 1)
            residual = at.scatter(1, rejected, 0.0)
            # rounding: a token rejected although it held all the mass leaves nothing; then p itself
            use = (kept < lengths[idx]).unsqueeze(1) & (residual.sum(dim=1, keepdim=True) > 0)
            at = torch.where(use, residual, at)
        drawn = torch.multinomial(at, 1).squeeze(1)
        tokens[idx, :k] = drafts[idx]
        tokens[idx, kept] = drawn
    kept_all = _kept(agree & real)
    return kept_all, tokens


def _kept(agree: torch.Tensor) -> torch.Tensor:
    """How many leading True each row has."""
    return agree.long().cumprod(dim=1).sum(dim=1)
