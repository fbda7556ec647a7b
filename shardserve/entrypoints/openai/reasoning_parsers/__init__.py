"""Reasoning parsers for ``--reasoning-parser NAME``: ``deepseek_r1`` and ``qwen3``.

Serving (phase 2 of issue 14): one parser per output sequence. The reasoning part goes to the message's
``reasoning`` and ``reasoning_content`` fields (dropped with ``include_reasoning: false``); tool parsing
and the structured-output grammar apply to the content part only, so give the manager's matcher
``reasoning_end_ids=parser.end_token_ids`` unless ``parser.prompt_ends_reasoning(prompt_text)``.
"""

from __future__ import annotations

from shardserve.entrypoints.openai.reasoning_parsers.base import ReasoningDelta, ThinkReasoningParser
from shardserve.entrypoints.openai.reasoning_parsers.deepseek_r1 import DeepSeekR1ReasoningParser
from shardserve.entrypoints.openai.reasoning_parsers.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ThinkReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}
"""``--reasoning-parser`` names (vLLM's) -> parser class."""


def get_reasoning_parser(name: str) -> type[ThinkReasoningParser]:
    """The parser class registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {known}") from None


__all__ = [
    "REASONING_PARSERS",
    "DeepSeekR1ReasoningParser",
    "Qwen3ReasoningParser",
    "ReasoningDelta",
    "ThinkReasoningParser",
    "get_reasoning_parser",
]
