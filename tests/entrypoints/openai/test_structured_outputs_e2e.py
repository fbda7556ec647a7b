"""Structured outputs, forced tool calls and logit_bias on the live server (embedded SmolLM2-135M), driven by
the ``openai`` client and LangChain.

The grammar makes even this small model's output valid, so every answer is checked with ``jsonschema`` against
the schema that was asked for. The 20 schemas go out concurrently (one engine batch), greedy, with bounded
strings, arrays and numbers so each JSON value ends well within its token budget.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from conftest import TIMEOUT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAME = {"type": "string", "minLength": 1, "maxLength": 16}
SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "city": {"type": "object", "properties": {"city": NAME, "country": NAME}, "required": ["city"]},
    "flag": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    "color_enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                   "required": ["color"]},
    "bounded_number": {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}},
                       "required": ["score"]},
    "exclusive_int": {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 5,
                      "exclusiveMaximum": 9}}, "required": ["n"]},
    "tags": {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
             "required": ["tags"]},
    "int_list": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2,
                 "maxItems": 4},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {"name": NAME, "address": {
               "type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
               "required": ["zip"]}}, "required": ["name", "address"]}}, "required": ["user"]},
    "array_of_objects": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "minItems": 1,
                         "items": {"type": "object", "properties": {"sku": NAME, "qty": {"type": "integer",
                         "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"]}}}, "required": ["items"]},
    "optional_keys": {"type": "object", "properties": {"title": NAME, "subtitle": NAME, "pages": {"type": "integer",
                      "minimum": 1, "maximum": 999}}, "required": ["title"], "additionalProperties": False},
    "const_and_enum": {"type": "object", "properties": {"version": {"const": 2}, "mode": {"enum": ["fast", "slow"]}},
                       "required": ["version", "mode"]},
    "nullable": {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 12}},
                 "required": ["note"]},
    "any_of": {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
               {"type": "string", "maxLength": 8}]}}, "required": ["id"]},
    "date_format": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
                    "required": ["day"]},
    "email_pattern": {"type": "object", "properties": {"email": {"type": "string",
                      "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["email"]},
    "tuple": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 8}, {"type": "integer", "minimum": 0,
              "maximum": 9}], "items": False, "minItems": 2},
    "defs_ref": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                 "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x", "y"]}},
                 "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
                 "required": ["start", "end"]},
    "string_enum_array": {"type": "object", "properties": {"days": {"type": "array", "uniqueItems": False,
                          "items": {"enum": ["mon", "tue", "wed"]}, "minItems": 1, "maxItems": 3}},
                          "required": ["days"]},
    "deep": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object",
             "properties": {"c": {"type": "array", "maxItems": 2, "items": {"type": "boolean"}}}, "required": ["c"]}},
             "required": ["b"]}}, "required": ["a"]},
}  # fmt: skip
ASK = [{"role": "user", "content": "Describe something as JSON. Keep every value short."}]


def _format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


async def _one(aclient, model: str, name: str, stream: bool) -> tuple[str, str | None]:
    kw = dict(model=model, messages=ASK, temperature=0, max_tokens=160, response_format=_format(name))
    if not stream:
        r = await aclient.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = [c async for c in await aclient.chat.completions.create(**kw, stream=True)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_twenty_json_schemas_validate(server_url, model, stream):
    assert len(SCHEMAS) == 20

    async def run() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(base_url=server_url + "/v1", api_key="none", max_retries=0,
                                      timeout=TIMEOUT * 4) as aclient:  # fmt: skip
            return await asyncio.gather(*(_one(aclient, model, name, stream) for name in SCHEMAS))

    for name, (text, finish) in zip(SCHEMAS, asyncio.run(run())):
        assert finish == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name], format_checker=jsonschema.FormatChecker())


def test_json_object_regex_and_choice(client, model, server_url):
    r = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=120,
                                       response_format={"type": "json_object"})  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    pattern = r"[A-Z][a-z]{2,8} [0-9]{2}"
    r = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=20,
                                       extra_body={"structured_outputs": {"regex": pattern}})  # fmt: skip
    assert re.fullmatch(pattern, r.choices[0].message.content), r.choices[0].message.content
    choices = ["Paris", "London", "Berlin"]
    capital = [{"role": "user", "content": "What is the capital of Germany?"}]
    r = client.chat.completions.create(model=model, messages=capital, temperature=0, max_tokens=10,
                                       extra_body={"guided_choice": choices})  # fmt: skip
    assert r.choices[0].message.content in choices
    c = client.completions.create(model=model, prompt="The answer is", max_tokens=10, temperature=0,
                                  extra_body={"guided_regex": "(yes|no)"})  # fmt: skip
    assert c.choices[0].text in ("yes", "no")
    body = {"text": "My zip code is", "sampling_params": {"max_new_tokens": 12, "temperature": 0, "regex": " [0-9]{5}"}}
    out = httpx.post(server_url + "/generate", json=body, timeout=TIMEOUT).json()
    assert re.fullmatch(" [0-9]{5}", out["text"]), out
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    body["sampling_params"] = {"max_new_tokens": 30, "temperature": 0, "json_schema": json.dumps(schema)}
    jsonschema.validate(json.loads(httpx.post(server_url + "/generate", json=body, timeout=TIMEOUT).json()["text"]),
                        schema)  # fmt: skip


def test_invalid_constraints_are_400(client, model):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "2"}}}
    for kw, param in [
        ({"response_format": bad}, "response_format.json_schema.schema"),
        ({"extra_body": {"structured_outputs": {"regex": "a(b"}}}, "structured_outputs.regex"),
        ({"extra_body": {"guided_grammar": "root ::= "}}, "guided_grammar"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=ASK, max_tokens=5, **kw)
        assert err.value.body["param"] == param and err.value.body["code"] == "invalid_structured_output"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"]},
    },
}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 10}}, "required": ["zone"]}}}  # fmt: skip
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])  # fmt: skip
def test_forced_tool_call_validates_streamed_and_not(client, model, choice):
    kw = dict(model=model, messages=PARIS, temperature=0, max_tokens=120, tools=[WEATHER, TIME], tool_choice=choice)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.id.startswith("call_") for c in calls)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    if isinstance(choice, dict):
        assert [c.function.name for c in calls] == ["get_time"]
    streamed: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            entry = streamed.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
            assert delta.id in (None, entry["id"])
            entry["arguments"] += delta.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls"
    assert [(s["name"], json.loads(s["arguments"])) for s in streamed.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ]


def test_logit_bias_forces_and_bans_a_token(client, model, server_url):
    tokens = httpx.post(server_url + "/tokenize", json={"prompt": " banana", "add_special_tokens": False},
                        timeout=TIMEOUT).json()["tokens"]  # fmt: skip
    kw = dict(model=model, prompt="My favourite fruit is", max_tokens=3, temperature=0, logprobs=1,
              extra_body={"return_token_ids": True})  # fmt: skip
    forced = client.completions.create(**kw, logit_bias={str(tokens[0]): 100})
    assert forced.choices[0].model_extra["token_ids"] == [tokens[0]] * 3
    plain = client.completions.create(**kw).choices[0].model_extra["token_ids"]
    banned = client.completions.create(**kw, logit_bias={str(plain[0]): -100})
    assert banned.choices[0].model_extra["token_ids"][0] != plain[0]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kw, logit_bias={str(tokens[0]): 101})
    assert err.value.body["param"] == "logit_bias"


def test_allowed_token_ids_and_bad_words(client, model, server_url):
    def ids(text: str) -> list[int]:
        body = {"prompt": text, "add_special_tokens": False}
        return httpx.post(server_url + "/tokenize", json=body, timeout=TIMEOUT).json()["tokens"]

    allowed = ids(" yes no")
    extra = {"return_token_ids": True, "ignore_eos": True, "allowed_token_ids": allowed}
    r = client.completions.create(model=model, prompt="Is the sky blue?", temperature=0, max_tokens=4, extra_body=extra)
    assert set(r.choices[0].model_extra["token_ids"]) <= set(allowed)
    capital = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model=model, messages=capital, temperature=0, max_tokens=24)
    assert "Paris" in plain.choices[0].message.content
    banned = client.chat.completions.create(model=model, messages=capital, temperature=0, max_tokens=24,
                                            extra_body={"bad_words": ["Paris"]})  # fmt: skip
    assert "Paris" not in banned.choices[0].message.content


def test_responses_text_format_and_function_tools(client, model):
    schema = SCHEMAS["person"]
    r = client.responses.create(
        model=model,
        input=ASK[0]["content"],
        max_output_tokens=80,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema}},
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    r = client.responses.create(model=model, input=PARIS[0]["content"], max_output_tokens=80, temperature=0,
                                tools=[tool], tool_choice="required")  # fmt: skip
    (call,) = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])


def test_echo_with_logprobs_and_prompt_logprobs(client, model):
    r = client.completions.create(model=model, prompt="The sky is blue", max_tokens=2, temperature=0, echo=True,
                                  logprobs=2, extra_body={"prompt_logprobs": 1})  # fmt: skip
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith("The sky is blue") and "".join(lp.tokens) == choice.text
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    prompt_logprobs = choice.model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == n_prompt and prompt_logprobs[0] is None
    for position, value in zip(prompt_logprobs[1:], lp.token_logprobs[1:n_prompt]):
        assert any(entry["logprob"] == pytest.approx(value, abs=1e-4) for entry in position.values())


def test_langchain_tools_and_structured_output(server_url, model):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(model=model, base_url=server_url + "/v1", api_key="none", temperature=0, max_tokens=100,
                     max_retries=0, timeout=TIMEOUT)  # fmt: skip
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"]["city"], str)

    class Person(BaseModel):
        """A person."""

        name: str = Field(max_length=16)
        age: int = Field(ge=0, le=120)

    prompt = 'Return a JSON object with the keys "name" (a string) and "age" (an integer), e.g. {"name": "Bob", '
    prompt += '"age": 40}.'
    for method in ("function_calling", "json_schema", "json_mode"):
        person = llm.with_structured_output(Person, method=method).invoke(prompt)
        assert isinstance(person, Person), method
