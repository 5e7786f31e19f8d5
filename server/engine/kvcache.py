"""The KV cache, written in place.

transformers' DynamicCache concatenates every layer's keys and values at every step: a copy of the whole cache
for each token generated. Here each layer keeps its keys and values in buffers with spare rows and columns:

    buffer (row slots, heads, columns, head size); live region rows [0, rows), columns [start, end)

A decode step writes one column. Rows that join are copied in once; a row that leaves is replaced by one from the
end (one row copied); the buffers are reallocated, with room to spare, only when they run out. The live region is
what attention sees, so padding columns outside it cost nothing; the values left behind in spare slots are finite
(zeros or old keys), so masked positions stay exact zeros in attention.

The spare never takes a buffer past `max_rows` slots (the engine's --max-batch-size) or `max_cols` columns
(--max-model-len): no row is longer, and no batch has more rows. `footprint` is the most a batch can allocate,
which is what the KV budget on a GPU is sized by (memory.py).
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _spare(columns: int) -> int:
    return max(32, columns // 4)


def _slots(rows: int) -> int:
    return rows + max(4, rows // 4)


def _capped(need: int, wanted: int, cap: int | None) -> int:
    """`wanted` (need plus spare), but no more than `cap`, and never less than `need`."""
    return max(need, wanted if cap is None else min(wanted, cap))


def footprint(rows: int, longest: int, max_rows: int, max_cols: int) -> int:
    """Tokens' worth of buffer that `rows` rows no longer than `longest` can hold allocated at once, whatever their
    split between the running batch (spare slots up to `max_rows`, spare columns) and the caches of prompts still
    being fed (exact rows, spare columns)."""
    slots = max(min(_slots(batch), max_rows) + rows - batch for batch in range(1, rows + 1))
    return slots * _capped(longest, longest + _spare(longest), max_cols)


class InPlaceLayer(DynamicLayer):
    def __init__(self, columns: int = 0, max_rows: int | None = None, max_cols: int | None = None) -> None:
        super().__init__()
        self.columns = columns  # columns to allocate at first (a prefill knows its width)
        self.max_rows, self.max_cols = max_rows, max_cols
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None
        self.rows = 0
        self.start = self.end = 0

    @property
    def width(self) -> int:
        return self.end - self.start

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows, heads, n, dim = key_states.shape
        cols = _capped(n, max(self.columns, n + _spare(n)), self.max_cols)
        self.kbuf = key_states.new_zeros((rows, heads, cols, dim))
        self.vbuf = value_states.new_zeros((rows, value_states.shape[1], cols, value_states.shape[3]))
        self.rows = rows
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        if self.end + n > self.kbuf.shape[2]:
            need = self.width + n
            self.reallocate(self.rows, _capped(need, need + _spare(need), self.max_cols))
        self.kbuf[: self.rows, :, self.end : self.end + n].copy_(key_states)
        self.vbuf[: self.rows, :, self.end : self.end + n].copy_(value_states)
        self.end += n
        self._view()
        return self.keys, self.values

    def close(self, n: int) -> None:
        """Forget the last n columns (tokens fed but not kept: a rejected draft's)."""
        self.end -= n
        self._view()

    def _view(self) -> None:
        self.keys = self._live(self.kbuf).narrow(0, 0, self.rows)
        self.values = self._live(self.vbuf).narrow(0, 0, self.rows)

    def _live(self, buf: torch.Tensor) -> torch.Tensor:
        """Every row slot's live columns (narrow, not indexing: the same on any device, fake ones included)."""
        return buf.narrow(2, self.start, self.width)

    def get_seq_length(self) -> int:
        return self.width

    def reallocate(self, row_slots: int, columns: int, left: int = 0) -> None:
        """New buffers of `row_slots` x `columns`; the live region moves to start at column `left`."""
        rows, width = self.rows, self.width
        for name in ("kbuf", "vbuf"):
            old = getattr(self, name)
            new = old.new_zeros((row_slots, old.shape[1], columns, old.shape[3]))
            new[:rows, :, left : left + width] = old[:rows, :, self.start : self.end]
            setattr(self, name, new)
        self.start, self.end = left, left + width
        self._view()

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor, rows: int, trim: int) -> None:
        """Row dst[i] takes row src[i]'s content; `rows` rows stay live; the first `trim` columns are dropped."""
        if rows > self.kbuf.shape[0]:
            self.reallocate(_capped(rows, _slots(rows), self.max_rows), self.kbuf.shape[2], self.start)
        if dst.numel():
            for buf in (self.kbuf, self.vbuf):
                live = self._live(buf)
                live.index_copy_(0, dst, live.index_select(0, src))
        self.rows = rows
        self.start += trim
        self._view()

    def append_rows(self, other: InPlaceLayer, width: int) -> None:
        """Add `other`'s rows after ours, both right-aligned on a timeline of `width` columns (>= both widths)."""
        rows = self.rows + other.rows
        left = width - self.width  # columns to open before our live region
        if rows > self.kbuf.shape[0] or left > self.start:
            slots = _capped(rows, _slots(rows), self.max_rows)  # sized for these rows, not for a batch gone by
            self.reallocate(slots, _capped(width, width + _spare(width), self.max_cols), left)
        self.start -= left
        for mine, theirs in ((self.kbuf, other.keys), (self.vbuf, other.values)):
            mine[self.rows : rows, :, self.end - theirs.shape[2] : self.end] = theirs
            # columns before their live region: whatever a former row left there (finite), masked out
        self.rows = rows
        self._view()


class KVCache(DynamicCache):
    """A DynamicCache (as far as the model sees) whose layers write in place."""

    def __init__(self, width: int = 0, max_rows: int | None = None, max_cols: int | None = None) -> None:
        """`width`: the tokens the first forward brings (a prefill's prompt width), to allocate once; `max_rows`
        and `max_cols`: what the spare may grow each buffer to."""
        super().__init__()
        self.layer_class_to_replicate = functools.partial(InPlaceLayer, width + _spare(width), max_rows, max_cols)

    def live_layers(self) -> list[InPlaceLayer]:
        return [layer for layer in self.layers if isinstance(layer, InPlaceLayer) and layer.is_initialized]

    @property
    def nbytes(self) -> int:
        """Bytes of every key and value buffer allocated, spare included."""
        return sum(layer.kbuf.nbytes + layer.vbuf.nbytes for layer in self.live_layers())
