"""Tool calls, reasoning and vLLM's prompt/response extras through the HTTP layer, over the scripted fake engine.

The fake copies its prompt's tokens (and stops at a copied ``<|im_end|>``), so a request whose chat template
renders only the last message makes the "model" write exactly that message: the expected tool calls and
reasoning come from the test's own text, not from the server code.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import FakeAsyncLLM

from shardserve.config import ServerConfig
from shardserve.entrypoints.openai.api_server import ServerState

pytestmark = pytest.mark.timeout(120)

LAST = "{{ messages[-1].content }}"
"""A chat template that renders the last message only: the fake then 'generates' it."""
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
END = "<|im_end|>"


@pytest.fixture
def fake(smollm_tokenizer):
    return FakeAsyncLLM(smollm_tokenizer)


def make_client(serve_app, fake, **config) -> openai.OpenAI:
    server = serve_app(ServerState(engine=fake, served_model_names=["fake-model"], config=ServerConfig(**config)))
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)


@pytest.fixture
def tools_client(serve_app, fake):
    return make_client(serve_app, fake, enable_auto_tool_choice=True, tool_call_parser="hermes")


@pytest.fixture
def reasoning_client(serve_app, fake):
    return make_client(serve_app, fake, enable_auto_tool_choice=True, tool_call_parser="hermes",
                       reasoning_parser="deepseek_r1")  # fmt: skip


@pytest.fixture
def client(serve_app, fake):
    return make_client(serve_app, fake)


def says(text: str, **kw) -> dict:
    """Arguments that make the fake answer ``text`` (then EOS)."""
    return dict(model="fake-model", messages=[{"role": "user", "content": text + END}], max_tokens=200,
                extra_body={"chat_template": LAST, **kw.pop("extra_body", {})}, **kw)  # fmt: skip


def joined_calls(chunks) -> dict[int, dict]:
    """Streamed ``delta.tool_calls`` joined per index: id, name, arguments (each id and name sent once)."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"ids": [], "names": [], "arguments": ""})
                entry["ids"] += [call.id] if call.id else []
                entry["names"] += [call.function.name] if call.function and call.function.name else []
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
    return calls


