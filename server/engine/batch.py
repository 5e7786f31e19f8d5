"""The running batch: rows left-padded to one timeline, with one KV cache for all of them.

The batch owns its rows' state: each row's mask over the timeline, its next position and next token, its cache row
and its sampling parameters. Rows join (extend, re-padding on the left), leave (drop, filled from the end), and can
be duplicated (n > 1: the copies are new choices) or reordered (beams: the cache rows move, the slots stay), all
through `select`; the cache rows follow, moved in place (kvcache.py). A decode step opens one mask column in place
(`open_column`: spare columns are allocated ahead, as the cache's are) and moves the positions on in place, so no
step allocates the batch's tensors anew. Every row's next position is tracked, so models with absolute or rotary
positions see the same positions whatever the padding. The rows' sampling parameters are tensors on the device,
made once and moved with the rows, not rebuilt each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .kvcache import KVCache
from .request import Request, Sequence

SPARE_COLUMNS = 32  # mask columns allocated ahead of the timeline's end


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass(frozen=True)
class RowParams:
    """Each row's sampling parameters, (rows,) tensors on the batch's device."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    host: list[tuple[float, float, int, float]]  # the same numbers on the host, so no step reads them back

    @classmethod
    def of(cls, seqs: list[Sequence], device: torch.device) -> RowParams:
        host = [(p.temperature, p.top_p, p.top_k, p.min_p) for p in (s.request.params for s in seqs)]
        on = torch.tensor(host, dtype=torch.float64).to(device)
        return cls(on[:, 0].float(), on[:, 1].float(), on[:, 2].long(), on[:, 3].float(), host)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.temperature, self.top_p, self.top_k, self.min_p

    def select(self, idx: torch.Tensor, indices: list[int]) -> RowParams:
        return RowParams(*(t.index_select(0, idx) for t in self.tensors()), [self.host[i] for i in indices])

    def cat(self, other: RowParams) -> RowParams:
        return RowParams(*(torch.cat([a, b]) for a, b in zip(self.tensors(), other.tensors(), strict=True)),
                         self.host + other.host)


