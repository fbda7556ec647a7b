"""The grammar + bitmask path proves itself without a model: a random "model" that samples uniformly among
the tokens the bitmask allows, on the embedded tokenizer, must always end in JSON valid for the schema.

Each walk samples from the allowed ids only (as the engine's masked sampler would), accepts the token, and
stops at the stop token; it is bounded in steps. Twenty schemas cover nested objects, arrays, enums,
numbers with bounds, required and optional keys, ``$ref``, ``anyOf`` and string formats.
"""

from __future__ import annotations

import json
import re
import uuid

import jsonschema
import numpy as np
import pytest
from bitmask_utils import allowed_ids

from shardserve.structured_output import from_response_format

MAX_STEPS = 6000
SEEDS = (0, 1)

S = {"type": "string", "maxLength": 12}
SCHEMAS = {
    "flat_required": {
        "type": "object",
        "properties": {"name": S, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "all_optional": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": S}},
    "integer_bounds": {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 17}},
        "required": ["n"],
    },
    "number_bounds": {
        "type": "object",
        "properties": {
            "x": {"type": "number", "minimum": 0.5, "maximum": 2.5},
            "y": {"type": "number", "exclusiveMaximum": 0},
        },
        "required": ["x", "y"],
    },
    "string_enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "mixed_enum_const": {
        "type": "object",
        "properties": {"v": {"enum": [1, "two", None, True]}, "k": {"const": "fixed"}},
        "required": ["v", "k"],
    },
    "array_of_ints": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 1,
        "maxItems": 5,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"id": {"type": "integer"}, "tag": S}, "required": ["id"]},
                "maxItems": 3,
            }
        },
        "required": ["items"],
    },
    "nested_two_levels": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": S,
                    "address": {
                        "type": "object",
                        "properties": {"city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "string_lengths": {
        "type": "object",
        "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 4}},
        "required": ["code"],
    },
    "string_pattern": {
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["id"],
    },
    "date_and_uuid_formats": {
        "type": "object",
        "properties": {"when": {"type": "string", "format": "date"}, "id": {"type": "string", "format": "uuid"}},
        "required": ["when", "id"],
    },
    "nullable_any_of": {
        "type": "object",
        "properties": {"maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
        "required": ["maybe"],
    },
    "type_list": {
        "type": "object",
        "properties": {"v": {"type": ["string", "integer"], "maxLength": 6}},
        "required": ["v"],
    },
    "ref_and_defs": {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a"],
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
            }
        },
    },
    "tuple_prefix_items": {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"type": "boolean"}, S],
        "items": False,
        "minItems": 3,
    },
    "additional_properties_typed": {
        "type": "object",
        "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 3},
        "maxProperties": 3,
    },
    "array_bounds_of_enums": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
    },
    "pydantic_style": {
        "title": "Person",
        "type": "object",
        "properties": {
            "name": {"title": "Name", "type": "string", "maxLength": 10},
            "pets": {"title": "Pets", "type": "array", "items": {"$ref": "#/$defs/Pet"}, "maxItems": 2},
            "score": {"title": "Score", "type": "number", "minimum": 0, "maximum": 100},
        },
        "required": ["name", "pets"],
        "$defs": {
            "Pet": {
                "title": "Pet",
                "type": "object",
                "properties": {
                    "kind": {"enum": ["cat", "dog"]},
                    "age": {"type": "integer", "minimum": 0, "maximum": 30},
                },
                "required": ["kind"],
            }
        },
    },
    "top_level_scalar_enum": {"enum": ["low", "medium", "high"]},
}


def random_walk(manager, tokenizer, spec, seed: int) -> tuple[str, int]:
    """Sample uniformly among allowed tokens until the stop token; returns (text, steps)."""
    rng = np.random.default_rng(seed)
    matcher = manager.matcher(spec)
    bitmask = manager.allocate_bitmask(1)
    ids: list[int] = []
    for step in range(MAX_STEPS):
        assert manager.fill_bitmask([matcher], bitmask) == [0]
        allowed = allowed_ids(bitmask, 0, manager.vocab_size)
        assert len(allowed) > 0, f"no allowed token after {tokenizer.decode(ids)!r}"
        token = int(rng.choice(allowed))
        assert matcher.accept_token(token), f"an allowed token was rejected after {tokenizer.decode(ids)!r}"
        if matcher.is_terminated():
            assert token in tokenizer.eos_token_ids
            return tokenizer.decode(ids), step + 1
        ids.append(token)
    raise AssertionError(f"no stop token within {MAX_STEPS} steps: {tokenizer.decode(ids)[:300]!r}")


def test_there_are_twenty_distinct_schemas():
    assert len(SCHEMAS) == 20
    assert len({json.dumps(s, sort_keys=True) for s in SCHEMAS.values()}) == 20
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_walk_output_validates_against_the_schema(name, manager, smollm_tokenizer):
    schema = SCHEMAS[name]
    spec = from_response_format(
        {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    )
    for seed in SEEDS:
        text, _ = random_walk(manager, smollm_tokenizer, spec, seed)
        value = json.loads(text)
        jsonschema.validate(value, schema)  # "format" is an annotation in 2020-12; the grammar shapes it too


@pytest.mark.parametrize("seed", range(4))
def test_walked_formats_have_their_shape(seed, manager, smollm_tokenizer):
    schema = SCHEMAS["date_and_uuid_formats"]
    spec = from_response_format({"type": "json_schema", "json_schema": {"name": "f", "schema": schema}})
    value = json.loads(random_walk(manager, smollm_tokenizer, spec, 100 + seed)[0])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", value["when"]), value
    uuid.UUID(value["id"])


def test_the_walk_is_a_real_check_an_unconstrained_walk_is_not_json(manager, smollm_tokenizer):
    # Without the grammar a uniform walk over the vocabulary does not produce JSON: the mask is what works.
    rng = np.random.default_rng(0)
    text = smollm_tokenizer.decode(rng.integers(0, manager.vocab_size, 30).tolist())
    with pytest.raises(ValueError):
        json.loads(text)
