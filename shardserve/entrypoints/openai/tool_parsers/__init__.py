"""Tool-call parsers for ``--enable-auto-tool-choice --tool-call-parser NAME`` and the forced-choice grammar.

Each parser reads one model family's tool-call format from the generated text, finished
(``extract_tool_calls``) or streamed (``extract_tool_calls_streaming``, OpenAI ``delta.tool_calls``
chunks whose concatenation is the non-streamed call). ``tool_choice="required"`` and named functions are
enforced by :func:`tool_choice_spec` (a structured-output spec) and read by :class:`ForcedToolCallParser`.

Serving (phase 2 of issue 14): one parser instance per output sequence; decode with
``skip_special_tokens=False`` when ``parser.needs_special_tokens()``; a choice whose parser reports
``tools_called`` (or whose finished text has calls) ends with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

from shardserve.entrypoints.openai.tool_parsers.base import (
    DeltaFunctionCall,
    DeltaToolCall,
    ExtractedToolCalls,
    FunctionCall,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    make_tool_call_id,
)
from shardserve.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from shardserve.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from shardserve.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from shardserve.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser
from shardserve.entrypoints.openai.tool_parsers.tool_choice import (
    ForcedToolCallParser,
    legacy_functions_to_tools,
    required_schema,
    tool_choice_spec,
    tool_functions,
)

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "llama3_json": Llama3JsonToolParser,
    "llama4_json": Llama3JsonToolParser,
    "hermes": HermesToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
    "llama4_pythonic": PythonicToolParser,
}
"""``--tool-call-parser`` names (vLLM's) -> parser class."""


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {known}") from None


__all__ = [
    "TOOL_PARSERS",
    "DeltaFunctionCall",
    "DeltaToolCall",
    "ExtractedToolCalls",
    "ForcedToolCallParser",
    "FunctionCall",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "PythonicToolParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "get_tool_parser",
    "legacy_functions_to_tools",
    "make_tool_call_id",
    "required_schema",
    "tool_choice_spec",
    "tool_functions",
]
