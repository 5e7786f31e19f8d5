#!/usr/bin/env python
"""Load and abuse a running server; report what came back, and fail if anything was lost or answered 5xx.

    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:8000 --clients 64 --seconds 600

Each of N clients loops for T seconds, picking at random (seeded) one of the following (between them, the
clients' first requests are one of each, so every run sends every kind):
  chat or completion, streamed or not, greedy, sampled (temperature 1, top_p 0.9) or 2-beam search;
  a sampled answer constrained by a JSON schema (response_format or guided_json);
  a stream it leaves after a few chunks (a client that disconnects);
  a malformed request (bad JSON, wrong types, out-of-range values, an unknown model);
  a prompt longer than the model's context;
  a hostile one (lone surrogates, CESU-8 bytes, 100,000-deep nesting, bad logit_bias keys, more prompts than the
  server queues, Transfer-Encoding with Content-Length, control characters in the path): must be a 4xx in OpenAI's
  shape;
  a client that hangs up halfway through sending its body;
  a slow reader, who reads its stream a few bytes at a time for a few seconds and then leaves.
It counts requests sent and completed, answers by status, 5xx answers (must be 0, by the client's count and by the
server's own polyglot_requests_total), lost requests (sent but never answered, or answered but cut short: must be
0), p50/p99 latency of the requests that completed, and the server's resident memory (from /metrics) before and
after, which must not grow past --max-growth-mib.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter

import httpx

MALFORMED = [
    (b"{not json", "application/json"),
    (json.dumps({"messages": "hello"}).encode(), "application/json"),
    (json.dumps({"prompt": "hi", "max_tokens": -3}).encode(), "application/json"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), "application/json"),
    (json.dumps({"prompt": "hi", "n": 100000}).encode(), "application/json"),
    (json.dumps({"model": "no-such-model", "prompt": "hi"}).encode(), "application/json"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "application/json"),
    (b"\xff\xfe\x00garbage", "text/plain"),
]


HOSTILE = [  # (method, path, raw body or None); each must get a 4xx in OpenAI's error shape
    ("POST", "/v1/completions", b'{"prompt": "\\ud800abc", "max_tokens": 1}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 1}'),
    ("POST", "/v1/completions", b'{"prompt": "\xed\xa0\x80", "max_tokens": 1}'),
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000),
    ("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 1, "logit_bias": {"-1": 100}}'),
    ("POST", "/v1/completions", json.dumps({"prompt": ["a"] * 5000, "max_tokens": 1}).encode()),
    ("GET", "/x%0aFORGED%1b[2J%c2%9b", None),
    ("SMUGGLE", "/v1/completions", None),  # Transfer-Encoding and Content-Length at once, on a raw connection
]


def memory_mib(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1]) / 2**20
    return float("nan")


def server_5xx(client: httpx.Client) -> float:
    """5xx answers by the server's own count."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("polyglot_requests_total{") and 'status="5' in line)


async def raw_exchange(url: str, data: bytes, close_after_send: bool = False) -> bytes:
    host, port = httpx.URL(url).host, httpx.URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        if close_after_send:
            return b""
        return await asyncio.wait_for(reader.read(), 60)
    finally:
        writer.close()


