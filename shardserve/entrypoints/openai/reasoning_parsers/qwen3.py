"""``qwen3``: Qwen3 (the model writes ``<think>``) and Qwen3-2507/Qwen3.5 (the template opens it).

With ``chat_template_kwargs: {"enable_thinking": false}`` the template closes the section in the prompt and
the whole output is content, as in vLLM.
"""

from __future__ import annotations

from shardserve.entrypoints.openai.reasoning_parsers.base import ThinkReasoningParser


class Qwen3ReasoningParser(ThinkReasoningParser):
    """Qwen3 ``<think>`` reasoning, switched off by ``enable_thinking: false``."""

    name = "qwen3"

    @property
    def thinking(self) -> bool:
        return self.chat_template_kwargs.get("enable_thinking", True) is not False
