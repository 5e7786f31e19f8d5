"""Server-sent events in OpenAI's framing: `data: {json}` blocks, then `data: [DONE]`."""

import json
from typing import Any

from pydantic import BaseModel


def sse(payload: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> str:
    """One event: a typed object (outputs.py), without the fields in `exclude`, or an error body."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json(exclude=exclude)}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"
