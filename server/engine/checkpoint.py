"""What a checkpoint folder holds, read without loading the model: the weights' dtype and tensor names, its
tokenizer files, and whether a tokenizer encodes as the folder's SentencePiece model does."""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# Any one of these makes a folder's tokenizer (transformers builds an empty GPT-2 tokenizer from a folder without).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "tekken.json")


def weight_files(folder: Path) -> list[Path]:
    """The files transformers would load, safetensors first (as it prefers them): one of each shard."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            names = json.loads((folder / index).read_text())["weight_map"].values()
            return [folder / n for n in dict.fromkeys(names)]
        if (folder / single).is_file():
            return [folder / single]
    return []


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def tensor_dtypes(path: Path) -> Counter:
    """Elements per floating dtype in one weights file: the safetensors header, or a `.bin` pickle opened with
    mmap onto the meta device (nothing is read but its index)."""
    counts: Counter = Counter()
    if path.suffix == ".safetensors":
        for info in _safetensors_header(path).values():
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is not None:
                counts[dtype] += math.prod(info["shape"])
        return counts
    state = torch.load(path, map_location="meta", mmap=True, weights_only=True)
    for tensor in state.values():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts


def weights_dtype(folder: Path) -> torch.dtype | None:
    """The dtype most of the checkpoint's floating-point weights are stored in, from its first weights file
    (a shard holds the same dtype as the others); None where there is nothing to read."""
    files = weight_files(folder)
    if not files:
        return None
    counts = tensor_dtypes(files[0])
    return counts.most_common(1)[0][0] if counts else None


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def sentencepiece_mismatch(tokenizer: Any, model_file: Path,
                           texts: list[str]) -> tuple[str, list[int], list[int]] | None:
    """The first text whose ids from `tokenizer` differ from `SentencePieceProcessor.encode` on the folder's
    tokenizer.model (no BOS, no special tokens), with both id lists; None if they agree on all."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    for text in texts:
        ours, theirs = tokenizer(text, add_special_tokens=False)["input_ids"], processor.encode(text)
        if ours != theirs:
            return text, ours, theirs
    return None
