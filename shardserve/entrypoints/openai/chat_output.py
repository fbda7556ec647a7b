"""One chat choice's generated text read back: reasoning first, then tool calls in the content that follows.

:class:`ChoiceReader` gives the finished message (:meth:`~ChoiceReader.message`) or, fed every delta of a
stream, the chunk deltas (:meth:`~ChoiceReader.delta`); both use the same parsers, so streamed pieces join
to the non-streamed fields. A choice that produced tool calls ends with ``finish_reason: "tool_calls"``
(``"function_call"`` for the deprecated ``functions``), unless it was cut (``length``) or failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardserve.entrypoints.openai.protocol import (
    AssistantMessage,
    DeltaFunction,
    DeltaMessage,
    ResponseFunctionCall,
    ResponseToolCall,
)
from shardserve.entrypoints.openai.reasoning_parsers import ThinkReasoningParser
from shardserve.entrypoints.openai.tool_parsers import DeltaToolCall, ToolParser

_KEEP_REASON = ("length", "abort", "error")


@dataclass
class ChoiceReader:
    """Splits one output sequence into reasoning, content and tool calls.

    Args:
        reasoning: the reasoning parser (None: no reasoning section).
        tools: the tool-call parser (None: calls are not parsed).
        include_reasoning: return the reasoning (``include_reasoning: false`` drops it).
        parallel: keep every call; False keeps the first.
        legacy: answer in the deprecated ``function_call`` shape (one call).
        prefix: text the finished content starts with (``echo``; a stream sends it in a chunk of its own).
    """

    reasoning: ThinkReasoningParser | None = None
    tools: ToolParser | None = None
    include_reasoning: bool = True
    parallel: bool = True
    legacy: bool = False
    prefix: str = ""
    _text: str = ""
    _content: str = ""
    _called: bool = False

    def finish_reason(self, reason: str | None) -> str | None:
        """The choice's finish reason once calls are known (``tool_calls`` when it made any)."""
        if reason is None or reason in _KEEP_REASON or not self._called:
            return reason
        return "function_call" if self.legacy else "tool_calls"

    # ------------------------------------------------------------------------------- finished

    def message(self, text: str) -> AssistantMessage:
        """The assistant message of a finished text."""
        reasoning, content = (None, text) if self.reasoning is None else self.reasoning.extract_reasoning(text)
        message = AssistantMessage(content=content)
        if self.tools is not None:
            extracted = self.tools.extract_tool_calls(content or "")
            if extracted.tools_called:
                calls = extracted.tool_calls if self.parallel else extracted.tool_calls[:1]
                self._called = True
                message.content = extracted.content
                if self.legacy:
                    message.function_call = ResponseFunctionCall(**calls[0].function.model_dump())
                else:
                    message.tool_calls = [ResponseToolCall.model_validate(c.model_dump()) for c in calls]
        if self.prefix:
            message.content = self.prefix + (message.content or "")
        if self.include_reasoning and reasoning is not None:
            message.reasoning = message.reasoning_content = reasoning
        return message

    # ------------------------------------------------------------------------------- streamed

    def delta(self, delta_text: str, finished: bool) -> DeltaMessage | None:
        """What one streamed delta adds (None: nothing to send yet); ``finished`` on the last one flushes."""
        previous = self._text
        self._text += delta_text
        reasoning, content = None, delta_text or None
        if self.reasoning is not None:
            split = self.reasoning.extract_reasoning_streaming(previous, self._text, delta_text, finished)
            reasoning, content = (split.reasoning, split.content) if split is not None else (None, None)
        out = DeltaMessage()
        if self.tools is not None and (content or finished):
            content, calls = self._tool_delta(content or "", finished)
            self._attach_calls(out, calls)
        out.content = content or None
        if self.include_reasoning and reasoning:
            out.reasoning = out.reasoning_content = reasoning
        if out.content is None and out.reasoning is None and out.tool_calls is None and out.function_call is None:
            return None
        return out

    def _tool_delta(self, content: str, finished: bool) -> tuple[str | None, list[DeltaToolCall]]:
        previous = self._content
        self._content += content
        parsed = self.tools.extract_tool_calls_streaming(previous, self._content, content, finished)  # type: ignore[union-attr]
        if parsed is None:
            return None, []
        calls = [c for c in parsed.tool_calls if self.parallel or c.index == 0]
        self._called = self._called or bool(calls)
        return parsed.content, calls

    def _attach_calls(self, out: DeltaMessage, calls: list[DeltaToolCall]) -> None:
        if not calls:
            return
        if self.legacy:
            function = calls[0].function
            if function is not None:
                out.function_call = DeltaFunction(name=function.name, arguments=function.arguments)
            return
        out.tool_calls = [c.model_dump() for c in calls]
