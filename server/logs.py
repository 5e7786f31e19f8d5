"""Logging: every line carries the request id it was written under; text or one JSON object per line."""

from __future__ import annotations

import contextvars
import json
import logging
import time
import unicodedata

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# fields a record may carry (logging's `extra=`) that the JSON lines include
FIELDS = ("method", "path", "status", "prompt_tokens", "completion_tokens", "latency_ms", "prompt")


# Characters a client can put in a log line (through a URL path, a model name, a prompt) that would forge a line
# or steer a terminal: C0 and C1 controls, DEL, line and paragraph separators, and format characters (bidi
# overrides, zero-width). Text lines show them escaped as Python does (`\x1b`), JSON lines as `\u001b`.
_UNSAFE = [c for c in (*range(0x10000), *range(0xE0000, 0xE0080))
           if unicodedata.category(chr(c)) in ("Cc", "Cf", "Zl", "Zp")] + [0x110BD, 0x110CD]
_TEXT_ESCAPES = {c: ascii(chr(c))[1:-1] for c in _UNSAFE}
_TEXT_ESCAPES_KEEP_LINES = {**_TEXT_ESCAPES, ord("\n"): "\n"}


def _json_escape(c: int) -> str:
    if c < 0x10000:
        return f"\\u{c:04x}"
    c -= 0x10000
    return f"\\u{0xD800 + (c >> 10):04x}\\u{0xDC00 + (c & 0x3FF):04x}"


_JSON_ESCAPES = {c: _json_escape(c) for c in _UNSAFE if c >= 0x7F}  # json.dumps escapes the C0 controls itself


class TextFormatter(logging.Formatter):
    """One line per record, whatever the record holds; a traceback keeps its own line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_TEXT_ESCAPES)

    def formatException(self, ei) -> str:
        return super().formatException(ei).translate(_TEXT_ESCAPES_KEEP_LINES)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (`-` outside a request, e.g. on the engine thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "request_id": getattr(record, "request_id", "-"),
                "message": record.getMessage()}
        line.update({k: getattr(record, k) for k in FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False).translate(_JSON_ESCAPES)


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # through our handler, not uvicorn's own
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # one line per request comes from the middleware
