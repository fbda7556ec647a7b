"""Tool-call parsers: finished and streamed output agree, for every format and every way of cutting the text."""

from __future__ import annotations

import json
import random
import re

import pytest

from shardserve.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    PythonicToolParser,
    get_tool_parser,
)


def stream(parser, text: str, cuts: list[int]) -> tuple[str, list[dict]]:
    """Feed ``text`` cut at ``cuts`` (then the end, finished); returns (content, calls joined from the deltas)."""
    content, calls, previous = "", [], ""
    bounds = [*sorted(set(cuts)), len(text)]
    for i, end in enumerate(bounds):
        current = text[:end]
        delta = parser.extract_tool_calls_streaming(previous, current, current[len(previous) :], i == len(bounds) - 1)
        previous = current
        if delta is None:
            continue
        content += delta.content or ""
        for chunk in delta.tool_calls:
            if chunk.index == len(calls):
                assert chunk.id and chunk.type == "function" and chunk.function.name, "a call's first chunk"
                calls.append({"id": chunk.id, "name": chunk.function.name, "arguments": "", "chunks": 0})
            else:
                assert chunk.index == len(calls) - 1 and chunk.id is None and chunk.function.name is None
            calls[chunk.index]["arguments"] += chunk.function.arguments or ""
            calls[chunk.index]["chunks"] += bool(chunk.function.arguments)
    return content, calls


def random_cuts(text: str, rng: random.Random) -> list[int]:
    return sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, len(text) // 2 + 1))))


def check_streaming_matches(parser_cls, text: str, seeds: int = 12) -> None:
    """Non-streamed calls == streamed calls for char-by-char, one-shot and random cuts."""
    expected = parser_cls().extract_tool_calls(text)
    want_content = expected.content or ""
    want_calls = [(c.function.name, c.function.arguments) for c in expected.tool_calls]
    rng = random.Random(0)
    cut_sets = [list(range(1, len(text))), []] + [random_cuts(text, rng) for _ in range(seeds)]
    for cuts in cut_sets:
        content, calls = stream(parser_cls(), text, cuts)
        assert content == want_content, (cuts, content)
        assert [(c["name"], c["arguments"]) for c in calls] == want_calls, cuts


HERMES = (
    'Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, France", '
    '"days": 3, "units": ["c", "f"], "scale": 1.5e3, "ok": true, "none": null}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>'
)
LLAMA3 = (
    '<|python_tag|>{"name": "search", "parameters": {"q": "a \\"quoted\\" word", "n": -12.5}}; '
    '{"name": "x", "parameters": {}}'
)
MISTRAL_ARRAY = (
    'Sure. [TOOL_CALLS][{"name": "f", "arguments": {"a": 1, "b": "é😀"}}, '
    '{"name": "g", "arguments": {"c": [1, {"d": null}]}}]'
)
MISTRAL_V11 = (
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"tz": "CET", "x": 10}'
)
PYTHONIC = (
    '[get_weather(city="San Francisco, CA", metric=True, days=12), '
    'search(q=\'it\\\'s\', opts={"a": [1, 2.5], "b": None}, t=(1, 2))]'
)

CASES = [
    (HermesToolParser, HERMES),
    (Llama3JsonToolParser, LLAMA3),
    (Llama3JsonToolParser, '{"name": "only", "arguments": {"k": "v"}}'),
    (MistralToolParser, MISTRAL_ARRAY),
    (MistralToolParser, MISTRAL_V11),
    (PythonicToolParser, PYTHONIC),
    (PythonicToolParser, "<|python_start|>[f(a=1)]<|python_end|>"),
]


@pytest.mark.parametrize(("parser_cls", "text"), CASES)
def test_streamed_calls_join_to_the_non_streamed_calls(parser_cls, text):
    result = parser_cls().extract_tool_calls(text)
    assert result.tools_called and result.tool_calls
    for call in result.tool_calls:
        json.loads(call.function.arguments)
    check_streaming_matches(parser_cls, text)


@pytest.mark.parametrize(("parser_cls", "text"), CASES)
def test_arguments_stream_in_several_chunks(parser_cls, text):
    _, calls = stream(parser_cls(), text, list(range(1, len(text))))
    assert max(c["chunks"] for c in calls) > 1  # not all at the end


def test_hermes_content_and_arguments():
    result = HermesToolParser().extract_tool_calls(HERMES)
    assert result.content == "Let me look that up.\n"
    first, second = result.tool_calls
    assert first.function.name == "get_weather" and second.function.name == "get_time"
    assert json.loads(first.function.arguments) == {"city": "Paris, France", "days": 3, "units": ["c", "f"],
                                                    "scale": 1500.0, "ok": True, "none": None}  # fmt: skip
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", first.id) and first.id != second.id


def test_hermes_unclosed_last_block_is_read_to_the_end():
    result = HermesToolParser().extract_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}')
    assert result.tools_called and result.tool_calls[0].function.arguments == '{"x": 1}'


@pytest.mark.parametrize(
    "text",
    [
        "No tools needed: 2 < 3 and <tool is not a tag.",
        '<tool_call>{"arguments": {"x": 1}}</tool_call>',  # no name
        '<tool_call>{"name": "f"}</tool_call>',  # no arguments
        "<tool_call>",
    ],
)
def test_hermes_text_without_a_valid_call_is_all_content(text):
    result = HermesToolParser().extract_tool_calls(text)
    assert not result.tools_called and result.content == text
    content, calls = stream(HermesToolParser(), text, list(range(1, len(text))))
    assert content == text and not calls


