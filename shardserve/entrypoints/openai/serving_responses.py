"""``POST /v1/responses``: served by the chat-completion path, its result rewritten as a Response object.

Non-streaming, the chat completion becomes ``output`` items: a ``reasoning`` item (when the chat message has
reasoning), a ``message`` with one ``output_text`` part, and a ``function_call`` item per tool call; a
completion cut by ``max_output_tokens`` is ``status: "incomplete"``. Streaming, the chat chunks become the
``response.*`` server-sent events (``event: TYPE`` and ``data: {...}``, numbered by ``sequence_number``):
``response.created``, ``response.in_progress``, per item ``response.output_item.added`` / ``.done``, text as
``response.content_part.added``, ``response.output_text.delta`` / ``.done``, ``response.content_part.done``,
reasoning as ``response.reasoning_text.delta`` / ``.done``, tool calls as
``response.function_call_arguments.delta`` / ``.done``, and last ``response.completed`` (or
``response.incomplete``; an engine error after the headers gives ``error`` then ``response.failed``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shardserve.entrypoints.openai.fields import check_fields
from shardserve.entrypoints.openai.protocol import ChatCompletionRequest, InvalidRequestError
from shardserve.entrypoints.openai.protocol_responses import ResponsesRequest, to_chat_body
from shardserve.entrypoints.openai.serving import SSE_DONE, ServingContext, streaming_response
from shardserve.entrypoints.openai.serving_chat import ChatServer

_CHAT_TO_RESPONSES_PARAM = {"max_completion_tokens": "max_output_tokens", "messages": "input",
                            "response_format": "text.format"}  # fmt: skip


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesServer:
    """Handles ``/v1/responses`` requests against one engine, through :class:`ChatServer`."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, body: ResponsesRequest, raw: Request) -> Response:
        """Serve one request: a JSON Response object, or an SSE stream of ``response.*`` events.

        Raises:
            InvalidRequestError: an unsupported field or input item (400), an unknown model (404), or what
                the chat path refuses (its parameter names mapped back, e.g. ``max_output_tokens``).
            EngineOverloadedError, EngineDeadError: from the engine.
        """
        chat_body = to_chat_request(to_chat_body(body))
        check_fields(chat_body, self.ctx.vocab_size)
        result = await ChatServer(self.ctx).create(chat_body, raw)
        response_id, created = _new_id("resp"), int(time.time())
        if body.stream:
            events = stream_events(body, response_id, created, result.body_iterator)  # type: ignore[union-attr]
            return streaming_response(events)
        chat = result.model_dump(mode="json")  # type: ignore[union-attr]
        return JSONResponse(response_from_chat(body, response_id, created, chat))


def to_chat_request(chat: dict[str, Any], model: type[ChatCompletionRequest] = ChatCompletionRequest) -> Any:
    """Validate the translated body as a chat request (``model``: the chat request class).

    Raises:
        InvalidRequestError: a field the chat path does not declare yet (so it would not be honoured), or a
            validation error, named by its Responses field.
    """
    for name in ("response_format", "tool_choice", "parallel_tool_calls"):
        if name in chat and name not in model.model_fields:
            param = _CHAT_TO_RESPONSES_PARAM.get(name, name)
            raise InvalidRequestError(f"{param} is not supported by this server yet", param=param)
    try:
        return model.model_validate(chat)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        param = _CHAT_TO_RESPONSES_PARAM.get(loc[0], loc[0]) if loc else None
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise InvalidRequestError(f"{param}: {message}" if param else message, param=param) from exc


def response_object(
    body: ResponsesRequest,
    response_id: str,
    created: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    incomplete: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Response object (OpenAI's fields; nothing is stored)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "model": model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": body.temperature,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "top_p": body.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": body.user,
    }


def responses_usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat ``usage`` in the Responses API's names."""
    if not chat_usage:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    return {
        "input_tokens": chat_usage.get("prompt_tokens", 0),
        "input_tokens_details": {"cached_tokens": cached or 0, "cache_write_tokens": 0},
        "output_tokens": chat_usage.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": reasoning or 0},
        "total_tokens": chat_usage.get("total_tokens", 0),
    }


def _status(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text else []}  # fmt: skip


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if text is not None else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}  # fmt: skip


