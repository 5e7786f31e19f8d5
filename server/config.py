"""Settings: every flag of `python -m server` is also an environment variable (POLYGLOT_<FLAG>).

Read in exactly one place (`parse_settings`); the rest of the code gets the frozen result.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from .families import FAMILY_CHOICES

ENV_PREFIX = "POLYGLOT_"


@dataclass(frozen=True)
class Settings:
    model: str | None = None
    served_model_name: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_batch_size: int = 64
    max_batch_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    max_waiting: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout: int = 600
    shutdown_timeout: int = 30
    header_timeout: int = 10
    body_timeout: int = 30
    write_timeout: int = 30
    keep_alive_timeout: int = 5
    max_connections: int = 1000
    kv_cache_memory: str | None = None
    prefill_chunk: int = 64
    fuse_prefill: bool = True
    native_decode: bool = True
    prefix_cache: bool = True
    prefix_cache_memory: str | None = None
    prompt_lookup: int = 0
    log_level: str = "info"
    log_format: str = "text"
    log_prompts: bool = False
    model_family: str = "auto"
    chat_template: str | None = None
    generation_config: str = "auto"
    trust_remote_code: bool = False
    device_map: str | None = None
    max_memory: str | None = None
    quantization: str = "auto"
    api_key: str | None = None
    cors_origins: str | None = None
    playground: bool = True
    docs: bool = False
    responses_store_size: int = 1000


HELP = {
    "model": "local Hugging Face model directory, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)",
    "served_model_name": "model id that clients use and /v1/models lists (default: derived from --model)",
    "host": "address to listen on",
    "port": "port to listen on",
    "dtype": "weights and activations dtype: auto (bf16/fp16 on GPU, fp32 on CPU), float32, bfloat16, float16",
    "device": "auto, cpu, cuda or cuda:N",
    "max_model_len": "maximum context (prompt + completion) in tokens (default: the model's)",
    "max_batch_size": "maximum rows in the running batch (a request with n choices takes n rows)",
    "max_batch_tokens": "KV-cache budget in tokens: rows x longest reserved row (prompt + max_tokens) must fit "
    "(default: on one GPU, what its memory holds; elsewhere 131072)",
    "gpu_memory_utilization": "on a GPU, the fraction of its memory this server may use: weights, the largest "
    "step's activations and the KV cache, which gets what the other two leave",
    "max_waiting": "maximum queued requests; past it new requests get 503",
    "max_body_bytes": "largest request body accepted, in bytes; larger ones get 413",
    "request_timeout": "seconds a generation request may run before it is ended with an error (504, or an error "
    "event in a stream); 0: no limit",
    "shutdown_timeout": "on SIGTERM, seconds that requests in flight (streams too) may run on before they are ended "
    "with an error; readiness turns 503 and new requests get 503 at once (a second SIGTERM exits at once)",
    "header_timeout": "seconds a client has to send a request's line and headers (from the connection opening, or "
    "the previous response); past it, 408 and the connection closes",
    "body_timeout": "seconds a client has to send a request's body; past it, 408 and the connection closes",
    "write_timeout": "seconds a client may leave a response unread (a stream it stopped reading) before its "
    "connection is dropped and its request ended",
    "keep_alive_timeout": "seconds an idle keep-alive connection stays open",
    "max_connections": "open connections at most; past it a new one gets 503 and is closed",
    "kv_cache_memory": "KV-cache budget in bytes (e.g. 4GiB, 512MiB); lowers --max-batch-tokens to what fits",
    "prefill_chunk": "prompt tokens fed per engine step while other requests stream (long prompts join over "
    "several steps instead of stalling the streams)",
    "log_level": "debug, info, warning or error",
    "log_format": "text, or json: one JSON object per line (time, level, logger, request_id, message; per request: "
    "method, path, status, prompt_tokens, completion_tokens, latency_ms)",
    "log_prompts": "add each request's prompt text (after the chat template) to its log line; off by default, so "
    "prompts stay out of the logs",
    "model_family": "prompt format and end token: auto (detect from the model), polylm, polylm-multialpaca, "
    "polylm-chat, bloomz, hf (the model's own chat template)",
    "chat_template": "a Jinja chat template file that replaces the family's or the model's template",
    "generation_config": "auto: the model's generation_config.json supplies defaults for fields a request leaves "
    "unset (e.g. num_beams=4); none: OpenAI's defaults",
    "fuse_prefill": "run the running rows' decode and the prompt chunks in one forward, for models that pass a "
    "start-up check (Llama, GPT-2 and other models on transformers' attention interface); --no-fuse-prefill runs "
    "two forwards a step",
    "native_decode": "on CPU, decode Llama-shaped models (Llama, Mistral, Qwen2: the default model) through a step "
    "written out on their weights, for models whose logits match transformers' forward at start-up "
    "(server/engine/llama.py); --no-native-decode decodes through transformers' forward",
    "prefix_cache": "keep prompts' keys and values by blocks of 16 tokens and reuse them for later prompts that "
    "start the same way (a shared system prompt, a chat's earlier turns); --no-prefix-cache turns it off",
    "prefix_cache_memory": "bytes the prefix cache may hold, least recently used blocks evicted (e.g. 2GiB; "
    "default: 1/8 of the KV-cache budget, on CPU at most 1GiB)",
    "prompt_lookup": "speculative decoding by prompt lookup: up to N draft tokens a step, copied from what followed the "
    "answer's last tokens earlier in the prompt or answer and checked in one forward (pays where answers repeat "
    "their prompt: translation, summaries, code edits); requests may set their own 'prompt_lookup'; 0: off",
    "trust_remote_code": "allow models that ship their own Python code (such as PolyLM base checkpoints) to run it",
    "device_map": "spread the layers over devices with accelerate: auto, balanced, sequential (GPUs, then CPU)",
    "max_memory": "with --device-map, the memory per device, e.g. '0=20GiB,1=20GiB,cpu=64GiB'",
    "quantization": "load the weights in 8bit or 4bit with bitsandbytes (CUDA only); int4: 4-bit weights in groups of "
    "32 through PyTorch's packed int4 kernel for CPUs (a Q4_1 GGUF keeps its own 4-bit values); none: as loaded; "
    "auto: int4 for a 4-bit GGUF file on a CPU where that kernel measured faster, else none",
    "api_key": "require 'Authorization: Bearer <key>' on /v1/*; several keys separated by commas (health, readiness "
    "and metrics stay open)",
    "playground": "serve the web playground at / (a chat and completion page over this server's API); "
    "--no-playground turns it off",
    "docs": "serve FastAPI's /docs and /redoc pages (they load their scripts from a CDN); /openapi.json is always "
    "served",
    "responses_store_size": "responses kept for previous_response_id and GET /v1/responses/{id} (store: true, the "
    "API's default), least recently used evicted; in this process's memory only: gone on restart, not shared between "
    "replicas; 0 keeps none",
    "cors_origins": "origins allowed to call the API from a browser, separated by commas, or '*' (default: no CORS)",
}
CHOICES = {
    "dtype": ["auto", "float32", "bfloat16", "float16"],
    "log_level": ["debug", "info", "warning", "error"],
    "log_format": ["text", "json"],
    "model_family": FAMILY_CHOICES,
    "generation_config": ["auto", "none"],
    "device_map": ["auto", "balanced", "sequential"],
    "quantization": ["auto", "none", "8bit", "4bit", "int4"],
    "prompt_lookup": range(0, 17),
}


def _type(default: object):
    if isinstance(default, float):
        return float
    return int if isinstance(default, int) and not isinstance(default, bool) else str


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Flags win over environment variables, which win over the defaults."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog="python -m server", description="OpenAI-compatible LLM server")
    for f in fields(Settings):
        name = f.name.replace("_", "-")
        var = ENV_PREFIX + f.name.upper()
        if isinstance(f.default, bool):
            default = env[var].lower() in ("1", "true", "yes", "on") if var in env else f.default
            parser.add_argument(
                f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=f"{HELP[f.name]} [env {var}]"
            )
            continue
        kind = int if f.name in ("port", "max_model_len", "max_batch_tokens") else _type(f.default)
        default = kind(env[var]) if var in env else f.default
        parser.add_argument(
            f"--{name}", type=kind, default=default, choices=CHOICES.get(f.name), help=f"{HELP[f.name]} [env {var}]"
        )
    return Settings(**vars(parser.parse_args(argv)))


def model_path_problem(model: str | None) -> str | None:
    """What is wrong with a local --model path, or None: checked before torch and transformers load (seconds),
    so that a mistyped path fails at once."""
    if model is None:
        return None
    if model.endswith(".gguf"):
        return None if Path(model).is_file() else f"GGUF file not found: {model}"
    if not Path(model).is_dir() and (Path(model).exists() or model.startswith((".", "/"))):
        return f"--model {model!r} is neither a model directory nor a .gguf file"
    return None
