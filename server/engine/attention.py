"""Decode attention over the batch's timeline, by runs of rows of about the same length.

The batch's rows are right-aligned on one timeline (batch.py): a row with a short prompt, or one that joined late,
has padding columns on its left up to the longest row's start. Attention over the whole timeline makes every row
pay for the longest one: 8 rows, one of them 1,600 tokens long and the others 100, took 1.45 ms a layer on a 2-core
CPU, where attending each row over its own columns took 0.28 ms. So the rows are cut into runs of neighbours
(rows join at the end, so neighbours are of about the same age), each attending over the columns its longest row
reaches. A run is cut where the (row, column) pairs it saves outweigh one more attention call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# One more attention call costs about as much as this many (row, column) pairs of keys and values read (2-core AMD
# EPYC, bf16, 64-wide heads: ~20 us a call, ~0.12 us a pair)
CALL_PAIRS = 170


@dataclass(frozen=True)
class Run:
    rows: slice  # consecutive rows of the batch
    start: int  # the first column any of them reads
    mask: torch.Tensor | None  # (rows, 1, 1, columns from start) bool; None where every column is real


def runs(mask: torch.Tensor) -> list[Run]:
    """Cut the batch's rows by their mask (rows, width) into runs (a step's work, shared by the layers)."""
    real = mask.bool()
    first = real.int().argmax(dim=1).tolist()  # each row's first real column
    cuts, begin, start = [], 0, first[0]
    for i, f in enumerate(first[1:], start=1):
        # joining the run: its rows read back to the new row's start, or the new row reads back to the run's
        more = (i - begin) * (start - f) if f < start else f - start
        if more > CALL_PAIRS:
            cuts.append((begin, i, start))
            begin, start = i, f
        else:
            start = min(start, f)
    cuts.append((begin, len(first), start))
    out = []
    for begin, end, start in cuts:
        part = real[begin:end, start:]
        out.append(Run(slice(begin, end), start, None if bool(part.all()) else part[:, None, None, :]))
    return out


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cut: list[Run], scale: float,
           attention=None) -> torch.Tensor:
    """Each run's queries (rows first) against its rows' keys and values from its start column; `attention(q, k, v,
    mask)` where given (transformers' attention function), else SDPA. The runs' outputs, concatenated by rows."""
    def one(run: Run) -> torch.Tensor:
        q, k, v = query[run.rows], keys[run.rows, :, run.start:], values[run.rows, :, run.start:]
        if attention is not None:
            return attention(q, k, v, run.mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=run.mask, scale=scale)

    return one(cut[0]) if len(cut) == 1 else torch.cat([one(run) for run in cut])
