"""HTTP routes: thin handlers over OpenAIServing."""

from __future__ import annotations

from importlib import metadata
from typing import Annotated, TypeVar

import json
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from .. import __version__
from .errors import APIError, error_response
from .schemas import ChatCompletionRequest, CompletionRequest
from .serving import OpenAIServing

router = APIRouter()
M = TypeVar("M", bound=BaseModel)


def serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """Parse the body as JSON whatever its Content-Type says (curl -d sends a form type), then validate it."""

    async def parse(raw: Request) -> M:
        try:
            data = json.loads(await raw.body())
        except ValueError as e:
            raise APIError(400, f"The request body is not valid JSON: {e}") from e
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from e

    return parse


Serving = Annotated[OpenAIServing, Depends(serving)]
Completion = Annotated[CompletionRequest, Depends(json_body(CompletionRequest))]
Chat = Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))]


@router.post("/v1/completions")
async def create_completion(body: Completion, raw: Request, s: Serving) -> Response:
    """Create a text completion."""
    return await s.completions(body, raw)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: Chat, raw: Request, s: Serving) -> Response:
    """Create a chat completion."""
    return await s.chat(body, raw)


def _model_card(s: OpenAIServing, created: int) -> dict:
    info = s.info
    return {"id": info.name, "object": "model", "created": created, "owned_by": "polyglot-server",
            "family": info.family.name, "max_model_len": info.max_model_len, "dtype": info.dtype,
            "checkpoint_dtype": info.checkpoint_dtype}


@router.get("/v1/models")
async def list_models(raw: Request, s: Serving) -> JSONResponse:
    """List the served model."""
    return JSONResponse({"object": "list", "data": [_model_card(s, raw.app.state.started)]})


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, raw: Request, s: Serving) -> JSONResponse:
    """Describe the served model."""
    if model_id != s.info.name:
        raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
    return JSONResponse(_model_card(s, raw.app.state.started))


@router.get("/health")
async def health(s: Serving) -> Response:
    """Liveness: the process is up and the engine thread is alive (503 otherwise: restart the pod)."""
    if not s.engine.is_alive():
        return error_response(503, "the engine thread has stopped")
    return JSONResponse({"status": "ok", "running": s.engine.num_running, "waiting": s.engine.num_waiting})


STALL_SECONDS = 60.0  # an engine with work that has not finished a step for this long is not ready


@router.get("/ready")
async def ready(raw: Request, s: Serving) -> Response:
    """Readiness: the model is loaded, the server is not draining, and the engine moved recently."""
    if getattr(raw.app.state, "draining", False):
        return error_response(503, "the server is shutting down", headers={"Retry-After": "1"})
    if not s.engine.is_alive():
        return error_response(503, "the engine thread has stopped")
    stalled = s.engine.stalled_for()
    if stalled > STALL_SECONDS:
        return error_response(503, f"the engine has not finished a step for {stalled:.0f} s")
    return JSONResponse({"status": "ready", "model": s.info.name})


@router.get("/metrics")
async def metrics(raw: Request) -> Response:
    """Prometheus metrics."""
    m = raw.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/version")
async def version(s: Serving) -> JSONResponse:
    """The server's version and what it runs on."""
    return JSONResponse({"version": __version__, "model": s.info.name, "family": s.info.family.name,
                         "dtype": s.info.dtype, "checkpoint_dtype": s.info.checkpoint_dtype,
                         "torch": metadata.version("torch"),
                         "transformers": metadata.version("transformers")})
