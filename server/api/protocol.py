"""uvicorn's HTTP/1.1 protocol (h11) with the connection limits a server open to any client needs:

- a request's line and headers must arrive within `header_timeout` seconds of the connection opening (or of the
  previous response): else 408 and the connection closes (slowloris sends one header line every few seconds); a
  connection that has sent nothing of a request by then is closed without an answer, as an idle one;
- its body within `body_timeout` seconds (the app answers 408 at that point, see BodyGuardMiddleware; here the
  connection closes a second later whatever the app did, for bodies nobody reads);
- a client that stops reading its response (a stream) is dropped once what it left unread fills the socket's
  send buffer (SEND_BUFFER: fixed, where Linux would grow it to 4 MiB) and the transport's (64 KiB) and stays so
  for `write_timeout` seconds: the connection is aborted, which the app sees as a disconnect, so the request is
  aborted and its rows freed. Nothing more is buffered meanwhile: the app's sends wait while writing is paused;
- past `max_connections` open connections a new one gets 503 and is closed.
uvicorn's own `timeout_keep_alive` closes idle keep-alive connections.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body

log = logging.getLogger("server.connections")
SEND_BUFFER = 256 * 1024  # bytes (Linux doubles it); SSE streams come at a few KB/s, far under what it carries


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10
    body_timeout: float = 30
    write_timeout: float = 30
    max_connections: int = 1000
    on_drop: Callable[[str], None] | None = None  # told the reason of each connection dropped (for the metrics)


def protocol_class(limits: ConnectionLimits) -> type[H11Protocol]:
    """The protocol class to hand uvicorn (`uvicorn.Config(http=...)`), with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(error_body(status, message, code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "x-content-type-options: nosniff\r\nconnection: close\r\n" + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n")
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    limits = ConnectionLimits()
    _logged: dict[str, float] = {}  # reason -> when it was last logged (one line per reason per 10 s at most)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._timer = self._write_timer = None
        self._waiting = ""
        self._begun = False  # some bytes of the next request have come
        if len(self.connections) > self.limits.max_connections:
            self._drop("too_many_connections", _raw_response(
                503, "Service Unavailable", f"The server has its limit of {self.limits.max_connections} open "
                "connections (--max-connections); retry later.", "too_many_connections"))
            return
        self._expect_head()

    # -- reading: the head, then the body, each against its clock ---------------------------------------------
    def _arm(self, waiting: str, seconds: float) -> None:
        self._cancel()
        self._waiting = waiting
        self._timer = self.loop.call_later(seconds, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._waiting = None, ""

    def _expect_head(self) -> None:
        self._begun = False
        self._arm("head", self.limits.header_timeout)

    def _follow(self) -> None:
        """Move the clock along with what h11 has parsed so far."""
        state = self.conn.their_state
        if self._waiting == "head" and state is not h11.IDLE:
            if state is h11.SEND_BODY:
                self._arm("body", self.limits.body_timeout + 1)
            else:
                self._cancel()
        elif self._waiting == "body" and state is not h11.SEND_BODY:
            self._cancel()
        elif not self._waiting and state is h11.IDLE and self.conn.our_state is h11.IDLE:  # the next request
            self._expect_head()

    def data_received(self, data: bytes) -> None:
        self._begun = self._begun or self._waiting == "head"
        super().data_received(data)
        if not self.transport.is_closing():
            self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._follow()

    def _expired(self) -> None:
        waiting, self._timer, self._waiting = self._waiting, None, ""
        if self.transport.is_closing():
            return
        if waiting == "head" and not self._begun:
            self.transport.close()  # idle: nothing to answer
        elif waiting == "head":
            self._drop("header_timeout", _raw_response(
                408, "Request Timeout", f"The request's headers did not arrive within {self.limits.header_timeout:g} s "
                "(--header-timeout).", "timeout"))
        elif self.conn.their_state is h11.SEND_BODY:  # the app has answered 408 by now, or never read the body
            self._drop("body_timeout")

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a control character in a header, a bad request line): OpenAI's error
        shape, as every other answer."""
        self.transport.write(_raw_response(400, "Bad Request", f"{msg} The request is not valid HTTP/1.1.",
                                           "invalid_http"))
        self.transport.close()

    # -- writing: a client that stops reading ------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _stalled(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            self._drop("write_timeout")

    # -- ending ---------------------------------------------------------------------------------------------------
    def _drop(self, reason: str, answer: bytes | None = None) -> None:
        now = time.monotonic()
        if now - self._logged.get(reason, 0) > 10:
            self._logged[reason] = now
            log.warning("dropping a connection from %s: %s (one line per 10 s for this reason; the metric "
                        "polyglot_dropped_connections_total counts them all)", self.client and self.client[0],
                        reason.replace("_", " "))
        if self.limits.on_drop is not None:
            self.limits.on_drop(reason)
        if answer is None:
            self.transport.abort()  # nothing buffered for this client is worth sending
        else:
            self.transport.write(answer)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)
