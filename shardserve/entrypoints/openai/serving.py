"""What every endpoint shares: model-name check, tokenization, consuming engine streams, SSE.

Request path: an endpoint parses its body into a protocol model, tokenizes the prompt(s), maps
the request to :class:`SamplingParams`, then consumes ``engine.generate`` through
:meth:`ServingContext.generate`, which observes metrics, applies the request timeout and always
closes the engine stream (closing it makes the engine abort the request and free its KV blocks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from shardserve.config import ServerConfig
from shardserve.engine.async_llm import AsyncLLM, EngineDeadError
from shardserve.entrypoints.openai.protocol import (
    ErrorInfo,
    ErrorResponse,
    InvalidRequestError,
    PromptTokensDetails,
    UsageInfo,
)
from shardserve.metrics import ServerMetrics
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"


class RequestTimeoutError(Exception):
    """The request ran past ``ServerConfig.request_timeout``."""


@dataclass
class ServingContext:
    """The engine and server settings the endpoint handlers need."""

    engine: AsyncLLM
    served_model_names: list[str]
    metrics: ServerMetrics
    config: ServerConfig

    @property
    def model_name(self) -> str:
        """The name reported in responses."""
        return self.served_model_names[0]

    def check_model(self, requested: str | None) -> str:
        """The served name for a request's ``model`` (None picks the default).

        Raises:
            InvalidRequestError: 404 ``model_not_found`` for a name that is not served.
        """
        if requested is None or requested in self.served_model_names:
            return self.model_name
        raise InvalidRequestError(
            f"The model `{requested}` does not exist. Served: {', '.join(self.served_model_names)}.",
            param="model",
            code="model_not_found",
            status=404,
        )

    @property
    def vocab_size(self) -> int | None:
        """Token ids a request may use: below both the tokenizer's and the model's vocabulary size."""
        engine = self.engine
        source = getattr(getattr(engine, "engine", None), "source", None)  # AsyncLLM -> LLMEngine -> ModelSource
        sizes = [
            getattr(engine, "vocab_size", None),
            getattr(engine.tokenizer, "vocab_size", None),
            getattr(getattr(source, "arch", None), "vocab_size", None),
        ]
        known = [s for s in sizes if isinstance(s, int)]
        return min(known) if known else None

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults for knobs a request leaves out: the model's generation_config.json
        (``--generation-config auto``), none (``vllm``) or a given directory's."""
        chosen = self.config.generation_defaults
        return dict(self.engine.generation_defaults) if chosen is None else dict(chosen)

    def include_usage(self, stream: bool, stream_options: Any) -> tuple[bool, bool]:
        """(send a usage chunk at the end, put the usage so far in every chunk) of a streamed request:
        ``stream_options.include_usage`` or ``--enable-force-include-usage``, and
        ``stream_options.continuous_usage_stats`` (vLLM's rules)."""
        if not stream:
            return False, False
        final = bool(self.config.enable_force_include_usage or (stream_options and stream_options.include_usage))
        return final, final and bool(stream_options and stream_options.continuous_usage_stats)

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Token ids of a prompt given as text or as ids (ids are range-checked against the vocabulary).

        Raises:
            InvalidRequestError: a token id is out of range, or the prompt has no tokens.
        """
        if isinstance(prompt, str):
            ids = list(self.engine.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        else:
            ids = list(prompt)
            vocab_size = self.vocab_size
            for token_id in ids:
                if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                    raise InvalidRequestError(
                        f"token id {token_id} is outside the vocabulary [0, {vocab_size})", param=param
                    )
        if not ids:
            raise InvalidRequestError(f"the {param} is empty: it has no tokens", param=param)
        return ids

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, stream: bool = False
    ) -> AsyncIterator[RequestOutput]:
        """The engine's output stream for one prompt, with metrics, timeout and a guaranteed close.

        ``stream`` asks for DELTA outputs (each holds what is new); otherwise one FINAL_ONLY output.

        Raises:
            ValueError, EngineOverloadedError, EngineDeadError: from the engine, before the first yield.
            RequestTimeoutError: ``config.request_timeout`` passed (the engine request is aborted).
        """
        tracker = self.metrics.track()
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        engine_stream = self.engine.generate(prompt_ids, dataclasses.replace(params, output_kind=kind), request_id)
        timeout = self.config.request_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        finished = False
        last: RequestOutput | None = None
        try:
            while not finished:
                try:
                    async with asyncio.timeout_at(deadline):
                        output = await anext(engine_stream)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    raise RequestTimeoutError(f"request {request_id} ran past {timeout} s") from exc
                tracker.observe(output)
                last, finished = output, output.finished
                yield output
        finally:
            await engine_stream.aclose()
            if not finished:
                await self._abort(request_id)
            tracker.finish(params.n)
            if self.config.log_requests:
                reasons = [c.finish_reason for c in last.outputs] if last and finished else ["abort"]
                logger.info("request %s: %d prompt tokens, finish %s", request_id, len(prompt_ids), reasons)

    async def _abort(self, request_id: str) -> None:
        # The engine aborts on close already; this covers a stream that ended without `finished`.
        try:
            await self.engine.abort(request_id)
        except Exception:
            logger.debug("abort of %s failed", request_id, exc_info=True)


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as ``(stream_index, item)`` in arrival order.

    The first exception of any stream is raised and the others are cancelled; closing the merged
    iterator closes every stream.
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item, None))
            queue.put_nowait((index, done, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, None, exc))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def prime(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for a stream's first item (so engine errors surface before HTTP headers go out).

    Returns an iterator that yields that item and then the rest; the stream is closed on error.

    Raises:
        whatever the stream raises before its first item.
    """
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise

    async def chained() -> AsyncIterator[T]:
        try:
            if first is not None:
                yield first
                async for item in stream:
                    yield item
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    return chained()


