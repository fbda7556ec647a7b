"""``/v1/responses`` <-> chat completions, without a server: the request translation, the Response object of
a chat completion (with reasoning and tool calls, as the chat path returns them once wired), and the event
stream of chat chunks. Outputs are validated against the ``openai`` package's types."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, ConfigDict, TypeAdapter

from shardserve.entrypoints.openai.protocol import InvalidRequestError
from shardserve.entrypoints.openai.protocol_responses import ResponsesRequest, to_chat_body, to_messages
from shardserve.entrypoints.openai.serving_responses import response_from_chat, stream_events, to_chat_request

EVENT = TypeAdapter(ResponseStreamEvent)
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_text_input_and_instructions():
    chat = to_chat_body(ResponsesRequest(input="Hi", instructions="Be nice.", max_output_tokens=7, temperature=0.1))
    assert chat["messages"] == [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]
    assert chat["max_completion_tokens"] == 7 and chat["temperature"] == 0.1 and "stream" not in chat


def test_items_become_messages_with_tool_calls_joined():
    items = [
        {"type": "message", "role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "done"}]},
    ]
    messages = to_messages(items, None)
    assert messages[0] == {"role": "system", "content": "Rules."}
    assert messages[1] == {"role": "user", "content": "a\nb"}
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"] and messages[2]["role"] == "assistant"
    assert messages[3:5] == [{"role": "tool", "tool_call_id": "c1", "content": "one"},
                             {"role": "tool", "tool_call_id": "c2", "content": "two"}]  # fmt: skip
    assert messages[5] == {"role": "assistant", "content": "done"}


def test_tools_tool_choice_and_text_format_translate():
    body = ResponsesRequest(
        input="x",
        tools=[{"type": "function", "name": "f", "description": "d", "parameters": SCHEMA, "strict": True}],
        tool_choice={"type": "function", "name": "f"},
        parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "out", "schema": SCHEMA, "strict": True}},
        stream=True,
        seed=3,
    )
    chat = to_chat_body(body)
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "description": "d", "parameters": SCHEMA,
                                                               "strict": True}}]  # fmt: skip
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["parallel_tool_calls"] is False and chat["seed"] == 3
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA,
                                                                              "strict": True}}  # fmt: skip
    assert chat["stream_options"] == {"include_usage": True}
    assert to_chat_body(ResponsesRequest(input="x", text={"format": {"type": "json_object"}}))["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in to_chat_body(ResponsesRequest(input="x", text={"format": {"type": "text"}}))


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_x"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format"),
        ({"tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "file_search"}]}, "tools"),
        ({"n": 2}, "n"),
    ],
)
def test_unsupported_fields_are_400(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        to_chat_body(ResponsesRequest(input="x", **fields))
    assert info.value.param == param and info.value.status == 400


def test_accepted_defaults_pass():
    chat = to_chat_body(ResponsesRequest(input="x", store=False, truncation="disabled", reasoning={"effort": None}))
    assert chat["messages"] == [{"role": "user", "content": "x"}]


class _OldChatRequest(BaseModel):
    """A chat request class that does not declare response_format/tool_choice (before they were wired)."""

    model_config = ConfigDict(extra="allow")
    messages: list


def test_a_field_the_chat_path_does_not_declare_is_refused_not_dropped():
    with pytest.raises(InvalidRequestError, match="text.format is not supported by this server yet"):
        to_chat_request({"messages": [], "response_format": {"type": "json_object"}}, model=_OldChatRequest)
    assert to_chat_request({"messages": [{"role": "user"}]}, model=_OldChatRequest).messages


def test_chat_validation_errors_use_responses_names():
    with pytest.raises(InvalidRequestError) as info:
        to_chat_request({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0})
    assert info.value.param == "max_output_tokens"


CHAT = {
    "id": "chatcmpl-1",
    "model": "m",
    "choices": [{
        "index": 0,
        "message": {
            "role": "assistant",
            "content": "Calling.",
            "reasoning_content": "The user wants weather.",
            "tool_calls": [{"id": "call_a", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        "finish_reason": "tool_calls",
    }],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
              "prompt_tokens_details": {"cached_tokens": 4}},
}  # fmt: skip


def test_response_from_a_chat_completion():
    body = ResponsesRequest(input="x", metadata={"k": "v"})
    response = Response.model_validate(response_from_chat(body, "resp_1", 1700000000, CHAT))
    assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
    assert response.output[0].content[0].text == "The user wants weather."
    assert response.output_text == "Calling." and response.status == "completed"
    call = response.output[2]
    assert (call.call_id, call.name, call.arguments) == ("call_a", "get_weather", '{"city": "Paris"}')
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.input_tokens_details.cached_tokens) == (11, 7, 4)
    assert response.metadata == {"k": "v"} and response.store is False


def test_length_finish_is_incomplete():
    chat = {**CHAT, "choices": [{**CHAT["choices"][0], "finish_reason": "length"}]}
    response = Response.model_validate(response_from_chat(ResponsesRequest(input="x"), "resp_1", 1, chat))
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def _chunk(delta=None, finish=None, usage=None):
    choices = [] if delta is None and finish is None else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    return "data: " + json.dumps({"id": "c", "model": "m", "choices": choices, "usage": usage}) + "\n\n"


async def _collect(chunks: list[str]) -> list:
    async def source():
        for c in chunks:
            yield c

    gen = source()
    return [e async for e in stream_events(ResponsesRequest(input="x", stream=True), "resp_1", 1, gen)]


def _parse(raw_events: list[str]) -> list:
    parsed = []
    for raw in raw_events:
        name_line, data_line = raw.strip().split("\n")
        event = EVENT.validate_json(data_line[len("data: ") :])
        assert name_line == f"event: {event.type}"
        parsed.append(event)
    return parsed


def test_stream_of_reasoning_text_and_tool_calls():
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"reasoning_content": "Think", "reasoning": "Think"}),
        _chunk({"reasoning_content": "ing.", "reasoning": "ing."}),
        _chunk({"content": "Hel"}),
        _chunk({"content": "lo"}),
        _chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": '}}
                ]
            }
        ),  # fmt: skip
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        _chunk(
            {
                "tool_calls": [
                    {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}
                ]
            }
        ),  # fmt: skip
        _chunk({}, finish="tool_calls"),
        _chunk(usage={"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}),
        "data: [DONE]\n\n",
    ]
    events = _parse(asyncio.run(_collect(chunks)))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Thinking."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello"
    args = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.name, e.arguments) for e in args] == [("f", '{"x": 1}'), ("g", "{}")]
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call", "function_call"]
    assert all(item.status == "completed" for item in final.output) and final.usage.output_tokens == 9
    # every item is added before its deltas and done after them, at its own output index
    added = {e.output_index: i for i, e in enumerate(events) if e.type == "response.output_item.added"}
    done = {e.output_index: i for i, e in enumerate(events) if e.type == "response.output_item.done"}
    for i, e in enumerate(events):
        if e.type.endswith(".delta"):
            assert added[e.output_index] < i < done[e.output_index]


def test_stream_error_after_headers_is_error_then_failed():
    error = {"error": {"message": "boom", "type": "server_error", "param": None, "code": "engine_dead"}}
    events = _parse(asyncio.run(_collect([_chunk({"content": "a"}), f"data: {json.dumps(error)}\n\n"])))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].code == "engine_dead" and events[-1].response.error.message == "boom"


def test_stream_that_ends_without_done_fails():
    events = _parse(asyncio.run(_collect([_chunk({"content": "a"})])))
    assert events[-1].type == "response.failed"
