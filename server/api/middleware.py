"""Request ids and request logs, API keys, the body size limit and draining for shutdown, as plain ASGI middleware:
streamed responses pass through untouched."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid

from starlette.middleware.cors import CORSMiddleware

from ..logs import request_id
from .errors import error_response

log = logging.getLogger("server.requests")
PROBES = ("/health", "/ready", "/metrics")
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9_.:/+=@-]{1,128}")
# on every response: no MIME sniffing, and pages may load and call only this server (the playground works offline
# and a stray script cannot send prompts elsewhere); FastAPI's /docs and /redoc (off unless --docs) load their
# scripts from a CDN, so they go without the policy
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                                 b"frame-ancestors 'self'"),
]
DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc")


def _header(scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return b""


class RequestLogMiddleware:
    """Takes the client's X-Request-ID (when it is a sane ASCII token) or makes one, echoes it on the response with
    the security headers, and logs one line per request when its response (stream included) has ended: method,
    path, status, tokens, latency. Prompt text only with --log-prompts (the serving layer then leaves it in the request's state)."""

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
        headers = [(b"x-request-id", rid.encode())] + SECURITY_HEADERS[:1 if scope["path"] in DOCS else 2]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        token = request_id.set(rid)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            job = state.get("job")
            usage = job.usage().model_dump() if job is not None else {}
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


def _guarded(path: str) -> bool:
    """The API's routes: `/v1/*`, and the tokenizer's (health, readiness, version and metrics are the operators')."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


class ApiKeyMiddleware:
    """The API's routes need `Authorization: Bearer <key>` for one of the keys, compared in constant time; health,
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
        if (scope["type"] == "http" and _guarded(scope["path"]) and scope["method"] != "OPTIONS"
                and not self._allowed(scope)):
            response = error_response(401, "Invalid or missing API key: send it as 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyGuardMiddleware:
    """The request body: over `limit` bytes it gets 413 before it is read (by Content-Length) or as soon as it passes
    the limit (chunked uploads); one that takes longer than `timeout` seconds to arrive gets 408; a request framed
    two ways at once (Transfer-Encoding and Content-Length, the shape of request smuggling) gets 400. The last two
    close the connection, whose framing can no longer be trusted."""

    def __init__(self, app, limit: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    def _too_large(self):
        return error_response(413, f"The request body is larger than this server's limit of {self.limit} bytes "
                                   "(--max-body-bytes).", code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared and _header(scope, b"transfer-encoding"):
            response = error_response(400, "The request has both Transfer-Encoding and Content-Length headers; "
                                           "send one of them.", code="bad_framing", headers=CLOSE)
            await response(scope, receive, send)
            return
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large()(scope, receive, send)
            return
        seen, more = 0, True
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def guarded():
            nonlocal seen, more
            if not more:  # the body is in; what follows is the wait for a disconnect, which has no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):  # wait_for would drop a cancel that comes with a message
                    message = await receive()
            except TimeoutError:
                raise _SlowBody from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
                if seen > self.limit:
                    raise _TooLarge
            return message

        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded, tracked_send)
        except _TooLarge:
            if not started:
                await self._too_large()(scope, receive, send)
        except _SlowBody:
            if not started:
                response = error_response(408, f"The request body did not arrive within this server's limit of "
                                               f"{self.timeout:g} s (--body-timeout).", code="timeout", headers=CLOSE)
                await response(scope, receive, send)


CLOSE = {"Connection": "close"}


class _TooLarge(Exception):
    pass


class _SlowBody(Exception):
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


class _HeaderNames(list):
    """The allowed request headers, and every `x-stainless-*` one: the OpenAI SDKs send several (OS, runtime,
    retry count, timeout...), and their names grow with the SDKs' versions."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.startswith("x-stainless-") or super().__contains__(name)


class ApiCORSMiddleware(CORSMiddleware):
    """Starlette's CORS with the headers the OpenAI SDKs send allowed: a preflight that passes has every header it
    asked for allowed by name."""

    def __init__(self, app, origins: list[str]) -> None:
        super().__init__(app, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                         allow_headers=["Authorization", "Content-Type", "X-Request-ID", "OpenAI-Organization",
                                        "OpenAI-Project", "OpenAI-Beta", "Idempotency-Key"],
                         expose_headers=["X-Request-ID"])
        self.allow_headers = _HeaderNames(self.allow_headers)

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        requested = request_headers.get("access-control-request-headers")
        if response.status_code == 200 and requested:
            response.headers["Access-Control-Allow-Headers"] = requested
        return response