def is_openai_error(status: int, body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return 400 <= status < 500 and isinstance(error.get("message"), str) and "type" in error


class Tally:
    def __init__(self) -> None:
        self.sent = self.completed = self.lost = self.left = 0
        self.status: Counter[int] = Counter()
        self.latency: list[float] = []
        self.kinds: Counter[str] = Counter()
        self.problems: list[str] = []

    def lose(self, kind: str, why: str) -> None:
        self.lost += 1
        if len(self.problems) < 20:
            self.problems.append(f"{kind}: {why}")


async def hostile(client: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    method, path, body = rng.choice(HOSTILE)
    kind = "hostile"
    t.sent += 1
    t.kinds[kind] += 1
    start = time.perf_counter()
    try:
        if method == "SMUGGLE":
            answer = await raw_exchange(str(client.base_url), b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            head, _, content = answer.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        else:
            r = await client.request(method, path, content=body, headers={"Content-Type": "application/json"})
            status, content = r.status_code, r.content
    except (httpx.HTTPError, OSError, ValueError, asyncio.TimeoutError) as e:
        t.lose(kind, f"{path}: {e!r}")
        return
    t.status[status] += 1
    if not is_openai_error(status, content):
        t.lose(kind, f"{method} {path}: {status} {content[:200]!r}")
        return
    t.completed += 1
    t.latency.append(time.perf_counter() - start)


async def hang_up_mid_body(client: httpx.AsyncClient, t: Tally) -> None:
    t.sent += 1
    t.kinds["hangs up mid-body"] += 1
    try:
        await raw_exchange(str(client.base_url), b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/json\r\nContent-Length: 400\r\n\r\n{\"prompt\": \"half a bo",
                           close_after_send=True)
    except OSError as e:
        t.lose("hangs up mid-body", repr(e))
        return
    t.left += 1


async def slow_reader(client: httpx.AsyncClient, rng: random.Random, model: str, t: Tally) -> None:
    """Reads its stream a few bytes every 0.2 s for 2 to 5 s, then leaves."""
    t.sent += 1
    t.kinds["slow reader"] += 1
    body = {"model": model, "prompt": "Tell me a long story.", "max_tokens": 200, "stream": True, "logprobs": 5}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                t.status[r.status_code] += 1
                t.lose("slow reader", f"{r.status_code} {r.text[:200]}")
                return
            t.status[200] += 1
            until = time.monotonic() + rng.uniform(2, 5)
            async for _ in r.aiter_raw(16):
                if time.monotonic() > until:
                    break
                await asyncio.sleep(0.2)
    except httpx.HTTPError as e:
        t.lose("slow reader", repr(e))
        return
    t.left += 1


# Each kind and its share of the traffic; every run sends each kind at least once (see run()).
KINDS = {"greedy": 0.306, "sampled": 0.306, "malformed": 0.072, "beam": 0.072, "hostile": 0.06, "structured": 0.054,
         "leaves mid-stream": 0.054, "over-long prompt": 0.036, "slow reader": 0.02, "hangs up mid-body": 0.02}


async def one(client: httpx.AsyncClient, rng: random.Random, model: str, context: int, t: Tally,
              kind: str) -> None:
    if kind == "hostile":
        return await hostile(client, rng, t)
    if kind == "hangs up mid-body":
        return await hang_up_mid_body(client, t)
    if kind == "slow reader":
        return await slow_reader(client, rng, model, t)
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    text = rng.choice(["Tell me about rivers.", "Translate to French: good morning.", "Write a haiku about snow.",
                       "北京是", "ما هي عاصمة مصر؟", "List three colors."])
    body: dict = {"model": model, "max_tokens": rng.choice([8, 16, 32, 64])}
    body.update({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})
    if kind == "malformed":
        content, ctype = rng.choice(MALFORMED)
        t.sent += 1
        t.kinds[kind] += 1
        start = time.perf_counter()
        try:
            r = await client.post(path, content=content, headers={"Content-Type": ctype})
        except httpx.HTTPError as e:
            t.lose(kind, repr(e))
            return
        t.status[r.status_code] += 1
        if not 400 <= r.status_code < 500 or "error" not in r.json():
            t.lose(kind, f"{r.status_code} {r.text[:200]}")
        else:
            t.completed += 1
            t.latency.append(time.perf_counter() - start)
        return
    if kind == "over-long prompt":
        body["max_tokens"] = 16
        long = "word " * (context + 50)
        body.update({"messages": [{"role": "user", "content": long}]} if chat else {"prompt": long})
    elif kind == "beam":
        body.update({"num_beams": 2, "temperature": 0, "stream": rng.random() < 0.5})
    elif kind == "structured":  # a grammar-masked row among free ones
        schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40}},
                  "required": ["answer"], "additionalProperties": False}
        body.update({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
                    if rng.random() < 0.5 else {"guided_json": schema})
        body.update({"temperature": 1.0, "stream": rng.random() < 0.5})
    elif kind == "leaves mid-stream":
        body.update({"stream": True, "max_tokens": 64})
    else:
        body.update({"temperature": 1.0, "top_p": 0.9} if kind == "sampled" else {"temperature": 0})
        body["stream"] = rng.random() < 0.5
    t.sent += 1
    t.kinds[kind] += 1
    start = time.perf_counter()
    try:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as r:
                t.status[r.status_code] += 1
                if r.status_code != 200:
                    await r.aread()
                    if kind == "over-long prompt" and r.status_code == 400:
                        t.completed += 1
                    else:
                        t.lose(kind, f"{r.status_code} {r.text[:200]}")
                    return
                chunks, done = 0, False
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: ") and '"error"' in line[:20]:
                        t.lose(kind, line[:200])
                        return
                    chunks += 1
                    if kind == "leaves mid-stream" and chunks >= 3:
                        t.left += 1
                        return
                if not done:
                    t.lose(kind, "stream ended without [DONE]")
                    return
        else:
            r = await client.post(path, json=body)
            t.status[r.status_code] += 1
            expected = 400 if kind == "over-long prompt" else 200
            if r.status_code != expected:
                t.lose(kind, f"{r.status_code} {r.text[:200]}")
                return
    except httpx.HTTPError as e:
        t.lose(kind, repr(e))
        return
    t.completed += 1
    t.latency.append(time.perf_counter() - start)


async def run(url: str, clients: int, seconds: float, seed: int) -> Tally:
    with httpx.Client(base_url=url, timeout=30) as c:
        card = c.get("/v1/models").json()["data"][0]
    t = Tally()
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            names, weights = list(KINDS), list(KINDS.values())
            first = names[i::clients]  # between them, the clients' first requests are one of each kind
            while time.monotonic() < stop:
                kind = first.pop(0) if first else rng.choices(names, weights)[0]
                await one(client, rng, card["id"], card.get("max_model_len", 2048), t, kind)

        await asyncio.gather(*[worker(i) for i in range(clients)])
    return t


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-growth-mib", type=float, default=512, help="allowed growth of resident memory")
    args = ap.parse_args()
    with httpx.Client(base_url=args.url, timeout=30) as c:
        before, before_5xx = memory_mib(c), server_5xx(c)
    started = time.monotonic()
    t = asyncio.run(run(args.url, args.clients, args.seconds, args.seed))
    wall = time.monotonic() - started
    with httpx.Client(base_url=args.url, timeout=30) as c:
        time.sleep(1)
        after, after_5xx = memory_mib(c), server_5xx(c)
        health = c.get("/health").json()
    fivexx = sum(n for s, n in t.status.items() if s >= 500)
    report = {
        "clients": args.clients, "seconds": round(wall, 1), "sent": t.sent, "completed": t.completed,
        "left_mid_stream": t.left, "lost": t.lost, "status": dict(sorted(t.status.items())), "5xx": fivexx,
        "server_5xx": after_5xx - before_5xx,
        "kinds": dict(t.kinds), "latency_p50_s": round(pct(t.latency, 0.5), 3),
        "latency_p99_s": round(pct(t.latency, 0.99), 3), "memory_before_mib": round(before, 1),
        "memory_after_mib": round(after, 1), "server_after": health, "problems": t.problems,
    }
    print(json.dumps(report, indent=1, ensure_ascii=False))
    grew = after - before
    ok = fivexx == 0 and after_5xx == before_5xx and t.lost == 0 and grew <= args.max_growth_mib and t.sent == t.completed + t.left + t.lost
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
