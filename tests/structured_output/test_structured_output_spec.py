"""Request-side parsing: every dialect maps to one spec; bad input is a ValueError naming the problem."""

from __future__ import annotations

import json

import pytest

from shardserve.structured_output import (
    InvalidStructuredOutputError,
    StructuredOutputSpec,
    from_guided_fields,
    from_openai_request,
    from_response_format,
    from_sglang_sampling_params,
    from_structured_outputs,
)

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_response_format_text_and_absent_give_no_spec():
    assert from_response_format(None) is None
    assert from_response_format({"type": "text"}) is None


def test_response_format_json_object():
    spec = from_response_format({"type": "json_object"})
    assert spec.kind == "json_object" and spec.param == "response_format"


@pytest.mark.parametrize("strict", [True, False, None])
def test_response_format_json_schema(strict):
    spec = from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": strict}}
    )
    assert spec.kind == "json" and spec.schema == SCHEMA
    assert spec.param == "response_format.json_schema.schema"


def test_response_format_from_a_pydantic_model_with_aliased_schema():
    from pydantic import BaseModel, Field

    class JsonSchema(BaseModel):
        name: str
        schema_: dict = Field(alias="schema")

    class ResponseFormat(BaseModel):
        type: str
        json_schema: JsonSchema

    rf = ResponseFormat(type="json_schema", json_schema=JsonSchema(name="x", schema=SCHEMA))
    assert from_response_format(rf).schema == SCHEMA


def test_same_schema_same_spec_so_the_cache_key_matches():
    a = from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    b = from_structured_outputs({"json": json.dumps(SCHEMA, indent=4)})
    assert (a.kind, a.payload) == (b.kind, b.payload)


@pytest.mark.parametrize(
    ("response_format", "words"),
    [
        ({"type": "yaml"}, ["yaml", "not supported"]),
        ({"type": "json_schema"}, ["json_schema is required"]),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, ["schema is required"]),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}},
            ["invalid JSON schema", "objec"],
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": 3}}},
            ["invalid JSON schema", "properties"],
        ),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{not json"}}, ["not valid JSON"]),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, ["must be an object"]),
        ({"type": "json_schema", "json_schema": {"name": 3, "schema": SCHEMA}}, ["name must be a string"]),
        ("json", ["must be an object"]),
    ],
)
def test_bad_response_format_names_the_problem(response_format, words):
    with pytest.raises(InvalidStructuredOutputError) as info:
        from_response_format(response_format)
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert info.value.param and info.value.param.startswith("response_format")


@pytest.mark.parametrize(
    ("keyword", "schema"),
    [
        ("not", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
        ("if", {"if": {"type": "string"}, "then": {"minLength": 2}}),
        ("uniqueItems", {"type": "array", "uniqueItems": True}),
        ("allOf", {"allOf": [{"type": "object"}, {"required": ["a"]}]}),
        ("contains", {"type": "array", "items": [{"contains": {"type": "string"}}]}),
        ("propertyNames", {"$defs": {"x": {"type": "object", "propertyNames": {"pattern": "^a"}}}}),
        ("dependentRequired", {"anyOf": [{"dependentRequired": {"a": ["b"]}}]}),
        ("together with 'minLength'", {"type": "string", "format": "email", "maxLength": 5}),
        ("together with 'minLength'", {"type": "string", "pattern": "^[a-z]+$", "minLength": 2}),
        ("multipleOf", {"type": "number", "multipleOf": 0.5}),
        ("multipleOf", {"type": "integer", "multipleOf": 3, "minimum": 1}),
        ("lookaround", {"type": "string", "pattern": "a(?=b)"}),
        ("anchors", {"type": "string", "pattern": "a^b"}),
    ],
)
def test_unenforceable_keywords_are_refused_where_they_are(keyword, schema):
    with pytest.raises(InvalidStructuredOutputError, match=keyword):
        from_structured_outputs({"json": schema})


def test_supported_neighbours_of_refused_keywords_are_accepted():
    for schema in (
        {"type": "integer", "multipleOf": 3},
        {"type": "integer", "multipleOf": 3, "minimum": 0, "maximum": 30},
        {"type": "string", "format": "email"},
        {"type": "string", "minLength": 1, "maxLength": 3},
        {"type": "string", "pattern": "^(a|b)+$"},
    ):
        assert from_structured_outputs({"json": schema}).kind == "json"


@pytest.mark.parametrize(("pattern", "problem"), [("a(?!b)", "lookaround"), ("x^y", "anchors"), ("(^a)b", "anchors")])
def test_regexes_xgrammar_would_not_enforce_are_refused(pattern, problem):
    with pytest.raises(InvalidStructuredOutputError, match=problem):
        from_structured_outputs({"regex": pattern})


@pytest.mark.parametrize("pattern", ["^abc$", "^a|^b", "a$|b", "[$^]x", r"\^x", r"\d{3}-[a-z]+"])
def test_regexes_with_anchors_at_the_ends_are_accepted(pattern):
    assert from_structured_outputs({"regex": pattern}).kind == "regex"


def test_a_property_named_like_a_keyword_is_fine():
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}}
    assert from_structured_outputs({"json": schema}).schema == schema


def test_single_allof_and_unique_items_false_are_accepted():
    schema = {"allOf": [{"$ref": "#/$defs/x"}], "$defs": {"x": {"type": "array", "uniqueItems": False}}}
    assert from_structured_outputs({"json": schema}).kind == "json"


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ({"json": SCHEMA}, "json"),
        ({"json": json.dumps(SCHEMA)}, "json"),
        ({"regex": r"\d{3}"}, "regex"),
        ({"choice": ["yes", "no"]}, "choice"),
        ({"grammar": 'root ::= "a" | "b"'}, "grammar"),
        ({"grammar": 'start: "a" | "b"'}, "lark"),
        ({"json_object": True}, "json_object"),
    ],
)
def test_structured_outputs_kinds(params, kind):
    assert from_structured_outputs(params).kind == kind


