"""Render Hugging Face chat templates in a Jinja2 sandbox, the way ``transformers`` does.

Chat templates ship with model files and are untrusted code. They are compiled in jinja2's
``ImmutableSandboxedEnvironment`` with the same options, filters and globals as
``transformers.utils.chat_template_utils._cached_compile_jinja_template`` (trim_blocks, lstrip_blocks,
``tojson`` without HTML escaping, ``raise_exception``, ``strftime_now``, a safe ``dict`` and
``namespace``, the ``loopcontrols`` extension and a pass-through ``{% generation %}`` tag), so that a
prompt rendered here matches ``tokenizer.apply_chat_template(..., tokenize=False)`` byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body unchanged.

    transformers uses the tag to find assistant tokens for training masks; serving only needs the text.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` for templates without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attribute names (no dunder access)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore-prefixed namespace attribute {name!r}")


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile ``template`` once per distinct string (LRU cache of 32).

    Raises:
        ValueError: the template is not valid Jinja2 (the message carries jinja2's).
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from e


def _plain(value: Any) -> Any:
    """Rebuild ``value`` out of plain JSON types so the sandbox only ever sees dict/list/str/numbers.

    Objects with methods unknown to the sandbox (pydantic models, dataclasses, enums) become plain data;
    anything else becomes an inert ``"<TypeName>"`` placeholder, as transformers does.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    special_tokens: Mapping[str, str | None] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` (OpenAI-style dicts with ``role``/``content``) into a prompt string.

    Args:
        template: Jinja2 chat template text (from ``tokenizer_config.json`` or GGUF
            ``tokenizer.chat_template``).
        messages: the conversation; each message must be a mapping.
        add_generation_prompt: append the assistant-turn header so the model answers next.
        tools: JSON schemas of callable tools, for templates that support tool use.
        special_tokens: ``bos_token``/``eos_token``/... strings exposed to the template; ``kwargs``
            override them, as in ``transformers``.
        **kwargs: extra template variables (e.g. ``enable_thinking``, ``documents``).

    Returns:
        The rendered prompt text (special tokens written out as text, e.g. ``<|im_start|>``).

    Raises:
        ValueError: a message is not a mapping, the template does not compile, calls
            ``raise_exception(msg)`` (``msg`` is in the error), reaches Python internals (jinja2
            ``SecurityError``) or fails in any other way while rendering.
    """
    compiled = compile_chat_template(template)
    chat = _plain(list(messages))
    for message in chat:
        if not isinstance(message, dict):
            raise ValueError(f"chat messages must be mappings with 'role' and 'content', got {message!r}")
    variables: dict[str, Any] = {"documents": None}  # transformers always defines it
    variables.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
    variables.update(_plain(kwargs))
    try:
        return compiled.render(
            messages=chat,
            tools=_plain(tools),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except SecurityError as e:
        raise ValueError(f"chat template tried an operation the sandbox forbids: {e}") from e
    except TemplateError as e:
        raise ValueError(f"chat template raised an error: {e}") from e
    except Exception as e:
        raise ValueError(f"chat template failed while rendering: {type(e).__name__}: {e}") from e
