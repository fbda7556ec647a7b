"""``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes 2/3, Qwen2.5, Qwen3).

Text before the first block is content; several blocks are several calls. A last block the model did not
close (it stopped at EOS) is read to the end of the text.
"""

from __future__ import annotations

from shardserve.entrypoints.openai.tool_parsers.base import (
    Incomplete,
    ParsedOutput,
    ToolParser,
    hold_back,
    json_call,
)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    """Hermes-style ``<tool_call>`` JSON blocks."""

    name = "hermes"
    markers = (START,)

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(START)
        if first < 0:
            return ParsedOutput(text if final else hold_back(text, self.markers))
        parsed = ParsedOutput(text[:first])
        start = first
        while start >= 0:
            body_start = start + len(START)
            end = text.find(END, body_start)
            body = text[body_start : end if end >= 0 else len(text)]
            try:
                call = json_call(body, complete=end >= 0 or final)
            except Incomplete:
                if final or end >= 0:
                    return ParsedOutput(text)  # a malformed block: the whole text is content
                raise
            parsed.calls.append(call)
            if end < 0:
                break
            start = text.find(START, end + len(END))
        return parsed
