"""Tool turns and the reasoning parser on a live server of the embedded SmolLM2-135M served with vLLM's flags:
``--chat-template`` (ChatML with Hermes tools and Qwen3's ``enable_thinking``, in ``templates/``),
``--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3`` and
``--default-chat-template-kwargs '{"enable_thinking": false}'``, and ``--tokenizer`` (the model's own GGUF, named
explicitly) with ``--generation-config vllm``.

With thinking on, the template opens ``<think>`` and a few-shot history in which the assistant closes its
reasoning with ``</think>`` makes the model do the same (greedy), so the split is checked on real output
against the raw token ids of that same output.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import pytest
from conftest import TIMEOUT, embedded_gguf
from procs import running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TEMPLATE = Path(__file__).parent / "templates" / "chatml_tools_think.jinja"
THINK = {"chat_template_kwargs": {"enable_thinking": True}}
SHOTS = [
    {"role": "user", "content": "What is 1+1?"},
    {"role": "assistant", "content": "1 plus 1 makes 2.</think>2"},
    {"role": "user", "content": "What is 3+3?"},
    {"role": "assistant", "content": "3 plus 3 makes 6.</think>6"},
    {"role": "user", "content": "What is 5+5?"},
]
"""Greedy, the model answers ``5 plus 5 makes 10.</think>10``: reasoning, the closing tag, the answer."""
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                       "required": ["city"]},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("tools-reasoning") / "server.log"
    args = ["--device", "cpu", "--max-model-len", "1024", "--log-level", "warning", "--chat-template", str(TEMPLATE),
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
            "--default-chat-template-kwargs", '{"enable_thinking": false}', "--tokenizer", str(embedded_gguf()),
            "--generation-config", "vllm"]  # fmt: skip
    with running_server(args, log) as url:
        yield url


def raw_text(server_url: str, token_ids: list[int]) -> str:
    text = httpx.post(server_url + "/detokenize", json={"tokens": token_ids}, timeout=TIMEOUT).json()["prompt"]
    return text.removesuffix("<|im_end|>")


def test_reasoning_and_content_are_split_streamed_and_not(server_url, client, model):
    kw = dict(model=model, messages=SHOTS, temperature=0, max_tokens=40)
    r = client.chat.completions.create(**kw, extra_body={**THINK, "return_token_ids": True})
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning"]
    assert reasoning and message.content and message.model_extra["reasoning_content"] == reasoning
    assert reasoning + "</think>" + message.content == raw_text(server_url, r.choices[0].model_extra["token_ids"])
    chunks = [c for c in client.chat.completions.create(**kw, stream=True, extra_body=THINK) if c.choices]
    deltas = [c.choices[0].delta.model_extra or {} for c in chunks]
    assert "".join(d.get("reasoning") or "" for d in deltas) == reasoning
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    first_content = next(i for i, c in enumerate(chunks) if c.choices[0].delta.content)
    assert all(not d.get("reasoning") for d in deltas[first_content:])  # the answer follows the reasoning
    dropped = client.chat.completions.create(**kw, extra_body={**THINK, "include_reasoning": False})
    assert dropped.choices[0].message.content == message.content
    assert "reasoning" not in dropped.choices[0].message.model_extra


def test_constraint_applies_after_the_reasoning(client, model):
    r = client.chat.completions.create(model=model, messages=SHOTS, temperature=0, max_tokens=40,
                                       extra_body={**THINK, "guided_choice": ["10", "ten"]})  # fmt: skip
    message = r.choices[0].message
    assert message.model_extra["reasoning"] and message.content in ("10", "ten")


def test_thinking_off_by_default_kwargs(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2+2?"}],
                                       temperature=0, max_tokens=16)  # fmt: skip
    assert r.choices[0].message.content and "reasoning" not in r.choices[0].message.model_extra


def test_tool_call_then_tool_result_turn(server_url, client, model):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=model, messages=ask, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=60)  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    turn = [*ask, r.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 degrees"}]  # fmt: skip
    prompt = httpx.post(server_url + "/tokenize", json={"messages": turn, "tools": [WEATHER]}, timeout=TIMEOUT).json()
    rendered = httpx.post(server_url + "/detokenize", json={"tokens": prompt["tokens"]}, timeout=TIMEOUT).json()
    assert '"name": "get_weather"' in rendered["prompt"] and json.dumps(arguments) in rendered["prompt"]
    assert "<tool_response>\nsunny, 24 degrees\n</tool_response>" in rendered["prompt"]
    answer = client.chat.completions.create(model=model, messages=turn, tools=[WEATHER], tool_choice="none",
                                            temperature=0, max_tokens=24)  # fmt: skip
    assert answer.usage.prompt_tokens == prompt["count"]
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_tokenizer_and_generation_config_flags(server_url):
    info = httpx.get(server_url + "/get_model_info", timeout=TIMEOUT).json()
    # auto would report the GGUF's {"bos_token_id": 1, "eos_token_id": 2}; vllm uses no model defaults
    assert info["tokenizer_path"] == str(embedded_gguf()) and info["preferred_sampling_params"] is None
