#!/usr/bin/env python
"""What a weight format or dtype costs in quality, against fp32, on the embedded default model (or --model).

    .venv/bin/python scripts/quality.py                       # fp32 (the reference), bf16, and llama.cpp if found
    .venv/bin/python scripts/quality.py --modes fp32,bf16,int4 --llama-server PATH

Two measures per mode:
- greedy agreement: 50 chat prompts in 15 languages (scripts/data/quality-prompts.txt), 64 greedy tokens each (end
  tokens ignored); per prompt the share of the 64 made before the first token that differs from fp32's, averaged,
  and how many prompts gave all 64 the same;
- mean log-probability per token of a held-out text in 12 languages (scripts/data/heldout.txt), scored as
  llama.cpp's `llama-perplexity` scores it, so that its number is comparable: chunks of --ctx tokens, each token of a
  chunk's second half predicted from the tokens before it in the chunk.

Modes: fp32 and bf16 are the GGUF's weights dequantized (what `--dtype` serves); int4 keeps them 4-bit in PyTorch's
packed layout (`--quantization int4`, server/engine/quant.py) where that runs; llama is llama.cpp on the GGUF file
itself (its Q4_1 matmuls take 8-bit activations), greedy through `llama-server` and scored by `llama-perplexity`.
Writes bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "scripts" / "data"


def prompt_ids(tok) -> list[list[int]]:
    texts = [t for t in (DATA / "quality-prompts.txt").read_text().splitlines() if t]
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in texts]
    return [tok(chat, add_special_tokens=False)["input_ids"] for chat in chats]


def load(hf_dir: Path, mode: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
    if mode == "int4":  # as the server does: the 4-bit values from the fp32 dequantization, the rest in bf16
        from server.engine.quant import quantize_int4

        quantize_int4(model)
        model.to(torch.bfloat16)
    return model.eval()


def greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    import torch

    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(y[0, len(ids):].tolist())
    return out


def chunks(tok, ctx: int) -> list[list[int]]:
    ids = tok((DATA / "heldout.txt").read_text(), add_special_tokens=False)["input_ids"]
    return [ids[i : i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]


def mean_logprob(model, parts: list[list[int]]) -> float:
    """llama-perplexity's scoring: in each chunk, the tokens of its second half given those before them."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in parts:
            first = len(ids) // 2
            logits = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            want = torch.tensor(ids[first + 1 :])
            total += float(logits[first : len(ids) - 1].gather(1, want.unsqueeze(1)).sum())
            count += len(want)
    return total / count


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    same = []
    for a, b in zip(reference, other, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same.append(k / len(a))
    return {"agreement": round(sum(same) / len(same), 3), "identical_prompts": sum(s == 1.0 for s in same)}


def llama_greedy(binary: str, gguf: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    from scripts.bench import free_port

    port = free_port()
    proc = subprocess.Popen([binary, "-m", str(gguf), "--port", str(port), "-np", "1", "-t", "2", "--poll", "0",
                             "-c", "2048"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        out = []
        for ids in prompts:
            body = {"prompt": ids, "n_predict": n, "ignore_eos": True, "temperature": 0, "top_k": 1,
                    "cache_prompt": False, "return_tokens": True}
            r = httpx.post(f"http://127.0.0.1:{port}/completion", json=body, timeout=300).json()
            out.append(r["tokens"])
        return out
    finally:
        proc.terminate()
        proc.wait()


def llama_mean_logprob(binary: str, gguf: Path, ctx: int) -> tuple[float, int]:
    perplexity = str(Path(binary).with_name("llama-perplexity"))
    run = subprocess.run([perplexity, "-m", str(gguf), "-f", str(DATA / "heldout.txt"), "-c", str(ctx), "-b", str(ctx),
                          "-t", "2"], capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
    chunks_seen = re.search(r"calculating perplexity over (\d+) chunks", run.stdout + run.stderr)
    if not found:
        raise RuntimeError("llama-perplexity gave no estimate:\n" + (run.stdout + run.stderr)[-2000:])
    return -math.log(float(found.group(1))), int(chunks_seen.group(1)) if chunks_seen else -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="fp32,bf16,int4,llama")
    ap.add_argument("--model", help="a .gguf file (default: the embedded default model)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--llama-server", help="path of llama.cpp's llama-server (llama-perplexity beside it)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from scripts.bench import OUT, llama_binary
    from server.engine.loader import default_gguf, gguf_to_hf_dir

    gguf = Path(args.model) if args.model else default_gguf()
    hf_dir = gguf_to_hf_dir(gguf)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts, parts = prompt_ids(tok), chunks(tok, args.ctx)
    result = {"model": gguf.name, "prompts": len(prompts), "tokens": args.tokens, "ctx": args.ctx,
              "scored_tokens": len(parts) * (args.ctx - args.ctx // 2 - 1), "modes": {}}
    reference = None
    for mode in args.modes.split(","):
        start = time.perf_counter()
        if mode == "llama":
            binary = llama_binary(args.llama_server)
            if binary is None:
                print("llama-server not found: skipping llama", file=sys.stderr)
                continue
            tokens = llama_greedy(binary, gguf, prompts, args.tokens)
            lp, seen = llama_mean_logprob(binary, gguf, args.ctx)
            row = {"mean_logprob": round(lp, 4), "chunks": seen}
        else:
            try:
                model = load(hf_dir, mode)
            except Exception as e:  # a mode this machine cannot run
                print(f"{mode}: {type(e).__name__}: {e}: skipping", file=sys.stderr)
                continue
            tokens = greedy(model, prompts, args.tokens)
            row = {"mean_logprob": round(mean_logprob(model, parts), 4), "chunks": len(parts)}
        if reference is None:
            reference = tokens
        row.update(agreement(reference, tokens), seconds=round(time.perf_counter() - start, 1))
        result["modes"][mode] = row
        print(mode, json.dumps(row), file=sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
