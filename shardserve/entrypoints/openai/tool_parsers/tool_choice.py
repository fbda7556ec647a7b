"""``tool_choice`` "required" and named functions, enforced with a JSON-schema grammar (as vLLM does).

- ``"required"``: the output must be ``[{"name": <a tool>, "parameters": {...}}, ...]`` with each
  ``parameters`` valid for its tool (at least one call; exactly one when ``parallel_tool_calls`` is false).
- a named function (``{"type": "function", "function": {"name": "f"}}``): the output is ``f``'s arguments
  object itself.

The output is then read by :class:`ForcedToolCallParser`, whatever ``--tool-call-parser`` says, because the
grammar, not the model's own format, shaped it. The legacy ``functions`` / ``function_call`` fields map onto
``tools`` / ``tool_choice`` with :func:`legacy_functions_to_tools`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from shardserve.entrypoints.openai.tool_parsers.base import (
    Incomplete,
    ParsedOutput,
    PartialCall,
    ToolParser,
    array_calls,
    partial_json,
)
from shardserve.structured_output.spec import InvalidStructuredOutputError, StructuredOutputSpec, _json_schema_spec

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def tool_functions(tools: Sequence[Any] | None) -> dict[str, dict[str, Any]]:
    """``name -> function definition`` of OpenAI ``tools`` (dicts or pydantic models).

    Raises:
        InvalidStructuredOutputError: a tool is not ``{"type": "function", "function": {"name": ...}}``,
            two tools share a name, or a ``parameters`` schema is invalid (``param`` names the tool).
    """
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or []):
        tool = tool.model_dump(exclude_none=True) if hasattr(tool, "model_dump") else tool
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise InvalidStructuredOutputError(f"{where}: only tools of type 'function' are supported", where)
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidStructuredOutputError(f"{where}.function.name is required", f"{where}.function.name")
        name = function["name"]
        if name in functions:
            raise InvalidStructuredOutputError(f"{where}: two tools are named {name!r}", f"{where}.function.name")
        parameters = function.get("parameters")
        if parameters is not None:
            _json_schema_spec(parameters, f"{where}.function.parameters")  # raises for an invalid schema
        functions[name] = dict(function)
    return functions


def named_tool(tool_choice: Any) -> str | None:
    """The function name of a named ``tool_choice`` (chat's or the Responses API's shape), else None."""
    choice = tool_choice.model_dump() if hasattr(tool_choice, "model_dump") else tool_choice
    if not isinstance(choice, Mapping):
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
    return name if isinstance(name, str) else None


def tool_choice_spec(
    tools: Sequence[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None = True
) -> StructuredOutputSpec | None:
    """The grammar that forces a valid call, for ``"required"`` or a named function; None otherwise.

    Raises:
        InvalidStructuredOutputError: ``tool_choice`` is unknown, is ``"required"`` or names a function
            without ``tools``, names a function not in ``tools``, or a tool is invalid.
    """
    if tool_choice in (None, "none", "auto"):
        return None
    functions = tool_functions(tools)
    name = named_tool(tool_choice)
    if tool_choice != "required" and name is None:
        raise InvalidStructuredOutputError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if not functions:
        raise InvalidStructuredOutputError("tool_choice needs tools to choose from", "tool_choice")
    if name is not None:
        if name not in functions:
            raise InvalidStructuredOutputError(
                f"tool_choice names function {name!r}, which is not in tools ({', '.join(functions)})", "tool_choice"
            )
        return _json_schema_spec(functions[name].get("parameters") or EMPTY_PARAMETERS, "tool_choice")
    return _json_schema_spec(required_schema(functions, parallel_tool_calls is not False), "tool_choice")


def required_schema(functions: Mapping[str, Mapping[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """The JSON schema of ``[{"name": ..., "parameters": ...}, ...]`` over ``functions``.

    Each tool's ``$defs`` move to the root so its ``#/$defs/...`` references still resolve (vLLM's
    ``_get_json_schema_from_tools``).

    Raises:
        InvalidStructuredOutputError: two tools define the same ``$defs`` name differently.
    """
    defs: dict[str, Any] = {}
    alternatives = []
    for name, function in functions.items():
        parameters = copy.deepcopy(dict(function.get("parameters") or EMPTY_PARAMETERS))
        for def_name, definition in (parameters.pop("$defs", None) or {}).items():
            if defs.get(def_name, definition) != definition:
                raise InvalidStructuredOutputError(f"tools define $defs {def_name!r} differently; rename one", "tools")
            defs[def_name] = definition
        alternatives.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
            "required": ["name", "parameters"],
        })  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


class ForcedToolCallParser(ToolParser):
    """Reads the output of a :func:`tool_choice_spec` grammar: a call array, or one named call's arguments."""

    name = "forced"

    def __init__(self, tool_choice: Any, tokenizer: Any = None) -> None:
        super().__init__(tokenizer)
        self.function = named_tool(tool_choice)
        """The named function, or None for ``"required"``."""

    def parse(self, text: str, final: bool) -> ParsedOutput:
        if self.function is not None:
            return ParsedOutput("", [self._arguments_call(text, final)])
        return ParsedOutput("", self._array_calls(text, final))

    def _arguments_call(self, text: str, final: bool) -> PartialCall:
        try:
            return PartialCall(self.function, json.loads(text), complete=True)
        except ValueError:
            if final:
                raise Incomplete("the arguments are not JSON") from None
        return PartialCall(self.function, partial_json(text)[0] if text.strip() else None)

    def _array_calls(self, text: str, final: bool) -> list[PartialCall]:
        if not text.strip() and not final:
            return []
        calls = array_calls(text, final, argument_keys=("parameters",))
        if final and not calls:
            raise Incomplete("no call")
        return calls


def legacy_functions_to_tools(functions: Sequence[Any] | None, function_call: Any) -> tuple[list | None, Any]:
    """The deprecated ``functions`` / ``function_call`` fields as ``tools`` / ``tool_choice``.

    ``function_call`` is ``"none"``, ``"auto"`` or ``{"name": ...}``.
    """
    tools = [{"type": "function", "function": dict(f)} for f in functions] if functions else None
    if isinstance(function_call, Mapping) and "name" in function_call:
        return tools, {"type": "function", "function": {"name": function_call["name"]}}
    return tools, function_call