def response_from_chat(body: ResponsesRequest, response_id: str, created: int, chat: dict[str, Any]) -> dict:
    """The Response object of a finished chat completion (``chat`` as JSON data)."""
    choice = chat["choices"][0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    reasoning = message.get("reasoning") or message.get("reasoning_content")
    if reasoning:
        output.append(_reasoning_item(_new_id("rs"), reasoning, "completed"))
    if message.get("content"):
        output.append(_message_item(_new_id("msg"), message["content"], "completed"))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        output.append(_call_item(_new_id("fc"), call.get("id") or _new_id("call"), function.get("name", ""),
                                 function.get("arguments", ""), "completed"))  # fmt: skip
    status, incomplete = _status(choice.get("finish_reason"))
    return response_object(body, response_id, created, chat.get("model", ""), status, output,
                           responses_usage(chat.get("usage")), incomplete)  # fmt: skip


# ------------------------------------------------------------------------------------ streaming


class _EventStream:
    """Turns chat chunks into ``response.*`` events, keeping the output items and their indices."""

    def __init__(self, body: ResponsesRequest, response_id: str, created: int) -> None:
        self.body, self.response_id, self.created = body, response_id, created
        self.model = body.model or ""
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, int] = {}
        """Open text items: "reasoning" / "message" -> output index."""
        self.calls: dict[int, int] = {}
        """Tool-call index of the chat stream -> output index."""
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def response(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_object(self.body, self.response_id, self.created, self.model, status, self.output, **extra)

    def start(self) -> list[str]:
        snapshot = self.response("in_progress")
        return [
            self.event("response.created", response=snapshot),
            self.event("response.in_progress", response=snapshot),
        ]

    def chunk(self, chunk: dict[str, Any]) -> list[str]:
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        events: list[str] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning") or delta.get("reasoning_content")
            if reasoning:
                events += self._text_delta("reasoning", reasoning)
            if delta.get("content"):
                events += self._text_delta("message", delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call_delta(call)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return events

    def _open_text(self, kind: str) -> list[str]:
        events = self._close_text()
        index = len(self.output)
        if kind == "reasoning":
            item = _reasoning_item(_new_id("rs"), "", "in_progress")
        else:
            item = _message_item(_new_id("msg"), None, "in_progress")
        self.output.append(item)
        self.open[kind] = index
        events.append(self.event("response.output_item.added", output_index=index, item=dict(item, content=[])))
        if kind == "message":
            item["content"] = [_text_part("")]
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                     content_index=0, part=_text_part("")))  # fmt: skip
        else:
            item["content"] = [{"type": "reasoning_text", "text": ""}]
        return events

    def _text_delta(self, kind: str, text: str) -> list[str]:
        events = [] if kind in self.open else self._open_text(kind)
        index = self.open[kind]
        item = self.output[index]
        item["content"][0]["text"] += text
        if kind == "reasoning":
            events.append(self.event("response.reasoning_text.delta", item_id=item["id"], output_index=index,
                                     content_index=0, delta=text))  # fmt: skip
        else:
            events.append(self.event("response.output_text.delta", item_id=item["id"], output_index=index,
                                     content_index=0, delta=text, logprobs=[]))  # fmt: skip
        return events

    def _call_delta(self, call: dict[str, Any]) -> list[str]:
        events: list[str] = []
        function = call.get("function") or {}
        if call["index"] not in self.calls:
            events += self._close_text()
            index = len(self.output)
            item = _call_item(_new_id("fc"), call.get("id") or _new_id("call"), function.get("name") or "", "",
                              "in_progress")  # fmt: skip
            self.output.append(item)
            self.calls[call["index"]] = index
            events.append(self.event("response.output_item.added", output_index=index, item=dict(item)))
        index = self.calls[call["index"]]
        item = self.output[index]
        if function.get("arguments"):
            item["arguments"] += function["arguments"]
            events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                     output_index=index, delta=function["arguments"]))  # fmt: skip
        return events

    def _close_text(self) -> list[str]:
        events: list[str] = []
        for kind, index in sorted(self.open.items(), key=lambda kv: kv[1]):
            item = self.output[index]
            item["status"] = "completed"
            if kind == "reasoning":
                text = item["content"][0]["text"]
                events.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                         content_index=0, text=text))  # fmt: skip
            else:
                part = item["content"][0]
                events.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                         content_index=0, text=part["text"], logprobs=[]))  # fmt: skip
                events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                         content_index=0, part=part))  # fmt: skip
            events.append(self.event("response.output_item.done", output_index=index, item=item))
        self.open.clear()
        return events

    def finish(self) -> list[str]:
        events = self._close_text()
        for index in self.calls.values():
            item = self.output[index]
            item["status"] = "completed"
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                     arguments=item["arguments"], name=item["name"]))  # fmt: skip
            events.append(self.event("response.output_item.done", output_index=index, item=item))
        status, incomplete = _status(self.finish_reason)
        final = self.response(status, usage=responses_usage(self.usage), incomplete=incomplete)
        events.append(self.event(f"response.{status}", response=final))
        return events

    def fail(self, error: dict[str, Any]) -> list[str]:
        code, message = error.get("code") or error.get("type") or "server_error", error.get("message", "")
        # A Response's error.code is one of OpenAI's codes; the error event keeps ours (engine_dead, ...).
        response_code = code if code == "rate_limit_exceeded" else "server_error"
        error_body = {"code": response_code, "message": message}
        failed = self.response("failed", usage=responses_usage(self.usage), error=error_body)
        return [self.event("error", code=code, message=message, param=error.get("param")),
                self.event("response.failed", response=failed)]  # fmt: skip


async def stream_events(
    body: ResponsesRequest, response_id: str, created: int, chat_events: AsyncIterator[str]
) -> AsyncIterator[str]:
    """The ``response.*`` SSE events of a chat SSE stream; closes the chat stream in all cases."""
    state = _EventStream(body, response_id, created)
    try:
        for event in state.start():
            yield event
        async for text in chat_events:
            for line in text.split("\n"):
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == SSE_DONE.strip()[len("data: ") :]:
                    for event in state.finish():
                        yield event
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    for event in state.fail(chunk["error"]):
                        yield event
                    return
                for event in state.chunk(chunk):
                    yield event
        for event in state.fail({"code": "internal_error", "message": "the chat stream ended early"}):
            yield event
    finally:
        await chat_events.aclose()  # type: ignore[attr-defined]
