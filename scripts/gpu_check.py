#!/usr/bin/env python
"""Check and time the GPU path in one run: at most 8 minutes on an H100/H200, every section with its own time
budget and its own error catch, the results written as they come.

    python scripts/gpu_check.py                          # on the GPU (cuda:0): every section
    python scripts/gpu_check.py --only A,B               # some sections
    python scripts/gpu_check.py --device cpu --tiny      # every section on 2-layer models, in seconds

Sections:
- A. environment and ceilings: versions, kernel probes, the device's copy bandwidth (read + written) and its bf16
  matmul rate. Every "fraction of roofline" below is against this measured bandwidth.
- B. correctness on the device, tiny GPT-2 and BLOOM in fp32: the engine's greedy output equals `generate`'s for
  prompts of three lengths together; a 4-beam request equals `generate(num_beams=4, early_stopping=True)`; n=3
  seeded sampling gives the same text twice; a request that ends mid-batch leaves the others as they were alone;
  no NaN in the KV cache after a padded prefill through two forwards; the fused-step check's verdict.
- C, D. PolyLM-1.7B and PolyLM-13B shapes (GPT-2, gelu_fast, 256,000-token vocabulary, random bf16 weights built on
  the device): a bare KV-cached eager loop at batch 1, this engine at 1 and 64 rows (driven step by step, no
  HTTP), sequential and static-batch `generate`, peak device memory and the KV buffers' shapes.
Printed last: one table (ms/step, tokens/s, fraction of the measured bandwidth roofline, peak memory) and two goal
lines, "batch-1 fraction of roofline" and "64 rows vs sequential generate". Files: OUT/gpu_check.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VOCAB = 256_000
SHAPES = {  # PolyLM's published shapes (GPT-2, gelu_fast): hidden, layers, heads
    "polylm-1.7b": {"n_embd": 2048, "n_layer": 24, "n_head": 16},
    "polylm-13b": {"n_embd": 5120, "n_layer": 40, "n_head": 40},
}
TINY_SHAPES = {"polylm-1.7b": {"n_embd": 64, "n_layer": 2, "n_head": 4},  # and a 32,000-id vocabulary
               "polylm-13b": {"n_embd": 128, "n_layer": 2, "n_head": 8}}
DATASHEET_GB_S = {"H200": 4800, "H100": 3350}  # HBM bandwidth of the SXM parts


# -- measuring ------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Elapsed milliseconds of the block: CUDA events on a GPU (what the device did between them), the wall clock
    elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.ms = device, 0.0

    def __enter__(self) -> Timer:
        if self.device.type == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1000


def copy_bandwidth_gb_s(device: torch.device, nbytes: int, repeats: int) -> float:
    """Best device-to-device copy of `nbytes`: every byte read once and written once."""
    a = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        with Timer(device) as t:
            b.copy_(a)
        best = min(best, t.ms)
    del a, b
    return round(2 * nbytes / (best / 1000) / 1e9, 1)


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    with Timer(device) as t:
        for _ in range(repeats):
            a @ b
    return round(2 * n**3 * repeats / (t.ms / 1000) / 1e12, 2)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# -- models ---------------------------------------------------------------------------------------------------
class StubTokenizer:
    """What the engine asks of a tokenizer, for random-weight models: a length, an end token, and a decode that
    gives every id one character."""

    eos_token_id, pad_token_id = 2, 0

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def decode(self, ids, **_) -> str:
        return "".join(chr(0x4E00 + i % 20000) for i in ids)


def random_gpt2(device: torch.device, dtype: torch.dtype, vocab: int, n_embd: int, n_layer: int, n_head: int,
                seed: int = 0):
    """A GPT-2 (PolyLM's network) with random weights, built on the device in `dtype`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=2048,
                     activation_function="gelu_fast", tie_word_embeddings=True, eos_token_id=2, bos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPT2LMHeadModel(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    return model


def random_bloom(device: torch.device, vocab: int = 1000, seed: int = 0):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=2, n_head=4, eos_token_id=2, bos_token_id=1,
                      pad_token_id=3)
    with torch.device(device):
        return BloomForCausalLM(cfg).eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- driving the engine ---------------------------------------------------------------------------------------
def make_engine(model, vocab: int, device: torch.device, rows: int):
    """An engine for `model` (one per model: the fused-step check switches the model's attention once), not
    started: run_engine drives it."""
    from server.engine.engine import Engine, EngineConfig

    config = EngineConfig(max_model_len=2048, max_batch_size=rows, max_batch_tokens=2048 * rows)
    engine = Engine(model, StubTokenizer(vocab), device, config)
    engine.runner.enable_fused()
    return engine


KV_SEEN: dict[str, Any] = {}  # the largest KV buffers run_engine saw: bytes, and one layer's shape


def run_engine(engine, prompts: list[list[int]], params: list) -> tuple[list[dict[int, list[int]]], int, float]:
    """Every prompt through the engine, step by step on this thread: each request's tokens per choice, the steps
    taken and the seconds."""
    from server.engine.request import Request

    results: list[dict[int, list[int]]] = [{} for _ in prompts]
    errors: list[str] = []

    def collector(k: int):
        def emit(out) -> None:
            if out.error:
                errors.append(out.error)
            for o in out.outputs:
                results[k].setdefault(o.index, []).extend(o.token_ids)
        return emit

    for k, (ids, p) in enumerate(zip(prompts, params, strict=True)):
        r = Request(f"r{k}", list(ids), p, collector(k))
        engine._requests[r.request_id] = r
        engine.scheduler.add(r)
    steps = 0
    sync(engine.runner.device)
    start = time.perf_counter()
    while engine.scheduler.has_work():
        engine.step()
        steps += 1
        allocated = engine.cache_usage()[2]
        if engine.batch is not None and allocated > KV_SEEN.get("bytes", 0):
            layers = engine.batch.cache.live_layers()
            KV_SEEN.update(bytes=allocated, shape=list(layers[0].kbuf.shape), layers=len(layers))
    sync(engine.runner.device)
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"the engine failed a request: {errors[0]}")
    return results, steps, seconds


