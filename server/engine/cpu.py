"""Which dtype decodes fastest on the CPU at hand, measured once per CPU and kept.

A flag list would say "bf16 only where the CPU computes it natively (avx512_bf16, AMX)". But decoding one row is
bound by the bytes of weights read, so bf16's half-size weights can win on a CPU that only converts bf16 to fp32
(AVX2: 70 ms a step against 127 ms in fp32 for the default model, on one such AMD EPYC), while 32 rows are bound by
arithmetic, where converting costs. So `--dtype auto` on CPU times both dtypes on a decode-shaped workload (eight
2048x2048 layers, 128 MiB of fp32 weights: more than a CPU's caches, as a model's are) at 1 row and at 32 rows, and
takes bf16 when the geometric mean of its two times beats fp32's by MARGIN (bf16 rounds more, so it must pay). The
timings are kept per CPU model, feature set and torch version (one file in the cache folder; the choice is made
from them anew at each start); a file lock makes servers that start together measure once.

Where oneDNN computes bf16 (AVX-512), it is the backend for bf16 matmuls, and it wins from two rows up (at 32 rows
of the default model, 94 ms a step against 288 through torch's own kernels); but at one row torch's own kernel
reads the weights faster (19 ms a step against 37). The probe times that too, and where it pays, forwards of one
token (one stream decoding alone) run with oneDNN switched off (`onednn_min_tokens`).

It also times the same layers as 4-bit weights through PyTorch's packed int4 kernel (quant.py) at 1, 8, 32 and 128
rows, against bf16 at its best. Where they win over one and eight rows (the geometric mean of the two times) by
MARGIN, a GGUF file whose weights are 4-bit runs on them (`--quantization auto`), keeping the file's own values;
where bf16 wins by MARGIN from 8, 32 or 128 rows up (oneDNN's kernels compute faster than the packed kernel unpacks:
prompt chunks, many streams), the layers keep bf16 weights beside the 4-bit ones for forwards of that many rows
(`int4_dense_from`). Where fp32 is the dtype, the packed kernel is held against fp32's times at 1 and 32 rows
instead, with no bf16 copies beside it. One row alone does not decide: with bf16 converted to fp32 (AVX2), the
probe found the packed kernel a little slower at one row and 2.6x faster at 8, and the server on 4-bit weights was
faster at 1, 8 and 32 clients alike.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# /proc/cpuinfo flag -> the name the log gives it
FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "avx512_vnni": "AVX512-VNNI",
            "avx_vnni": "AVX-VNNI", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}
MARGIN = 0.9  # bf16 is taken when its time is under 90% of fp32's (and torch's kernels at one row under 90% of oneDNN's)
PLAIN = "bfloat16 without oneDNN"
PROBE = 7  # the probe's version: kept results of another are measured again
WIDTH, LAYERS, ROWS = 2048, 8, (1, 32)
INT4_ROWS = (1, 8, 32, 128)  # 128: a prompt chunk's forward
BF16_MORE = "bfloat16 at 8 and 128 rows"


@dataclass(frozen=True)
class Cpu:
    model: str
    features: tuple[str, ...]  # FEATURES' names of the flags this CPU has

    @property
    def key(self) -> str:
        return f"{self.model} | {','.join(self.features)} | torch {torch.__version__} | probe {PROBE}"


def read_cpu(cpuinfo: str | None = None) -> Cpu:
    """The CPU's model name and features, from /proc/cpuinfo's text (this machine's where not given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() not in fields:
            fields[name.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return Cpu(fields.get("model name") or platform.processor() or platform.machine(),
               tuple(label for flag, label in FEATURES.items() if flag in flags))


@dataclass(frozen=True)
class Choice:
    dtype: str  # "bfloat16" or "float32"
    ms: dict[str, list[float]]  # per dtype: the workload's time at 1 row and at 32 rows (bf16 without oneDNN: 1 row)
    why: str
    onednn_min_tokens: int = 0  # forwards of fewer tokens run with oneDNN off (0: never off)
    int4: bool = False  # 4-bit weights through the packed int4 kernel beat bf16 over 1 and 8 rows (quant.py)
    int4_dense_from: int = 0  # forwards of this many rows or more are faster on bf16 weights (0: never)


def native_bf16() -> bool:
    """Whether oneDNN computes bf16 on this CPU (AVX-512 BW and newer); elsewhere torch converts it to fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose(ms: dict[str, list[float]]) -> Choice:
    """bf16 where the geometric mean of its times (1 row, 32 rows) is under MARGIN times fp32's."""
    mean = {d: math.sqrt(ms[d][0] * ms[d][1]) for d in ("float32", "bfloat16")}
    ratio = mean["bfloat16"] / mean["float32"]
    faster = ratio < MARGIN
    why = (f"bf16 takes {ratio:.2f}x fp32's time (1 row: {ms['bfloat16'][0]:.1f} against {ms['float32'][0]:.1f} ms; "
           f"32 rows: {ms['bfloat16'][1]:.1f} against {ms['float32'][1]:.1f} ms): "
           + ("bf16" if faster else f"fp32 (bf16 must be under {MARGIN}x)"))
    dtype = "bfloat16" if faster else "float32"
    plain = ms.get(PLAIN)
    onednn_off = faster and plain is not None and plain[0] < MARGIN * ms["bfloat16"][0]
    if onednn_off:
        why += f"; one-token forwards without oneDNN ({plain[0]:.1f} against {ms['bfloat16'][0]:.1f} ms)"
    int4, takes_int4, dense_from = ms.get("int4"), False, 0
    if int4 is not None and dtype == "bfloat16":
        more = ms.get(BF16_MORE, [math.inf, math.inf])
        bf16 = [min(ms["bfloat16"][0], plain[0]) if onednn_off else ms["bfloat16"][0], more[0], ms["bfloat16"][1],
                more[1]]
        # taken where it wins over one and eight rows (a decode step's range: the geometric mean, by the margin);
        # bf16 weights beside it from where bf16 wins by the margin past one row
        takes_int4 = math.sqrt(int4[0] * int4[1]) < MARGIN * math.sqrt(bf16[0] * bf16[1])
        loses = [i for i, (t, b) in enumerate(zip(int4, bf16, strict=True)) if i and b < MARGIN * t]
        # between the last row count where 4-bit held and the first where bf16 won: halfway, on a log scale
        dense_from = round(math.sqrt(INT4_ROWS[loses[0] - 1] * INT4_ROWS[loses[0]])) if takes_int4 and loses else 0
        against = f"bf16's {'/'.join(f'{t:.1f}' for t in bf16)}"
    elif int4 is not None:  # fp32 chosen: the packed kernel (bf16 activations) against fp32 at 1 and 32 rows
        fp32 = ms["float32"]
        takes_int4 = math.sqrt(int4[0] * int4[2]) < MARGIN * math.sqrt(fp32[0] * fp32[1])
        against = f"fp32's {fp32[0]:.1f} at 1 row and {fp32[1]:.1f} at 32"
    if int4 is not None:
        why += (f"; 4-bit weights (packed int4 kernel) at 1/8/32/128 rows: {'/'.join(f'{t:.1f}' for t in int4)} ms "
                f"against {against}: "
                + ("not faster, not used unless asked for" if not takes_int4 else
                   "used for 4-bit GGUF files" + (f", with bf16 weights beside them from {dense_from} rows"
                                                  if dense_from else "")))
    return Choice(dtype, ms, why, onednn_min_tokens=2 if onednn_off else 0, int4=takes_int4,
                  int4_dense_from=dense_from)


def measure(repeats: int = 5) -> dict[str, list[float]]:
    """Fastest ms of one pass through the LAYERS layers, per dtype, at each of ROWS rows; bf16 also at 8 and 128
    rows, and where oneDNN computes bf16, at one row with oneDNN off; where PyTorch has the packed int4 kernel, the
    layers as 4-bit weights at each of INT4_ROWS rows."""
    gen = torch.Generator().manual_seed(0)

    def timed(weights: list, rows: int) -> float:
        """`weights`: tensors, or layers (4-bit ones) to call."""
        dtype = weights[0].dtype if isinstance(weights[0], torch.Tensor) else torch.bfloat16
        x = torch.randn(rows, WIDTH, generator=gen).to(dtype)
        runs = []
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first warms the kernels and the caches
                start = time.perf_counter()
                for w in weights:
                    torch.nn.functional.linear(x, w) if isinstance(w, torch.Tensor) else w(x)
                runs.append(time.perf_counter() - start)
        return round(1000 * min(runs[1:]), 2)  # the least disturbed: servers may be loading beside the probe

    out: dict[str, list[float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(WIDTH, WIDTH, generator=gen).to(dtype) for _ in range(LAYERS)]
        out[str(dtype).removeprefix("torch.")] = [timed(weights, rows) for rows in ROWS]
        if dtype == torch.bfloat16:
            out[BF16_MORE] = [timed(weights, 8), timed(weights, 128)]
            if native_bf16():
                with onednn(False):
                    out[PLAIN] = [timed(weights, 1)]
    if hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        from .quant import Int4Linear

        layers = []
        for _ in range(LAYERS):
            linear = torch.nn.Linear(WIDTH, WIDTH, bias=False, dtype=torch.bfloat16)
            torch.nn.init.normal_(linear.weight, generator=gen)
            layers.append(Int4Linear(linear))
        with onednn(False):  # as a one-token forward runs it where oneDNN is switched off for those
            one = timed(layers, 1)
        out["int4"] = [one] + [timed(layers, rows) for rows in INT4_ROWS[1:]]
    return out


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """oneDNN on or off for the matmuls run inside (a process-wide switch: forwards run on one thread)."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def cpu_dtype(cache: Path, cpu: Cpu | None = None, measure=measure) -> Choice:
    """How a bf16-capable checkpoint runs on this CPU: kept in `cache`, else measured and kept (where the cache
    folder cannot be written, measured at every start)."""
    cpu = cpu or read_cpu()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock, unwritable = open(cache.with_suffix(".lock"), "w"), None  # noqa: SIM115 - closed by the with
    except OSError as e:  # a read-only cache folder
        lock, unwritable = None, e
    with lock or nullcontext():
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # servers starting together: one measures, the others read
        try:
            kept = json.loads(cache.read_text())
        except (OSError, ValueError):
            kept = {}
        if cpu.key in kept:
            choice, source = choose(kept[cpu.key]["ms"]), f"timings kept in {cache}"  # decided anew
        else:
            started = time.perf_counter()
            choice = choose(measure())
            source = f"measured in {time.perf_counter() - started:.1f} s"
            if unwritable is None:
                kept[cpu.key] = asdict(choice)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                try:
                    tmp.write_text(json.dumps(kept, indent=1) + "\n")
                    tmp.replace(cache)
                except OSError as e:
                    unwritable = e
            if unwritable is not None:
                source += f", not kept: {unwritable}"
    log.info("CPU: %s; %s; fp32 matmuls through %s, bf16 through %s; dtype auto: %s (%s)", cpu.model,
             ", ".join(cpu.features) or "none of AVX2, AVX-512, bf16, VNNI or AMX",
             "MKL" if torch.backends.mkl.is_available() else "torch's BLAS",
             "oneDNN" if native_bf16() else "torch's own kernels (converted to fp32)", choice.why, source)
    return choice