def test_auto_tool_call_is_parsed_streamed_and_not(tools_client):
    r = tools_client.chat.completions.create(**says("Let me check. " + CALL), tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and len(call.id) == 29 and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(tools_client.chat.completions.create(**says("Let me check. " + CALL), tools=[WEATHER], stream=True))
    (streamed,) = joined_calls(chunks).values()
    assert len(streamed["ids"]) == 1 and streamed["names"] == ["get_weather"]
    assert streamed["arguments"] == call.function.arguments
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check. "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_text_without_a_call_stays_content(tools_client):
    r = tools_client.chat.completions.create(**says("It is sunny."), tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"


def test_parallel_calls_and_parallel_tool_calls_false(tools_client):
    two = CALL + '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    r = tools_client.chat.completions.create(**says(two), tools=[WEATHER, TIME])
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    assert len({c.id for c in r.choices[0].message.tool_calls}) == 2
    one = tools_client.chat.completions.create(**says(two), tools=[WEATHER, TIME], parallel_tool_calls=False)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    chunks = tools_client.chat.completions.create(**says(two), tools=[WEATHER, TIME], parallel_tool_calls=False,
                                                  stream=True)  # fmt: skip
    assert list(joined_calls(chunks)) == [0]


def test_legacy_functions_answer_with_function_call(tools_client):
    r = tools_client.chat.completions.create(**says(CALL), functions=[WEATHER["function"]])
    choice = r.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}
    chunks = list(tools_client.chat.completions.create(**says(CALL), functions=[WEATHER["function"]], stream=True))
    deltas = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert deltas[0].name == "get_weather" and "".join(d.arguments or "" for d in deltas) == '{"city": "Paris"}'


def test_tool_errors_are_400(client, tools_client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**says("x"), tools=[WEATHER])  # auto without the server flags
    assert "--enable-auto-tool-choice" in err.value.body["message"] and err.value.body["param"] == "tool_choice"
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
    cases = [
        ({"tools": [bad_schema]}, "tools[0].function.parameters"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            tools_client.chat.completions.create(**says("x"), **kw)
        assert err.value.body["param"] == param, (kw, err.value.body)


def test_template_variables_the_server_sets_are_400(client):
    for name in ("messages", "tools", "add_generation_prompt"):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**says("x", extra_body={"chat_template_kwargs": {name: []}}))
        assert err.value.body["param"] == "chat_template_kwargs" and name in err.value.body["message"]
    bad = client.chat.completions.create  # a template that does not compile is the client's error too
    with pytest.raises(openai.BadRequestError) as err:
        bad(model="fake-model", messages=[{"role": "user", "content": "x"}], extra_body={"chat_template": "{% if %}"})
    assert err.value.body["param"] == "messages"


def test_tools_and_tool_turns_render_into_the_template(client, smollm_tokenizer):
    template = (
        "{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<call {{ c.id }} {{ c.function.name }} {{ c.function.arguments | tojson }}>"
        "{% endfor %}{% if m.tool_call_id %}<result of {{ m.tool_call_id }}>{% endif %}{{ '\\n' }}{% endfor %}" + END
    )
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    r = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=200, tools=[WEATHER],
                                       tool_choice="none", extra_body={"chat_template": template})  # fmt: skip
    assert r.choices[0].message.content == (
        '[tool get_weather]user:Weather in Paris?\nassistant:<call call_1 get_weather {"city": "Paris"}>\n'
        "tool:sunny<result of call_1>\n"
    )


def test_reasoning_is_split_streamed_and_not(reasoning_client):
    text = "<think>The user wants 2+2.</think>It is 4."
    r = reasoning_client.chat.completions.create(**says(text))
    message = r.choices[0].message
    assert message.content == "It is 4." and r.choices[0].finish_reason == "stop"
    assert message.model_extra["reasoning"] == message.model_extra["reasoning_content"] == "The user wants 2+2."
    chunks = [c for c in reasoning_client.chat.completions.create(**says(text), stream=True) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "It is 4."
    reasoning = [(d.model_extra or {}).get("reasoning") or "" for d in deltas]
    assert "".join(reasoning) == "The user wants 2+2." and sum(1 for part in reasoning if part) > 1
    assert reasoning == [(d.model_extra or {}).get("reasoning_content") or "" for d in deltas]
    dropped = reasoning_client.chat.completions.create(**says(text, extra_body={"include_reasoning": False}))
    assert dropped.choices[0].message.content == "It is 4."
    assert "reasoning" not in dropped.choices[0].message.model_extra


def test_reasoning_cut_short_is_all_reasoning_and_tool_calls_follow_it(reasoning_client):
    r = reasoning_client.chat.completions.create(**{**says("<think>still thinking about it"), "max_tokens": 4})
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.model_extra["reasoning"]
    thought = "<think>I need the weather.</think>"
    call = reasoning_client.chat.completions.create(**says(thought + CALL), tools=[WEATHER])
    message = call.choices[0].message
    assert message.model_extra["reasoning"] == "I need the weather." and call.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].function.name == "get_weather" and not message.content


def test_continue_final_message_and_echo(client, smollm_tokenizer):
    messages = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "The color is"}]
    kw = dict(model="fake-model", messages=messages, max_tokens=200, extra_body={"ignore_eos": True,
              "add_generation_prompt": False, "continue_final_message": True})  # fmt: skip
    prompt = smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    open_prompt = prompt[: prompt.rindex("The color is") + len("The color is")]
    ids = smollm_tokenizer.encode(open_prompt, add_special_tokens=False)
    r = client.chat.completions.create(**{**kw, "max_tokens": len(ids)})
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content.endswith("The color is")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{**kw, "extra_body": {"continue_final_message": True}})
    assert err.value.body["param"] == "continue_final_message"  # add_generation_prompt is true by default
    echo = client.chat.completions.create(**says("x", extra_body={"echo": True}))
    assert echo.choices[0].message.content == "x"  # the last message is the user's: nothing to echo
    messages = [{"role": "user", "content": "hi" + END}, {"role": "assistant", "content": "Hello"}]
    kw = dict(model="fake-model", messages=messages, max_tokens=30,
              extra_body={"echo": True, "chat_template": "{{ messages[0].content }}"})  # fmt: skip
    assert client.chat.completions.create(**kw).choices[0].message.content == "Hellohi"
    chunks = client.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hellohi"


