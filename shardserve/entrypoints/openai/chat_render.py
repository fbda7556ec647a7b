"""Render a conversation with the chat template, with the options vLLM requests and flags take.

``chat_template`` (a request's or ``--chat-template``'s) replaces the model's; ``chat_template_kwargs`` (the
request's, over ``--default-chat-template-kwargs``) become template variables; ``continue_final_message``
leaves the last message open so the model continues it (transformers' rule: the rendered text is cut just
after the final message's content).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shardserve.entrypoints.openai.protocol import InvalidRequestError
from shardserve.transformers_utils.chat_template import render_chat_template

RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "special_tokens", "template"})
"""Variables the renderer sets itself; ``chat_template_kwargs`` may not replace them."""


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    default_chat_template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text of ``messages`` (template-ready dicts).

    Raises:
        InvalidRequestError: both ``add_generation_prompt`` and ``continue_final_message``, a final message
            the rendered text does not contain, ``chat_template_kwargs`` naming a variable the renderer sets,
            or any template error (``param`` is ``messages``).
    """
    if continue_final_message and add_generation_prompt:
        raise InvalidRequestError(
            "continue_final_message and add_generation_prompt cannot both be true", param="continue_final_message"
        )
    reserved = sorted(RESERVED_TEMPLATE_VARIABLES & set(chat_template_kwargs or {}))
    if reserved:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {', '.join(reserved)}: the server sets it", param="chat_template_kwargs"
        )
    kwargs = {**(default_chat_template_kwargs or {}), **(chat_template_kwargs or {})}
    kwargs = {k: v for k, v in kwargs.items() if k not in RESERVED_TEMPLATE_VARIABLES}
    try:
        if chat_template is None:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                                 **kwargs)  # fmt: skip
        else:
            special = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
            text = render_chat_template(chat_template, messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, special_tokens=special, **kwargs)  # fmt: skip
    except ValueError as exc:
        raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
    return _cut_after_final_message(text, messages) if continue_final_message else text


def _cut_after_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    final = messages[-1].get("content") if messages else None
    if isinstance(final, list):
        final = next((part.get("text") for part in reversed(final) if isinstance(part, Mapping) and "text" in part),
                     None)  # fmt: skip
    if not isinstance(final, str) or not final.strip() or final.strip() not in text:
        raise InvalidRequestError(
            "continue_final_message is set but the final message does not appear in the rendered chat",
            param="continue_final_message",
        )
    end = text.rindex(final.strip()) + len(final.strip())
    return text[:end]
