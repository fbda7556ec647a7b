"""The HTTP server: FastAPI routes, error mapping and the uvicorn launcher.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /generate`` (SGLang native), ``GET /metrics`` (Prometheus), ``GET /version``, ``GET /cluster/status``
(layout, ranks, KV cache and throughput; behind the API key when one is set), and those of
:mod:`~shardserve.entrypoints.openai.extra_routes` (tokenization, model/server info, probes, ``/v1/responses``).

Every failure is answered in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``:
400 for bad parameters, malformed JSON (lone surrogates and nesting past the JSON parser's depth limit
included), unsupported fields (:mod:`.fields`) and too long prompts; 401 for a missing API key; 404 for
an unknown model or route; 413 for too large a body; 429 (with ``Retry-After``) when the engine queue
is full; 503 while the model loads, while the ranks restart after a failure, while shutting down, or
after the engine died; 504 past the request timeout. Client errors are :class:`InvalidRequestError`;
any other exception is a bug: it is logged with an error id and answered 500 naming that id, by
:class:`UnexpectedErrorMiddleware`, which (unlike Starlette's ``ServerErrorMiddleware``, which re-raises
and so makes uvicorn drop the connection) keeps the keep-alive connection usable.
``/openapi.json`` describes every request body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shardserve.config import ServerConfig
from shardserve.engine.async_llm import AsyncLLM, EngineDeadError, EngineOverloadedError, RequestFailedError
from shardserve.entrypoints.openai.access import check_api_key, install_cors, warn_if_open
from shardserve.entrypoints.openai.cluster_status import build_cluster_status
from shardserve.entrypoints.openai.extra_routes import BODY_MODELS, RootPathMiddleware, add_extra_routes
from shardserve.entrypoints.openai.fields import check_fields
from shardserve.entrypoints.openai.lifecycle import DrainState, GracefulServer, InFlightCounter
from shardserve.entrypoints.openai.openapi_docs import publish_body_schemas, request_body
from shardserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    InvalidRequestError,
    ModelCard,
    ModelList,
)
from shardserve.entrypoints.openai.serving import (
    RequestTimeoutError,
    ServingContext,
    cancel_on_disconnect,
    error_body,
)
from shardserve.entrypoints.openai.serving_chat import ChatServer
from shardserve.entrypoints.openai.serving_completion import CompletionServer
from shardserve.entrypoints.openai.serving_generate import GenerateServer
from shardserve.metrics import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
RETRY_AFTER_S = 1


class EngineNotReadyError(Exception):
    """The engine is still loading, or failed to load."""


@dataclass
class ServerState:
    """What the routes read: the engine (None while it loads) and the names it is served under."""

    engine: AsyncLLM | None
    served_model_names: list[str]
    """Names accepted in ``model``; the first is reported. Empty uses ``engine.model_name``."""
    config: ServerConfig = field(default_factory=ServerConfig)
    error: str | None = None
    """Why the engine is unusable (failed load, dead worker); /health answers 503 while set."""
    load_engine: Callable[[], AsyncLLM] | None = None
    """Blocking loader run in a thread at server start-up when ``engine`` is None (see :func:`run_server`)."""
    on_load_error: Callable[[BaseException], None] | None = None
    """Called (in the event loop) when ``load_engine`` raises."""
    on_engine_dead: Callable[[], None] | None = None
    """Called (in the event loop) when the loaded engine stops for good (restarts exhausted)."""
    drain: DrainState = field(default_factory=DrainState)
    """Requests in flight, and whether a SIGTERM drain is under way."""

    def unusable_reason(self) -> str | None:
        """Why requests cannot be served now (loading, failed load, dead engine), None when ready."""
        if self.error is None and self.engine is not None and getattr(self.engine, "errored", False):
            self.error = f"the engine stopped: {getattr(self.engine, 'dead_reason', None) or 'see the server log'}"
        if self.error is not None:
            return self.error
        return "the model is still loading" if self.engine is None else None

    def model_names(self) -> list[str]:
        """The served names, falling back to the engine's own name."""
        if self.served_model_names:
            return self.served_model_names
        return [self.engine.model_name] if self.engine is not None else []


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI application over ``state``; starts ``state.load_engine`` in a thread on start-up if set."""
    app = FastAPI(title="shardserve", lifespan=_lifespan(state))
    app.state.server_state = state
    metrics = ServerMetrics(state.served_model_names[0] if state.served_model_names else "")
    app.state.metrics = metrics
    _install_error_handlers(app, state)
    _add_routes(app, state, metrics)
    publish_body_schemas(app, [CompletionRequest, ChatCompletionRequest, GenerateRequest, *BODY_MODELS])
    app.add_middleware(UnexpectedErrorMiddleware)  # innermost of ours: answers 500s before the counters
    app.add_middleware(InFlightCounter, drain=state.drain)
    if state.config.root_path:
        app.add_middleware(RootPathMiddleware, root_path=state.config.root_path)
    install_cors(app, state.config)  # outermost, so preflights are answered before anything else
    return app


# ------------------------------------------------------------------------------------- routes


def _add_routes(app: FastAPI, state: ServerState, metrics: ServerMetrics) -> None:
    def context(request: Request) -> ServingContext:
        check_api_key(state.config, request)
        if state.drain.draining:
            raise EngineNotReadyError("the server is shutting down")
        reason = state.unusable_reason()
        if reason is not None:
            raise EngineNotReadyError(reason)
        if not metrics.model_name:
            metrics.model_name = state.model_names()[0]
        return ServingContext(state.engine, state.model_names(), metrics, state.config)

    @app.get("/health")
    async def health() -> Response:
        reason = state.unusable_reason()  # also notices an engine that died
        if state.error is not None:
            return JSONResponse({"status": "error", "error": state.error}, status_code=503)
        if reason is not None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if state.drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if getattr(state.engine, "restarting", False):
            return JSONResponse({"status": "restarting"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": _version()})

    @app.get("/cluster/status")
    async def cluster_status(request: Request) -> Response:
        # Protected like /v1: it shows hosts, pids and memory. Reads the store, so off the event loop.
        ctx = context(request)
        body = await asyncio.to_thread(build_cluster_status, ctx.engine, ctx.served_model_names[0])
        return JSONResponse(body)

    @app.get("/metrics")
    async def get_metrics(request: Request) -> Response:
        if state.config.protect_metrics:
            check_api_key(state.config, request)
        stats = None
        if state.engine is not None:
            try:
                stats = state.engine.stats()
            except Exception:
                logger.warning("engine.stats() failed", exc_info=True)
        return Response(metrics.render(stats), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        ctx = context(request)
        root = ctx.engine.model_name
        cards = [
            ModelCard(id=name, root=root, max_model_len=ctx.engine.max_model_len) for name in ctx.served_model_names
        ]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    async def parse(request: Request, model: type[M], ctx: ServingContext) -> M:
        body = await _parse_body(request, model, state.config.max_request_body_bytes)
        check_fields(body, ctx.vocab_size)
        return body

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        ctx = context(request)
        body = await parse(request, CompletionRequest, ctx)
        return await cancel_on_disconnect(request, _as_response(CompletionServer(ctx).create(body, request)))

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        ctx = context(request)
        body = await parse(request, ChatCompletionRequest, ctx)
        return await cancel_on_disconnect(request, _as_response(ChatServer(ctx).create(body, request)))

    @app.post("/generate", openapi_extra=request_body(GenerateRequest))
    async def generate(request: Request) -> Response:
        ctx = context(request)
        body = await parse(request, GenerateRequest, ctx)
        return await cancel_on_disconnect(request, _as_response(GenerateServer(ctx).create(body)))

    limit = state.config.max_request_body_bytes
    add_extra_routes(app, state, context, lambda request, model: _parse_body(request, model, limit), _version)


async def _as_response(result: Any) -> Response:
    value = await result
    return value if isinstance(value, Response) else JSONResponse(value.model_dump(mode="json"))


async def _parse_body(request: Request, model: type[M], limit: int) -> M:
    """The JSON body validated as ``model``, parsed by pydantic's own JSON parser (jiter).

    jiter refuses lone surrogates (``"\\ud800"``) and nesting deeper than its limit with a
    ``json_invalid`` error, where ``json.loads`` would accept the first and hit a ``RecursionError``.

    Raises:
        InvalidRequestError: 413 past ``limit`` bytes; 400 for malformed JSON or an invalid field.
    """
    too_large = InvalidRequestError(
        f"Request body is larger than the limit of {limit} bytes.", code="request_too_large", status=413
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as exc:
        raise _validation_error(exc.errors(include_url=False)) from exc


def _validation_error(errors: Any) -> InvalidRequestError:
    """The first pydantic error as a 400 naming its field (``param``), like OpenAI's messages."""
    first = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"The request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if first.get("type") == "model_type" and not first.get("loc"):
        return InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    param = loc[0] if loc else None
    where = ".".join(loc)
    return InvalidRequestError(f"{where}: {message}" if where else message, param=param, code="invalid_value")