def test_return_token_ids_and_tokens_as_ids(client, smollm_tokenizer):
    kw = says("one two three", extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    prompt_ids = smollm_tokenizer.encode("one two three" + END, add_special_tokens=False)
    assert r.model_extra["prompt_token_ids"] == prompt_ids
    token_ids = r.choices[0].model_extra["token_ids"]
    assert token_ids == prompt_ids and len(token_ids) == r.usage.completion_tokens
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == [f"token_id:{i}" for i in token_ids]
    assert all(alt.token.startswith("token_id:") for t in content for alt in t.top_logprobs)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].model_extra["prompt_token_ids"] == prompt_ids
    assert [i for c in chunks if c.choices for i in c.choices[0].model_extra.get("token_ids") or []] == token_ids
    completion = client.completions.create(model="fake-model", prompt="one two", max_tokens=3,
                                           extra_body={"return_token_ids": True})  # fmt: skip
    choice = completion.choices[0].model_extra
    assert choice["prompt_token_ids"] == smollm_tokenizer.encode("one two") and len(choice["token_ids"]) == 3


def test_top_logprobs_minus_one_is_capped_by_max_logprobs(serve_app, fake):
    capped = make_client(serve_app, fake, max_logprobs=5)
    r = capped.chat.completions.create(**says("a b c"), logprobs=True, top_logprobs=-1)
    assert all(len(t.top_logprobs) == 5 for t in r.choices[0].logprobs.content) and fake.seen_params[-1].logprobs == 5
    with pytest.raises(openai.BadRequestError) as err:
        capped.chat.completions.create(**says("a b c"), logprobs=True, top_logprobs=6)
    assert err.value.body["param"] == "top_logprobs" and "--max-logprobs" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        capped.completions.create(model="fake-model", prompt="a", max_tokens=2, logprobs=6)
    assert err.value.body["param"] == "logprobs"


def test_continuous_usage_and_forced_usage(serve_app, fake):
    forced = make_client(serve_app, fake, enable_force_include_usage=True)
    chunks = list(forced.chat.completions.create(**says("one two three four"), stream=True))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chunks[-1].usage.total_tokens - (
        chunks[-1].usage.prompt_tokens)  # fmt: skip
    assert all(c.usage is None for c in chunks[:-1])
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(forced.chat.completions.create(**says("one two three four"), stream=True, stream_options=options))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == chunks[-1].usage.completion_tokens > 3
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)
    stream = forced.completions.create(model="fake-model", prompt="one two three", max_tokens=3, stream=True,
                                       stream_options=options)  # fmt: skip
    counts = [c.usage.completion_tokens for c in stream]
    assert counts == [1, 2, 3, 3]


def test_generation_config_vllm_ignores_the_model_defaults(serve_app, smollm_tokenizer):
    for choice, temperature in (("auto", 0.3), ("vllm", 1.0)):
        engine = FakeAsyncLLM(smollm_tokenizer)
        engine.generation_defaults = {"temperature": 0.3}
        make_client(serve_app, engine, generation_config=choice).chat.completions.create(**says("a"))
        assert engine.seen_params[-1].temperature == temperature


def test_constraints_are_checked_before_the_engine(client, fake):
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
         "response_format.json_schema.schema"),
        ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs.regex"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice"),
        ({"extra_body": {"guided_regex": "a+", "guided_choice": ["a"]}}, "guided_choice"),
    ]  # fmt: skip
    for kw, param in cases:
        extra = {"chat_template": LAST, **kw.pop("extra_body", {})}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=5, extra_body=extra, **kw)  # fmt: skip
        assert err.value.body["param"] == param and err.value.body["code"] == "invalid_structured_output", kw
    assert not fake.seen_params


def test_generate_constraints_are_checked(client, fake):
    url = str(client.base_url).removesuffix("/v1/")
    r = httpx.post(url + "/generate", json={"text": "x", "sampling_params": {"regex": "(a"}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.regex"
    assert not fake.seen_params
