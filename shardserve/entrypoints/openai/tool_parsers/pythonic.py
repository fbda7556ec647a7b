"""``pythonic``: a Python list of calls, ``[get_weather(city="Paris"), search(q="x", n=3)]`` (Llama 3.2/4,
ToolACE). Llama 4's ``<|python_start|>``/``<|python_end|>`` wrapping is accepted.

The text is parsed with :mod:`ast` and every argument must be a literal (``ast.literal_eval``: strings,
numbers, booleans, None, lists, tuples, dicts); nothing is evaluated. Keyword arguments only. While
streaming, the unfinished text is closed (open strings and brackets) and parsed the same way; a last
argument that is not a literal yet (``flag=Tr``) waits.
"""

from __future__ import annotations

import ast
from typing import Any

from shardserve.entrypoints.openai.tool_parsers.base import Incomplete, ParsedOutput, PartialCall, ToolParser

WRAPPERS = ("<|python_start|>", "<|python_end|>")
_CLOSERS = {"[": "]", "(": ")", "{": "}"}


class PythonicToolParser(ToolParser):
    """Python-syntax tool calls, read with ``ast``."""

    name = "pythonic"
    markers = ("[", WRAPPERS[0])

    def parse(self, text: str, final: bool) -> ParsedOutput:
        body = text.strip()
        if body.startswith(WRAPPERS[0]):
            body = body[len(WRAPPERS[0]) :].removesuffix(WRAPPERS[1]).strip()
        elif not final and body and WRAPPERS[0].startswith(body):
            return ParsedOutput("")
        if not body.startswith("["):
            return ParsedOutput(text if final or body else "")
        try:
            return ParsedOutput("", _calls(body if final else _close(body), final))
        except Incomplete:
            if final:
                return ParsedOutput(text)
            raise


def _calls(source: str, final: bool) -> list[PartialCall]:
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise Incomplete("not Python yet") from None
    if not isinstance(tree, ast.List):
        raise Incomplete("not a list of calls")
    calls = []
    for i, node in enumerate(tree.elts):
        last = not final and i == len(tree.elts) - 1
        if last and isinstance(node, (ast.Name, ast.Attribute)):
            calls.append(PartialCall(None))  # the name is still being written
            break
        if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Name, ast.Attribute)):
            raise Incomplete("a list element is not a call")
        if node.args and not last:
            raise Incomplete("positional arguments are not supported")
        calls.append(PartialCall(_name(node.func), _arguments(node.keywords, last), complete=not last))
    return calls


def _name(func: ast.expr) -> str:
    return ast.unparse(func)  # ``f`` or ``module.f``


def _arguments(keywords: list[ast.keyword], partial: bool) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for j, kw in enumerate(keywords):
        if kw.arg is None:
            raise Incomplete("**kwargs are not supported")
        try:
            args[kw.arg] = _json_value(ast.literal_eval(kw.value))
        except (ValueError, TypeError, SyntaxError, RecursionError):
            if partial and j == len(keywords) - 1:
                break  # the last value is still being written (``x=Tr``)
            raise Incomplete(f"argument {kw.arg!r} is not a literal") from None
    return args


def _json_value(value: Any) -> Any:
    """A literal as JSON data: tuples become lists; sets, bytes, complex numbers and non-string keys fail."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v) for k, v in value.items()}
    raise ValueError(f"{type(value).__name__} is not JSON")


def _close(text: str) -> str:
    """``text`` with its open string (a trailing lone backslash dropped) and brackets closed."""
    stack: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 1
            elif text.startswith(quote, i):
                i += len(quote) - 1
                quote = None
        elif ch in "'\"":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            i += len(quote) - 1
        elif ch in _CLOSERS:
            stack.append(_CLOSERS[ch])
        elif ch in ")]}" and stack and stack[-1] == ch:
            stack.pop()
        i += 1
    if quote is not None:
        if text.endswith("\\") and not text.endswith("\\\\"):
            text = text[:-1]
        text += quote
    return text + "".join(reversed(stack))
