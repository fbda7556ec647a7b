"""What a request asks its output to match, parsed from each API dialect into one :class:`StructuredOutputSpec`.

Dialects (all map to the same kinds):

- OpenAI ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name", "description", "schema", "strict"}}``.
- vLLM ``structured_outputs``: ``{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`` plus
  ``disable_any_whitespace``; its older top-level names ``guided_json`` / ``guided_regex`` /
  ``guided_choice`` / ``guided_grammar`` / ``guided_whitespace_pattern``.
- SGLang ``/generate`` ``sampling_params``: ``json_schema`` (a JSON string), ``regex``, ``ebnf``.

Every payload is checked here, without a tokenizer: a JSON schema against its meta-schema (jsonschema) and
then by xgrammar's converter, regexes and grammars by xgrammar's parsers. A problem raises
:class:`InvalidStructuredOutputError` (a ``ValueError``) whose message names the field and the problem; the
server answers it with HTTP 400. What xgrammar would accept but not enforce is refused too, so no constraint
is silently dropped: the JSON-schema keywords ``not``, ``if``/``then``/``else``, ``allOf`` with several
parts, ``uniqueItems``, ``contains``, ``propertyNames``, ``dependentRequired``/``dependentSchemas``,
``minLength``/``maxLength`` next to ``pattern`` or ``format``, ``multipleOf`` on numbers or with a one-sided
range; in regexes (and schema patterns) lookarounds and ``^``/``$`` anywhere but at the ends.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["json", "json_object", "regex", "choice", "grammar", "lark"]
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar", "lark")

# JSON-schema keywords xgrammar 0.2 parses but does not enforce (checked against its matcher).
_UNENFORCED_KEYWORDS = (
    "not",
    "if",
    "then",
    "else",
    "contains",
    "minContains",
    "maxContains",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
)
# Keywords whose value is one subschema / a list of them / a name -> subschema map.
_SUBSCHEMA = ("additionalProperties", "items", "additionalItems", "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class InvalidStructuredOutputError(ValueError):
    """A structured-output constraint that cannot be used; the server answers HTTP 400.

    Attributes:
        param: the request field at fault (``response_format``, ``structured_outputs.regex``, ...).
        code: ``invalid_structured_output``.
    """

    code = "invalid_structured_output"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class StructuredOutputSpec:
    """One constraint on a request's output: its kind and payload, as the grammar compiler takes them.

    Small and picklable, so it can travel to the rank that builds the matcher; it is also the cache key of
    the compiled grammar.

    Attributes:
        kind: ``json`` (payload: the schema as compact JSON text), ``json_object`` (any JSON object; payload
            ``""``), ``regex`` (payload: the pattern), ``choice`` (payload: the alternatives, one of which is
            output verbatim), ``grammar`` (payload: EBNF in xgrammar's/llama.cpp GBNF syntax, root rule
            ``root``), ``lark`` (payload: a Lark grammar with a ``start`` rule).
        any_whitespace: JSON kinds: allow any whitespace between tokens (vLLM's default); False fixes the
            separators to ``", "`` and ``": "`` (vLLM's ``disable_any_whitespace``).
        param: the request field it came from, for error messages.
    """

    kind: Kind
    payload: str | tuple[str, ...]
    any_whitespace: bool = True
    param: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidStructuredOutputError(f"unknown structured output kind {self.kind!r}", self.param or None)

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema of a ``json`` spec (parsed), None for other kinds."""
        return json.loads(self.payload) if self.kind == "json" else None  # type: ignore[arg-type]

    def ebnf(self) -> str | None:
        """The EBNF grammar of a ``choice`` or ``grammar`` spec, None for other kinds."""
        if self.kind == "choice":
            return "root ::= " + " | ".join(_ebnf_literal(c) for c in self.payload)
        return self.payload if self.kind == "grammar" else None  # type: ignore[return-value]

    def validate(self) -> StructuredOutputSpec:
        """Check the payload with the grammar engine's parsers (no tokenizer needed); returns ``self``.

        Raises:
            InvalidStructuredOutputError: the schema, regex or grammar is invalid or uses what cannot be
                enforced; the message names the field and the problem.
        """
        import xgrammar as xgr

        where = self.param or self.kind
        try:
            if self.kind == "json":
                _check_json_schema(self.schema, where)  # type: ignore[arg-type]
                xgr.Grammar.from_json_schema(self.payload, any_whitespace=self.any_whitespace)  # type: ignore[arg-type]
            elif self.kind == "regex":
                problem = regex_problem(self.payload)  # type: ignore[arg-type]
                if problem is not None:
                    raise InvalidStructuredOutputError(f"{where}: unsupported regex: {problem}", where)
                xgr.Grammar.from_regex(self.payload)  # type: ignore[arg-type]
            elif self.kind in ("choice", "grammar"):
                xgr.Grammar.from_ebnf(self.ebnf())  # type: ignore[arg-type]
            elif self.kind == "lark":
                xgr.Grammar.from_lark(self.payload)  # type: ignore[arg-type]
        except InvalidStructuredOutputError:
            raise
        except (RuntimeError, ValueError) as exc:  # ValueError: xgrammar's own message may not decode (UTF-8 cut)
            noun = {"json": "JSON schema", "regex": "regex", "lark": "Lark grammar"}.get(self.kind, "grammar")
            detail = xgrammar_message(exc) if isinstance(exc, RuntimeError) else "the grammar engine cannot parse it"
            raise InvalidStructuredOutputError(f"{where}: invalid {noun}: {detail}", where) from exc
        return self


def xgrammar_message(exc: BaseException) -> str:
    """xgrammar's error text without its C++ source location prefix."""
    return _XGRAMMAR_LOCATION.sub("", str(exc).strip()).strip()


def _ebnf_literal(text: str) -> str:
    # JSON string syntax is EBNF string syntax for these escapes; non-BMP characters stay raw
    # (xgrammar's EBNF parser does not join \\uD83D\\uDE00 surrogate pairs).
    return json.dumps(text, ensure_ascii=False)


# ------------------------------------------------------------------------------------ JSON schema checks


def _check_json_schema(schema: Any, where: str) -> None:
    """Meta-schema check (jsonschema) and refusal of keywords xgrammar does not enforce."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise InvalidStructuredOutputError(f"{where}: a JSON schema must be an object, got {_kind(schema)}", where)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.path)
        raise InvalidStructuredOutputError(
            f"{where}: invalid JSON schema: {exc.message}" + (f" (at /{at})" if at else ""), where
        ) from None
    for path, node in _subschemas(schema, ""):
        problem = _unenforced(node)
        if problem is not None:
            raise InvalidStructuredOutputError(
                f"{where}: JSON schema {problem} (at {path or '/'}) is not supported by the grammar engine "
                "(xgrammar), so it could not be enforced",
                where,
            )


def _unenforced(node: dict[str, Any]) -> str | None:
    """What in one schema object xgrammar would accept but not enforce (it logs a warning and drops it)."""
    for keyword in _UNENFORCED_KEYWORDS:
        if keyword in node:
            return f"keyword {keyword!r}"
    if node.get("uniqueItems") is True:
        return "keyword 'uniqueItems'"
    if len(node.get("allOf") or []) > 1:
        return "keyword 'allOf' with several subschemas"
    lengths = "minLength" in node or "maxLength" in node
    if lengths and ("pattern" in node or "format" in node):
        return f"'{'pattern' if 'pattern' in node else 'format'}' together with 'minLength'/'maxLength'"
    if "multipleOf" in node:
        types = node.get("type")
        lower = "minimum" in node or "exclusiveMinimum" in node
        upper = "maximum" in node or "exclusiveMaximum" in node
        if types != "integer" and not (isinstance(types, list) and "integer" in types and "number" not in types):
            return "'multipleOf' on a non-integer"
        if lower != upper:
            return "'multipleOf' with a bound on one side only"
    if isinstance(node.get("pattern"), str):
        problem = regex_problem(node["pattern"])
        if problem is not None:
            return f"pattern {node['pattern']!r} ({problem})"
    return None


def regex_problem(pattern: str) -> str | None:
    """What xgrammar would silently drop from ``pattern``: a lookaround, or an anchor not at an end.

    Parsed with Python's regex parser; a pattern Python cannot parse is left to xgrammar's own errors.
    """
    import re._constants as c
    import re._parser as parser

    try:
        tree = parser.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return None

    def walk(items: Any, top: bool) -> str | None:
        items = list(items)
        for i, (op, arg) in enumerate(items):
            if op in (c.ASSERT, c.ASSERT_NOT):
                return "lookaround assertions are not supported"
            if op == c.AT and arg in (c.AT_BEGINNING, c.AT_BEGINNING_STRING, c.AT_END, c.AT_END_STRING):
                at_edge = top and (i == 0 if arg in (c.AT_BEGINNING, c.AT_BEGINNING_STRING) else i == len(items) - 1)
                if not at_edge:
                    return "'^'/'$' anchors are only supported at the start and end"
            children = []
            if op == c.BRANCH:
                children = [(branch, top) for branch in arg[1]]
            elif op == c.SUBPATTERN:
                children = [(arg[-1], False)]
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                children = [(arg[2], False)]
            elif op == c.ATOMIC_GROUP:
                children = [(arg, False)]
            for child, child_top in children:
                found = walk(child, child_top and len(items) == 1)
                if found:
                    return found
        return None

    return walk(tree, True)


def _subschemas(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema object with its JSON-pointer path (values under ``properties``, ``items``, ...)."""
    if not isinstance(node, dict):
        return
    yield path, node
    for key in _SUBSCHEMA + _SUBSCHEMA_LISTS:  # "items" may be a list too (draft 4 tuples)
        value = node.get(key)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                yield from _subschemas(sub, f"{path}/{key}/{i}")
        else:
            yield from _subschemas(value, f"{path}/{key}")
    for key in _SUBSCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                yield from _subschemas(sub, f"{path}/{key}/{name}")


_KIND_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _kind(value: Any) -> str:
    return _KIND_NAMES.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------ dialects


def _as_dict(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump(exclude_none=True) if callable(dump) else value


def _json_schema_spec(schema: Any, param: str, any_whitespace: bool = True) -> StructuredOutputSpec:
    """A ``json`` spec from a schema given as an object or as JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidStructuredOutputError(f"{param}: the JSON schema is not valid JSON: {exc}", param) from None
    if not isinstance(schema, dict):
        raise InvalidStructuredOutputError(f"{param}: a JSON schema must be an object, got {_kind(schema)}", param)
    text = json.dumps(schema, separators=(",", ":"), sort_keys=False, ensure_ascii=False)
    return StructuredOutputSpec("json", text, any_whitespace, param).validate()


def from_response_format(response_format: Any, param: str = "response_format") -> StructuredOutputSpec | None:
    """OpenAI's ``response_format`` (or a pydantic model of it); None for ``text`` or absent.

    ``strict`` is accepted either way: the grammar always enforces the schema, which is what
    ``strict: true`` promises.

    Raises:
        InvalidStructuredOutputError: unknown ``type``, missing or invalid ``json_schema.schema``.
    """
    rf = _as_dict(response_format)
    if rf is None:
        return None
    if not isinstance(rf, Mapping):
        raise InvalidStructuredOutputError(f"{param} must be an object with a 'type'", param)
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object", "", True, param)
    if kind != "json_schema":
        raise InvalidStructuredOutputError(
            f"{param}.type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'", f"{param}.type"
        )
    body = _as_dict(rf.get("json_schema"))
    if not isinstance(body, Mapping):
        raise InvalidStructuredOutputError(f"{param}.json_schema is required for type 'json_schema'", param)
    # The openai SDK sends the schema under "schema"; pydantic models of it alias the field as "schema_".
    schema = body.get("schema", body.get("schema_", body.get("json_schema")))
    if schema is None:
        raise InvalidStructuredOutputError(f"{param}.json_schema.schema is required", f"{param}.json_schema.schema")
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidStructuredOutputError(f"{param}.json_schema.name must be a string", f"{param}.json_schema.name")
    return _json_schema_spec(schema, f"{param}.json_schema.schema")


def from_structured_outputs(params: Any, param: str = "structured_outputs") -> StructuredOutputSpec | None:
    """vLLM's ``structured_outputs`` extra: exactly one of ``json``, ``regex``, ``choice``, ``grammar``,
    ``json_object``, with the option ``disable_any_whitespace``.

    Raises:
        InvalidStructuredOutputError: several constraints, an unsupported key (``structural_tag``,
            ``whitespace_pattern``, a backend other than xgrammar) or an invalid payload.
    """
    so = _as_dict(params)
    if so is None:
        return None
    if not isinstance(so, Mapping):
        raise InvalidStructuredOutputError(f"{param} must be an object", param)
    unsupported = {"structural_tag", "whitespace_pattern"} & {k for k, v in so.items() if v is not None}
    if unsupported:
        key = sorted(unsupported)[0]
        raise InvalidStructuredOutputError(f"{param}.{key} is not supported", f"{param}.{key}")
    backend = so.get("backend")
    if backend not in (None, "auto", "xgrammar"):
        raise InvalidStructuredOutputError(
            f"{param}.backend {backend!r} is not supported; shardserve uses xgrammar", f"{param}.backend"
        )
    values = {k: so.get(k) for k in ("json", "regex", "choice", "grammar", "json_object")}
    given = [k for k, v in values.items() if v is not None and v is not False]
    _one_at_most([f"{param}.{k}" for k in given])
    if not given:
        return None
    any_ws = not so.get("disable_any_whitespace", False)
    return _constraint(given[0], values[given[0]], f"{param}.{given[0]}", any_ws)


def from_guided_fields(body: Mapping[str, Any]) -> StructuredOutputSpec | None:
    """vLLM's older top-level ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``
    (and ``guided_json_object``); ``guided_decoding_backend`` may only name xgrammar.

    Raises:
        InvalidStructuredOutputError: several constraints, ``guided_whitespace_pattern``, another backend
            or an invalid payload.
    """
    if body.get("guided_whitespace_pattern") is not None:
        raise InvalidStructuredOutputError("guided_whitespace_pattern is not supported", "guided_whitespace_pattern")
    backend = body.get("guided_decoding_backend")
    if backend not in (None, "auto", "xgrammar"):
        raise InvalidStructuredOutputError(
            f"guided_decoding_backend {backend!r} is not supported; shardserve uses xgrammar", "guided_decoding_backend"
        )
    names = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
             "guided_json_object": "json_object"}  # fmt: skip
    given = [k for k in names if body.get(k) is not None and body.get(k) is not False]
    _one_at_most(given)
    if not given:
        return None
    return _constraint(names[given[0]], body[given[0]], given[0], True)


def from_sglang_sampling_params(sampling_params: Mapping[str, Any]) -> StructuredOutputSpec | None:
    """SGLang's ``sampling_params`` constraints: ``json_schema`` (JSON text or object), ``regex``, ``ebnf``.

    Raises:
        InvalidStructuredOutputError: several constraints, ``structural_tag``, or an invalid payload.
    """
    sp = _as_dict(sampling_params) or {}
    if sp.get("structural_tag") is not None:
        raise InvalidStructuredOutputError(
            "sampling_params.structural_tag is not supported", "sampling_params.structural_tag"
        )
    names = {"json_schema": "json", "regex": "regex", "ebnf": "grammar"}
    given = [k for k in names if sp.get(k) is not None]
    _one_at_most([f"sampling_params.{k}" for k in given])
    if not given:
        return None
    return _constraint(names[given[0]], sp[given[0]], f"sampling_params.{given[0]}", True)


def from_openai_request(body: Any) -> StructuredOutputSpec | None:
    """The one constraint of a chat or completion request body (dict or pydantic model with extras):
    ``response_format``, ``structured_outputs`` or the ``guided_*`` fields.

    Raises:
        InvalidStructuredOutputError: more than one of them, or an invalid one.
    """
    data = _as_dict(body)
    if not isinstance(data, Mapping):
        raise InvalidStructuredOutputError("the request body must be an object")
    specs = {
        "response_format": from_response_format(data.get("response_format")),
        "structured_outputs": from_structured_outputs(data.get("structured_outputs")),
        "guided_*": from_guided_fields(data),
    }
    given = [spec for spec in specs.values() if spec is not None]
    _one_at_most([spec.param for spec in given])
    return given[0] if given else None


def _one_at_most(fields: list[str]) -> None:
    if len(fields) > 1:
        raise InvalidStructuredOutputError(
            f"only one structured output constraint may be given, got {' and '.join(fields)}", fields[1]
        )


def _constraint(kind: str, value: Any, param: str, any_whitespace: bool) -> StructuredOutputSpec:
    """A validated spec of ``kind`` from a dialect's raw value."""
    if kind == "json":
        return _json_schema_spec(value, param, any_whitespace)
    if kind == "json_object":
        return StructuredOutputSpec("json_object", "", any_whitespace, param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise InvalidStructuredOutputError(f"{param} must be a non-empty list of strings", param)
        return StructuredOutputSpec("choice", tuple(value), any_whitespace, param).validate()
    if not isinstance(value, str) or not value:
        raise InvalidStructuredOutputError(f"{param} must be a non-empty string", param)
    if kind == "grammar":
        kind = "grammar" if "::=" in value else "lark"  # vLLM takes EBNF or Lark under one name
    return StructuredOutputSpec(kind, value, any_whitespace, param).validate()  # type: ignore[arg-type]
