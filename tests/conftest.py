"""Shared fixtures: tiny models built here (random weights, the default model's real tokenizer),
real servers on real ports, and a validator for OpenAI's published schemas."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import jsonschema
import pytest

ROOT = Path(__file__).resolve().parent.parent
# The response schemas of OpenAI's published API description (../shared/spec/openai-openapi.json), with every
# schema they reference, copied by scripts/extract_schemas.py; tests/test_schemas_copy.py keeps the copy exact.
SCHEMAS = ROOT / "tests" / "data" / "openai-schemas.json"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct), converted from its GGUF once and cached."""
    from server.engine.loader import default_gguf, gguf_to_hf_dir

    return gguf_to_hf_dir(default_gguf())


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _save_tiny(config, tokenizer, path: Path, chat_template: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if not chat_template:
        for f in ("chat_template.jinja", "chat_template.json"):
            (path / f).unlink(missing_ok=True)
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama (rotary positions, grouped KV heads) with the default model's tokenizer and chat template."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return _save_tiny(config, tokenizer, tmp_path_factory.mktemp("tiny-llama"), chat_template=True)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer GPT-2 (learned absolute positions) with no chat template."""
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return _save_tiny(config, tokenizer, tmp_path_factory.mktemp("tiny-gpt2"), chat_template=False)


@pytest.fixture(scope="session")
def tiny_bloom_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer BLOOM: ALiBi attention, no position ids, the architecture of BLOOMZ."""
    from transformers import BloomConfig

    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return _save_tiny(config, tokenizer, tmp_path_factory.mktemp("tiny-bloom"), chat_template=False)


@pytest.fixture(scope="session")
def family_models() -> dict[str, Path]:
    """Tiny copies of the published PolyLM-1.7B, PolyLM-13B, PolyLM-MultiAlpaca-13B, PolyLM-Chat-13B and
    BLOOMZ-560M checkpoints (their files, keys and quirks), plus PolyLM-1.7B with an NFKC-normalizing tokenizer,
    built and trained on the shipped multilingual text by scripts/make_test_models.py (cached between runs; about
    90 s on 2 cores the first time)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_test_models", ROOT / "scripts" / "make_test_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="server-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port), *args]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait()

    def wait(self) -> None:
        """Until /health answers 200; raises with the server's log if it exits first."""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy in 180 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """start(*flags) -> a healthy server; start(*flags, wait=False) starts it only (call .wait()), so that several
    servers load their models side by side."""
    servers: list[ServerProcess] = []

    def start(*args: str, wait: bool = True) -> ServerProcess:
        servers.append(ServerProcess(*args, wait=wait))
        return servers[-1]

    yield start
    for s in servers:  # all at once: each drains and exits on its own
        s.proc.terminate()
    for s in servers:
        s.stop()


def start_side_by_side(start: Callable[..., ServerProcess], **servers: Sequence[str]) -> dict[str, ServerProcess]:
    """Start several servers at once, so their imports and model loads overlap, and wait until all are healthy."""
    started = {name: start(*args, wait=False) for name, args in servers.items()}
    for server in started.values():
        server.wait()
    return started


@pytest.fixture(scope="session")
def tiny_server(start_server, tiny_llama_dir) -> ServerProcess:
    return start_server("--model", str(tiny_llama_dir), "--served-model-name", "tiny")


@pytest.fixture(scope="session")
def default_server(start_server) -> ServerProcess:
    return start_server()


@pytest.fixture(scope="session")
def fp32_server(start_server, default_server) -> ServerProcess:
    """The default model in fp32: the default server where it runs fp32, else one started so. In bf16 (the default on
    CPUs with native bf16) a matrix product's rounding depends on the batch's shape, so a greedy answer may change
    with what runs beside it, as in any bf16 server; tests of answers that must not change use this one."""
    served = httpx.get(default_server.url + "/v1/models").json()["data"][0]["dtype"]
    return default_server if served == "float32" else start_server("--dtype", "float32")


def _nullable_to_anyof(node):
    """The spec mixes OpenAPI 3.0 `nullable: true` into 3.1 schemas; JSON Schema needs it as a union with null."""
    if isinstance(node, list):
        return [_nullable_to_anyof(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_anyof(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="session")
def validate() -> Callable[[str, dict], None]:
    """validate(schema_name, body): raises if body does not match OpenAI's schema of that name."""
    components = _nullable_to_anyof(json.loads(SCHEMAS.read_text())["components"])
    # Streamed completions share CreateCompletionResponse, whose finish_reason cannot be null; OpenAI itself
    # sends null until a choice ends. This derived schema differs from it in that one respect only.
    chunk = json.loads(json.dumps(components["schemas"]["CreateCompletionResponse"]))
    reason = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {"anyOf": [reason, {"type": "null"}]}
    components["schemas"]["CreateCompletionStreamChunk"] = chunk

    def check(name: str, body: dict) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": components}
        jsonschema.Draft202012Validator(schema).validate(body)

    return check


def sse_events(lines: Iterator[str]) -> list:
    """Parse an SSE body strictly: `data: ...` lines separated by blank lines, ending with [DONE]."""
    events, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert not done, "data after [DONE]"
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    assert done, "stream did not end with data: [DONE]"
    return events


# -- structured outputs and tools, shared by the default model's and the families' tests ---------------------------
# Keys and values in Chinese, Thai and Arabic; bounded, so that every model reaches the end of the grammar.
MULTISCRIPT_SCHEMA = {
    "type": "object",
    "properties": {
        "城市": {"enum": ["北京", "東京", "上海"]},
        "ชื่อ": {"type": "string", "maxLength": 12},
        "العدد": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["ภาษาไทย", "العربية", "中文"]}, "maxItems": 3},
    },
    "required": ["城市", "ชื่อ", "العدد", "tags"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}


def check_tool_calls(calls: list[dict]) -> None:
    """Each call has an id, type function, a known name and JSON arguments valid under its parameters schema."""
    assert calls
    for call in calls:
        assert call["id"] and call["type"] == "function"
        jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL_SCHEMAS[call["function"]["name"]])


def streamed_tool_calls(events: list[dict]) -> list[dict]:
    """The tool calls of a streamed chat answer (choice 0), joined from their deltas: id, type and name only in a
    call's first delta, argument text in pieces after it."""
    calls: dict[int, dict] = {}
    for e in events:
        for c in e["choices"]:
            for d in c["delta"].get("tool_calls") or []:
                if d["index"] not in calls:
                    assert d["id"] and d["type"] == "function" and d["function"]["name"], d
                    calls[d["index"]] = {"id": d["id"], "type": "function",
                                         "function": {"name": d["function"]["name"], "arguments": ""}}
                else:
                    assert "id" not in d and "name" not in d.get("function", {}), d
                calls[d["index"]]["function"]["arguments"] += d["function"].get("arguments", "")
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)]
