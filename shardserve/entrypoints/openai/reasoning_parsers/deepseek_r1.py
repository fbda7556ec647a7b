"""``deepseek_r1``: DeepSeek-R1 and its distills (Llama, Qwen).

Their chat templates end the prompt with ``<think>\\n``, so the output usually starts inside the reasoning
with no opening tag; an output that does write ``<think>`` is read the same way.
"""

from __future__ import annotations

from shardserve.entrypoints.openai.reasoning_parsers.base import ThinkReasoningParser


class DeepSeekR1ReasoningParser(ThinkReasoningParser):
    """DeepSeek-R1 ``<think>`` reasoning."""

    name = "deepseek_r1"
