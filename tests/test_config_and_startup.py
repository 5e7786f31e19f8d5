"""Settings come from flags or POLYGLOT_* variables; start-up failures say what to do."""

import os
import subprocess
import sys

import httpx

from server.config import parse_settings
from tests.conftest import ROOT


def test_flags_override_environment_override_defaults():
    assert parse_settings([], env={}).port == 8000
    env = {"POLYGLOT_PORT": "9001", "POLYGLOT_MODEL": "/models/x", "POLYGLOT_MAX_BATCH_SIZE": "8"}
    s = parse_settings([], env=env)
    assert (s.port, s.model, s.max_batch_size) == (9001, "/models/x", 8)
    assert parse_settings(["--port", "9002"], env=env).port == 9002


def launch_server(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "server", "--port", "1", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_model_that_is_not_there_fails_at_once_naming_it():
    procs = (launch_server("--model", "DAMO-NLP-MT/polylm-13b", env={"HF_HUB_OFFLINE": "1"}),  # side by side
             launch_server("--model", "/no/such/model.gguf"), launch_server("--model", "./no-such-dir"))
    r = finished(procs[0])  # a hub id, offline
    assert r.returncode != 0
    assert "DAMO-NLP-MT/polylm-13b" in r.stderr and "cannot be reached" in r.stderr
    r = finished(procs[1])
    assert r.returncode != 0 and "GGUF file not found" in r.stderr
    r = finished(procs[2])
    assert r.returncode != 0 and "neither a model directory" in r.stderr


def test_environment_configures_the_server(start_server, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("POLYGLOT_SERVED_MODEL_NAME", "from-env")
    monkeypatch.setenv("POLYGLOT_MAX_MODEL_LEN", "128")
    server = start_server("--model", str(tiny_llama_dir))
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["id"] == "from-env" and card["max_model_len"] == 128


def test_kv_cache_memory_sets_the_token_budget(start_server, tiny_llama_dir):
    from server.engine.loader import parse_bytes

    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512MiB") == 2**29 and parse_bytes("2GB") == 2 * 10**9
    # tiny Llama: 2 layers x 2 KV heads x 16 dims x keys and values x 4 bytes = 512 bytes a token
    too_small = launch_server("--model", str(tiny_llama_dir), "--kv-cache-memory", "64KiB")  # starts meanwhile
    server = start_server("--model", str(tiny_llama_dir), "--kv-cache-memory", "512KiB", "--served-model-name", "t")
    body = {"model": "t", "prompt": "Hello", "max_tokens": 300, "temperature": 0}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    r = httpx.post(server.url + "/v1/completions", json={**body, "n": 4}, timeout=60)  # 4 rows x 302 > 1024 tokens
    assert r.status_code == 400 and "max_batch_tokens=1024" in r.json()["error"]["message"]
    too_small = finished(too_small)
    assert too_small.returncode != 0 and "--kv-cache-memory 64KiB holds 128 tokens" in too_small.stderr
