"""How much KV cache a GPU holds, and what its memory is doing.

On CUDA the KV budget is what the device has left after the weights and the largest step's activations (vLLM's
`gpu_memory_utilization` idea): run one dry step at the largest batch, read the peak, and give the KV cache the rest
of `utilization` x the device's memory. The cache's buffers keep spare rows and columns (kvcache.py), so the token
budget admission works with is the largest one whose buffers, spare included, fit in those bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .kvcache import footprint
from .params import SamplingParams
from .runner import bare_requests


@dataclass(frozen=True)
class DeviceBudget:
    total: int  # the device's memory, bytes
    other: int  # used outside this process's PyTorch allocator: the CUDA context, other processes
    peak: int  # most this process's allocator held at once (weights + the dry step), its KV cache left out
    kv_bytes: int  # what the KV cache may take
    tokens: int  # the admission budget: rows x longest reserved row


def token_budget(capacity: int, max_rows: int, max_cols: int) -> int:
    """The largest budget T (<= max_rows x max_cols) such that any batch admitted under it (r rows, longest row
    <= T // r) allocates at most `capacity` tokens' worth of buffers, spare included; 0 if not even one row of
    `max_cols` tokens fits."""

    def fits(budget: int) -> bool:
        return all(footprint(r, min(max_cols, budget // r), max_rows, max_cols) <= capacity
                   for r in range(1, min(max_rows, budget) + 1))

    if not fits(max_cols):
        return 0
    lo, hi = max_cols, max_rows * max_cols
    while lo < hi:  # fits() holds at lo and is monotone in the budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def dry_step(runner: Any, rows: int, prompt_tokens: int) -> int:
    """One prefill of `rows` prompts of `prompt_tokens` tokens and one sampled decode step over them: the largest
    step the engine takes (a fused step has these rows and at most a chunk of prompt tokens). Returns the bytes of
    KV cache it allocated, which the peak must not count twice."""
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9)
    batch, logits = runner.prefill(bare_requests([[0] * prompt_tokens] * rows, params))
    runner.sample(batch, logits)
    runner.sample(batch, runner.decode(batch))
    return batch.cache.nbytes


def size_from_device(runner: Any, device: torch.device, utilization: float, per_token: int, max_rows: int,
                     max_cols: int, prompt_tokens: int) -> DeviceBudget:
    """Measure, with one dry step, what the KV cache may take of `device` under `utilization`."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    kv = dry_step(runner, max_rows, max(1, min(prompt_tokens, max_cols - 1)))
    peak = torch.cuda.max_memory_allocated(device) - kv
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    other = max(0, total - free - torch.cuda.memory_reserved(device))
    kv_bytes = max(0, int(total * utilization) - other - peak)
    return DeviceBudget(total, other, peak, kv_bytes, token_budget(kv_bytes // per_token, max_rows, max_cols))


def cuda_devices(model: Any) -> list[torch.device]:
    """The CUDA devices the model's weights are on (several with --device-map)."""
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=lambda d: d.index or 0)


def device_memory(devices: list[torch.device]) -> list[tuple[str, int, int, int]]:
    """Per device: (name, bytes reserved by this process's allocator, bytes of tensors allocated, total bytes)."""
    out = []
    for d in devices:
        _, total = torch.cuda.mem_get_info(d)
        out.append((str(d), torch.cuda.memory_reserved(d), torch.cuda.memory_allocated(d), total))
    return out
