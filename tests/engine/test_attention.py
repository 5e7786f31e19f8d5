"""Decode attention by runs of rows of about the same length (attention.py): where the rows are cut, and the same
output as attention over the whole timeline with its padding mask."""

import pytest
import torch
import torch.nn.functional as F

from server.engine import attention
from server.engine.attention import attend, runs


def timeline(spans: list[int], width: int, holes: dict[int, list[int]] | None = None) -> torch.Tensor:
    """Rows right-aligned on `width` columns, row i real over its last spans[i]; `holes`: masked columns inside."""
    mask = torch.zeros(len(spans), width, dtype=torch.long)
    for i, span in enumerate(spans):
        mask[i, width - span:] = 1
        for col in (holes or {}).get(i, []):
            mask[i, col] = 0
    return mask


def test_rows_of_about_the_same_length_share_a_run_and_read_only_their_columns():
    cut = runs(timeline([400, 390, 20, 30, 25, 405], 410))
    assert [(r.rows.start, r.rows.stop, r.start) for r in cut] == [(0, 2, 10), (2, 5, 380), (5, 6, 5)]
    # each run's mask covers its own columns; the second run's rows are real over the last 30 but two
    assert cut[1].mask.shape == (3, 1, 1, 30) and int(cut[1].mask.sum()) == 20 + 30 + 25
    # a run whose columns are all real needs no mask
    assert cut[2].mask is None
    # one row, or rows that differ by less than a call's worth of columns: one run over the whole timeline
    assert [(r.rows, r.start) for r in runs(timeline([12, 50, 7], 50))] == [(slice(0, 3), 0)]


@pytest.mark.parametrize("call_pairs", [attention.CALL_PAIRS, 0])
def test_the_same_output_as_attention_over_the_whole_timeline(monkeypatch, call_pairs):
    monkeypatch.setattr(attention, "CALL_PAIRS", call_pairs)  # 0: a run wherever two neighbours differ
    torch.manual_seed(0)
    spans, width = [300, 296, 40, 44, 9, 300, 1], 300
    mask = timeline(spans, width, holes={0: [150, 151], 3: [280]})  # holes: a rejected draft's columns
    query = torch.randn(len(spans), 2, 3, 16)  # (rows, key/value heads, query heads per key/value head, dim)
    keys, values = torch.randn(len(spans), 2, width, 16), torch.randn(len(spans), 2, width, 16)
    cut = runs(mask)
    assert len(cut) == (4 if call_pairs else 7)
    expected = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask.bool()[:, None, None, :], scale=0.25)
    torch.testing.assert_close(attend(query, keys, values, cut, 0.25), expected)
