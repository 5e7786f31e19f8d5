#!/usr/bin/env python
"""Build tiny copies of the published PolyLM and BLOOMZ checkpoints, for the tests (no download needed).

    python scripts/make_test_models.py [--out DIR]    # prints one line per model: name and directory

Each folder reproduces its published checkpoint file for file and key for key (as far as the published files
are known), only with 2 layers of 64: hand-written `config.json`, `tokenizer_config.json` and
`special_tokens_map.json` (never `save_pretrained`, which writes keys the real files lack), no `torch_dtype`,
no `generation_config.json`, and the weights in the published format:

- polylm-1.7b: GPT-2 (`GPT2LMHeadModel`), bos = eos = vocab_size - 1 (the converter's placeholder), one bf16
  `pytorch_model.bin` with GPT-2's `attn.bias`/`attn.masked_bias` buffers and no `lm_head.weight`.
- polylm-13b: `architectures ["PolyLMHeadModel"]` with an `auto_map` to `modeling_polylm.PolyLMHeadModel` only,
  eos 2 and no bos, `n_ctx`; four bf16 shards with an index and `lm_head.weight` stored as a copy of the
  embeddings; `modeling_polylm.py` is a stand-in of ours with the published module's imports, which fail on
  transformers 5 exactly as the real one's do.
- polylm-multialpaca-13b (two shards) and polylm-chat-13b (four shards): as polylm-1.7b otherwise.
- polylm-1.7b-nfkc: polylm-1.7b with a tokenizer trained with SentencePiece's defaults (`nmt_nfkc`
  normalization, whitespace collapsing) and `<|user|>`/`<|assistant|>` as pieces of their own, since the
  published `tokenizer.model`'s normalizer is not known; its own network is trained on that tokenizer.
- bloomz-560m: BLOOM with the published key names (`n_embed`, `num_attention_heads`, `seq_length`, ...), a
  vocabulary 200 ids larger than its tokenizer, fp16 `pytorch_model.bin` and `model.safetensors` with
  `BloomModel` key names (no `transformer.` prefix, no `lm_head`), a byte-level BPE `tokenizer.json`.

The PolyLM tokenizers are SentencePiece BPE models with byte fallback and split digits (`tokenizer.model` only,
no `tokenizer.json`), `<unk> <s> </s>` = 0 1 2; the default one uses LLaMA-style identity normalization. The
networks are trained for a few hundred steps on `data/multilingual.txt` (a paragraph in each of PolyLM's 18
languages; the PolyLM ones also on chat and MultiAlpaca exchanges made from it), so greedy answers are real text
in the prompt's language. Results are cached under DIR (default
`~/.cache/polyglot-server/test-models/<hash>`), keyed by this script and the text.
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
NAMES = ("polylm-1.7b", "polylm-13b", "polylm-multialpaca-13b", "polylm-chat-13b", "polylm-1.7b-nfkc", "bloomz-560m")
WIDTH, LAYERS, HEADS, POSITIONS = 64, 2, 4, 2048
DROP = object()  # a key of the common layout that a checkpoint's config.json lacks

# Our own stand-in, not the published code: its imports are those of PolyLM-13B's modeling_polylm.py, names
# that transformers 5 removed, so importing it fails as importing the real module does.
MODELING_POLYLM = '''"""Stand-in for PolyLM-13B's modeling_polylm.py (for transformers 4.31), with the same imports."""

from torch.cuda.amp import autocast  # noqa: F401
from transformers.modeling_utils import PreTrainedModel, SequenceSummary  # noqa: F401
from transformers.pytorch_utils import Conv1D, find_pruneable_heads_and_indices, prune_conv1d_layer  # noqa: F401
from transformers.utils.model_parallel_utils import assert_device_map, get_device_map  # noqa: F401
from transformers import GPT2LMHeadModel


class PolyLMHeadModel(GPT2LMHeadModel):
    pass