# ------------------------------------------------------------------------------------- errors


def _error(status: int, message: str, err_type: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(message, err_type, param, code), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(InvalidRequestError)
    async def invalid(_: Request, exc: InvalidRequestError) -> Response:
        return _error(exc.status, exc.message, _error_type(exc.status), exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> Response:
        err = _validation_error(exc.errors())
        return _error(400, err.message, "invalid_request_error", err.param, err.code)

    @app.exception_handler(EngineOverloadedError)
    async def overloaded(_: Request, exc: EngineOverloadedError) -> Response:
        message = f"The server is overloaded, retry later. {exc}".strip()
        return _error(429, message, "rate_limit_error", code="rate_limit_exceeded",
                      headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip

    @app.exception_handler(EngineDeadError)
    async def dead(_: Request, exc: EngineDeadError) -> Response:
        # The ranks may be restarting (the engine goes on) or gone for good (state.error, /health 503).
        state.unusable_reason()
        logger.error("request failed: %s", exc)
        return _error(503, f"engine failure: {exc}", "service_unavailable", code="engine_dead",
                      headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip

    @app.exception_handler(RequestFailedError)
    async def request_failed(_: Request, exc: RequestFailedError) -> Response:
        # One request a rank could not serve; the engine and the other requests go on.
        logger.error("%s", exc)
        return _error(500, str(exc), "server_error", code="request_failed")

    @app.exception_handler(EngineNotReadyError)
    async def not_ready(_: Request, exc: EngineNotReadyError) -> Response:
        return _error(503, str(exc), "service_unavailable", code="model_not_ready")

    @app.exception_handler(RequestTimeoutError)
    async def timed_out(_: Request, exc: RequestTimeoutError) -> Response:
        return _error(504, str(exc), "timeout", code="request_timeout")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), _error_type(exc.status_code), headers=exc.headers)


class UnexpectedErrorMiddleware:
    """ASGI middleware: an exception no handler claimed is logged with an error id and answered 500.

    It does not re-raise (Starlette's ``ServerErrorMiddleware`` does, and uvicorn then closes the
    connection), so the client's keep-alive connection survives. When the response had already
    started, only the log line is written.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # the last line of defence: answer, log, keep serving
            error_id = uuid.uuid4().hex[:12]
            logger.error("internal error %s on %s %s", error_id, scope.get("method"), scope.get("path"), exc_info=exc)
            if started:
                return
            message = f"Internal server error (error id {error_id}; the server log has the details)."
            response = _error(500, message, "server_error", code="internal_error")
            await response(scope, receive, send)


def _error_type(status: int) -> str:
    return {401: "authentication_error", 404: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardserve")
    except PackageNotFoundError:
        return "0.1.0+local"


# ----------------------------------------------------------------------------------- start-up


def _lifespan(state: ServerState) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = None
        if state.engine is None and state.load_engine is not None:
            task = asyncio.create_task(_load_engine(state))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()

    return lifespan


async def _load_engine(state: ServerState) -> None:
    """Run the blocking loader in a daemon thread (so Ctrl-C is not held up) and publish the engine."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[AsyncLLM] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def work() -> None:
        try:
            engine = state.load_engine()  # type: ignore[misc]
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop
            loop.call_soon_threadsafe(settle, future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, future.set_result, engine)

    threading.Thread(target=work, name="shardserve-load-engine", daemon=True).start()
    try:
        engine = await future
    except Exception as exc:
        state.error = f"engine failed to load: {type(exc).__name__}: {exc}"
        logger.exception("engine failed to load", exc_info=exc)
        if state.on_load_error is not None:
            state.on_load_error(exc)
        return
    state.engine = engine
    _watch_engine(state, loop)
    cfg = state.config
    logger.info("ready: serving %s at http://%s:%d/v1", ", ".join(state.model_names()), cfg.host, cfg.port)


def _watch_engine(state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
    """Stop the server (``state.on_engine_dead``) once the engine stops for good: no HTTP without an engine."""

    def dead() -> None:
        logger.error("the engine stopped for good; stopping the server: %s", state.unusable_reason())
        if state.on_engine_dead is not None:
            state.on_engine_dead()

    def from_engine_thread(_: BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            loop.call_soon_threadsafe(dead)

    callbacks = getattr(state.engine, "on_fatal", None)
    if callbacks is None:
        return
    callbacks.append(from_engine_thread)
    if getattr(state.engine, "errored", False):
        dead()


def make_uvicorn_server(app: FastAPI, config: ServerConfig, log_level: str = "info") -> GracefulServer:
    """A uvicorn server for ``app`` (call ``.run()``, or ``.serve()`` in a running loop, e.g. from a thread).

    SIGTERM drains it (see :mod:`shardserve.entrypoints.openai.lifecycle`); ``begin_drain()`` does the same.
    """
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return GracefulServer(uv_config, app.state.server_state, config.shutdown_timeout)


def run_server(
    server_config: ServerConfig,
    load_engine: Callable[[], AsyncLLM],
    served_model_names: list[str] | None,
    log_level: str = "info",
) -> int:
    """Serve HTTP on ``host:port`` at once (``/health`` is 503 while loading) and load the engine meanwhile.

    Blocks until SIGINT, or until SIGTERM has drained the requests in flight, then shuts the engine down.

    Returns:
        0; 1 when the engine failed to load or stopped for good (the server stops as soon as that
        happens), or when a SIGTERM drain had to abort requests.
    """
    state = ServerState(engine=None, served_model_names=list(served_model_names or []), config=server_config)
    state.load_engine = load_engine
    server = make_uvicorn_server(build_app(state), server_config, log_level)

    def stop(_: BaseException | None = None) -> None:
        server.should_exit = True

    state.on_load_error = stop
    state.on_engine_dead = stop
    warn_if_open(server_config)
    logger.info("starting HTTP server on http://%s:%d (loading the model)", server_config.host, server_config.port)
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.shutdown()
    reason = state.unusable_reason() if state.engine is not None else state.error
    if reason is not None:
        logger.error("exiting: %s", reason)
        return 1
    if state.drain.aborted:
        logger.error("exiting: %d request(s) were aborted by the shutdown", state.drain.aborted)
        return 1
    return 0
