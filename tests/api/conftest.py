"""The API over the fake engine (tests/fake_engine.py): a real uvicorn server on a real port, in this process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn

from server.api.app import create_app
from server.api.protocol import ConnectionLimits, protocol_class
from server.config import Settings
from server.engine.client import ModelInfo
from server.families import FAMILIES
from tests.conftest import free_port
from tests.fake_engine import FakeEngine

MODEL = "fake"


class InProcessServer:
    def __init__(self, engine: FakeEngine, settings: Settings) -> None:
        self.engine = engine
        self.app = create_app(settings, engine, ModelInfo(MODEL, FAMILIES["hf"], engine.config.max_model_len))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        limits = ConnectionLimits(on_drop=self.app.state.metrics.dropped_connection)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                                    http=protocol_class(limits)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the in-process server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def fake_server(tokenizer) -> Iterator[Callable[..., InProcessServer]]:
    """fake_server(**settings) -> a started server over a new FakeEngine (settings: Settings fields)."""
    servers: list[InProcessServer] = []

    def start(**settings) -> InProcessServer:
        servers.append(InProcessServer(FakeEngine(tokenizer), Settings(**settings)))
        assert httpx.get(servers[-1].url + "/health").status_code == 200
        return servers[-1]

    yield start
    for s in servers:
        s.stop()