'''


def default_out() -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes() + TEXT.read_bytes()).hexdigest()[:12]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "polyglot-server" / "test-models" / digest


def lines() -> list[str]:
    return [line for line in TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- PolyLM ----------------------------------------------------------------------------------------

def _added_token(content: str, typed: bool) -> dict:
    token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if typed else token


def polylm_tokenizer(path: Path, normalizer: str) -> int:
    """tokenizer.model, tokenizer_config.json and special_tokens_map.json as the converter's
    LlamaTokenizer.save_pretrained wrote them; returns the number of pieces."""
    import sentencepiece as spm

    options = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False}
    if normalizer == "nmt_nfkc":  # SentencePiece's defaults, plus the chat markers as pieces of their own
        options = {"user_defined_symbols": ["<|user|>", "<|assistant|>"]}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines()), model_writer=model, model_type="bpe", vocab_size=1000, hard_vocab_limit=False,
        character_coverage=1.0, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, **options,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())
    write_json(path / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": False, "bos_token": _added_token("<s>", True),
        "clean_up_tokenization_spaces": False, "eos_token": _added_token("</s>", True), "model_max_length": 2048,
        "pad_token": None, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>", True),
    })
    write_json(path / "special_tokens_map.json", {
        "bos_token": _added_token("<s>", False), "eos_token": _added_token("</s>", False),
        "unk_token": _added_token("<unk>", False),
    })
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()


def polylm_config(vocab_size: int, **layout) -> dict:
    """The converter's GPT-2 config.json (sorted keys, as transformers 4.x wrote it), with `layout`'s keys."""
    config = {
        "activation_function": "gelu_fast", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.0,
        "bos_token_id": vocab_size - 1, "embd_pdrop": 0.0, "eos_token_id": vocab_size - 1, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_embd": WIDTH, "n_head": HEADS, "n_inner": 4 * WIDTH,
        "n_layer": LAYERS, "n_positions": POSITIONS, "reorder_and_upcast_attn": False, "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True, "summary_activation": None,
        "summary_first_dropout": 0.0, "summary_proj_to_labels": True, "summary_type": "cls_index",
        "summary_use_proj": True, "tokenizer_class": "AutoTokenizer", "transformers_version": "4.28.1",
        "use_cache": True, "vocab_size": vocab_size,
    }
    config.update(layout)
    return {k: v for k, v in sorted(config.items()) if v is not DROP}


def polylm_state_dict(model, lm_head_copy: bool) -> dict:
    """The converter's bf16 state dict: GPT-2 keys, each block's causal-mask buffers, and (13B) lm_head.weight
    stored as a copy of the embeddings."""
    import torch

    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        out[key] = value.detach().to(torch.bfloat16).clone()
        if key.endswith(".ln_1.bias"):  # the converter writes the mask buffers after the first norm
            block = key.removesuffix(".ln_1.bias")
            mask = torch.tril(torch.ones((POSITIONS, POSITIONS), dtype=torch.bfloat16))
            out[f"{block}.attn.bias"] = mask.view(1, 1, POSITIONS, POSITIONS)
            out[f"{block}.attn.masked_bias"] = torch.tensor(-1e4, dtype=torch.bfloat16)
    if lm_head_copy:
        out["lm_head.weight"] = out["transformer.wte.weight"].clone()
    return out


def save_bin(path: Path, state: dict, shards: int) -> None:
    """pytorch_model.bin, or `shards` files pytorch_model-0000k-of-0000n.bin with their index."""
    import torch

    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    keys = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    weight_map, start = {}, 0
    for k in range(shards):
        end = len(keys) if k == shards - 1 else start + -(-(len(keys) - start) // (shards - k))
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({key: state[key] for key in keys[start:end]}, path / name)
        weight_map.update(dict.fromkeys(keys[start:end], name))
        start = end
    write_json(path / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


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


def train(model, tokenizer, docs: list[str], steps: int, batch: int = 16) -> None:
    """Fit the network to the documents, each from position 0 (where a prompt starts) to its end token: random
    batches of whole documents, padded, one-cycle learning rate."""
    import torch

    seqs = [tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for doc in docs]
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        picked = [seqs[i] for i in torch.randperm(len(seqs), generator=generator)[:batch].tolist()]
        width = max(map(len, picked))
        ids = torch.zeros((len(picked), width), dtype=torch.long)
        labels = torch.full((len(picked), width), -100)
        for row, seq in enumerate(picked):
            ids[row, : len(seq)] = labels[row, : len(seq)] = torch.tensor(seq)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    print(f"  trained {type(model).__name__}: final loss {loss.item():.2f}", file=sys.stderr)


def polylm_network(tokenizer_dir: Path, vocab_size: int, chat: bool, steps: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tokenizer = TokenizersBackend.from_pretrained(tokenizer_dir)  # the SentencePiece model's own ids
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
                        activation_function="gelu_fast", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    train(model, tokenizer, documents(chat), steps)
    return model


def build_polylm(out: Path) -> None:
    work = Path(tempfile.mkdtemp(dir=out))
    pieces = polylm_tokenizer(work, "identity")
    vocab = -(-pieces // 128) * 128  # Megatron pads the vocabulary (256000 for the real models)
    model = polylm_network(work, vocab, chat=True, steps=300)
    layouts = {
        "polylm-1.7b": ({}, 1, False),
        "polylm-13b": ({"architectures": ["PolyLMHeadModel"], "auto_map": {"AutoModelForCausalLM":
                        "modeling_polylm.PolyLMHeadModel"}, "bos_token_id": DROP, "eos_token_id": 2,
                        "n_ctx": POSITIONS, "transformers_version": "4.31.0"}, 4, True),
        "polylm-multialpaca-13b": ({}, 2, False),
        "polylm-chat-13b": ({}, 4, False),
    }
    for name, (layout, shards, lm_head_copy) in layouts.items():
        target = out / name
        target.mkdir()
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(work / f, target / f)
        write_json(target / "config.json", polylm_config(vocab, **layout))
        save_bin(target, polylm_state_dict(model, lm_head_copy), shards)
        (target / "README.md").write_text(f"# {name}\n\nA tiny test copy of DAMO-NLP-MT/{name}'s layout.\n")
        if "auto_map" in layout:
            (target / "modeling_polylm.py").write_text(MODELING_POLYLM)
    shutil.rmtree(work)

    target = out / "polylm-1.7b-nfkc"
    target.mkdir()
    pieces = polylm_tokenizer(target, "nmt_nfkc")
    vocab = -(-pieces // 128) * 128
    model = polylm_network(target, vocab, chat=False, steps=150)
    write_json(target / "config.json", polylm_config(vocab))
    save_bin(target, polylm_state_dict(model, False), 1)


# -- BLOOMZ ----------------------------------------------------------------------------------------

# bigscience/bloomz-560m's tokenizer_config.json and special_tokens_map.json, byte for byte (222 and 85 bytes)
BLOOMZ_TOKENIZER_CONFIG = ('{"unk_token": "<unk>", "eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>", '
                           '"name_or_path": "bigscience/tokenizer", "special_tokens_map_file": null, '
                           '"tokenizer_class": "BloomTokenizerFast", "padding_side":"left"}')
BLOOMZ_SPECIAL_TOKENS = '{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}'


def bloomz_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer.json, <unk> <s> </s> <pad> = 0 1 2 3, with BLOOMZ's two small JSON files."""
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
    (path / "tokenizer_config.json").write_text(BLOOMZ_TOKENIZER_CONFIG)
    (path / "special_tokens_map.json").write_text(BLOOMZ_SPECIAL_TOKENS)


def build_bloomz(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    target = out / "bloomz-560m"
    target.mkdir()
    bloomz_tokenizer(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    vocab = len(tokenizer) + 200  # 250880 in the published config against 250680 in the tokenizer
    config = {  # the published key set, in bigscience/bloomz-1b7's order
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
        "architectures": ["BloomForCausalLM"], "bias_dropout_fusion": True, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 3, "unk_token_id": 0, "hidden_dropout": 0.0, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True, "model_type": "bloom", "n_embed": WIDTH,
        "n_inner": None, "n_layer": LAYERS, "num_attention_heads": HEADS, "offset_alibi": 100, "pretraining_tp": 1,
        "seq_length": 2048, "skip_bias_add": True, "skip_bias_add_qkv": False, "transformers_version": "4.20.0",
        "use_cache": True, "vocab_size": vocab,
    }
    write_json(target / "config.json", config)
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=vocab, hidden_size=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=3))
    train(model, tokenizer, documents(chat=False), steps=200)
    state = {k.removeprefix("transformer."): v.detach().to(torch.float16).contiguous()
             for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    torch.save(state, target / "pytorch_model.bin")
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})


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
