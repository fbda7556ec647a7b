"""``POST /v1/responses`` request body (OpenAI's Responses API, without storage) and its translation into a
chat-completion body, which the chat path then serves (templates, sampling, structured outputs, tools).

Supported: ``input`` as text or items (messages with text parts, ``function_call`` and
``function_call_output`` items; ``reasoning`` items are skipped, as chat templates drop past reasoning),
``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``, function ``tools``, ``tool_choice``,
``parallel_tool_calls``, ``text.format`` (text, json_object, json_schema), ``stream``, ``metadata``,
``user``. Refused with 400: ``previous_response_id``, ``store: true``, ``background: true``,
``conversation``, ``prompt``, non-text input, non-function tools, ``include``, ``reasoning`` options,
``truncation: auto``, ``text.verbosity``, ``top_logprobs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shardserve.entrypoints.openai.protocol import InvalidRequestError

TEXT_PART_TYPES = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
"""Responses roles -> chat roles (chat templates know no ``developer``)."""


class ResponsesRequest(BaseModel):
    """OpenAI ``POST /v1/responses``; extra fields pass on to the chat request (vLLM's sampling extras)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    top_logprobs: int | None = None
    service_tier: str | None = None


def check_supported(body: ResponsesRequest) -> None:
    """Refuse what this server cannot honour (no storage, text only).

    Raises:
        InvalidRequestError: 400 naming the field.
    """
    refusals = [
        ("previous_response_id", body.previous_response_id is not None,
         "previous_response_id needs stored responses, which this server does not keep; send the whole "
         "conversation in input"),
        ("store", body.store is True, "store: true is not supported: this server keeps no responses"),
        ("background", body.background is True, "background responses are not supported"),
        ("conversation", body.conversation is not None, "conversations are not supported (no storage)"),
        ("prompt", body.prompt is not None, "stored prompt templates are not supported"),
        ("include", bool(body.include), "include is not supported"),
        ("reasoning", bool(body.reasoning and any(v is not None for v in body.reasoning.values())),
         "reasoning options are not supported"),
        ("truncation", body.truncation not in (None, "disabled"), "only truncation 'disabled' is supported"),
        ("top_logprobs", bool(body.top_logprobs), "top_logprobs is not supported on /v1/responses"),
        ("text.verbosity", bool(body.text and body.text.get("verbosity") not in (None, "medium")),
         "text.verbosity is not supported"),
        ("service_tier", body.service_tier not in (None, "auto", "default"), "service tiers are not supported"),
    ]  # fmt: skip
    for param, refused, message in refusals:
        if refused:
            raise InvalidRequestError(message, param=param)


def to_chat_body(body: ResponsesRequest) -> dict[str, Any]:
    """The chat-completion request body that serves ``body`` (``n`` is 1; usage is always reported).

    Raises:
        InvalidRequestError: an unsupported field (see :func:`check_supported`), item, content part or tool.
    """
    check_supported(body)
    chat: dict[str, Any] = dict(body.model_extra or {})
    if chat.get("n", 1) != 1:
        raise InvalidRequestError("n is not supported on /v1/responses (one output per response)", param="n")
    chat["messages"] = to_messages(body.input, body.instructions)
    for name in ("model", "temperature", "top_p", "user", "parallel_tool_calls"):
        if getattr(body, name) is not None:
            chat[name] = getattr(body, name)
    if body.max_output_tokens is not None:
        chat["max_completion_tokens"] = body.max_output_tokens
    if body.tools:
        chat["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(body.tools)]
    if body.tool_choice is not None:
        chat["tool_choice"] = _chat_tool_choice(body.tool_choice)
    response_format = _response_format((body.text or {}).get("format"))
    if response_format is not None:
        chat["response_format"] = response_format
    if body.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def to_messages(input_: str | list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Chat messages from ``instructions`` and ``input`` (consecutive function calls join one assistant turn).

    Raises:
        InvalidRequestError: an unknown item type or role, a non-text part, or a malformed item.
    """
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(input_, str):
        messages.append({"role": "user", "content": input_})
        return messages
    for i, item in enumerate(input_):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            function = {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}
            call = {"id": _string(item, "call_id", where), "type": "function", "function": function}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": text})
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: chat templates drop it
        else:
            raise InvalidRequestError(f"{where}: input items of type {kind!r} are not supported", param="input")
    if not messages:
        raise InvalidRequestError("input must not be empty", param="input")
    return messages


def _message(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ROLES:
        raise InvalidRequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param="input")
    content = item.get("content")
    text = content if isinstance(content, str) else _text(content, f"{where}.content")
    return {"role": ROLES[role], "content": text}


def _text(parts: Any, where: str) -> str:
    if not isinstance(parts, list):
        raise InvalidRequestError(f"{where} must be a string or a list of text parts", param="input")
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, Mapping) or part.get("type") not in TEXT_PART_TYPES:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(f"{where}[{j}]: content of type {kind!r} is not supported; only text is",
                                      param="input")  # fmt: skip
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{where}[{j}].text must be a string", param="input")
        texts.append(part["text"])
    return "\n".join(texts)


def _string(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where}.{key} must be a string", param="input")
    return value


def _chat_tool(tool: Mapping[str, Any], index: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise InvalidRequestError(
            f"tools[{index}]: tools of type {tool.get('type')!r} are not supported; only 'function' is",
            param="tools",
        )
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | Mapping[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequestError(f"tool_choice {choice!r} is not supported", param="tool_choice")
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequestError("tool_choice must be none, auto, required or {type: function, name}", param="tool_choice")


def _response_format(fmt: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequestError(f"text.format type {fmt.get('type')!r} is not supported", param="text.format")
