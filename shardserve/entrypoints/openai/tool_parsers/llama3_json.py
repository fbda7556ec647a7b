"""``llama3_json``: Llama 3.1/3.2/3.3 JSON tool calls, ``{"name": ..., "parameters": {...}}``.

The output is a call when it starts (after whitespace) with ``<|python_tag|>`` or ``{``; several calls
are separated by ``;``. Anything else, or JSON that is not such an object, is content. ``"arguments"`` is
accepted for ``"parameters"`` as vLLM does. (``<|python_tag|>`` followed by Python code, Llama's built-in
tools, is content.)
"""

from __future__ import annotations

import json

from shardserve.entrypoints.openai.tool_parsers.base import Incomplete, ParsedOutput, ToolParser, json_call

PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("parameters", "arguments")


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON tool calls."""

    name = "llama3_json"
    markers = (PYTHON_TAG,)

    def parse(self, text: str, final: bool) -> ParsedOutput:
        stripped = text.lstrip()
        if stripped.startswith(PYTHON_TAG):
            body = stripped[len(PYTHON_TAG) :]
        elif stripped.startswith("{"):
            body = stripped
        elif not final and PYTHON_TAG.startswith(stripped):
            return ParsedOutput("")  # empty, or the start of the tag: wait
        else:
            return ParsedOutput(text)
        try:
            return ParsedOutput("", self._calls(body, final))
        except Incomplete:
            if final:
                return ParsedOutput(text)
            return ParsedOutput("")  # JSON in progress: content is held until it is known not to be a call

    def _calls(self, body: str, final: bool) -> list:
        decoder = json.JSONDecoder()
        calls, pos = [], 0
        while True:
            pos = _skip_space(body, pos)
            if pos == len(body):
                if not calls and (final or not body.strip()):
                    raise Incomplete("no call")
                return calls
            try:
                _, end = decoder.raw_decode(body, pos)
            except ValueError:
                if final:
                    raise Incomplete("not JSON") from None
                calls.append(json_call(body[pos:], complete=False, argument_keys=ARGUMENT_KEYS))
                return calls
            calls.append(json_call(body[pos:end], complete=True, argument_keys=ARGUMENT_KEYS))
            pos = _skip_space(body, end)
            if pos < len(body) and body[pos] == ";":
                pos += 1
            elif pos < len(body):
                raise Incomplete("text after a call")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos
