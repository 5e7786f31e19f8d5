#!/usr/bin/env python
"""Copy the response schemas the tests validate against, and every schema they reference, out of OpenAI's
published API description into tests/data/openai-schemas.json (so the tests run wherever the repo is cloned).

    python scripts/extract_schemas.py [path/to/openai-openapi.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = ROOT.parent / "shared" / "spec" / "openai-openapi.json"
OUT = ROOT / "tests" / "data" / "openai-schemas.json"
ROOTS = ["CreateCompletionResponse", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
         "ListModelsResponse", "Model", "ErrorResponse", "Response", "ResponseCreatedEvent", "ResponseInProgressEvent",
         "ResponseCompletedEvent", "ResponseFailedEvent", "ResponseOutputItemAddedEvent", "ResponseOutputItemDoneEvent",
         "ResponseContentPartAddedEvent", "ResponseContentPartDoneEvent", "ResponseTextDeltaEvent",
         "ResponseTextDoneEvent", "ResponseFunctionCallArgumentsDeltaEvent", "ResponseFunctionCallArgumentsDoneEvent"]


def refs(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def closure(schemas: dict) -> dict:
    keep, todo = {}, list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep[name] = schemas[name]
            todo += refs(keep[name])
    return dict(sorted(keep.items()))


def main() -> None:
    spec = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SPEC).read_text())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"components": {"schemas": closure(spec["components"]["schemas"])}}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