def greedy(max_tokens: int, **kw):
    from server.engine.params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=kw.pop("ignore_eos", True), **kw)


def hf_generate(model, ids: list[int], new: int, device: torch.device, **kw) -> list[list[int]]:
    out = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                         device=device), max_new_tokens=new, do_sample=False, **kw)
    return out[:, len(ids):].tolist()


def prompt_ids(n: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


# -- sections -------------------------------------------------------------------------------------------------
class Section:
    def __init__(self, name: str, budget: float) -> None:
        self.name, self.budget, self.start = name, budget, time.monotonic()
        self.results: dict[str, Any] = {}
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def has_time(self, what: str) -> bool:
        if self.left() > 0:
            return True
        self.skipped.append(what)
        return False


def section_a(s: Section, device: torch.device, tiny: bool) -> None:
    import transformers

    s.results["python"] = platform.python_version()
    s.results["torch"] = torch.__version__
    s.results["transformers"] = transformers.__version__
    s.results["triton"] = importlib.util.find_spec("triton") is not None
    s.results["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if device.type == "cuda":
        try:
            s.results["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                                     timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            s.results["nvidia_smi"] = f"unavailable: {e}"
        s.results["memory_gib"] = round(torch.cuda.mem_get_info(device)[1] / 2**30, 1)
        s.results["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    s.results["varlen_attn"] = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    try:
        s.results["flash_block_table"] = "block_table" in str(torch.ops.aten._flash_attention_forward.default._schema)
    except (AttributeError, RuntimeError):
        s.results["flash_block_table"] = False
    nbytes = (16 if tiny else 4096) * 2**20
    s.results["copy_gb_s"] = copy_bandwidth_gb_s(device, nbytes, 5 if tiny else 20)
    if s.has_time("matmul"):
        n, dtype = (256, torch.float32) if tiny else (8192, torch.bfloat16)
        s.results["matmul_tflops"] = matmul_tflops(device, n, dtype)
        s.results["matmul"] = f"{n}^3 {str(dtype).removeprefix('torch.')}"
    name = s.results["device"]
    s.results["datasheet_gb_s"] = next((v for k, v in DATASHEET_GB_S.items() if k in name), None)


def section_b(s: Section, device: torch.device, tiny: bool) -> None:
    from server.engine.params import SamplingParams

    checks = s.results
    vocab = 1000
    gpt2 = random_gpt2(device, torch.float32, vocab, 64, 2, 4)
    bloom = random_bloom(device, vocab)

    def check(name: str, fn) -> None:
        if not s.has_time(name):
            return
        try:
            ok, detail = fn()
            checks[name] = {"ok": bool(ok), "detail": detail}
        except Exception as e:  # recorded; the other checks still run
            checks[name] = {"ok": False, "detail": f"{type(e).__name__}: {e}"}

    prompts = prompt_ids(3, 30, vocab)
    prompts = [prompts[0][:5], prompts[1][:17], prompts[2]]

    engines = {id(gpt2): make_engine(gpt2, vocab, device, 8), id(bloom): make_engine(bloom, vocab, device, 8)}
    engine = engines[id(gpt2)]

    def greedy_equals_generate(model):
        def run():
            engine = engines[id(model)]
            got, _, _ = run_engine(engine, prompts, [greedy(12) for _ in prompts])
            want = [hf_generate(model, ids, 12, device, eos_token_id=None)[0] for ids in prompts]
            same = [g[0] == w for g, w in zip(got, want, strict=True)]
            return all(same), f"equal for {sum(same)} of {len(same)} prompts (fused: {engine.runner.fused})"
        return run

    check("greedy_equals_generate_gpt2", greedy_equals_generate(gpt2))
    check("greedy_equals_generate_bloom", greedy_equals_generate(bloom))

    def beams():
        params = SamplingParams(max_tokens=12, temperature=0.0, num_beams=4, early_stopping=True)
        got, _, _ = run_engine(engine, [prompts[1]], [params])
        want = hf_generate(gpt2, prompts[1], 12, device, num_beams=4, early_stopping=True, eos_token_id=2)[0]
        want = want[: want.index(2) + 1] if 2 in want else want
        return got[0][0] == want, f"engine {got[0][0][:6]}..., generate {want[:6]}..."

    check("beam4_equals_generate", beams)

    def seeded():
        p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=7)
        first, _, _ = run_engine(engine, [prompts[0]], [p])
        second, _, _ = run_engine(engine, [prompts[0]], [p])
        return first == second and len(first[0]) == 3, "three choices, the same twice"

    check("n3_seeded_twice_equal", seeded)

    def row_leaves():
        together, _, _ = run_engine(engine, prompts, [greedy(4), greedy(12), greedy(12)])
        alone = [run_engine(engine, [ids], [greedy(n)])[0][0] for ids, n in zip(prompts, (4, 12, 12), strict=True)]
        return together == alone, "a 4-token request left a batch of three; the others as alone"

    check("row_leaving_mid_batch", row_leaves)

    def no_nan_after_padded_prefill():
        from server.engine.runner import bare_requests

        # prefill() is the two-forward path, as with --no-fuse-prefill or echo
        batch, logits = engine.runner.prefill(bare_requests((prompts[0][:3], prompts[2][:20]), greedy(1)))
        bad = [i for i, layer in enumerate(batch.cache.live_layers())
               if torch.isnan(layer.kbuf).any() or torch.isnan(layer.vbuf).any()]
        return not bad and not torch.isnan(logits).any(), f"layers with NaN in the cache: {bad}"

    check("no_nan_in_cache_after_padded_prefill", no_nan_after_padded_prefill)

    def fused_check():
        verdicts = {type(m).__name__: e.runner.fused for m, e in ((gpt2, engines[id(gpt2)]), (bloom, engines[id(bloom)]))}
        return verdicts["GPT2LMHeadModel"], f"one forward a step: {verdicts} (BLOOM's attention is its own: two)"

    check("fused_step_check", fused_check)


def shape_section(s: Section, device: torch.device, tiny: bool, shape: str, bandwidth: float | None,
                  big: bool) -> None:
    dims = (TINY_SHAPES if tiny else SHAPES)[shape]
    dtype = torch.float32 if tiny and device.type == "cpu" else torch.bfloat16
    vocab = 32_000 if tiny else VOCAB
    rows = 8 if tiny else 64
    prompt_len, new = (16, 8) if tiny else (128, 64 if big else 128)
    steps = 8 if tiny else (32 if big else 64)
    r = s.results
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with Timer(device) as t:
        model = random_gpt2(device, dtype, vocab, **dims)
    r["build_s"] = round(t.ms / 1000, 1)
    r["dtype"] = str(dtype).removeprefix("torch.")
    r["weight_gb"] = round(weight_bytes(model) / 1e9, 2)
    roofline_ms = weight_bytes(model) / (bandwidth * 1e9) * 1000 if bandwidth else None
    r["roofline_ms"] = round(roofline_ms, 3) if roofline_ms else None
    runs: list[dict] = r.setdefault("runs", [])

    def record(path: str, batch: int, ms_step: float | None, tokens_s: float, **extra) -> None:
        row = {"model": shape, "path": path, "batch": batch, "ms_step": round(ms_step, 2) if ms_step else None,
               "tokens_s": round(tokens_s, 1), **extra}
        if roofline_ms and ms_step:
            row["roofline_fraction"] = round(roofline_ms / ms_step, 3)
        runs.append(row)
        print(json.dumps(row), flush=True)

    ids = prompt_ids(rows, prompt_len, vocab)
    if s.has_time("bare loop"):
        from transformers import DynamicCache

        with torch.inference_mode():
            cache = DynamicCache()
            x = torch.tensor([ids[0]], device=device)
            token = model(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for _ in range(steps):
                with Timer(device) as t:
                    token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(
                        -1, keepdim=True)
                times.append(t.ms)
        times.sort()
        ms = times[len(times) // 2]
        record("bare eager loop", 1, ms, 1000 / ms)
    engine = make_engine(model, vocab, device, rows)
    KV_SEEN.clear()
    for batch in (1, rows):
        if not s.has_time(f"engine at {batch}"):
            continue
        run_engine(engine, [ids[0][:8]], [greedy(2)])  # warm up
        got, n_steps, seconds = run_engine(engine, ids[:batch], [greedy(new) for _ in range(batch)])
        tokens = sum(len(t) for g in got for t in g.values())
        record("engine", batch, seconds * 1000 / n_steps, tokens / seconds, fused=engine.runner.fused)
        if batch == rows:
            r["peak_gib_after_engine"] = peak_gib(device)
            r["kv_largest"] = {"gib": round(KV_SEEN.get("bytes", 0) / 2**30, 3), "layer_buffer_shape":
                               KV_SEEN.get("shape"), "layers": KV_SEEN.get("layers")}  # slots, heads, columns, dim
            KV_SEEN.clear()
    if s.has_time("sampled engine"):
        from server.engine.params import SamplingParams

        params = [SamplingParams(max_tokens=new // 2, temperature=1.0, top_p=0.95, ignore_eos=True, seed=i)
                  for i in range(rows)]
        got, n_steps, seconds = run_engine(engine, ids, params)
        tokens = sum(len(t) for g in got for t in g.values())
        record("engine, top_p 0.95", rows, seconds * 1000 / n_steps, tokens / seconds)
    if s.has_time("sequential generate"):
        count = 1 if big else 2
        with torch.inference_mode():
            hf_generate(model, ids[0][:8], 2, device)
            sync(device)
            start = time.perf_counter()
            for k in range(count):
                hf_generate(model, ids[k], new, device, eos_token_id=None)
            sync(device)
        seconds = time.perf_counter() - start
        record("generate, sequential", 1, seconds * 1000 / (count * new), count * new / seconds)
    if not big and s.has_time("static-batch generate"):
        with torch.inference_mode():
            x = torch.tensor(ids, device=device)
            sync(device)
            start = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False, eos_token_id=None)
            sync(device)
        seconds = time.perf_counter() - start
        record("generate, static batch", rows, seconds * 1000 / new, rows * new / seconds)
    r["peak_gib"] = peak_gib(device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- output ---------------------------------------------------------------------------------------------------
def report(result: dict) -> str:
    a = result["sections"].get("A", {}).get("results", {})
    bandwidth, datasheet = a.get("copy_gb_s"), a.get("datasheet_gb_s")
    lines = [f"gpu_check on {a.get('device', '?')}: torch {a.get('torch')}, transformers {a.get('transformers')}; "
             f"copy {bandwidth} GB/s (read + written), matmul {a.get('matmul_tflops')} TFLOP/s ({a.get('matmul')})",
             "", "| model | path | rows | ms/step | tokens/s | of measured roofline | of datasheet roofline | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    runs = []
    for key in ("C", "D"):
        sec = result["sections"].get(key, {}).get("results", {})
        for row in sec.get("runs", []):
            runs.append(row)
            frac = row.get("roofline_fraction")
            sheet = frac * bandwidth / datasheet if frac and datasheet and bandwidth else None
            lines.append(f"| {row['model']} | {row['path']} | {row['batch']} | {row['ms_step']} | {row['tokens_s']} | "
                         f"{f'{frac:.0%}' if frac else ''} | {f'{sheet:.0%}' if sheet else ''} | "
                         f"{sec.get('peak_gib') or ''} |")
    b = result["sections"].get("B", {}).get("results", {})
    lines += ["", "correctness: " + ", ".join(f"{k} {'pass' if v['ok'] else 'FAIL (' + v['detail'] + ')'}"
                                               for k, v in b.items())]
    lines.append(f"probes: varlen_attn {a.get('varlen_attn')}, flash block_table {a.get('flash_block_table')}, "
                 f"triton {a.get('triton')}")
    for name, sec in result["sections"].items():
        if sec.get("error"):
            lines.append(f"section {name} failed: {sec['error']}")
        if sec.get("skipped"):
            lines.append(f"section {name} ran out of its {sec['budget_s']} s before: {', '.join(sec['skipped'])}")
    for shape in SHAPES:
        eager = next((r for r in runs if r["model"] == shape and r["path"] == "engine" and r["batch"] == 1), None)
        bare = next((r for r in runs if r["model"] == shape and r["path"] == "bare eager loop"), None)
        if eager or bare:
            lines.append(f"goal, batch-1 fraction of roofline ({shape}): engine "
                         f"{eager.get('roofline_fraction', 0) if eager else 0:.0%}, bare eager loop "
                         f"{bare.get('roofline_fraction', 0) if bare else 0:.0%}, graph not built")
        many = [r for r in runs if r["model"] == shape and r["path"] == "engine" and r["batch"] > 1]
        seq = next((r for r in runs if r["model"] == shape and r["path"] == "generate, sequential"), None)
        if many and seq:
            lines.append(f"goal, {many[0]['batch']} rows vs sequential generate ({shape}): "
                         f"{many[0]['tokens_s'] / seq['tokens_s']:.1f}x")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="2-layer models and small buffers: every section in seconds")
    ap.add_argument("--only", default="A,B,C,D", help="sections to run, e.g. A,C")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"),
                    help="folder for gpu_check.json and gpu_check.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = {"A": 20, "B": 60, "C": 150, "D": 180}
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": str(device), "tiny": args.tiny, "sections": {}}
    bandwidth = None
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        s = Section(name, budgets[name] * (0.5 if args.tiny else 1))
        print(f"== section {name} ({s.budget:g} s)", flush=True)
        try:
            if name == "A":
                section_a(s, device, args.tiny)
                bandwidth = s.results.get("copy_gb_s")
            elif name == "B":
                section_b(s, device, args.tiny)
            else:
                if bandwidth is None:
                    bandwidth = copy_bandwidth_gb_s(device, (16 if args.tiny else 4096) * 2**20, 5)
                shape_section(s, device, args.tiny, "polylm-1.7b" if name == "C" else "polylm-13b", bandwidth,
                              big=name == "D")
            error = None
        except Exception as e:  # recorded; the next section still runs
            error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["sections"][name] = {"budget_s": s.budget, "seconds": round(time.monotonic() - s.start, 1),
                                    "results": s.results, "skipped": s.skipped, "error": error}
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")  # so far
    text = report(result)
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    failed = [n for n, sec in result["sections"].items() if sec["error"]]
    failed += [k for k, v in result["sections"].get("B", {}).get("results", {}).items() if not v["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
