"""Server-sent events in OpenAI's framing: `data: {json}` blocks, then `data: [DONE]`."""

import json
from typing import Any


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"
