"""The model runner: the forward passes and everything on the device. No scheduling, no text."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .batch import Batch
from .kvcache import KVCache
from .request import Request, TokenLogprob
from .processors import process_logits
from .sampling import sample, token_logprobs


@dataclass
class Prefill:
    """Prompts being prefilled a chunk at a time: left-padded to one width, with a cache of their own until
    they join the running batch."""

    requests: list[Request]
    ids: torch.Tensor  # (rows, width)
    mask: torch.Tensor  # (rows, width): 1 = prompt token
    positions: torch.Tensor  # (rows, width): each token's position in its own prompt
    cache: KVCache
    done: int = 0  # columns fed so far


class ModelRunner:
    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        accepted = inspect.signature(model.forward).parameters
        # BLOOM uses ALiBi and takes no position ids; pass only what the model accepts.
        self.takes_positions = "position_ids" in accepted
        self.takes_logits_to_keep = "logits_to_keep" in accepted

    def _forward(self, input_ids, attention_mask, positions, cache, all_logits: bool = False) -> torch.Tensor:
        """Logits of the last position, (rows, vocab); of every position, (rows, tokens, vocab), if all_logits."""
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "past_key_values": cache, "use_cache": True}
        if self.takes_positions:
            kwargs["position_ids"] = positions
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 0 if all_logits else 1
        logits = self.model(input_ids=input_ids, **kwargs).logits
        return logits.float() if all_logits else logits[:, -1, :].float()

    def start_prefill(self, requests: list[Request]) -> Prefill:
        """Left-pad the prompts to one width (one row per request); `prefill_step` then feeds them in chunks."""
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros((len(requests), width), dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        mask = mask.to(self.device)
        return Prefill(requests, ids.to(self.device), mask, (mask.cumsum(dim=1) - 1).clamp(min=0), KVCache(width))

    def prefill(self, requests: list[Request]) -> tuple[Batch, torch.Tensor]:
        """The whole prefill in one forward."""
        p = self.start_prefill(requests)
        return self.prefill_step(p, p.ids.shape[1])

    @torch.inference_mode()
    def prefill_step(self, p: Prefill, chunk: int) -> tuple[Batch, torch.Tensor] | None:
        """Feed the next `chunk` columns of the prompts; when the last one is in, return their batch and the
        logits of each row's last position. Prompt log-probabilities (echo) need every position's logits at
        once, so such a prefill runs whole."""
        requests = p.requests
        wants = [r.params.prompt_logprobs is not None for r in requests]
        width = p.ids.shape[1]
        end = width if any(wants) else min(width, p.done + chunk)
        logits = self._forward(p.ids[:, p.done : end], p.mask[:, :end], p.positions[:, p.done : end], p.cache,
                               all_logits=any(wants))
        p.done = end
        if end < width:
            return None
        if any(wants):
            for r, want, row_logits, row_ids in zip(requests, wants, logits, p.ids, strict=True):
                if want:
                    r.prompt_logprobs = self._prompt_logprobs(row_logits, row_ids, len(r.prompt_ids), r.params.prompt_logprobs)
            logits = logits[:, -1, :]
        lengths = p.mask.sum(dim=1)
        batch = Batch([r.sequences[0] for r in requests], p.cache, p.mask, lengths, torch.zeros_like(lengths))
        rows = [i for i, r in enumerate(requests) for _ in r.sequences]
        if len(rows) > len(requests):  # n > 1: every choice starts from its request's prefilled cache row
            batch.select(rows)
            logits = logits[rows]
        batch.seqs = [s for r in requests for s in r.sequences]
        return batch, logits

    @torch.inference_mode()
    def decode(self, batch: Batch) -> torch.Tensor:
        """Feed every row its next token; return the logits for the token after."""
        ones = batch.attention_mask.new_ones((len(batch), 1))
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        logits = self._forward(
            batch.next_tokens.unsqueeze(1), batch.attention_mask, batch.positions.unsqueeze(1), batch.cache
        )
        batch.positions = batch.positions + 1
        return logits

    @torch.inference_mode()
    def sample(self, batch: Batch, logits: torch.Tensor, eos_ids: set[int]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Next token per row, and its log-probability (with the top alternatives) for rows that ask."""
        params = [s.request.params for s in batch.seqs]
        if any(p.shapes_logits for p in params):
            logits = process_logits(logits, batch.seqs, eos_ids)
        temperature = torch.tensor([p.temperature for p in params], device=self.device)
        tokens = sample(
            logits,
            temperature,
            torch.tensor([p.top_p for p in params], device=self.device),
            torch.tensor([p.top_k for p in params], device=self.device),
            [s.generator for s in batch.seqs],
            torch.tensor([p.min_p for p in params], device=self.device),
        )
        batch.next_tokens = tokens
        return tokens.tolist(), self._logprobs(logits, temperature, tokens, params)

    def _logprobs(self, logits, temperature, tokens, params) -> list[TokenLogprob | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(params)
        if not rows:
            return out
        idx = torch.tensor(rows, device=self.device)
        num_top = max(params[i].logprobs for i in rows)
        chosen, top_ids, top_lps = token_logprobs(logits[idx], temperature[idx], tokens[idx], num_top)
        for row, lp, ids, lps in zip(rows, chosen.tolist(), top_ids.tolist(), top_lps.tolist(), strict=True):
            k = params[row].logprobs
            out[row] = TokenLogprob(int(tokens[row]), lp, list(zip(ids[:k], lps[:k], strict=True)))
        return out

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, ids: torch.Tensor, length: int, k: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (none for the first), raw model scores."""
        lp = logits[-length:-1].log_softmax(dim=-1)
        targets = ids[-length + 1 :] if length > 1 else ids[:0]
        chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        top = lp.topk(k, dim=-1) if k else None
        out = [TokenLogprob(int(ids[-length]), None, [])]
        for j, (t, c) in enumerate(zip(targets.tolist(), chosen, strict=True)):
            alts = list(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True)) if top is not None else []
            out.append(TokenLogprob(t, c, alts))
        return out

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)
