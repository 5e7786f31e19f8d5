"""SIGTERM on a real server process: drain, 503s, streams finish or end with an error event, exit code."""

import json
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import start_side_by_side

BODY = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "stream": True, "ignore_eos": True}


def stream_in_background(url: str, max_tokens: int) -> tuple[threading.Event, list[str], threading.Thread]:
    """Start a streamed completion; the event is set once its first token has arrived."""
    first, lines = threading.Event(), []

    def run() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**BODY, "max_tokens": max_tokens}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        first.set()
        except httpx.HTTPError:  # the server was killed mid-stream
            lines.append("closed")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return first, lines, thread


@pytest.fixture(scope="module")
def servers(start_server):
    """One server per test (each is shut down), started together."""
    return start_side_by_side(start_server, drain=("--shutdown-timeout", "60"), past=("--shutdown-timeout", "1"),
                              second=("--shutdown-timeout", "60"))


def sigterm_mid_stream(server, max_tokens: int):
    """A stream running on the server, and SIGTERM sent once its first token came."""
    first, lines, thread = stream_in_background(server.url, max_tokens)
    assert first.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    return server, lines, thread


def test_sigterm_drains_streams_then_exits_0(servers):
    server, lines, thread = sigterm_mid_stream(servers["drain"], 80)
    time.sleep(0.3)
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 503 and ready.json()["error"]["type"] == "server_error"
    late = httpx.post(server.url + "/v1/completions", json={**BODY, "stream": False, "max_tokens": 2})
    assert late.status_code == 503 and late.headers["retry-after"] and late.json()["error"]["code"] == "shutting_down"
    thread.join(60)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"  # the stream ran to its end (80 tokens)
    assert server.proc.wait(30) == 0


def test_sigterm_past_the_timeout_ends_streams_with_an_error_event(servers):
    server, lines, thread = sigterm_mid_stream(servers["past"], 1500)
    started = time.monotonic()
    thread.join(60)
    assert lines[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(lines[-2][6:])["error"]["message"]
    assert server.proc.wait(30) == 0 and time.monotonic() - started < 15


def test_a_second_sigterm_exits_at_once(servers):
    server, _, _ = sigterm_mid_stream(servers["second"], 1500)
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) != 0
