"""What a chat request asks besides sampling: its tools, how calls are read, its constraint and reasoning.

- ``tools`` (or the deprecated ``functions``) are rendered by the chat template; ``tool_choice`` decides
  how calls come out: ``none`` (not parsed), ``auto`` (the ``--tool-call-parser`` reads the model's own
  format; needs ``--enable-auto-tool-choice``, as in vLLM), ``required`` or a named function (a JSON-schema
  grammar forces a valid call, read by :class:`ForcedToolCallParser`).
- one structured-output constraint at most: ``response_format`` / ``structured_outputs`` / ``guided_*``,
  or the forced tool choice's grammar.
- ``--reasoning-parser``: the ``<think>`` section is split off first; the grammar starts after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardserve.config import ServerConfig
from shardserve.entrypoints.openai.protocol import ChatCompletionRequest, InvalidRequestError
from shardserve.entrypoints.openai.reasoning_parsers import ThinkReasoningParser, get_reasoning_parser
from shardserve.entrypoints.openai.request_options import request_error, structured_output_fields
from shardserve.entrypoints.openai.tool_parsers import (
    ForcedToolCallParser,
    ToolParser,
    get_tool_parser,
    legacy_functions_to_tools,
    tool_choice_spec,
    tool_functions,
)
from shardserve.structured_output import InvalidStructuredOutputError, StructuredOutputSpec, from_openai_request

AUTO_NEEDS_FLAGS = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


@dataclass
class ChatPlan:
    """How one chat request is rendered, constrained and read back.

    Attributes:
        tools: the tool definitions for the template (OpenAI's ``{"type": "function", "function": ...}``).
        tool_choice: ``none``, ``auto``, ``required`` or ``{"type": "function", "function": {"name"}}``.
        legacy: the request used ``functions``: answers carry ``function_call`` (one call).
        parallel: more than one call per answer is allowed.
        spec: the constraint (a forced tool choice's grammar, or the request's own).
        template_kwargs: the template variables (``--default-chat-template-kwargs`` under the request's).
    """

    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = "none"
    legacy: bool = False
    parallel: bool = True
    spec: StructuredOutputSpec | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    _tool_parser: Callable[[Any], ToolParser] | None = None
    _reasoning_parser: type[ThinkReasoningParser] | None = None

    @property
    def forced(self) -> bool:
        """``required`` or a named function: a grammar shapes the call."""
        return self._tool_parser is not None and self.tool_choice not in ("auto", "none")

    def tool_parser(self, tokenizer: Any) -> ToolParser | None:
        """A fresh tool-call parser for one output sequence, None when calls are not parsed."""
        return self._tool_parser(tokenizer) if self._tool_parser is not None else None

    def reasoning_parser(self, tokenizer: Any) -> ThinkReasoningParser | None:
        """A fresh reasoning parser for one output sequence, None without ``--reasoning-parser``."""
        if self._reasoning_parser is None:
            return None
        return self._reasoning_parser(tokenizer, self.template_kwargs)

    def needs_special_tokens(self, tokenizer: Any) -> bool:
        """The tool-call markers are special tokens, so the text must keep them."""
        parser = self.tool_parser(tokenizer)
        return parser is not None and not self.forced and parser.needs_special_tokens()

    def engine_fields(self, tokenizer: Any, prompt_text: str) -> dict[str, Any]:
        """The constraint as SamplingParams fields; past the reasoning unless the prompt already closed it.

        Raises:
            InvalidRequestError: the engine cannot enforce constraints.
        """
        reasoning = self.reasoning_parser(tokenizer)
        end_ids = None
        if self.spec is not None and reasoning is not None and not reasoning.prompt_ends_reasoning(prompt_text):
            end_ids = reasoning.end_token_ids
        return structured_output_fields(self.spec, end_ids)


def plan_chat(body: ChatCompletionRequest, config: ServerConfig) -> ChatPlan:
    """Work out a chat request's tools, tool choice, constraint and parsers.

    Raises:
        InvalidRequestError: an invalid tool, tool choice or constraint; ``auto`` without the server flags;
            a tool choice without tools; a forced tool choice together with another constraint.
    """
    tools, choice, legacy = body.tools, body.tool_choice, False
    if body.functions is not None or body.function_call is not None:
        tools, choice = legacy_functions_to_tools(body.functions, body.function_call)
        legacy = True
    plan = ChatPlan(tools=tools or None, legacy=legacy, parallel=body.parallel_tool_calls is not False and not legacy)
    plan.template_kwargs = {**(config.default_chat_template_kwargs or {}), **(body.chat_template_kwargs or {})}
    param = "function_call" if legacy else "tool_choice"
    try:
        tool_functions(tools)  # every definition and parameters schema is checked, whatever the choice
        plan.tool_choice = _tool_choice(choice, bool(tools), param)
        forced_spec = tool_choice_spec(tools, plan.tool_choice, plan.parallel)
        request_spec = from_openai_request(body)
    except InvalidStructuredOutputError as exc:
        raise request_error(exc) from None
    if forced_spec is not None and request_spec is not None:
        raise InvalidRequestError(
            f"{param} {_describe(plan.tool_choice)} cannot be combined with {request_spec.param}: both constrain "
            "the whole output",
            param=request_spec.param,
        )
    plan.spec = forced_spec or request_spec
    if forced_spec is not None:
        plan._tool_parser = lambda tokenizer: ForcedToolCallParser(plan.tool_choice, tokenizer)
    elif plan.tool_choice == "auto":
        if not (config.enable_auto_tool_choice and config.tool_call_parser):
            raise InvalidRequestError(AUTO_NEEDS_FLAGS, param=param)
        plan._tool_parser = get_tool_parser(config.tool_call_parser)
    if config.reasoning_parser:
        plan._reasoning_parser = get_reasoning_parser(config.reasoning_parser)
    return plan


def _tool_choice(choice: Any, have_tools: bool, param: str) -> Any:
    if choice is None:
        return "auto" if have_tools else "none"
    if choice != "none" and not have_tools:
        raise InvalidRequestError(f"{param} is only allowed when tools are given", param=param)
    if isinstance(choice, dict) and choice.get("type", "function") != "function":
        raise InvalidRequestError(f"{param} type {choice.get('type')!r} is not supported; use 'function'", param=param)
    return choice


def _describe(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else "naming a function"
