#!/usr/bin/env python
"""Build tiny models with the real structure of PolyLM and BLOOMZ, for the tests (no download needed).

    python scripts/make_test_models.py [--out DIR]    # prints one line per model: name and directory

- polylm-chat, polylm-multialpaca: GPT-2 networks with a SentencePiece tokenizer (`tokenizer.model` only, as
  PolyLM ships it, so transformers converts it at load time), trained here on `data/multilingual.txt` (all 18
  PolyLM languages), with PolyLM's `<|user|>` and `<|assistant|>` pieces and end token `</s>` = 2. The chat
  model's `generation_config.json` holds the seeds' decoding (`num_beams=4, early_stopping=True`).
- polylm-base: the same network as a checkpoint with its own configuration and modelling code
  (`model_type: polylm`, `auto_map`), which loads only with trust_remote_code.
- bloomz: `BloomForCausalLM` (ALiBi) with a byte-level BPE tokenizer trained here with `tokenizers`.

Each network (2 layers, 128 wide) is trained for a few hundred steps on the multilingual text, so that greedy
continuations are real text in the prompt's language rather than random bytes. The results are cached
under DIR (default `~/.cache/polyglot-server/test-models/<hash>`), keyed by this script and the text.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "multilingual.txt"
NAMES = ("polylm-chat", "polylm-multialpaca", "polylm-base", "bloomz")
POLYLM_SPECIALS = ["<|user|>", "<|assistant|>"]

CONFIGURATION_POLYLM = '''from transformers import GPT2Config


class PolyLMConfig(GPT2Config):
    model_type = "polylm"
'''
MODELING_POLYLM = '''from transformers import GPT2LMHeadModel

from .configuration_polylm import PolyLMConfig


class PolyLMForCausalLM(GPT2LMHeadModel):
    config_class = PolyLMConfig
'''


def default_out() -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes() + TEXT.read_bytes()).hexdigest()[:12]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "polyglot-server" / "test-models" / digest


def lines() -> list[str]:
    return [line for line in TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]


def sentencepiece_tokenizer(path: Path) -> None:
    """A PolyLM-style tokenizer folder: tokenizer.model (BPE with byte fallback) and tokenizer_config.json."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines()), model_writer=model, model_type="bpe", vocab_size=1000, hard_vocab_limit=False,
        character_coverage=1.0, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=POLYLM_SPECIALS, minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False, "legacy": False, "model_max_length": 512,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def byte_bpe_tokenizer(path: Path) -> None:
    """A BLOOM-style tokenizer: byte-level BPE, <unk> <s> </s> <pad> = 0 1 2 3, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines(), trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "BloomTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "padding_side": "left", "model_max_length": 512,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def documents(chat: bool) -> list[str]:
    """Each paragraph as plain text; with `chat`, also as PolyLM-Chat and MultiAlpaca exchanges in which the
    first sentence is the user's and the rest is the answer."""
    docs = []
    for line in lines():
        docs.append(line)
        if chat:
            match = re.match(r"(.+?[.。!?؟])\s*(.+)", line) or re.match(r"(\S+)\s+(.+)", line)
            first, rest = match.groups()
            docs += [f"<|user|>\n{first}\n<|assistant|>\n{rest}", f"{first}\n\n{rest}"]
    return docs


def train(model, tokenizer, chat: bool, steps: int = 600, window: int = 96) -> None:
    """Fit the network to the documents, each ending with the end token (teacher forcing on random windows)."""
    import torch

    ids = []
    for doc in documents(chat):
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - window - 1, (32,), generator=generator)
        batch = torch.stack([data[s : s + window] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    print(f"  trained {type(model).__name__}: final loss {loss.item():.2f}", file=sys.stderr)


def build_polylm(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    work = Path(tempfile.mkdtemp(dir=out))
    sentencepiece_tokenizer(work)
    tokenizer = AutoTokenizer.from_pretrained(work, legacy=False, use_fast=False)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=128, n_layer=2, n_head=4, n_positions=512, activation_function="gelu_fast",
        bos_token_id=1, eos_token_id=2,
    )
    model = GPT2LMHeadModel(config)
    train(model, tokenizer, chat=True)
    for name, beams in (("polylm-chat", True), ("polylm-multialpaca", False)):
        target = out / name
        model.generation_config.num_beams = 4 if beams else 1
        model.generation_config.early_stopping = True if beams else False
        model.save_pretrained(target)
        for f in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(work / f, target / f)
    # The base checkpoint: same weights, its own code, named only by model_type and auto_map.
    base = out / "polylm-base"
    shutil.copytree(out / "polylm-chat", base)
    (base / "generation_config.json").unlink()
    (base / "configuration_polylm.py").write_text(CONFIGURATION_POLYLM)
    (base / "modeling_polylm.py").write_text(MODELING_POLYLM)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(
        model_type="polylm", architectures=["PolyLMForCausalLM"],
        auto_map={"AutoConfig": "configuration_polylm.PolyLMConfig",
                  "AutoModelForCausalLM": "modeling_polylm.PolyLMForCausalLM"},
    )
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(work)


def build_bloomz(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    target = out / "bloomz"
    target.mkdir()
    byte_bpe_tokenizer(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=128, n_layer=2, n_head=4,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = BloomForCausalLM(config)
    train(model, tokenizer, chat=False)
    model.save_pretrained(target)


def build(out: Path | None = None) -> dict[str, Path]:
    """Build the models once into `out` (atomically); return their directories by name."""
    out = out or default_out()
    if not all((out / name / "config.json").exists() for name in NAMES):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
        build_polylm(tmp)
        build_bloomz(tmp)
        try:
            tmp.rename(out)
        except OSError:  # built meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
    return {name: out / name for name in NAMES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to build (default: a cache folder keyed by content)")
    for name, path in build(parser.parse_args().out).items():
        print(name, path)


if __name__ == "__main__":
    main()
