"""The routes clients of vLLM and SGLang call besides completions: tokenization, model and server info,
probes, and the Responses API. Mounted by :func:`add_extra_routes` from ``api_server``.

Behind the API key (when one is set): ``GET /v1/models/{id}``, ``POST /v1/responses``, ``POST /tokenize``,
``POST /detokenize``, ``GET /tokenizer_info``, ``GET /get_model_info``, ``GET /get_server_info``. Public,
like ``/health``: ``GET|POST /ping`` (vLLM's, same answer as ``/health``) and ``GET /health_generate``
(SGLang's: 200 once the engine generated one token, 503 otherwise).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from shardserve.entrypoints.openai.openapi_docs import request_body
from shardserve.entrypoints.openai.protocol_responses import ResponsesRequest
from shardserve.entrypoints.openai.serving import ServingContext, cancel_on_disconnect
from shardserve.entrypoints.openai.serving_info import (
    health_generate,
    model_info,
    retrieve_model,
    server_info,
)
from shardserve.entrypoints.openai.serving_responses import ResponsesServer
from shardserve.entrypoints.openai.serving_tokenization import (
    DetokenizeRequest,
    TokenizeRequest,
    detokenize,
    tokenize,
    tokenizer_info,
)

M = TypeVar("M", bound=BaseModel)
BODY_MODELS: list[type[BaseModel]] = [TokenizeRequest, DetokenizeRequest, ResponsesRequest]
"""Request bodies of these routes, for ``publish_body_schemas``."""


def add_extra_routes(
    app: FastAPI,
    state: Any,
    context: Callable[[Request], ServingContext],
    parse_body: Callable[[Request, type[M]], Awaitable[M]],
    version: Callable[[], str],
) -> None:
    """Mount the routes on ``app``.

    Args:
        state: the server's ``ServerState`` (engine, names, config, drain state).
        context: the API-key-checking context builder of ``api_server`` (raises 401/503).
        parse_body: reads and validates a JSON body (413 past the size limit, 400 when invalid).
        version: the package version.
    """

    def json(model: BaseModel | dict[str, Any]) -> Response:
        return JSONResponse(model.model_dump(mode="json") if isinstance(model, BaseModel) else model)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        return json(retrieve_model(context(request), model_id))

    @app.post("/v1/responses", openapi_extra=request_body(ResponsesRequest))
    async def responses(request: Request) -> Response:
        ctx = context(request)
        body = await parse_body(request, ResponsesRequest)
        return await cancel_on_disconnect(request, ResponsesServer(ctx).create(body, request))

    @app.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
    async def tokenize_route(request: Request) -> Response:
        ctx = context(request)
        return json(tokenize(ctx, await parse_body(request, TokenizeRequest)))

    @app.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
    async def detokenize_route(request: Request) -> Response:
        ctx = context(request)
        return json(detokenize(ctx, await parse_body(request, DetokenizeRequest)))

    @app.get("/tokenizer_info")
    async def tokenizer_info_route(request: Request) -> Response:
        return json(tokenizer_info(context(request)))

    @app.get("/get_model_info")
    async def get_model_info(request: Request) -> Response:
        return json(model_info(context(request)))

    @app.get("/get_server_info")
    async def get_server_info(request: Request) -> Response:
        return json(server_info(context(request), version()))

    health = next(r.endpoint for r in app.routes if getattr(r, "path", None) == "/health")  # type: ignore[attr-defined]

    @app.get("/ping")
    async def ping() -> Response:
        return await health()

    @app.post("/ping", include_in_schema=False)  # SageMaker-style probe; nothing to document beyond GET
    async def ping_post() -> Response:
        return await health()

    @app.get("/health_generate")
    async def health_generate_route() -> Response:
        reason = state.unusable_reason()
        if reason is not None or state.drain.draining or getattr(state.engine, "restarting", False):
            return JSONResponse({"status": "unhealthy", "reason": reason or "draining or restarting"}, 503)
        ctx = ServingContext(state.engine, state.model_names(), app.state.metrics, state.config)
        if await health_generate(ctx):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "reason": "the engine did not generate a token in time"}, 503)


class RootPathMiddleware:
    """``--root-path``: requests are routed with or without the prefix (a proxy may strip it or not), and
    ``/openapi.json`` names the prefix as the server URL. (What FastAPI's deprecated ``root_path`` did.)"""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "root_path": self.root_path}
        await self.app(scope, receive, send)