class Batch:
    def __init__(
        self,
        seqs: list[Sequence],
        cache: KVCache,
        attention_mask: torch.Tensor,  # (rows, cached tokens): 1 = real token, 0 = padding
        positions: torch.Tensor,  # (rows,): position of each row's next token
        next_tokens: torch.Tensor,  # (rows,): the token each row feeds next
    ) -> None:
        self.seqs = seqs
        self.cache = cache
        self._set_mask(attention_mask)
        self.positions = positions
        self.next_tokens = next_tokens
        self._params: RowParams | None = None  # made at the first sampling step, then moved with the rows

    def _set_mask(self, mask: torch.Tensor) -> None:
        """The rows' mask, in a buffer with spare columns on the right for the steps to come."""
        self._width = mask.shape[1]
        self._mask = torch.cat([mask, mask.new_zeros((mask.shape[0], SPARE_COLUMNS))], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(rows, width): 1 = a real token, 0 = padding (a view of the buffer)."""
        return self._mask.narrow(1, 0, self._width)

    def open_column(self, n: int = 1) -> None:
        """Every row feeds n tokens: the timeline's next n columns open, written in place while spare ones last."""
        if self._width + n > self._mask.shape[1]:
            self._set_mask(self.attention_mask)
        self._mask.narrow(1, self._width, n).fill_(1)
        self._width += n

    @torch.inference_mode()
    def settle(self, kept: list[int], fed: int) -> None:
        """After a forward that fed each row `fed` tokens (its next token and a draft, speculative.py), of which row
        i keeps its first kept[i] + 1: the others are masked out, columns that no row keeps are closed (here and in
        the cache), and each row's next position moves past what it kept."""
        keep = max(kept) + 1
        start = self._width - fed
        kept = torch.tensor(kept, device=self.positions.device)
        cols = torch.arange(keep, device=kept.device).unsqueeze(0)
        self._mask.narrow(1, start, keep).masked_fill_(cols > kept.unsqueeze(1), 0)
        self._mask.narrow(1, start + keep, fed - keep).zero_()
        self._width = start + keep
        for layer in self.cache.live_layers():
            layer.close(fed - keep)
        self.positions += kept + 1

    @property
    def params(self) -> RowParams:
        if self._params is None:
            self._params = RowParams.of(self.seqs, self.attention_mask.device)
        return self._params

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def width(self) -> int:
        return self._width

    @torch.inference_mode()
    def select(self, indices: list[int], seqs: list[Sequence] | None = None) -> None:
        """Row i takes row indices[i]'s place: keep, repeat or reorder rows. Padding columns that no row needs
        any more are trimmed. `seqs`: the rows' sequences afterwards, where they are not the moved ones (the
        copies of a row made for n > 1 are new choices; a beam's slots stay while their content moves)."""
        device = self.attention_mask.device
        idx = torch.tensor(indices, dtype=torch.long, device=device)
        self.seqs = seqs if seqs is not None else [self.seqs[i] for i in indices]
        mask = self.attention_mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        trim = int(used[0]) if used.numel() else mask.shape[1]
        self._set_mask(mask[:, trim:])
        self.positions = self.positions.index_select(0, idx)
        self.next_tokens = self.next_tokens.index_select(0, idx)
        if self._params is not None:
            self._params = self._params.select(idx, indices)
        moved = [(i, j) for i, j in enumerate(indices) if i != j]
        self.move_cache_rows([i for i, _ in moved], [j for _, j in moved], len(indices), trim)

    def move_cache_rows(self, dst: list[int], src: list[int], rows: int, trim: int) -> None:
        """Cache row dst[i] takes row src[i]'s content in every layer. With --device-map each layer's buffers are
        on its own GPU, so the indices go to each device once."""
        dst_t, src_t = torch.tensor(dst, dtype=torch.long), torch.tensor(src, dtype=torch.long)
        on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in self.cache.live_layers():
            where = layer.kbuf.device
            if where not in on:
                on[where] = (dst_t.to(where, non_blocking=True), src_t.to(where, non_blocking=True))
            layer.move_rows(*on[where], rows, trim)

    @torch.inference_mode()
    def clear(self, rows: list[int]) -> None:
        """Zero these rows' whole cache slots (a failed row's NaN must not linger where masked columns are read)."""
        if rows:
            for layer in self.cache.live_layers():
                layer.kbuf[rows] = 0
                layer.vbuf[rows] = 0

    def drop(self, rows: list[int]) -> None:
        """Remove rows; the last rows move into the holes, so only as many cache rows are copied as leave."""
        gone = set(rows)
        keep = len(self) - len(gone)
        fillers = iter([i for i in range(keep, len(self)) if i not in gone])
        self.select([i if i not in gone else next(fillers) for i in range(keep)])

    @torch.inference_mode()
    def extend(self, other: Batch) -> None:
        """Join another batch's rows after this one's, padding the shorter timeline on the left."""
        width = max(self.width, other.width)
        self._set_mask(torch.cat([_pad_left(self.attention_mask, width, 1), _pad_left(other.attention_mask, width, 1)]))
        for mine, theirs in zip(self.cache.live_layers(), other.cache.live_layers(), strict=True):
            mine.append_rows(theirs, width)
        self.seqs = self.seqs + other.seqs
        both = self._params is not None and other._params is not None
        self._params = self._params.cat(other._params) if both else None
        self.positions = torch.cat([self.positions, other.positions])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])


class Prefill(Batch):
    """A prompt group's rows (scheduler.PromptGroup) while their prompts are fed in chunks: a batch whose rows are
    not yet fully computed, left-padded to one width, with a cache of its own. Its mask and next positions are
    already those of the whole prompts; `ids` and `prompt_positions` are the columns still to feed. Once the last
    one is in, `computed()` drops what only feeding needed, and its rows join the running batch."""

    def __init__(self, requests: list[Request], ids: torch.Tensor, mask: torch.Tensor, cache: KVCache,
                 hits: list[Any] | None = None) -> None:
        lengths = mask.sum(dim=1)
        super().__init__([r.sequences[0] for r in requests], cache, mask, lengths, torch.zeros_like(lengths))
        self.requests = requests
        self.ids: torch.Tensor | None = ids  # (rows, width)
        self.prompt_positions: torch.Tensor | None = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each token's position
        self.hits = hits  # per row, its prefix-cache hit (prefix.py), or None: kept there once computed

    def computed(self) -> Batch:
        self.ids = self.prompt_positions = self.hits = None  # a hit holds cache blocks: let them go with the pool
        return self
