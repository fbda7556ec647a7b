"""``mistral``: ``[TOOL_CALLS]`` followed by the calls, in either of Mistral's two formats.

- Tokenizers before v11 (Mistral 7B v0.3, Mixtral 8x22B, Nemo): ``[TOOL_CALLS][{"name": ..., "arguments":
  {...}}, ...]``, one JSON array.
- v11 and later (Mistral Small 3.2, Magistral, Devstral): ``[TOOL_CALLS]name[ARGS]{...}`` per call,
  optionally ``name[CALL_ID]id[ARGS]{...}``.

Text before ``[TOOL_CALLS]`` is content. The markers are special tokens, so the server decodes with
``skip_special_tokens=False`` (see :meth:`ToolParser.needs_special_tokens`). Call ids are 9 letters or
digits: Mistral's chat templates refuse others when the call is sent back.
"""

from __future__ import annotations

import json

from shardserve.entrypoints.openai.tool_parsers.base import (
    Incomplete,
    ParsedOutput,
    PartialCall,
    ToolParser,
    array_calls,
    hold_back,
    make_tool_call_id,
    partial_json,
)

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"


class MistralToolParser(ToolParser):
    """Mistral ``[TOOL_CALLS]`` tool calls (JSON array or v11 ``name[ARGS]{...}``)."""

    name = "mistral"
    markers = (TOOL_CALLS,)

    def make_id(self) -> str:
        return make_tool_call_id(9, prefix="")

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(TOOL_CALLS)
        if first < 0:
            return ParsedOutput(text if final else hold_back(text, self.markers))
        rest = text[first + len(TOOL_CALLS) :]
        try:
            head = rest.lstrip()
            if not head and not final:
                raise Incomplete("nothing after the marker yet")
            calls = array_calls(head, final) if head.startswith(("[", "{")) else _v11_calls(rest, final)
        except Incomplete:
            if final:
                return ParsedOutput(text)
            raise
        return ParsedOutput(text[:first], calls)


def _v11_calls(rest: str, final: bool) -> list[PartialCall]:
    """``name[ARGS]{...}`` segments separated by ``[TOOL_CALLS]``."""
    segments = rest.split(TOOL_CALLS)
    calls = []
    for i, segment in enumerate(segments):
        complete = final or i < len(segments) - 1
        name_part, sep, body = segment.partition(ARGS)
        name = name_part.split(CALL_ID, 1)[0].strip()
        if not sep:
            if complete:
                raise Incomplete(f"no {ARGS} after the tool name")
            calls.append(PartialCall(None))
            break
        if not name:
            raise Incomplete("empty tool name")
        if complete:
            try:
                calls.append(PartialCall(name, json.loads(body), complete=True))
            except ValueError:
                raise Incomplete("the arguments are not JSON") from None
        else:
            value = partial_json(body)[0] if body.strip() else None
            calls.append(PartialCall(name, value if value is not None else None, complete=False))
    return calls
