"""4-bit weights on CPU: `--quantization int4` keeps each decoder linear layer's weights as 4-bit integers in groups
of 32 along the input, with a scale and an offset per group, and multiplies through PyTorch's packed int4 kernel for
CPUs (`torch._weight_int4pack_mm_for_cpu`: AVX-512 where the CPU has it, else AVX2; bf16 activations).

The format is GGUF's Q4_1 (w = d * q + m, q in 0..15, 32 weights a group) in another layout: a Q4_1 checkpoint (the
embedded default model) dequantized on load has in every group its minimum at q = 0 and its maximum at q = 15, so
the group's d and m, and every q, come back exactly and the model runs on the very weights the file holds. Other
checkpoints are rounded to the nearest of 16 levels between each group's minimum and maximum. The output layer and
the embeddings stay as they are (GGUF keeps them at 8 bits or more too).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformers.pytorch_utils import Conv1D

GROUP = 32  # weights per scale and offset, along the input: Q4_1's block
_MID = 8  # the kernel's dequantization: (q - 8) * scale + zero


def quantize(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(out, in) float weights -> their 4-bit values (int32, 0..15), the kernel's (in / GROUP, out, 2) scales and
    zeros in `dtype`, and the largest difference between the weights and what the 4-bit ones stand for."""
    w = weight.float()
    groups = w.unflatten(1, (-1, GROUP))  # (out, in / GROUP, GROUP)
    low, high = groups.amin(dim=2, keepdim=True), groups.amax(dim=2, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = ((groups - low) / scale).round().clamp(0, 15)
    error = float((q * scale + low - groups).abs().max())
    zero = low + _MID * scale  # (q - 8) * scale + zero == q * scale + low
    scales_zeros = torch.stack([scale.squeeze(2), zero.squeeze(2)], dim=2).transpose(0, 1).contiguous().to(dtype)
    return q.flatten(1).to(torch.int32), scales_zeros, error


def pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit values (out, in) as int32 -> the kernel's packed layout."""
    return torch._convert_weight_to_int4pack_for_cpu(q, 4 if q.shape[1] % (4 * 16) == 0 else 2)


def _weight(module: torch.nn.Module) -> torch.Tensor | None:
    """A linear layer's (out, in) weight: torch's Linear, or transformers' Conv1D (GPT-2, PolyLM), which stores it
    transposed; None for anything else."""
    if isinstance(module, torch.nn.Linear):
        return module.weight
    if isinstance(module, Conv1D):
        return module.weight.t()
    return None


def _product(flat: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, dense: torch.Tensor | None,
             dense_from: int, bias: torch.Tensor | None) -> torch.Tensor:
    """(rows, in) inputs in the scales' dtype -> (rows, out): on the bf16 weights from `dense_from` rows where they
    are kept, else through the packed kernel."""
    if dense is not None and flat.shape[0] >= dense_from:
        y = torch.nn.functional.linear(flat, dense)
    else:
        y = torch._weight_int4pack_mm_for_cpu(flat, packed, GROUP, scales_zeros)
    return y if bias is None else y + bias.to(y.dtype)


class Int4Linear(torch.nn.Module):
    """A linear layer on 4-bit weights. With `dense_from`, it also keeps the 16-bit weights and multiplies forwards
    of that many rows or more with them: the packed kernel reads a quarter of the bytes, which is what a step of
    one or a few rows waits for, while many rows are bound by arithmetic, where oneDNN's bf16 kernels are faster."""

    def __init__(self, linear: torch.nn.Module, dense_from: int = 0) -> None:
        super().__init__()
        weight = _weight(linear).detach()
        self.dense_from = dense_from
        self.register_buffer("dense", weight.to(torch.bfloat16) if dense_from else None, persistent=False)
        self.out_features, self.in_features = weight.shape
        dtype = weight.dtype if weight.dtype in (torch.bfloat16, torch.float32) else torch.bfloat16
        values, scales_zeros, self.error = quantize(weight, dtype)
        self.register_buffer("packed", pack(values))
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = linear.bias

    @classmethod
    def joined(cls, parts: list[Int4Linear]) -> Int4Linear | None:
        """One layer for several that read the same input (q, k and v; gate and up), their outputs side by side:
        one kernel call instead of several. The parts' 4-bit (and bf16) weights become views of the joined layer's,
        so no memory doubles; their scales are copied (the kernel reads them only contiguous). None where they
        differ in kind, or where the packed layout does not join by rows: it is packed by blocks of output rows
        (64 here), so parts whose sizes are not whole blocks cannot be, which a probe product checks."""
        first = parts[0]
        alike = {(p.dense_from, p.in_features, p.scales_zeros.dtype, p.dense is not None, p.bias is not None)
                 for p in parts}
        if len(alike) > 1:
            return None
        joined = cls.__new__(cls)
        torch.nn.Module.__init__(joined)
        joined.dense_from, joined.in_features = first.dense_from, first.in_features
        joined.out_features = sum(p.out_features for p in parts)
        joined.error = max(p.error for p in parts)
        sizes = [p.out_features for p in parts]
        for name, dim in (("packed", 0), ("dense", 0), ("scales_zeros", 1), ("bias", 0)):
            tensors = [getattr(p, name) for p in parts]
            whole = torch.cat(tensors, dim=dim) if tensors[0] is not None else None
            if name == "bias":
                joined.bias = whole
            else:
                joined.register_buffer(name, whole, persistent=False)
        probe = torch.randn((2, first.in_features), generator=torch.Generator().manual_seed(0)).to(first.scales_zeros)
        if not torch.equal(joined._packed_mm(probe), torch.cat([p._packed_mm(probe) for p in parts], dim=1)):
            return None
        for name in ("packed", "dense"):
            if getattr(joined, name) is not None:
                for p, view in zip(parts, getattr(joined, name).split(sizes), strict=True):
                    setattr(p, name, view)
        return joined

    def product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This layer's product as a plain function of (rows, in) inputs in the scales' dtype, without the module's
        call, reshapes and conversions, and without reading its buffers through the module each call (llama.py
        calls it ~120 times a step, where those cost a third as much as the kernel at one row)."""
        return functools.partial(_product, packed=self.packed, scales_zeros=self.scales_zeros, dense=self.dense,
                                 dense_from=self.dense_from, bias=self.bias)

    def _packed_mm(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _product(x.reshape(-1, self.in_features).to(self.scales_zeros.dtype), self.packed, self.scales_zeros,
                     self.dense, self.dense_from, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantizable(module: torch.nn.Module) -> bool:
    weight = _weight(module)
    return weight is not None and weight.shape[1] % (2 * 16) == 0 and weight.shape[0] % 16 == 0


def quantize_int4(model: torch.nn.Module, dense_from: int = 0) -> dict[str, float]:
    """Replace the decoder's linear layers (not the output layer) with Int4Linear, in place (keeping bf16 weights
    too for forwards of `dense_from` rows or more, where it is not 0); returns each one's largest rounding error
    (0 where the weights were 4-bit already)."""
    head = model.get_output_embeddings()
    errors = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child is not head and quantizable(child):
                q = Int4Linear(child, dense_from)
                setattr(module, child_name, q)
                errors[f"{name}.{child_name}".lstrip(".")] = q.error
    return errors

