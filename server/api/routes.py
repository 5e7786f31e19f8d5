"""HTTP routes: thin handlers over OpenAIServing."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from .errors import APIError, error_response
from .schemas import ChatCompletionRequest, CompletionRequest
from .serving import OpenAIServing

router = APIRouter()


def serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


Serving = Annotated[OpenAIServing, Depends(serving)]


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, raw: Request, s: Serving) -> Response:
    """Create a text completion."""
    return await s.completions(body, raw)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, raw: Request, s: Serving) -> Response:
    """Create a chat completion."""
    return await s.chat(body, raw)


def _model_card(s: OpenAIServing, created: int) -> dict:
    return {"id": s.model_name, "object": "model", "created": created, "owned_by": "polyglot-server", "max_model_len": s.max_model_len}


@router.get("/v1/models")
async def list_models(raw: Request, s: Serving) -> JSONResponse:
    """List the served model."""
    return JSONResponse({"object": "list", "data": [_model_card(s, raw.app.state.started)]})


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, raw: Request, s: Serving) -> JSONResponse:
    """Describe the served model."""
    if model_id != s.model_name:
        raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
    return JSONResponse(_model_card(s, raw.app.state.started))


@router.get("/health")
async def health(s: Serving) -> Response:
    """Liveness: the process is up and the engine thread is alive."""
    if not s.engine.is_alive():
        return error_response(503, "the engine thread has stopped")
    return JSONResponse({"status": "ok", "running": s.engine.num_running, "waiting": s.engine.num_waiting})
