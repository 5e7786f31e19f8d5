#!/usr/bin/env python
"""Throughput and latency of the server under C concurrent streaming clients, next to sequential
`model.generate` on the same prompts. Not a test: run it by hand, e.g.

    .venv/bin/python scripts/bench.py                      # starts the default model on a free port
    .venv/bin/python scripts/bench.py --url http://host:8000 --concurrency 1,8,32

Prints one JSON line with, per concurrency: completion tokens/s, TTFT and inter-token latency p50/p99; then
a 16-client run with all requests sampled next to one where a quarter are 4-beam searches, and one 4-beam
request alone against `model.generate(num_beams=4)` on the same prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a lighthouse keeper", "a robot learning to paint", "the first city on Mars", "a dragon who hates gold",
          "a detective cat", "an old violin", "a river that flows uphill", "a library at the end of time"]


def prompts(count: int) -> list[str]:
    return [f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}." for i in range(count)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start if stamps else float("nan"), "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens}


SAMPLED = {"temperature": 1.0, "top_p": 0.95}
BEAM = {"num_beams": 4, "early_stopping": True}


async def run_level(url: str, model: str, concurrency: int, rounds: int, max_tokens: int, beam_every: int = 0,
                    extra: dict | None = None) -> dict:
    """C clients, `rounds` requests each; with beam_every=k, every k-th request is a 4-beam one."""
    work = prompts(concurrency * rounds)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await one_request(client, model, "Warm up.", 4)

        def options(k: int) -> dict | None:
            return BEAM if beam_every and k % beam_every == 0 else extra

        async def worker(i: int) -> list[dict]:
            return [await one_request(client, model, work[i * rounds + j], max_tokens, options(i * rounds + j))
                    for j in range(rounds)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[worker(i) for i in range(concurrency)]) for r in rs]
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"concurrency": concurrency, "requests": len(results), "completion_tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": round(1000 * pct(ttft, 0.5), 1),
            "ttft_p99_ms": round(1000 * pct(ttft, 0.99), 1), "itl_p50_ms": round(1000 * pct(gaps, 0.5), 1),
            "itl_p99_ms": round(1000 * pct(gaps, 0.99), 1)}


def load_baseline(model_dir: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.engine.loader import default_gguf, gguf_to_hf_dir

    path = model_dir or gguf_to_hf_dir(default_gguf())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generate(**tok("Warm up", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    return tok, model


def sequential_generate(tok, model, count: int, max_tokens: int, **generate_kwargs) -> dict:
    """The baseline: plain transformers generate, one prompt after another, same prompts and length."""
    tokens, start = 0, time.perf_counter()
    for p in prompts(count):
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, **generate_kwargs)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - start
    return {"requests": count, "completion_tokens": tokens, "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1)}


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one with --model)")
    ap.add_argument("--model", help="model for the started server and the baseline (default: the embedded one)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--baseline-requests", type=int, default=8, help="sequential generate calls (0: skip)")
    ap.add_argument("--beam-clients", type=int, default=16, help="clients for the beam mix (0: skip the beam runs)")
    args = ap.parse_args()

    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        levels = [asyncio.run(run_level(url, model, int(c), args.rounds, args.max_tokens)) for c in args.concurrency.split(",")]
        beams = {}
        if args.beam_clients:
            c = args.beam_clients
            beams["all_sampled"] = asyncio.run(run_level(url, model, c, args.rounds, args.max_tokens, extra=SAMPLED))
            beams["quarter_4_beam"] = asyncio.run(run_level(url, model, c, args.rounds, args.max_tokens, beam_every=4, extra=SAMPLED))
            beams["one_4_beam_request_alone_s"] = asyncio.run(run_level(url, model, 1, 1, args.max_tokens, beam_every=1))["seconds"]
    finally:
        if proc:
            proc.terminate()
            proc.wait()
    result = {"model": model, "max_tokens": args.max_tokens, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "server": levels}
    if args.baseline_requests or beams:
        tok, net = load_baseline(args.model)
    if args.baseline_requests:
        base = sequential_generate(tok, net, args.baseline_requests, args.max_tokens)
        result["sequential_generate"] = base
        result["speedup_vs_sequential"] = {lv["concurrency"]: round(lv["tokens_per_s"] / base["tokens_per_s"], 2) for lv in levels}
    if beams:
        beams["generate_4_beam_alone_s"] = sequential_generate(tok, net, 1, args.max_tokens, num_beams=4, early_stopping=True)["seconds"]
        result["beams"] = beams
    print(json.dumps(result))


if __name__ == "__main__":
    main()
