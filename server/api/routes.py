"""HTTP routes: thin handlers over OpenAIServing."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from .. import __version__
from . import chat, completions, responses, tokenize
from .errors import APIError, error_response
from .outputs import ModelCard, ModelList, json_response
from .schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .serving import OpenAIServing

router = APIRouter()
M = TypeVar("M", bound=BaseModel)


def serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


MAX_DEPTH = 32  # OpenAI's bodies nest 5 deep; a deeper one is an attack on the parser
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_json(data: Any) -> None:
    """A 400 for what JSON allows and the server cannot take: nesting past MAX_DEPTH, and lone UTF-16 surrogates
    (`"\\ud800"`, or CESU-8 bytes), which are not Unicode text: no tokenizer or encoder accepts them."""
    stack = [(data, 0, None)]
    while stack:
        node, depth, field = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"The request body nests more than {MAX_DEPTH} levels deep.", field)
        if isinstance(node, str):
            if _SURROGATE.search(node):
                where = f"'{field}'" if field else "the request body"
                raise APIError(400, f"Invalid value for {where}: it contains a lone UTF-16 surrogate, which is not "
                                    "Unicode text (send UTF-8, or an escaped surrogate pair).", field)
        elif isinstance(node, dict):
            for key, value in node.items():
                stack += [(key, depth + 1, field or key), (value, depth + 1, field or key)]
        elif isinstance(node, list):
            stack += [(value, depth + 1, field) for value in node]


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """Parse the body as JSON whatever its Content-Type says (curl -d sends a form type), then validate it."""

    async def parse(raw: Request) -> M:
        try:
            data = json.loads(await raw.body())
        except ValueError as e:
            raise APIError(400, f"The request body is not valid JSON: {e}") from e
        except RecursionError:
            raise APIError(400, f"The request body nests more than {MAX_DEPTH} levels deep.") from None
        check_json(data)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from e

    return parse


ERRORS = {400: "invalid request", 401: "missing or wrong API key (with --api-key)", 404: "unknown model",
          408: "body too slow", 413: "body too large", 503: "queue full, shutting down or not ready",
          504: "ran past --request-timeout"}


def errors(*codes: int) -> dict[int, Any]:
    """The OpenAPI description of a route's error answers, all in OpenAI's error shape."""
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {code: {"description": ERRORS[code], "content": body} for code in codes}


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """What the OpenAPI document says of a generation route, whose body `json_body` reads: the body's schema
    (models in `openapi_document`), the answer's media types, and the errors."""
    ok = {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}
    return {
        "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}},
        "responses": {200: {"description": "the completion (with stream: server-sent events)", "content": ok},
                      **errors(*ERRORS)},
    }


BODIES = (CompletionRequest, ChatCompletionRequest, responses.ResponsesRequest, TokenizeRequest, DetokenizeRequest)


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document with the generation routes' request bodies and this server's error answers (400,
    where FastAPI would say 422), built once."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for op in (op for ops in schema["paths"].values() for op in ops.values()):
            op["responses"].pop("422", None)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for model in BODIES:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
        detail = {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}
        schemas["ErrorResponse"] = {"type": "object", "required": ["error"], "properties": {"error": detail}}
        app.openapi_schema = schema
    return app.openapi_schema


Serving = Annotated[OpenAIServing, Depends(serving)]
Completion = Annotated[CompletionRequest, Depends(json_body(CompletionRequest))]
Chat = Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))]
Responses = Annotated[responses.ResponsesRequest, Depends(json_body(responses.ResponsesRequest))]
Tokenize = Annotated[TokenizeRequest, Depends(json_body(TokenizeRequest))]
Detokenize = Annotated[DetokenizeRequest, Depends(json_body(DetokenizeRequest))]


@router.post("/v1/completions", **documented(CompletionRequest))
async def create_completion(body: Completion, raw: Request, s: Serving) -> Response:
    """Create a text completion."""
    return await completions.create_completion(s, body, raw)


@router.post("/v1/chat/completions", **documented(ChatCompletionRequest))
async def create_chat_completion(body: Chat, raw: Request, s: Serving) -> Response:
    """Create a chat completion."""
    return await chat.create_chat_completion(s, body, raw)


@router.post("/v1/responses", **documented(responses.ResponsesRequest))
async def create_response(body: Responses, raw: Request, s: Serving) -> Response:
    """Create a model response (OpenAI's Responses API), run as the equivalent chat."""
    return await responses.create_response(s, body, raw)


@router.get("/v1/responses/{response_id}", responses=errors(401, 404))
async def retrieve_response(response_id: str, s: Serving) -> Response:
    """A stored response (store: true), until this process evicts it."""
    return responses.retrieve_response(s, response_id)


@router.delete("/v1/responses/{response_id}", responses=errors(401, 404))
async def delete_response(response_id: str, s: Serving) -> Response:
    """Forget a stored response."""
    return responses.delete_response(s, response_id)


@router.post("/tokenize", **documented(TokenizeRequest))
async def create_tokenize(body: Tokenize, s: Serving) -> Response:
    """The token ids of a prompt, or of chat messages as the chat route renders them, with the context length."""
    return await tokenize.tokenize(s, body)


@router.post("/detokenize", **documented(DetokenizeRequest))
async def create_detokenize(body: Detokenize, s: Serving) -> Response:
    """The text of token ids."""
    return await tokenize.detokenize(s, body)


def _model_card(s: OpenAIServing, created: int) -> ModelCard:
    info = s.info
    return ModelCard(id=info.name, created=created, family=info.family.name, max_model_len=info.max_model_len,
                     dtype=info.dtype, checkpoint_dtype=info.checkpoint_dtype)


@router.get("/v1/models", responses=errors(401))
async def list_models(raw: Request, s: Serving) -> Response:
    """List the served model."""
    return json_response(ModelList(data=[_model_card(s, raw.app.state.started)]))


@router.get("/v1/models/{model_id:path}", responses=errors(400, 401, 404))
async def retrieve_model(model_id: str, raw: Request, s: Serving) -> Response:
    """Describe the served model."""
    if model_id != s.info.name:
        raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
    return json_response(_model_card(s, raw.app.state.started))


def _engine_down(s: OpenAIServing) -> Response:
    why = f"the engine cannot run: {s.engine.broken}" if s.engine.broken else "the engine thread has stopped"
    return error_response(503, why)


@router.get("/health", responses=errors(503))
async def health(s: Serving) -> Response:
    """Liveness: the process is up and the engine thread is alive (503 otherwise: restart the pod)."""
    if not s.engine.is_alive():
        return _engine_down(s)
    return JSONResponse({"status": "ok", "running": s.engine.num_running, "waiting": s.engine.num_waiting})


STALL_SECONDS = 60.0  # an engine with work that has not finished a step for this long is not ready


@router.get("/ready", responses=errors(503))
async def ready(raw: Request, s: Serving) -> Response:
    """Readiness: the model is loaded, the server is not draining, and the engine moved recently."""
    if getattr(raw.app.state, "draining", False):
        return error_response(503, "the server is shutting down", headers={"Retry-After": "1"})
    if not s.engine.is_alive():
        return _engine_down(s)
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
