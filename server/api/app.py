"""The app factory: builds the engine (or takes one), starts it for the app's lifetime, wires routes and errors."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from ..config import Settings
from ..engine.client import EngineClient, ModelInfo
from ..families import FAMILIES
from .errors import install_handlers
from .metrics import Metrics
from .middleware import ApiCORSMiddleware, ApiKeyMiddleware, BodyGuardMiddleware, DrainMiddleware, RequestLogMiddleware
from .playground import mount_playground
from .routes import openapi_document, router
from .serving import OpenAIServing

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: EngineClient | None = None, info: ModelInfo | None = None) -> FastAPI:
    """The app over `engine`, or over the model the settings name (loaded now: torch comes with it)."""
    if engine is None:
        from ..engine.build import build_engine

        engine, info = build_engine(settings)
    info = info or ModelInfo("model", FAMILIES["hf"], engine.config.max_model_len)
    metrics = Metrics(engine, engine.devices, info.name)
    serving = OpenAIServing(engine, info, metrics, settings.request_timeout or None, settings.log_prompts,
                            settings.responses_store_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A full garbage collection walks every object the model and tokenizer made (about 400,000 for the
        # default model: 0.2 s with every stream stalled). Move them out of the collector's sight, once.
        gc.collect()
        gc.freeze()
        engine.start()
        watch_signals(app, engine, settings.shutdown_timeout)
        yield
        engine.stop()

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="polyglot-server", version=__version__, lifespan=lifespan, **docs)
    app.openapi = lambda: openapi_document(app)
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.draining = False
    app.state.inflight = 0
    app.state.exit = None  # set by the process that serves the app: how to make it stop listening and exit
    app.state.started = int(time.time())
    install_handlers(app)
    app.include_router(router)
    if settings.playground:
        mount_playground(app)
    # the last added runs first: request id, then CORS (answers preflights), then the API key
    keys = [k.strip() for k in (settings.api_key or "").split(",") if k.strip()]
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys)
    if settings.cors_origins:
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(ApiCORSMiddleware, origins=origins)
    app.add_middleware(DrainMiddleware)
    app.add_middleware(BodyGuardMiddleware, limit=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(RequestLogMiddleware)
    return app


def watch_signals(app: FastAPI, engine: EngineClient, timeout: float) -> None:
    """SIGTERM (or SIGINT): readiness turns 503 and new generation requests get 503 at once; requests in flight,
    streams included, run on for up to `timeout` seconds; whatever is left is ended with an error (an error event
    in a stream); then the server exits (0). A second signal exits at once."""
    loop = asyncio.get_running_loop()

    async def drain() -> None:
        log.info("shutting down: draining %d request(s) for up to %g s", app.state.inflight, timeout)
        deadline = loop.time() + timeout
        while app.state.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if app.state.inflight:
            log.warning("shutting down: ending %d request(s) still running", app.state.inflight)
            engine.fail_all("the server is shutting down")
            deadline = loop.time() + 5
            while app.state.inflight and loop.time() < deadline:
                await asyncio.sleep(0.05)
        if app.state.exit is not None:
            app.state.exit()

    def on_signal() -> None:
        if app.state.draining:
            log.warning("second signal: exiting now")
            os._exit(1)
        app.state.draining = True
        app.state.drain_task = loop.create_task(drain())

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (an app run in-process)
            return