class UsageCounter:
    """Token usage of a request's engine streams, fed every output (DELTA outputs included)."""

    def __init__(self) -> None:
        self._prompt: dict[int, int] = {}
        self._cached: dict[int, int] = {}
        self._completion: dict[tuple[int, int], int] = {}

    def observe(self, stream: int, output: RequestOutput) -> None:
        self._prompt[stream] = len(output.prompt_token_ids)
        self._cached[stream] = output.num_cached_tokens
        for c in output.outputs:
            self._completion[(stream, c.index)] = c.num_output_tokens

    def expect_prompt(self, stream: int, num_tokens: int) -> None:
        """Count a prompt before its first output arrived (for usage in the first chunks)."""
        self._prompt.setdefault(stream, num_tokens)

    def usage(self) -> UsageInfo:
        """Prompt tokens once per prompt, completion tokens of every choice (so far)."""
        prompt, completion = sum(self._prompt.values()), sum(self._completion.values())
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached.values())),
        )


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event line: ``data: {json}\\n\\n``."""
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


def error_body(message: str, err_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI error body as a dict."""
    return ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=code)).model_dump()


def stream_error_event(exc: BaseException) -> str:
    """The SSE event reporting an error after the response headers were sent."""
    if isinstance(exc, RequestTimeoutError):
        return sse(error_body(str(exc), "timeout", code="request_timeout"))
    if isinstance(exc, EngineDeadError):  # a rank failed (the server restarts them) or the server shuts down
        return sse(error_body(f"engine failure: {exc}", "service_unavailable", code="engine_dead"))
    return sse(error_body(f"{type(exc).__name__}: {exc}", "server_error", code="internal_error"))


class DisconnectAwareStreamingResponse(StreamingResponse):
    """A streaming response that stops, and closes its body iterator, as soon as the client leaves.

    Starlette's own StreamingResponse, under ASGI spec 2.4 servers such as uvicorn, only notices a
    disconnect when a send fails, and uvicorn drops sends to a closed socket silently, so a dead
    client would keep the engine busy. Here a listener task waits for ``http.disconnect`` and
    cancels the streaming task once (edge-triggered, so the engine's cleanup awaits are not
    re-cancelled the way an anyio cancel scope would).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream_task = asyncio.ensure_future(self.stream_response(send))
        listen_task = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream_task, listen_task}, return_when=asyncio.FIRST_COMPLETED)
            if not stream_task.done():
                logger.debug("client disconnected; stopping the stream")
                stream_task.cancel()
            listen_task.cancel()
            await asyncio.gather(listen_task, return_exceptions=True)
            try:
                await stream_task
            except (asyncio.CancelledError, OSError):
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
        finally:
            for task in (stream_task, listen_task):
                task.cancel()
            # The body iterator can only be closed once the task running it has stopped.
            await asyncio.gather(stream_task, listen_task, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def cancel_on_disconnect(request: Request, handler: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it (once) if the client disconnects before it returns.

    The cancellation reaches the engine stream the handler consumes, which aborts the request.
    """
    handler_task = asyncio.ensure_future(handler)

    async def listen() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    listen_task = asyncio.ensure_future(listen())
    try:
        await asyncio.wait({handler_task, listen_task}, return_when=asyncio.FIRST_COMPLETED)
        if not handler_task.done():
            handler_task.cancel()
            await asyncio.gather(handler_task, return_exceptions=True)
            return Response(status_code=499)
        return handler_task.result()
    finally:
        listen_task.cancel()
        handler_task.cancel()


def streaming_response(events: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response over ``events``."""
    return DisconnectAwareStreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def timestamp() -> int:
    """Unix seconds for ``created`` fields."""
    return int(time.time())
