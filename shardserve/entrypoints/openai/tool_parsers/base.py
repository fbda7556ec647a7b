"""What every tool-call parser shares: OpenAI's tool-call shapes, and one streaming rule for all formats.

A parser only says how far a model's text has got: :meth:`ToolParser.parse` turns the text so far into
the content that may be shown and a list of (possibly partial) calls. The base class makes both APIs
from it: :meth:`ToolParser.extract_tool_calls` for a finished text and
:meth:`ToolParser.extract_tool_calls_streaming` for deltas. A streamed call's ``arguments`` chunks are
prefixes of ``json.dumps(arguments, ensure_ascii=False)`` (vLLM's form of the non-streamed call), so their
concatenation equals the non-streamed ``arguments``: a partial JSON value is written with its last string
left open and its last number (which may still grow) held back, and nothing is sent that a later parse
could contradict. Text that may be the start of a marker (``<tool_c``) is held back from the content.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, model_serializer
from pydantic_core import from_json

MISSING: Any = object()
"""A call whose arguments have not started yet."""
_ALPHANUMERIC = string.ascii_letters + string.digits


def make_tool_call_id(length: int = 24, prefix: str = "call_") -> str:
    """A random id in OpenAI's shape: ``call_`` and 24 letters or digits."""
    return prefix + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


# ------------------------------------------------------------------------------- OpenAI shapes


class _DropNone(BaseModel):
    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCall(BaseModel):
    """``tool_calls[].function`` of a message: ``arguments`` is JSON text."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One entry of an assistant message's ``tool_calls``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_DropNone):
    """``delta.tool_calls[].function`` of a chunk: the name once, then ``arguments`` chunks."""

    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_DropNone):
    """One entry of a chunk's ``delta.tool_calls``; the first chunk of a call carries ``id`` and ``type``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


@dataclass
class ExtractedToolCalls:
    """A finished text split into content and calls (``tools_called`` is False when there are none)."""

    tools_called: bool
    tool_calls: list[ToolCall]
    content: str | None


@dataclass
class ToolCallDelta:
    """What one streamed delta adds: content text and/or tool-call chunks."""

    content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


# ------------------------------------------------------------------------------- parser state


@dataclass
class PartialCall:
    """A call as far as the text goes.

    Attributes:
        name: the function name once it is complete, else None.
        arguments: the (partial) arguments value, :data:`MISSING` before they start; a string is taken
            as JSON text already (some models write ``"arguments": "{...}"``).
        complete: the call's text is finished, so ``arguments`` is final.
    """

    name: str | None
    arguments: Any = MISSING
    complete: bool = False

    def arguments_text(self) -> str:
        """The final ``arguments`` string: ``json.dumps(arguments, ensure_ascii=False)``."""
        if self.arguments is MISSING or self.arguments is None:
            return "{}"
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments, ensure_ascii=False)

    def partial_arguments_text(self) -> str:
        """A prefix of :meth:`arguments_text` of every completion of this call."""
        if self.arguments is MISSING or self.arguments is None:
            return ""
        return self.arguments if isinstance(self.arguments, str) else open_json(self.arguments)


@dataclass
class ParsedOutput:
    """The text so far: ``content`` that may be shown, and the calls (only the last may be incomplete)."""

    content: str
    calls: list[PartialCall] = field(default_factory=list)


class Incomplete(Exception):
    """The text cannot be read yet (a streaming parse waits for more)."""


def open_json(value: Any) -> str:
    """JSON text of a partially parsed value that is a prefix of the text of any completion of it.

    The last string is left unclosed, the last container open, and a last number, ``true``, ``false`` or
    ``null`` is held back (``1`` may become ``1e5``, written ``100000.0``). Separators are
    ``json.dumps``'s (``", "``, ``": "``).
    """
    if isinstance(value, dict):
        items = list(value.items())
        if not items:
            return "{"
        head = "".join(f"{json.dumps(k, ensure_ascii=False)}: {_dumps(v)}, " for k, v in items[:-1])
        key, last = items[-1]
        return "{" + head + json.dumps(key, ensure_ascii=False) + ": " + open_json(last)
    if isinstance(value, list):
        if not value:
            return "["
        return "[" + "".join(f"{_dumps(v)}, " for v in value[:-1]) + open_json(value[-1])
    if isinstance(value, str):
        return _dumps(value)[:-1]
    return ""


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def partial_json(text: str) -> tuple[Any, Any]:
    """``(value with partial trailing strings, value with complete strings only)`` of unfinished JSON.

    Raises:
        Incomplete: not even a prefix of JSON.
    """
    try:
        return from_json(text, allow_partial="trailing-strings"), from_json(text, allow_partial=True)
    except ValueError as exc:
        raise Incomplete(str(exc)) from None


