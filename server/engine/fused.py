"""One forward for the running rows' next tokens and the next chunk of the prompts being prefilled.

Two forwards a step (decode, then a prefill chunk) read every weight twice; on a small batch that is most of a
step's time, so a step with a chunk cost about three plain steps and the streams stuttered while prompts joined.
Here the tokens go through the model as one flat sequence, (1, rows + prompts x chunk, ...), so the matrix
products run once over all of them. Only attention tells them apart: the model's attention calls this module's
function, which gives each decode row its own cache row and each group of prompts its chunk, causally, against
the group's own cache.

It works for models whose attention goes through transformers' attention interface and takes explicit position
ids (Llama, Qwen, Mistral, GPT-2...). `supported()` checks a model at start-up against the two-forward path and
the engine falls back to it otherwise (BLOOM's ALiBi, most remote code).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .attention import Run, attend
from .kvcache import KVCache

NAME = "polyglot_fused"
_current = threading.local()


@dataclass
class Group:
    """Prompts prefilled together: `prompts` rows of `chunk` tokens each in the flat sequence."""

    cache: KVCache
    prompts: int
    chunk: int
    mask: torch.Tensor  # (prompts, 1, chunk, keys) bool


@dataclass
class FusedStep:
    decode_cache: KVCache
    rows: int  # decode rows, one token each, first in the flat sequence
    decode_runs: list[Run]  # the decode rows by runs of about the same length (attention.py)
    groups: list[Group]  # then each group's tokens, row by row
    kv: dict[int, list] = field(default_factory=dict)

    def split(self, states: torch.Tensor) -> list[torch.Tensor]:
        """(1, heads, tokens, dim) -> the decode rows' (rows, heads, 1, dim), then each group's
        (prompts, heads, chunk, dim): views, no copies."""
        parts = [states[:, :, : self.rows].transpose(0, 2)]
        start = self.rows
        for g in self.groups:
            size = g.prompts * g.chunk
            parts.append(states[0, :, start : start + size].unflatten(1, (g.prompts, g.chunk)).transpose(0, 1))
            start += size
        return parts


class FlatCache(DynamicCache):
    """What the model sees as its cache: hands each part of the flat sequence's keys and values to its own cache."""

    def __init__(self, step: FusedStep) -> None:
        super().__init__()
        self.step = step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        s = self.step
        caches = [s.decode_cache] + [g.cache for g in s.groups]
        s.kv[layer_idx] = [cache.update(k, v, layer_idx)
                           for cache, k, v in zip(caches, s.split(key_states), s.split(value_states), strict=True)]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    s: FusedStep | None = getattr(_current, "step", None)
    if s is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)

    def sdpa(q, k, v, mask):
        return sdpa_attention_forward(module, q, k, v, mask, scaling=scaling, dropout=0.0)[0]

    parts, kv = s.split(query), s.kv.pop(module.layer_idx)
    outs = [attend(parts[0], *kv[0], s.decode_runs, scaling, sdpa)]
    outs += [sdpa(q, k, v, g.mask) for q, (k, v), g in zip(parts[1:], kv[1:], s.groups, strict=True)]
    # each (rows, tokens, heads, dim) -> one flat sequence
    return torch.cat([o.reshape(1, -1, *o.shape[-2:]) for o in outs], dim=1), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def prefill_mask(mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(prompts, 1, end - start, end): query i (column start + i) sees the prompt's tokens up to itself. A padding
    query sees itself, so no row is empty and padding stays finite."""
    cols = torch.arange(end, device=mask.device)
    query = torch.arange(start, end, device=mask.device).unsqueeze(1)
    allowed = (mask[:, None, :end].bool() & (cols <= query)) | (cols == query)
    return allowed.unsqueeze(1)


def forward(model, step: FusedStep, ids: torch.Tensor, positions: torch.Tensor | None, keep: torch.Tensor):
    """Run the flat sequence; logits (len(keep), vocab) of the positions in `keep`."""
    kwargs = {"position_ids": positions} if positions is not None else {}
    _current.step = step
    try:
        # a 4-D mask goes to attention as is: ours ignores it and uses the step's masks
        dummy = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=ids.device)
        out = model(input_ids=ids, attention_mask=dummy, past_key_values=FlatCache(step), use_cache=True,
                    logits_to_keep=keep, **kwargs)
    finally:
        _current.step = None
    return out.logits[0].float()


def enable(model) -> None:
    model.set_attn_implementation(NAME)


def disable(model, previous: str) -> None:
    model.set_attn_implementation(previous)
