#!/usr/bin/env python
"""Fuzz a running server from its own OpenAPI document: every route, every field, hostile values.

    .venv/bin/python scripts/fuzz.py --url http://127.0.0.1:8000 --minutes 10
    .venv/bin/python scripts/fuzz.py --url http://127.0.0.1:8000 --examples 400 --seed 1

For each operation in /openapi.json, hypothesis builds requests from the operation's own schemas (path parameters
and JSON body, through $ref, anyOf, enums, bounds), and at any node may put a hostile value instead: strings with
lone UTF-16 surrogates, C0/C1 controls, bidi overrides and NUL; nesting 40 to 100,000 deep; integers and floats at
and past every bound (2**64, -2**63, 1e308, NaN, Infinity); the wrong type. Some bodies are sent as raw bytes
instead (CESU-8, invalid UTF-8, truncated JSON), and some requests carry a hostile X-Request-ID.

Pass mark: no 5xx, every 4xx in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}), no answer
slower than --timeout seconds, and the server healthy at the end. Prints a JSON report; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as seeded
from hypothesis import strategies as st

HOSTILE_TEXT = ["\ud800", "\udfff", "a\ud83dz", "\x00", "\x1b[2J", "\x9b31m", "\u202e", "\u2028", "\x85", "\n", "\r\n",
                "%0a", "\ufeff", "\U0010ffff", "'\"\\", "{{", "<script>"]
text = st.text(st.characters(codec=None, categories=None), max_size=30)  # any code point, surrogates included
hostile_text = st.one_of(text, st.lists(st.sampled_from(HOSTILE_TEXT) | text, min_size=1, max_size=6).map("".join))
hostile_numbers = st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 2**64, 10**30, 1e308, -1e308, 5e-324,
                                   float("nan"), float("inf"), float("-inf"), 0.5, -0.0])
deep = st.integers(40, 100_000).map(lambda d: {"__deep__": d})  # written out as raw nested brackets
anything = st.recursive(st.none() | st.booleans() | hostile_numbers | hostile_text,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
                        max_leaves=6)
hostile = st.one_of(hostile_text, hostile_numbers, deep, anything)


class Spec:
    """Strategies built from an OpenAPI document's schemas."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.schemas = doc.get("components", {}).get("schemas", {})
        self.cache: dict[str, st.SearchStrategy] = {}

    def value(self, schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy:
        """A value the schema allows, or (about one time in eight) a hostile one."""
        if depth >= 6:
            return hostile
        valid = self._valid(schema, depth)
        return st.integers(0, 7).flatmap(lambda roll: hostile if roll == 0 else valid)

    def _valid(self, schema: dict[str, Any], depth: int) -> st.SearchStrategy:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name not in self.cache:
                self.cache[name] = st.deferred(lambda: self._valid(self.schemas[name], depth + 1))
            return self.cache[name]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return st.one_of([self._valid(s, depth + 1) for s in schema[key]])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        if "const" in schema:
            return st.just(schema["const"])
        kind = schema.get("type")
        if isinstance(kind, list):
            return st.one_of([self._valid({**schema, "type": k}, depth) for k in kind])
        if kind == "object":
            props = schema.get("properties", {})
            required = set(schema.get("required", []))
            return st.fixed_dictionaries(
                {k: self.value(v, depth + 1) for k, v in props.items() if k in required},
                optional={k: self.value(v, depth + 1) for k, v in props.items() if k not in required})
        if kind == "array":
            return st.lists(self.value(schema.get("items", {}), depth + 1), min_size=schema.get("minItems", 0),
                            max_size=4)
        if kind == "string":
            return hostile_text
        if kind in ("integer", "number"):
            low, high = schema.get("minimum", -(2**64)), schema.get("maximum", 2**64)
            near = st.sampled_from([low, high, low - 1, high + 1] + ([] if kind == "integer" else [low - 1e-9]))
            inside = st.integers(int(max(low, -(2**64))), int(min(high, 2**64))) if kind == "integer" else \
                st.floats(low, high, allow_nan=False)
            return st.one_of(inside, near, st.integers(-3, 40))
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        return anything


def encode(value: Any) -> bytes:
    """JSON as a sloppy client writes it: NaN and Infinity as bare words, surrogates escaped, deep nesting raw."""
    parts: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict) and set(v) == {"__deep__"}:
            parts.append("[" * v["__deep__"] + "]" * v["__deep__"])
        elif isinstance(v, dict):
            parts.append("{")
            for i, (k, item) in enumerate(v.items()):
                parts.append(("," if i else "") + json.dumps(k) + ":")
                walk(item)
            parts.append("}")
        elif isinstance(v, list):
            parts.append("[")
            for i, item in enumerate(v):
                parts.append("," if i else "")
                walk(item)
            parts.append("]")
        else:
            parts.append(json.dumps(v, allow_nan=True))

    walk(value)
    return "".join(parts).encode()