def json_call(body: str, complete: bool, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> PartialCall:
    """A call written as ``{"name": ..., "arguments": {...}}`` (or ``"parameters"``).

    Args:
        body: the object's text (complete or a prefix).
        complete: ``body`` is the whole object.

    Raises:
        Incomplete: a complete body that is not such an object, or a prefix that cannot be one yet.
    """
    if complete:
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise Incomplete(f"not JSON: {exc}") from None
        key = next((k for k in argument_keys if isinstance(obj, dict) and k in obj), None)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or key is None:
            raise Incomplete("not a {name, arguments} object")
        return PartialCall(obj["name"], obj[key], complete=True)
    if not body.strip():
        return PartialCall(None)
    value, strict = partial_json(body)
    if not isinstance(value, dict) or not isinstance(strict, dict):
        raise Incomplete("not an object")
    key = next((k for k in argument_keys if k in value), None)
    name = strict.get("name")
    # The name counts once the arguments have started too: a plain JSON answer with a "name" key is no call.
    if not isinstance(name, str) or key is None:
        return PartialCall(None)
    return PartialCall(name, value[key], complete=False)


def array_calls(
    body: str, final: bool, argument_keys: tuple[str, ...] = ("arguments", "parameters")
) -> list[PartialCall]:
    """Calls written as a JSON array of ``{"name", "arguments"}`` objects (a bare object is one call).

    Raises:
        Incomplete: not such an array (when ``final``, or a prefix that cannot become one).
    """
    try:
        value, complete = json.loads(body), True
    except ValueError:
        if final:
            raise Incomplete("the tool-call array is not JSON") from None
        (value, strict), complete = partial_json(body), False
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, dict) for item in items):
        raise Incomplete("tool calls are not objects")
    calls = [json_call(json.dumps(item), True, argument_keys) for item in (items if complete else items[:-1])]
    if not complete and items:
        strict_items = strict if isinstance(strict, list) else [strict]
        last_strict = strict_items[-1] if len(strict_items) == len(items) else {}
        name = last_strict.get("name") if isinstance(last_strict, dict) else None
        key = next((k for k in argument_keys if k in items[-1]), None)
        # As in json_call: the name counts once the arguments have started.
        calls.append(PartialCall(name if isinstance(name, str) and key else None, items[-1].get(key, MISSING)))
    return calls


def hold_back(text: str, markers: tuple[str, ...]) -> str:
    """``text`` without a suffix that could be the start of one of ``markers``."""
    for cut in range(min(len(text), max((len(m) for m in markers), default=0)), 0, -1):
        if any(m.startswith(text[-cut:]) for m in markers):
            return text[:-cut]
    return text


# ------------------------------------------------------------------------------------ parsers


@dataclass
class _SentCall:
    id: str
    arguments: str = ""


class ToolParser:
    """Base of the ``--tool-call-parser`` parsers; one instance per output sequence (it keeps stream state).

    Attributes:
        name: the ``--tool-call-parser`` name.
        markers: text that opens tool calls; where the tokenizer has them as special tokens, decode the
            output with ``skip_special_tokens=False`` (see :meth:`needs_special_tokens`).
    """

    name: ClassVar[str] = ""
    markers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._sent_content = ""
        self._sent_calls: list[_SentCall] = []

    def parse(self, text: str, final: bool) -> ParsedOutput:
        """Content and calls of ``text``; ``final`` when no more text will come.

        A final text that is not a well-formed tool call is all content. Raises :class:`Incomplete` when a
        streaming text cannot be read yet.
        """
        raise NotImplementedError

    def make_id(self) -> str:
        """The id of a new call."""
        return make_tool_call_id()

    def needs_special_tokens(self) -> bool:
        """Some marker is a special token of the tokenizer, so decoding must keep special tokens."""
        is_special = getattr(self.tokenizer, "is_special", None)
        backend = getattr(self.tokenizer, "backend", None)
        if is_special is None or backend is None:
            return False
        ids = (backend.token_to_id(m) for m in self.markers)
        return any(i is not None and is_special(i) for i in ids)

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """Split a finished output into content and tool calls (all content when it holds no valid call)."""
        try:
            parsed = self.parse(text, final=True)
        except Incomplete:
            parsed = ParsedOutput(text)
        calls = [c for c in parsed.calls if c.name is not None and c.complete]
        if not calls or len(calls) != len(parsed.calls):
            return ExtractedToolCalls(False, [], text)
        tool_calls = [ToolCall(id=self.make_id(), function=FunctionCall(name=c.name, arguments=c.arguments_text()))
                      for c in calls]  # fmt: skip
        return ExtractedToolCalls(True, tool_calls, parsed.content or None)

    def extract_tool_calls_streaming(
        self, previous_text: str, current_text: str, delta_text: str, finished: bool = False
    ) -> ToolCallDelta | None:
        """What ``delta_text`` adds, given all the text so far; None when nothing can be sent yet.

        Call it for every delta of one output sequence (same instance), with ``finished=True`` on the last
        (possibly with an empty delta) so held-back text and the last call's tail are flushed.
        ``previous_text`` and ``delta_text`` are accepted for vLLM's signature; ``current_text`` decides.
        """
        try:
            parsed = self.parse(current_text, final=finished)
        except Incomplete:
            return None
        delta = ToolCallDelta()
        if parsed.content.startswith(self._sent_content) and len(parsed.content) > len(self._sent_content):
            delta.content = parsed.content[len(self._sent_content) :]
            self._sent_content = parsed.content
        for index, call in enumerate(parsed.calls):
            chunk = self._call_delta(index, call)
            if chunk is not None:
                delta.tool_calls.append(chunk)
            if index >= len(self._sent_calls):
                break  # a call's header waits for its name; later calls wait for it
        return delta if delta.content is not None or delta.tool_calls else None

    def _call_delta(self, index: int, call: PartialCall) -> DeltaToolCall | None:
        new = index == len(self._sent_calls)
        if new:
            if call.name is None:
                return None
            self._sent_calls.append(_SentCall(self.make_id()))
        sent = self._sent_calls[index]
        text = call.arguments_text() if call.complete else call.partial_arguments_text()
        chunk = text[len(sent.arguments) :] if text.startswith(sent.arguments) else ""
        sent.arguments += chunk
        if new:
            function = DeltaFunctionCall(name=call.name, arguments=chunk)
            return DeltaToolCall(index=index, id=sent.id, type="function", function=function)
        return DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=chunk)) if chunk else None

    @property
    def tools_called(self) -> bool:
        """A call has been streamed (the server ends the choice with ``finish_reason: "tool_calls"``)."""
        return bool(self._sent_calls)
