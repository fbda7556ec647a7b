"""``tool_choice`` "required" and named functions: the grammar forces a valid call, the forced parser reads it.

A random walk over the tokens the bitmask allows (the embedded tokenizer) stands in for the model: every
walk must parse into calls whose arguments validate against the chosen tool's parameters.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from shardserve.entrypoints.openai.tool_parsers import (
    ForcedToolCallParser,
    legacy_functions_to_tools,
    required_schema,
    tool_choice_spec,
    tool_functions,
)
from shardserve.structured_output import InvalidStructuredOutputError, StructuredOutputManager

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/small"}, "b": {"$ref": "#/$defs/small"}},
            "required": ["a", "b"],
            "$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 99}},
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters
TOOLS = [WEATHER, ADD, NOW]
PARAMETERS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}


@pytest.fixture(scope="module")
def manager(smollm_tokenizer):
    mgr = StructuredOutputManager(smollm_tokenizer)
    yield mgr
    mgr.shutdown()


def walk(manager, tokenizer, spec, seed: int, max_steps: int = 4000) -> str:
    rng = np.random.default_rng(seed)
    matcher, bitmask = manager.matcher(spec), manager.allocate_bitmask(1)
    ids: list[int] = []
    for _ in range(max_steps):
        manager.fill_bitmask([matcher], bitmask)
        bits = np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")[: manager.vocab_size]
        token = int(rng.choice(np.flatnonzero(bits)))
        assert matcher.accept_token(token)
        if matcher.is_terminated():
            return tokenizer.decode(ids)
        ids.append(token)
    raise AssertionError("the walk did not end")


@pytest.mark.parametrize("seed", range(6))
def test_required_always_yields_valid_calls(seed, manager, smollm_tokenizer):
    spec = tool_choice_spec(TOOLS, "required")
    text = walk(manager, smollm_tokenizer, spec, seed)
    result = ForcedToolCallParser("required").extract_tool_calls(text)
    assert result.tools_called and result.content is None, text
    for call in result.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("seed", range(4))
def test_named_function_always_yields_its_valid_arguments(seed, manager, smollm_tokenizer):
    choice = {"type": "function", "function": {"name": "add"}}
    text = walk(manager, smollm_tokenizer, tool_choice_spec(TOOLS, choice), seed)
    (call,) = ForcedToolCallParser(choice).extract_tool_calls(text).tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS["add"])


def test_parallel_tool_calls_false_allows_exactly_one_call(manager, smollm_tokenizer):
    spec = tool_choice_spec(TOOLS, "required", parallel_tool_calls=False)
    assert spec.schema["maxItems"] == 1
    for seed in range(3):
        text = walk(manager, smollm_tokenizer, spec, seed)
        assert len(ForcedToolCallParser("required").extract_tool_calls(text).tool_calls) == 1


def test_required_schema_hoists_defs_and_pins_names():
    schema = required_schema(tool_functions(TOOLS))
    assert schema["$defs"] == {"small": {"type": "integer", "minimum": 0, "maximum": 99}}
    names = [alt["properties"]["name"]["enum"] for alt in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["add"], ["now"]] and schema["minItems"] == 1
    valid = [{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "now", "parameters": {}}]
    jsonschema.validate(valid, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "parameters": {"a": 100, "b": 2}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)


def test_conflicting_defs_are_refused():
    other = json.loads(json.dumps(ADD))
    other["function"]["name"] = "add2"
    other["function"]["parameters"]["$defs"]["small"] = {"type": "string"}
    with pytest.raises(InvalidStructuredOutputError, match="small"):
        tool_choice_spec([ADD, other], "required")


@pytest.mark.parametrize("choice", [None, "none", "auto"])
def test_no_grammar_for_none_and_auto(choice):
    assert tool_choice_spec(TOOLS, choice) is None


@pytest.mark.parametrize(
    ("tools", "choice", "words", "param"),
    [
        (TOOLS, {"type": "function", "function": {"name": "missing"}}, ["'missing'", "not in tools"], "tool_choice"),
        (None, "required", ["needs tools"], "tool_choice"),
        (TOOLS, "sometimes", ["tool_choice must be"], "tool_choice"),
        ([{"type": "retrieval"}], "required", ["type 'function'"], "tools[0]"),
        ([{"type": "function", "function": {}}], "required", ["name is required"], "tools[0].function.name"),
        ([WEATHER, WEATHER], "required", ["two tools"], "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}],
            "required",
            ["tools[0].function.parameters", "invalid JSON schema"],
            "tools[0].function.parameters",
        ),
    ],
)
def test_tool_choice_errors_name_the_field(tools, choice, words, param):
    with pytest.raises(InvalidStructuredOutputError) as info:
        tool_choice_spec(tools, choice)
    for word in words:
        assert word in str(info.value)
    assert info.value.param == param


def test_responses_api_named_choice_shape_is_understood():
    assert tool_choice_spec(TOOLS, {"type": "function", "name": "now"}).schema == {"type": "object", "properties": {}}


def test_forced_parser_streams_the_same_calls():
    text = '[{"name": "add", "parameters": {"a": 1, "b": 22}}, {"name": "now", "parameters": {}}]'
    parser = ForcedToolCallParser("required")
    joined: dict[int, list[str]] = {}
    for end in range(1, len(text) + 1):
        delta = parser.extract_tool_calls_streaming("", text[:end], "", finished=end == len(text))
        for chunk in delta.tool_calls if delta else []:
            entry = joined.setdefault(chunk.index, [chunk.function.name, ""])
            entry[1] += chunk.function.arguments or ""
    expected = ForcedToolCallParser("required").extract_tool_calls(text).tool_calls
    assert [tuple(v) for v in joined.values()] == [(c.function.name, c.function.arguments) for c in expected]


def test_named_parser_sends_the_name_first():
    parser = ForcedToolCallParser({"type": "function", "function": {"name": "add"}})
    first = parser.extract_tool_calls_streaming("", "{", "{")
    assert first.tool_calls[0].function.name == "add" and first.tool_calls[0].id.startswith("call_")


def test_forced_parser_refuses_non_json():
    assert not ForcedToolCallParser("required").extract_tool_calls("not json").tools_called
    assert not ForcedToolCallParser("required").extract_tool_calls("[]").tools_called


def test_legacy_functions_map_to_tools():
    functions = [{"name": "f", "parameters": {"type": "object"}}]
    tools, choice = legacy_functions_to_tools(functions, {"name": "f"})
    assert tools == [{"type": "function", "function": functions[0]}]
    assert choice == {"type": "function", "function": {"name": "f"}}
    assert legacy_functions_to_tools(functions, "auto")[1] == "auto"
    assert legacy_functions_to_tools(None, None) == (None, None)
