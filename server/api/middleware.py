"""Request ids and request logs, API keys, the body size limit and draining for shutdown, as plain ASGI middleware:
streamed responses pass through untouched."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from ..logs import request_id
from .errors import error_response

log = logging.getLogger("server.requests")
PROBES = ("/health", "/ready", "/metrics")
_ACCEPTED_ID = re.compile(r"[\w.:/+=@-]{1,128}")


def _header(scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return b""


class RequestLogMiddleware:
    """Takes the client's X-Request-ID (when it is a sane token) or makes one, echoes it on the response, and logs
    one line per request when its response (stream included) has ended: method, path, status, tokens, latency.
    Prompt text only with --log-prompts (the serving layer then leaves it in the request's state)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id").decode("latin-1")
        rid = given if _ACCEPTED_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = [500]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        token = request_id.set(rid)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            job = state.get("job")
            usage = job.usage() if job is not None else {}
            latency = round((time.perf_counter() - start) * 1000, 1)
            metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
            if metrics is not None:
                metrics.request_done(scope["path"], status[0], latency / 1000, usage)
            level = logging.DEBUG if scope["path"] in PROBES else logging.INFO  # probes every few seconds: quiet
            extra = {"method": scope["method"], "path": scope["path"], "status": status[0], "latency_ms": latency,
                     "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}
            fmt, args = "%s %s %d %.1f ms", [scope["method"], scope["path"], status[0], latency]
            if "prompt" in state:
                extra["prompt"] = state["prompt"]
                fmt, args = fmt + " prompt=%r", [*args, state["prompt"]]
            log.log(level, fmt, *args, extra=extra)
            request_id.reset(token)


class ApiKeyMiddleware:
    """`/v1/*` needs `Authorization: Bearer <key>` for one of the keys, compared in constant time; health,
    readiness, version and metrics stay open. CORS preflights (OPTIONS) carry no credentials."""

    def __init__(self, app, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope) -> bool:
        scheme, _, token = _header(scope, b"authorization").partition(b" ")
        matched = False
        for key in self.keys:  # every key compared, so the time says nothing about which one nearly matched
            matched |= hmac.compare_digest(token.strip(), key)
        return scheme.lower() == b"bearer" and matched

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS"
                and not self._allowed(scope)):
            response = error_response(401, "Invalid or missing API key: send it as 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Requests with a body over `limit` bytes get 413 before it is read (by Content-Length) or as soon as it passes
    the limit (chunked uploads)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self):
        return error_response(413, f"The request body is larger than this server's limit of {self.limit} bytes "
                                   "(--max-body-bytes).", code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large()(scope, receive, send)
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except _TooLarge:
            if not started:
                await self._too_large()(scope, receive, send)


class _TooLarge(Exception):
    pass


class DrainMiddleware:
    """Counts the generation requests in flight (`app.state.inflight`); while the server drains for shutdown
    (`app.state.draining`), new ones get 503 with Retry-After, so a load balancer retries them elsewhere."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        if getattr(state, "draining", False):
            response = error_response(503, "The server is shutting down; retry on another replica.",
                                      code="shutting_down", headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        state.inflight = getattr(state, "inflight", 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.inflight -= 1
