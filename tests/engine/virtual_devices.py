"""Tensors on CUDA devices this machine does not have, with their data: each is a CPU tensor wrapped in a subclass
that says `cuda:N`. Every op runs on the CPU data, and raises as CUDA would when its tensor arguments sit on
different devices (a 0-dim CPU tensor may join a CUDA op, as on CUDA; a copy may cross devices). FakeTensorMode
checks devices too, but has no data, so code that reads values (`nonzero`, `.tolist()`, `int()`) cannot run
under it; this can.

    with VirtualCuda():
        logits = torch.randn(4, 100, device="cuda:0")   # an OnDevice tensor: data on the CPU, device cuda:0
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map


class DeviceMismatch(RuntimeError):
    pass


def _virtual(device) -> torch.device | None:
    if device is None or isinstance(device, (int, torch.dtype)):
        return torch.device("cuda", device) if isinstance(device, int) else None
    device = torch.device(device)
    return device if device.type == "cuda" else None


class OnDevice(torch.Tensor):
    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device):
        t = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=device, requires_grad=False)
        t.elem = elem
        return t

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        target = _virtual(kwargs.get("device"))
        if target is not None:
            kwargs["device"] = torch.device("cpu")
        devices: set[torch.device] = set()

        def unwrap(x):
            if isinstance(x, OnDevice):
                devices.add(x.device)
                return x.elem
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                devices.add(x.device)
            return x

        plain_args, plain_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        crossing = func in (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)
        if len(devices) > 1 and not crossing:
            raise DeviceMismatch(f"Expected all tensors to be on the same device, but found {sorted(map(str, devices))}"
                                 f" in {func}")
        out = func(*plain_args, **plain_kwargs)
        schema = func._schema
        if schema.arguments and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write:
            return args[0]  # in place: the wrapper itself
        if func is torch.ops.aten._to_copy.default and "device" in kwargs:
            device = target  # None: a copy to the host
        else:
            device = target or next((d for d in devices if d.type == "cuda"), None)
        if device is None:
            return out
        return tree_map(lambda x: OnDevice(x, device) if isinstance(x, torch.Tensor) else x, out)


def _elem(x):
    return x.elem if isinstance(x, OnDevice) else x


def _to_target(args, kwargs) -> torch.device | None:
    for a in (*args, kwargs.get("device")):
        if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
            return _virtual(a)
        if isinstance(a, torch.Tensor):
            return a.device if a.device.type == "cuda" else None
    return None


class VirtualCuda(TorchFunctionMode):
    """Where a CUDA device would be asked for before any op runs (factories with device=cuda, `.to("cuda")`,
    Python indexing, `new_tensor`), do it on the CPU and wrap the result; everything else goes to OnDevice."""

    FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
                 torch.rand, torch.randn, torch.randint}
    READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and _virtual(kwargs.get("device")) is not None:
            device = _virtual(kwargs.pop("device"))
            return OnDevice(func(*args, **kwargs), device)
        if func is torch.Tensor.to or func is torch.Tensor.cuda:
            self_, *rest = args
            target = _to_target(rest, kwargs) if func is torch.Tensor.to else _virtual(rest[0] if rest else 0)
            if target is not None:
                if isinstance(self_, OnDevice) and self_.device == target:
                    return self_
                dtype = next((a for a in rest if isinstance(a, torch.dtype)), kwargs.get("dtype"))
                data = _elem(self_).to(dtype) if dtype is not None else _elem(self_).clone()
                return OnDevice(data, target)
        if func in self.READS and isinstance(args[0], OnDevice):  # a copy to the host (a sync on CUDA)
            return func(args[0].elem, *args[1:], **kwargs)
        if func is torch.Tensor.new_tensor and isinstance(args[0], OnDevice):
            return OnDevice(_elem(args[0]).new_tensor(*args[1:], **kwargs), args[0].device)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], OnDevice):
            base = args[0]
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            for i in index:  # CUDA takes host indices for a device tensor, not another device's
                if isinstance(i, OnDevice) and i.device != base.device:
                    raise DeviceMismatch(f"indices on {i.device} for a tensor on {base.device}")
            plain = tuple(_elem(i) for i in index)
            plain = plain if isinstance(args[1], tuple) else plain[0]
            if func is torch.Tensor.__getitem__:
                return OnDevice(base.elem[plain], base.device)
            value = args[2]
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != base.device:
                raise DeviceMismatch(f"a value on {value.device} written into a tensor on {base.device}")
            base.elem[plain] = _elem(value)
            return None
        try:
            return func(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as e:  # a binding that asks the device itself first (nonzero,
            # searchsorted, ...), or makes a Python number a tensor on it (torch.where(c, t, 0))
            if "not linked with support for cuda" not in str(e) and "from the 'CUDA' backend" not in str(e):
                raise
        devices = {x.device for x in _tensors((args, kwargs)) if x.dim() > 0 or isinstance(x, OnDevice)}
        if len(devices) > 1:
            raise DeviceMismatch(f"Expected all tensors to be on the same device, but found {sorted(map(str, devices))}"
                                 f" in {getattr(func, '__name__', func)}")
        device = next(iter(devices))
        out = func(*tree_map(_elem, args), **tree_map(_elem, kwargs))
        return tree_map(lambda x: OnDevice(x, device) if isinstance(x, torch.Tensor) else x, out)


def _tensors(tree) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map(lambda x: found.append(x) if isinstance(x, torch.Tensor) else None, tree)
    return found


def host(x):
    """The CPU data of a virtual tensor (for comparing results)."""
    return x.elem if isinstance(x, OnDevice) else x
