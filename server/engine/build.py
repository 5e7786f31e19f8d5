"""Build an engine from the settings: load the model, size the KV cache, describe what is served."""

from __future__ import annotations

import logging
import threading

from ..config import Settings
from .client import EngineConfig, ModelInfo
from .engine import Engine
from .loader import Loaded, ModelLoadError, kv_bytes_per_token, load, parse_bytes
from .memory import cuda_devices, size_from_device, token_budget
from .runner import ModelRunner

log = logging.getLogger(__name__)
DEFAULT_BATCH_TOKENS = 131072  # the KV budget where it is not measured on the device (CPU, --device-map)
PREFIX_SHARE = 8  # by default the prefix cache takes 1/8 of the KV budget's bytes...
PREFIX_CPU_CAP = 2**30  # ...and on CPU, where the budget is a flag rather than measured memory, at most 1 GiB


def off_main_thread(work):
    """Run `work()` on a thread of its own, which ends with it, and return its result (or raise its error).

    Loading runs tensor operations on all cores (OpenMP). On the main thread they leave its team of OpenMP threads
    alive for the life of the process, beside the engine thread's own team; with more OpenMP threads than cores,
    libgomp stops spinning between parallel regions, and every region of the engine's forwards then waits for its
    threads to wake. The 4-bit kernel opens hundreds of regions a step: a decode step of the default model took 41
    ms against 18 (2-core AMD EPYC). A loading thread's team ends with the thread."""
    result: list = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as e:  # raised again on the caller's thread
            errors.append(e)

    thread = threading.Thread(target=run, name="load")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def build_engine(settings: Settings) -> tuple[Engine, ModelInfo]:
    """Load the model named by the settings and build an engine for it (not started)."""
    loaded = off_main_thread(lambda: load(settings))
    model_len = getattr(loaded.model.config, "max_position_embeddings", None) or settings.max_model_len or 2048
    max_model_len = settings.max_model_len or model_len
    if max_model_len > model_len:
        raise ModelLoadError(f"--max-model-len {max_model_len} is longer than the model's context ({model_len})")
    max_batch_tokens, prefix_bytes = kv_budget(settings, loaded, max_model_len)
    config = EngineConfig(
        max_model_len=max_model_len,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_waiting=settings.max_waiting,
        prefill_chunk=settings.prefill_chunk,
        fuse_prefill=settings.fuse_prefill,
        native_decode=settings.native_decode,
        prefix_cache_bytes=prefix_bytes,
        onednn_min_tokens=loaded.onednn_min_tokens,
        prompt_lookup=settings.prompt_lookup,
        eos_token_ids=loaded.family.eos_token_ids,
    )
    info = ModelInfo(
        name=settings.served_model_name or loaded.name,
        family=loaded.family,
        max_model_len=max_model_len,
        dtype=str(loaded.dtype).removeprefix("torch."),
        checkpoint_dtype=loaded.checkpoint_dtype,
        generation_defaults=loaded.generation_defaults,
    )
    return Engine(loaded.model, loaded.tokenizer, loaded.device, config), info


def prefix_cache_bytes(settings: Settings, kv_bytes: int, measured: bool) -> int:
    """The prefix cache's pool: --prefix-cache-memory, or a share of the KV budget's bytes; 0 with --no-prefix-cache."""
    if not settings.prefix_cache:
        return 0
    if settings.prefix_cache_memory:
        return parse_bytes(settings.prefix_cache_memory)
    return kv_bytes // PREFIX_SHARE if measured else min(kv_bytes // PREFIX_SHARE, PREFIX_CPU_CAP)


def kv_budget(settings: Settings, loaded: Loaded, max_model_len: int) -> tuple[int, int]:
    """The KV-cache budget in tokens (rows x longest reserved row), and the prefix cache's bytes. On one CUDA
    device: what its memory holds after the weights and a dry step at the largest batch, under
    --gpu-memory-utilization (memory.py), the prefix cache's share taken out first. Elsewhere (CPU, --device-map):
    --max-batch-tokens (131072 by default). --kv-cache-memory lowers either."""
    per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
    cap = parse_bytes(settings.kv_cache_memory) if settings.kv_cache_memory else None
    devices = cuda_devices(loaded.model)
    if not 0 < settings.gpu_memory_utilization <= 1:
        raise ModelLoadError(f"--gpu-memory-utilization must be in (0, 1], not {settings.gpu_memory_utilization}")
    if len(devices) == 1:
        runner = ModelRunner(loaded.model, loaded.device, len(loaded.tokenizer), settings.max_batch_size, max_model_len)
        b = size_from_device(runner, devices[0], settings.gpu_memory_utilization, per_token, settings.max_batch_size,
                             max_model_len, settings.prefill_chunk)
        kv_bytes = b.kv_bytes if cap is None else min(b.kv_bytes, cap)
        prefix = min(prefix_cache_bytes(settings, kv_bytes, measured=True), kv_bytes)
        kv_bytes -= prefix
        tokens = token_budget(kv_bytes // per_token, settings.max_batch_size, max_model_len)
        gib = 2**30
        if tokens == 0:
            raise ModelLoadError(
                f"{devices[0]} has {kv_bytes / gib:.2f} GiB left for the KV cache (of {b.total / gib:.1f} GiB x "
                f"--gpu-memory-utilization {settings.gpu_memory_utilization}: weights and the largest step take "
                f"{b.peak / gib:.2f} GiB, other users {b.other / gib:.2f} GiB), less than one full-length row of "
                f"{max_model_len} tokens with its spare; lower --max-model-len or --max-batch-size, or raise "
                "--gpu-memory-utilization")
        if settings.max_batch_tokens:
            tokens = min(tokens, settings.max_batch_tokens)
        log.info("KV cache on %s: %.2f GiB (%.1f GiB x %g, less %.2f GiB for weights and the largest step, %.2f GiB "
                 "used outside this process, %.2f GiB for the prefix cache) = a budget of %d tokens of %d bytes, "
                 "spare rows and columns included", devices[0], kv_bytes / gib, b.total / gib,
                 settings.gpu_memory_utilization, b.peak / gib, b.other / gib, prefix / gib, tokens, per_token)
        return max(tokens, max_model_len), prefix
    tokens = settings.max_batch_tokens or DEFAULT_BATCH_TOKENS
    if cap is not None:
        tokens = min(tokens, cap // per_token)
        if tokens < max_model_len:
            raise ModelLoadError(
                f"--kv-cache-memory {settings.kv_cache_memory} holds {tokens} tokens ({per_token} bytes each), "
                f"fewer than one full-length request ({max_model_len}); raise it or lower --max-model-len"
            )
        log.info("KV cache budget: %s = %d tokens of %d bytes", settings.kv_cache_memory, tokens, per_token)
    tokens = max(tokens, max_model_len)
    return tokens, prefix_cache_bytes(settings, tokens * per_token, measured=False)
