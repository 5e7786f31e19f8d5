"""Per-request logit processors: penalties, logit bias and min_tokens, applied row by row to the rows
that ask for them (the others pay nothing), before temperature, top-k/top-p and min-p."""

from __future__ import annotations

import torch

from .request import Sequence


def process_logits(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> torch.Tensor:
    """Apply each row's processors in place: repetition penalty (Hugging Face's formula), presence and
    frequency penalties (OpenAI's), logit bias, then the ban on ending before min_tokens."""
    vocab = logits.shape[-1]
    for row, seq in enumerate(seqs):
        p = seq.request.params
        if not p.shapes_logits:
            continue
        out = torch.tensor(seq.token_ids, dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.request.prompt_ids + seq.token_ids, device=logits.device).unique()
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and out.numel():
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=logits.device)
            bias = torch.tensor([b for _, b in p.logit_bias], dtype=logits.dtype, device=logits.device)
            logits[row, ids] += bias.masked_fill(bias <= -100, float("-inf"))  # -100 bans outright
        if len(seq.token_ids) < p.min_tokens:
            enders = [t for t in (*(() if p.ignore_eos else eos_ids), *p.stop_token_ids) if t < vocab]
            logits[row, enders] = float("-inf")
    return logits
