"""Reasoning parsers: the ``<think>`` section and the answer, finished and streamed, agree for every cut."""

from __future__ import annotations

import random

import pytest

from shardserve.entrypoints.openai.reasoning_parsers import (
    REASONING_PARSERS,
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    get_reasoning_parser,
)

PARSERS = [DeepSeekR1ReasoningParser, Qwen3ReasoningParser]


def stream(parser, text: str, cuts: list[int]) -> tuple[str, str]:
    reasoning, content, previous = "", "", ""
    bounds = [*sorted(set(cuts)), len(text)]
    for i, end in enumerate(bounds):
        current = text[:end]
        delta = parser.extract_reasoning_streaming(previous, current, current[len(previous) :], i == len(bounds) - 1)
        previous = current
        if delta is not None:
            reasoning += delta.reasoning or ""
            content += delta.content or ""
    return reasoning, content


TEXTS = [
    "<think>\nThe user asks for 2+2. That is 4.\n</think>\n\nThe answer is 4.",
    "Okay, the prompt opened the section. 2+2=4.\n</think>\n\n4",
    "  <think>leading space</think>answer",
    "<think></think>empty reasoning",
    "</think>no reasoning at all",
    "cut by max_tokens inside the reasoning </thi",
    "<think>the answer mentions <think> later</think> and </think> twice",
    "a < b and </ think> is not a tag</think>done",
]


@pytest.mark.parametrize("parser_cls", PARSERS)
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_parts_join_to_the_non_streamed_parts(parser_cls, text):
    reasoning, content = parser_cls().extract_reasoning(text)
    rng = random.Random(0)
    cut_sets = [list(range(1, len(text))), []]
    cut_sets += [sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) // 3))) for _ in range(10)]
    for cuts in cut_sets:
        assert stream(parser_cls(), text, cuts) == (reasoning or "", content or ""), cuts


@pytest.mark.parametrize("parser_cls", PARSERS)
def test_split_with_tags(parser_cls):
    assert parser_cls().extract_reasoning(TEXTS[0]) == ("\nThe user asks for 2+2. That is 4.\n", "\n\nThe answer is 4.")


@pytest.mark.parametrize("parser_cls", PARSERS)
def test_output_may_start_inside_the_reasoning(parser_cls):
    assert parser_cls().extract_reasoning(TEXTS[1]) == ("Okay, the prompt opened the section. 2+2=4.\n", "\n\n4")


@pytest.mark.parametrize("parser_cls", PARSERS)
def test_without_end_tag_everything_is_reasoning(parser_cls):
    assert parser_cls().extract_reasoning("still thinking about it") == ("still thinking about it", None)


def test_only_the_first_end_tag_splits_and_a_late_start_tag_is_text():
    reasoning, content = DeepSeekR1ReasoningParser().extract_reasoning(TEXTS[6])
    assert reasoning == "the answer mentions <think> later" and content == " and </think> twice"


def test_empty_parts_are_none():
    assert DeepSeekR1ReasoningParser().extract_reasoning("<think></think>x") == (None, "x")
    assert DeepSeekR1ReasoningParser().extract_reasoning("") == (None, None)


def test_partial_tags_are_held_back_while_streaming():
    parser = DeepSeekR1ReasoningParser()
    assert parser.extract_reasoning_streaming("", "<thi", "<thi") is None
    delta = parser.extract_reasoning_streaming("<thi", "<think>abc</thi", "nk>abc</thi")
    assert delta.reasoning == "abc" and delta.content is None
    delta = parser.extract_reasoning_streaming("", "<think>abc</think>X", "nk>X")
    assert delta.reasoning is None and delta.content == "X"


def test_qwen3_enable_thinking_false_is_all_content():
    parser = Qwen3ReasoningParser(chat_template_kwargs={"enable_thinking": False})
    text = "Paris.</think> stays text"
    assert parser.extract_reasoning(text) == (None, text)
    assert stream(Qwen3ReasoningParser(chat_template_kwargs={"enable_thinking": False}), text, [2, 5]) == ("", text)
    assert parser.prompt_ends_reasoning("anything")


def test_deepseek_ignores_enable_thinking():
    parser = DeepSeekR1ReasoningParser(chat_template_kwargs={"enable_thinking": False})
    assert parser.extract_reasoning("a</think>b") == ("a", "b")


def test_prompt_ends_reasoning():
    parser = Qwen3ReasoningParser()
    assert parser.prompt_ends_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not parser.prompt_ends_reasoning("<|im_start|>assistant\n<think>\n")
    assert not parser.prompt_ends_reasoning("old turn <think>x</think> new turn <think>\n")
    assert not parser.prompt_ends_reasoning("no tags")


class _Backend:
    def __init__(self, vocab):
        self.vocab = vocab

    def token_to_id(self, token):
        return self.vocab.get(token)


class _SingleTokenTags:
    """A tokenizer whose vocabulary has <think> = 7 and </think> = 8, as Qwen3's and DeepSeek-R1's do."""

    backend = _Backend({"<think>": 7, "</think>": 8})

    def encode(self, text, add_special_tokens=False):
        raise AssertionError("single-token tags need no encoding")


def test_token_ids_of_single_token_tags():
    parser = DeepSeekR1ReasoningParser(_SingleTokenTags())
    assert parser.end_token_ids == [8]
    assert parser.is_reasoning_end([1, 7, 2, 8, 3])
    assert not parser.is_reasoning_end([1, 7, 2, 3])
    assert not parser.is_reasoning_end([7, 8, 5, 7, 1])  # reopened


def test_token_ids_on_the_embedded_tokenizer_spell_the_tag(smollm_tokenizer):
    parser = Qwen3ReasoningParser(smollm_tokenizer)
    ids = parser.end_token_ids
    assert len(ids) > 1 and smollm_tokenizer.decode(ids) == "</think>"
    assert not parser.is_reasoning_end(ids)  # multi-token tags: decided on text, not ids
    assert DeepSeekR1ReasoningParser().end_token_ids == []


def test_registry():
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3"}
    assert get_reasoning_parser("qwen3") is Qwen3ReasoningParser
    with pytest.raises(ValueError, match="unknown reasoning parser 'r2'.*deepseek_r1"):
        get_reasoning_parser("r2")
