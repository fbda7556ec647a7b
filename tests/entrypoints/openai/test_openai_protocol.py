"""Request models -> SamplingParams, defaults, and validation errors naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shardserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionStreamChoice,
    CompletionRequest,
    DeltaMessage,
    GenerateRequest,
    InvalidRequestError,
    check_context_length,
)


def chat(**kw):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_chat_request_maps_every_sampling_field():
    req = chat(
        n=3, max_completion_tokens=7, max_tokens=99, temperature=0.3, top_p=0.9, stop="END", seed=5,
        presence_penalty=0.5, frequency_penalty=-0.5, top_k=40, min_p=0.05, repetition_penalty=1.1,
        ignore_eos=True, stop_token_ids=[2], min_tokens=3, skip_special_tokens=False, logprobs=True, top_logprobs=4,
    )  # fmt: skip
    p = req.to_sampling_params({}, prompt_len=10, max_model_len=100)
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (3, 7, 0.3, 0.9, ["END"], 5)
    assert (p.presence_penalty, p.frequency_penalty, p.top_k, p.min_p) == (0.5, -0.5, 40, 0.05)
    assert (p.repetition_penalty, p.ignore_eos, p.stop_token_ids, p.min_tokens) == (1.1, True, [2], 3)
    assert p.skip_special_tokens is False and p.logprobs == 4


def test_defaults_fill_only_missing_fields_and_max_tokens_runs_to_context():
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}
    p = chat(top_p=0.5).to_sampling_params(defaults, prompt_len=30, max_model_len=100)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.6, 0.5, 20, 1.05)
    assert p.max_tokens == 70 and p.logprobs is None
    explicit = chat(temperature=0.0).to_sampling_params(defaults, prompt_len=30, max_model_len=100)
    assert explicit.temperature == 0.0 and explicit.greedy


def test_completion_prompt_forms_and_logprobs():
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    p = CompletionRequest(prompt="a", logprobs=2, max_tokens=4).to_sampling_params({}, 1, 64)
    assert p.logprobs == 2 and p.max_tokens == 4


def test_context_length_error_gives_both_counts():
    with pytest.raises(InvalidRequestError) as err:
        chat(max_tokens=50).to_sampling_params({}, prompt_len=60, max_model_len=100, prompt_noun="messages")
    msg = err.value.message
    assert "100" in msg and "60 in the messages" in msg and "50 in the completion" in msg
    assert err.value.status == 400 and err.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="maximum context length is 100"):
        check_context_length(100, None, 100, "prompt")
    assert check_context_length(99, None, 100, "prompt") == 1


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -1), ("temperature", "hot"), ("top_p", 0), ("n", 0), ("max_tokens", 0),
     ("top_logprobs", -2), ("presence_penalty", 3), ("messages", []), ("stop", 5)],
)  # fmt: skip
def test_out_of_range_fields_fail_validation_with_their_name(field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, field: value}
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate(body)
    assert err.value.errors()[0]["loc"][0] == field


def test_unknown_fields_are_ignored_and_parts_are_joined():
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
         "response_format": {"type": "text"}, "parallel_tool_calls": False}
    )  # fmt: skip
    assert req.messages[0].to_template_dict() == {"role": "user", "content": "a\nb"}
    image = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    )
    with pytest.raises(InvalidRequestError):
        image.messages[0].to_template_dict()


def test_cross_field_rules():
    with pytest.raises(ValidationError, match="top_logprobs requires logprobs"):
        chat(top_logprobs=2)
    with pytest.raises(ValidationError, match="stream_options"):
        chat(stream_options={"include_usage": True})
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True).include_usage


def test_generate_request_maps_sglang_names():
    req = GenerateRequest.model_validate(
        {"text": ["x", "y"], "sampling_params": {"max_new_tokens": 5, "temperature": 0, "min_new_tokens": 2}}
    )
    assert req.is_batch and req.prompts() == ["x", "y"]
    p = req.sampling_params.to_sampling_params({"temperature": 0.7}, prompt_len=3, max_model_len=64)
    assert (p.max_tokens, p.temperature, p.min_tokens) == (5, 0.0, 2)
    assert GenerateRequest(input_ids=[1, 2]).prompts() == [[1, 2]]
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({})


def test_stream_delta_omits_unset_fields():
    choice = ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content="x"))
    dumped = choice.model_dump()
    assert dumped["delta"] == {"content": "x"} and dumped["finish_reason"] is None


def test_completion_max_tokens_defaults_to_16_and_null_runs_to_the_context():
    assert CompletionRequest(prompt="a").to_sampling_params({}, prompt_len=10, max_model_len=100).max_tokens == 16
    explicit_null = CompletionRequest.model_validate({"prompt": "a", "max_tokens": None})
    assert explicit_null.to_sampling_params({}, prompt_len=10, max_model_len=100).max_tokens == 90


@pytest.mark.parametrize(
    "field, value",
    [("seed", 2**63), ("seed", -(2**63) - 1), ("max_tokens", 2**31), ("top_k", 2**31), ("min_tokens", -1),
     ("stop_token_ids", [2**31]), ("temperature", float("nan")), ("repetition_penalty", float("inf")),
     ("logit_bias", {"x1": 1}), ("logit_bias", {"1": 100.5})],
)  # fmt: skip
def test_engine_limits_fail_validation_with_their_name(field, value):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], field: value})
    assert err.value.errors()[0]["loc"][0] == field
    assert chat(seed=2**63 - 1).seed == 2**63 - 1 and chat(seed=-(2**63)).seed == -(2**63)