def test_a_call_that_turns_out_malformed_still_delivers_the_whole_text():
    # A streamed call header cannot be taken back; the text then follows as content, as vLLM does.
    text = '<tool_call>{"name": "f", "arguments": {"x": }</tool_call>'
    assert HermesToolParser().extract_tool_calls(text).content == text
    content, _ = stream(HermesToolParser(), text, list(range(1, len(text))))
    assert content == text


def test_hermes_holds_back_a_possible_tag_while_streaming():
    parser = HermesToolParser()
    delta = parser.extract_tool_calls_streaming("", "Hello <tool", "Hello <tool")
    assert delta.content == "Hello "
    delta = parser.extract_tool_calls_streaming("Hello <tool", "Hello <tool>", ">")
    assert delta.content == "<tool>"


def test_hermes_arguments_given_as_a_json_string_stay_that_string():
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert HermesToolParser().extract_tool_calls(text).tool_calls[0].function.arguments == '{"x": 1}'
    check_streaming_matches(HermesToolParser, text)


def test_llama3_plain_text_is_content_and_streams_at_once():
    text = "The capital of France is Paris."
    assert Llama3JsonToolParser().extract_tool_calls(text).content == text
    parser = Llama3JsonToolParser()
    assert parser.extract_tool_calls_streaming("", "The", "The").content == "The"


def test_llama3_json_that_is_not_a_call_is_content_in_both_modes():
    text = '{"name": "Paris", "country": "France"}'
    result = Llama3JsonToolParser().extract_tool_calls(text)
    assert not result.tools_called and result.content == text
    content, calls = stream(Llama3JsonToolParser(), text, list(range(1, len(text))))
    assert content == text and not calls


def test_llama3_accepts_leading_whitespace_and_arguments_key():
    result = Llama3JsonToolParser().extract_tool_calls('\n {"name": "f", "arguments": {"a": [1]}}')
    assert result.tools_called and result.tool_calls[0].function.arguments == '{"a": [1]}'


def test_mistral_ids_are_nine_alphanumerics_and_content_is_kept():
    result = MistralToolParser().extract_tool_calls(MISTRAL_ARRAY)
    assert result.content == "Sure. "
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in result.tool_calls)
    v11 = MistralToolParser().extract_tool_calls(MISTRAL_V11)
    assert [c.function.name for c in v11.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(v11.tool_calls[1].function.arguments) == {"tz": "CET", "x": 10}


@pytest.mark.parametrize("text", ["[TOOL_CALLS]f", '[TOOL_CALLS][{"name": "f"', "[TOOL_CALLS]f[ARGS]{bad}"])
def test_mistral_malformed_calls_are_content(text):
    assert MistralToolParser().extract_tool_calls(text).content == text


class _Backend:
    def __init__(self, vocab):
        self.vocab = vocab

    def token_to_id(self, token):
        return self.vocab.get(token)


class _Tokenizer:
    def __init__(self, special: dict[str, int]):
        self.backend = _Backend(special)
        self._special = set(special.values())

    def is_special(self, token_id):
        return token_id in self._special


def test_needs_special_tokens_when_a_marker_is_a_special_token():
    assert MistralToolParser(_Tokenizer({"[TOOL_CALLS]": 5})).needs_special_tokens()
    assert not MistralToolParser(_Tokenizer({})).needs_special_tokens()
    assert not HermesToolParser().needs_special_tokens()


def test_pythonic_values_become_json():
    result = PythonicToolParser().extract_tool_calls(PYTHONIC)
    first, second = result.tool_calls
    assert json.loads(first.function.arguments) == {"city": "San Francisco, CA", "metric": True, "days": 12}
    assert json.loads(second.function.arguments) == {"q": "it's", "opts": {"a": [1, 2.5], "b": None}, "t": [1, 2]}


@pytest.mark.parametrize(
    "text",
    [
        "[f(__import__('os').system('touch /tmp/pwned-by-tool-parser'))]",
        "[f(a=__import__('os').getcwd())]",
        "[f(1, 2)]",
        "[f(**{'a': 1})]",
        "[f(a={1, 2})]",
        "[1, 2]",
        "plain words",
    ],
)
def test_pythonic_refuses_what_is_not_a_literal_call_and_never_evaluates(text, tmp_path):
    result = PythonicToolParser().extract_tool_calls(text)
    assert not result.tools_called and result.content == text
    assert not __import__("os").path.exists("/tmp/pwned-by-tool-parser")


def test_pythonic_streaming_waits_for_a_value_that_is_not_a_literal_yet():
    parser = PythonicToolParser()
    assert parser.extract_tool_calls_streaming("", "[f(a=1, flag=Tr", "") is not None  # name and a=
    delta = parser.extract_tool_calls_streaming("", "[f(a=1, flag=True", "")
    assert delta is None or all("Tr" not in (c.function.arguments or "") for c in delta.tool_calls)
    done = parser.extract_tool_calls_streaming("", "[f(a=1, flag=True)]", "", finished=True)
    assert done is not None


def test_registry_knows_the_vllm_names():
    for name in ("llama3_json", "hermes", "mistral", "pythonic"):
        assert get_tool_parser(name).name in (name, "llama3_json", "pythonic")
    assert set(TOOL_PARSERS) >= {"llama3_json", "hermes", "mistral", "pythonic"}
    with pytest.raises(ValueError, match="unknown tool call parser 'qwen9'.*hermes"):
        get_tool_parser("qwen9")


@pytest.mark.parametrize(("parser_cls", "text"), CASES)
def test_tools_called_is_set_once_a_call_streams(parser_cls, text):
    parser = parser_cls()
    stream_content, calls = stream(parser, text, [])
    assert calls and parser.tools_called
    plain = parser_cls()
    stream(plain, "just words here", [])
    assert not plain.tools_called
