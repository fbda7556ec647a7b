"""Split a reasoning model's output into its ``<think>...</think>`` section and the answer.

One rule serves both APIs, as for the tool parsers: :meth:`ThinkReasoningParser.split` reads the text so
far, :meth:`~ThinkReasoningParser.extract_reasoning` uses it on a finished text and
:meth:`~ThinkReasoningParser.extract_reasoning_streaming` sends what each delta adds, holding back text
that may be the start of a tag (``</thi``), so the streamed reasoning and content join to the non-streamed
ones. A ``<think>`` tag counts only at the start of the output (after whitespace); later it is text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class ReasoningDelta:
    """What one streamed delta adds to ``reasoning`` (vLLM's name; also sent as ``reasoning_content``) and to
    ``content``."""

    reasoning: str | None = None
    content: str | None = None


def _hold_back(text: str, tag: str) -> str:
    """``text`` without a suffix that could be the start of ``tag``."""
    for cut in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-cut:]):
            return text[:-cut]
    return text


class ThinkReasoningParser:
    """``<think>`` ... ``</think>`` reasoning, which may start with no opening tag (the chat template wrote it).

    One instance per output sequence (streaming keeps state).

    Args:
        tokenizer: the serving tokenizer, for the token-id helpers (may be None for text-only use).
        chat_template_kwargs: the request's template variables (``enable_thinking`` for Qwen3).
    """

    name: ClassVar[str] = ""
    start_tag: ClassVar[str] = "<think>"
    end_tag: ClassVar[str] = "</think>"

    def __init__(self, tokenizer: Any = None, chat_template_kwargs: Mapping[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._sent_reasoning = ""
        self._sent_content = ""

    @property
    def thinking(self) -> bool:
        """The output may hold reasoning (Qwen3 with ``enable_thinking: false`` has none)."""
        return True

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """``(reasoning, content)`` of ``text``; when not ``final``, a possible partial tag is held back."""
        if not self.thinking:
            return "", text
        stripped = text.lstrip()
        if stripped.startswith(self.start_tag):
            body = stripped[len(self.start_tag) :]
        elif not final and self.start_tag.startswith(stripped):
            return "", ""  # whitespace, or the start of <think>: wait
        else:
            body = text  # the template opened the section in the prompt
        reasoning, tag, content = body.partition(self.end_tag)
        if tag:
            return reasoning, content
        return (body if final else _hold_back(body, self.end_tag)), ""

    def extract_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """``(reasoning, content)`` of a finished output, None for an empty part. Without ``</think>`` the
        output was cut inside the reasoning (``max_tokens``), so it is all reasoning."""
        reasoning, content = self.split(text, final=True)
        return reasoning or None, content or None

    def extract_reasoning_streaming(
        self, previous_text: str, current_text: str, delta_text: str, finished: bool = False
    ) -> ReasoningDelta | None:
        """What the delta adds, given all the text so far; None when nothing can be sent yet.

        Call it with ``finished=True`` on the last delta so held-back text is flushed. ``previous_text`` and
        ``delta_text`` are accepted for vLLM's signature; ``current_text`` decides.
        """
        reasoning, content = self.split(current_text, final=finished)
        delta = ReasoningDelta()
        if reasoning.startswith(self._sent_reasoning) and len(reasoning) > len(self._sent_reasoning):
            delta.reasoning = reasoning[len(self._sent_reasoning) :]
            self._sent_reasoning = reasoning
        if content.startswith(self._sent_content) and len(content) > len(self._sent_content):
            delta.content = content[len(self._sent_content) :]
            self._sent_content = content
        return delta if delta.reasoning is not None or delta.content is not None else None

    # ------------------------------------------------------------------ token ids (structured outputs)

    def _tag_ids(self, tag: str) -> list[int]:
        backend = getattr(self.tokenizer, "backend", None)
        if backend is None:
            return []
        single = backend.token_to_id(tag)
        return [single] if single is not None else list(self.tokenizer.encode(tag, add_special_tokens=False))

    @property
    def end_token_ids(self) -> list[int]:
        """Token ids of ``</think>`` (one id where the vocabulary has it, as Qwen3 and DeepSeek-R1 do), for
        ``StructuredOutputManager.matcher(reasoning_end_ids=...)``; empty without a tokenizer."""
        return self._tag_ids(self.end_tag)

    def is_reasoning_end(self, token_ids: Sequence[int]) -> bool:
        """``</think>`` occurs in ``token_ids`` after the last ``<think>`` (when each is one token)."""
        start, end = self._tag_ids(self.start_tag), self._tag_ids(self.end_tag)
        if len(start) != 1 or len(end) != 1:
            return False
        ids = list(token_ids)
        last_end = max((i for i, t in enumerate(ids) if t == end[0]), default=-1)
        last_start = max((i for i, t in enumerate(ids) if t == start[0]), default=-1)
        return last_end > last_start

    def prompt_ends_reasoning(self, prompt: str) -> bool:
        """The rendered prompt closed the section itself (Qwen3's ``enable_thinking: false`` template writes
        ``<think>\\n\\n</think>``): then the whole output is content and the grammar starts at once."""
        if not self.thinking:
            return True
        start = prompt.rfind(self.start_tag)
        return start >= 0 and prompt.find(self.end_tag, start) >= 0
