"""The running batch: rows left-padded to one timeline, with one KV cache for all of them.

Rows join (concatenate, re-padding on the left), leave (filter), and can be duplicated or
reordered (select): the cache rows follow. Every row's next position is tracked, so models
with absolute or rotary positions see the same positions whatever the padding.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .request import Sequence


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Batch:
    def __init__(
        self,
        seqs: list[Sequence],
        cache: DynamicCache,
        attention_mask: torch.Tensor,  # (rows, cached tokens): 1 = real token, 0 = padding
        positions: torch.Tensor,  # (rows,): position of each row's next token
        next_tokens: torch.Tensor,  # (rows,): the token each row feeds next
    ) -> None:
        self.seqs = seqs
        self.cache = cache
        self.attention_mask = attention_mask
        self.positions = positions
        self.next_tokens = next_tokens

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def width(self) -> int:
        return self.attention_mask.shape[1]

    def _kv(self) -> list:
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]

    def select(self, indices: list[int]) -> None:
        """Keep (or repeat, or reorder) rows by index; trim padding columns no row needs any more."""
        idx = torch.tensor(indices, dtype=torch.long, device=self.attention_mask.device)
        self.seqs = [self.seqs[i] for i in indices]
        mask = self.attention_mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        self.attention_mask = mask[:, start:]
        self.positions = self.positions.index_select(0, idx)
        self.next_tokens = self.next_tokens.index_select(0, idx)
        for layer in self._kv():
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]

    def extend(self, other: Batch) -> None:
        """Join another batch's rows to this one, padding the shorter timeline on the left."""
        width = max(self.width, other.width)
        self.attention_mask = torch.cat(
            [_pad_left(self.attention_mask, width, 1), _pad_left(other.attention_mask, width, 1)]
        )
        for mine, theirs in zip(self._kv(), other._kv(), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.seqs = self.seqs + other.seqs
        self.positions = torch.cat([self.positions, other.positions])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