RAW_BODIES = [b'{"prompt": "\xed\xa0\x80", "max_tokens": 1}', b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
              b'{"prompt": "hi", "max_tokens": ', b"", b"null", b"[]", b'"just a string"', b"\x00" * 64,
              b'{"prompt": "hi"}' * 3, b'{"prompt": 1e999999}', b'{"n": ' + b"9" * 5000 + b"}"]


def requests_for(doc: dict[str, Any]) -> st.SearchStrategy:
    """(method, path, headers, body bytes or None) for any operation in the document."""
    spec = Spec(doc)
    ops = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            params = [p for p in op.get("parameters", []) if p.get("in") == "path"]
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            ops += (4 if body else 1) * [st.tuples(  # the generation routes, with bodies, four times as often
                st.just(method.upper()), st.just(path),
                st.fixed_dictionaries({p["name"]: hostile_text for p in params}),
                spec.value(body) if body else st.none(),
                st.sampled_from([None] * 6 + RAW_BODIES) if body else st.none(),
                st.sampled_from([None] * 4) | st.binary(max_size=40) | hostile_text)]
    return st.one_of(ops)


def is_openai_error(r: httpx.Response) -> bool:
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
            and {"param", "code"} <= set(error))


class Report:
    def __init__(self) -> None:
        self.sent = self.unsendable = 0
        self.status: Counter[int] = Counter()
        self.by_route: Counter[str] = Counter()
        self.failures: list[str] = []

    def fail(self, why: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(why[:600])


def send(client: httpx.Client, case: tuple, report: Report) -> None:
    method, path, params, body, raw, request_id = case
    for name, value in params.items():
        path = path.replace("{" + name + "}", quote(value.encode("utf-8", "surrogatepass"), safe="") or "x")
    headers = {"Content-Type": "application/json"}
    if isinstance(request_id, bytes):
        headers["X-Request-ID"] = request_id.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
    elif isinstance(request_id, str):
        headers["X-Request-ID"] = request_id.encode("utf-8", "surrogatepass")
    content = raw if raw is not None else None if body is None else encode(_small(body))
    report.sent += 1
    report.by_route[f"{method} {case[1]}"] += 1
    try:
        r = client.request(method, path, content=content, headers=headers)
    except httpx.TimeoutException:
        report.fail(f"no answer in time: {method} {path} {content[:300] if content else ''!r}")
        return
    except httpx.HTTPError as e:  # httpx refused what it was asked to send (a header it cannot encode): not sent
        report.sent -= 1
        report.unsendable += 1
        report.by_route[f"{method} {case[1]}"] -= 1
        if "header" not in str(e).lower() and not isinstance(e, httpx.LocalProtocolError):
            report.fail(f"{type(e).__name__}: {e}: {method} {path}")
        return
    report.status[r.status_code] += 1
    if r.status_code >= 500:
        report.fail(f"{r.status_code} for {method} {path} {content[:300] if content else ''!r}: {r.text[:300]}")
    elif r.status_code >= 400 and not is_openai_error(r):
        report.fail(f"{r.status_code} not in OpenAI's error shape for {method} {path}: {r.text[:300]}")


def _small(body: Any) -> Any:
    """Keep a generation short where the body asks for a long one (or, leaving max_tokens out, for the whole
    context): the fuzz is about parsing, not decoding."""
    if isinstance(body, dict):
        limits = ("max_tokens", "max_completion_tokens", "max_output_tokens")  # the last is /v1/responses's
        if not any(key in body for key in limits):
            body["max_output_tokens" if "input" in body else "max_tokens"] = 8
        for key in limits:
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and 8 < body[key] < 2**31:
                body[key] = 8
    return body


def run(url: str, examples: int | None, seconds: float | None, seed: int, timeout: float) -> Report:
    report = Report()
    with httpx.Client(base_url=url, timeout=timeout) as client:
        doc = client.get("/openapi.json").json()
        strategy = requests_for(doc)
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds if seconds else None
        left = examples
        while (left is None or left > 0) and (deadline is None or time.monotonic() < deadline):
            batch = min(50, left) if left is not None else 50

            @seeded(rng.randrange(2**32))  # a new, reproducible batch each time
            @settings(max_examples=batch, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def once(case: tuple) -> None:
                send(client, case, report)

            once()
            if left is not None:
                left -= batch
        health = client.get("/health")
        if health.status_code != 200:
            report.fail(f"unhealthy after the fuzz: {health.status_code} {health.text[:200]}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--minutes", type=float, help="run for this long")
    ap.add_argument("--examples", type=int, help="send this many requests (default: 500 unless --minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60, help="seconds an answer may take")
    args = ap.parse_args()
    examples = args.examples if args.examples or args.minutes else 500
    started = time.monotonic()
    report = run(args.url, examples, args.minutes * 60 if args.minutes else None, args.seed, args.timeout)
    fivexx = sum(n for s, n in report.status.items() if s >= 500)
    print(json.dumps({"seconds": round(time.monotonic() - started, 1), "sent": report.sent,
                      "not_sent": report.unsendable, "5xx": fivexx,
                      "status": dict(sorted(report.status.items())), "routes": dict(report.by_route),
                      "failures": report.failures}, indent=1, ensure_ascii=True))
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