def test_structured_outputs_none_and_false_are_no_constraint():
    assert from_structured_outputs(None) is None
    assert from_structured_outputs({"json_object": False, "regex": None}) is None


def test_disable_any_whitespace():
    assert from_structured_outputs({"json": SCHEMA}).any_whitespace
    assert not from_structured_outputs({"json": SCHEMA, "disable_any_whitespace": True}).any_whitespace


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"regex": "a(b"}, ["structured_outputs.regex", "invalid regex", "parenthesis"]),
        ({"regex": ""}, ["non-empty string"]),
        ({"grammar": "root ::= foo"}, ["structured_outputs.grammar", "foo"]),
        ({"grammar": "start: foo"}, ["invalid Lark grammar", "unknown name 'foo'"]),
        ({"choice": []}, ["non-empty list of strings"]),
        ({"choice": ["a", 1]}, ["non-empty list of strings"]),
        ({"regex": "a", "choice": ["b"]}, ["only one", "structured_outputs.regex", "structured_outputs.choice"]),
        ({"structural_tag": "{}"}, ["structural_tag", "not supported"]),
        ({"whitespace_pattern": " "}, ["whitespace_pattern", "not supported"]),
        ({"regex": "a", "backend": "outlines"}, ["outlines", "xgrammar"]),
    ],
)
def test_bad_structured_outputs(params, words):
    with pytest.raises(InvalidStructuredOutputError) as info:
        from_structured_outputs(params)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_regex_error_strips_the_cpp_location():
    with pytest.raises(InvalidStructuredOutputError) as info:
        from_structured_outputs({"regex": "a(b"})
    assert ".cc:" not in str(info.value) and "[" not in str(info.value).split("regex:")[1][:3]


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"guided_json": SCHEMA}, "json"),
        ({"guided_regex": "[a-z]+"}, "regex"),
        ({"guided_choice": ["x", "y"]}, "choice"),
        ({"guided_grammar": 'root ::= "x"'}, "grammar"),
        ({"guided_json_object": True}, "json_object"),
    ],
)
def test_guided_fields(fields, kind):
    spec = from_guided_fields(fields)
    assert spec.kind == kind and spec.param == next(iter(fields))


def test_guided_fields_errors():
    with pytest.raises(InvalidStructuredOutputError, match="only one"):
        from_guided_fields({"guided_regex": "a", "guided_choice": ["a"]})
    with pytest.raises(InvalidStructuredOutputError, match="guided_whitespace_pattern"):
        from_guided_fields({"guided_json": SCHEMA, "guided_whitespace_pattern": r"\s*"})
    with pytest.raises(InvalidStructuredOutputError, match="lm-format-enforcer"):
        from_guided_fields({"guided_regex": "a", "guided_decoding_backend": "lm-format-enforcer"})
    assert from_guided_fields({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}).kind == "regex"


def test_sglang_sampling_params():
    assert from_sglang_sampling_params({"json_schema": json.dumps(SCHEMA)}).schema == SCHEMA
    assert from_sglang_sampling_params({"regex": "(yes|no)"}).kind == "regex"
    assert from_sglang_sampling_params({"ebnf": 'root ::= "x"'}).kind == "grammar"
    assert from_sglang_sampling_params({"max_new_tokens": 4}) is None
    with pytest.raises(InvalidStructuredOutputError, match="sampling_params.regex"):
        from_sglang_sampling_params({"regex": "(", "max_new_tokens": 4})
    with pytest.raises(InvalidStructuredOutputError, match="only one"):
        from_sglang_sampling_params({"regex": "a", "ebnf": 'root ::= "a"'})


def test_openai_request_combines_dialects_and_refuses_two():
    assert from_openai_request({"messages": []}) is None
    assert from_openai_request({"response_format": {"type": "json_object"}}).kind == "json_object"
    assert from_openai_request({"structured_outputs": {"regex": "a+"}}).kind == "regex"
    assert from_openai_request({"guided_choice": ["a"]}).kind == "choice"
    with pytest.raises(InvalidStructuredOutputError, match="only one"):
        from_openai_request({"response_format": {"type": "json_object"}, "guided_regex": "a"})


def test_choice_ebnf_escapes_quotes_backslashes_and_non_bmp_characters():
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    choices = ['a"b', "x\\y", "new\nline", "héllo", "😀 ok"]
    spec = from_structured_outputs({"choice": choices})
    grammar = xgr.Grammar.from_ebnf(spec.ebnf())
    assert all(_is_grammar_accept_string(grammar, c) for c in choices)
    assert not _is_grammar_accept_string(grammar, "ab")


def test_unknown_kind_is_refused():
    with pytest.raises(InvalidStructuredOutputError, match="unknown"):
        StructuredOutputSpec("yaml", "x")  # type: ignore[arg-type]


def test_spec_is_hashable_and_picklable():
    import pickle

    spec = from_structured_outputs({"choice": ["a", "b"]})
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert len({spec, from_structured_outputs({"choice": ["a", "b"]})}) == 1


def test_a_grammar_whose_parse_error_does_not_decode_is_still_a_clear_error():
    """Found by the OpenAPI fuzz test: xgrammar's error message quoted the grammar with a UTF-8 sequence cut in
    two, and decoding that message raised instead of the error: a 500 where a 400 belongs."""
    with pytest.raises(InvalidStructuredOutputError, match="sampling_params.ebnf: invalid"):
        from_sglang_sampling_params({"ebnf": "Q\u00e2\u00fa\u00b9t4\U0008b1a5\x99\u00fb"})
