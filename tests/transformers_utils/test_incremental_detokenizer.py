"""IncrementalDetokenizer: streamed text equals a full decode, never shows a cut character."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardserve.transformers_utils.detokenizer import IncrementalDetokenizer
from shardserve.transformers_utils.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Hello world, how are you today?",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 done",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "  spaced   out\n\n  lines\t tab",
    "mixé: naïve café 🍵 茶 and code `x = 1`",
]


class _DecodeSpy:
    """Delegates to a Tokenizer and records the longest id list passed to ``decode``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self._tokenizer.decode(ids, skip_special_tokens)


def _stream(detok: IncrementalDetokenizer, ids: list[int], step: int) -> list[str]:
    return [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_stream_reconstructs_full_decode(tokenizer: Tokenizer, text: str, step: int) -> None:
    prompt = tokenizer.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    chunks = _stream(detok, ids, step)
    assert "".join(chunks) == detok.output_text == tokenizer.decode(ids)
    assert all("\ufffd" not in chunk for chunk in chunks)


def test_multibyte_character_is_held_back(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a😀", add_special_tokens=False)
    assert len(ids) > 2, "the emoji should span several byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer, [])
    chunks = _stream(detok, ids, 1)
    assert chunks[0] == "a"
    assert chunks[1:-1] == [""] * (len(ids) - 2)
    assert chunks[-1] == "😀"


def test_special_tokens_skipped_or_kept(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Sure thing!<|im_end|>", add_special_tokens=False)
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi"), skip_special_tokens=skip)
        _stream(detok, ids, 1)
        assert detok.output_text == tokenizer.decode(ids, skip_special_tokens=skip)
        assert detok.output_text.endswith("<|im_end|>") is not skip


def test_leading_space_uses_prompt_context(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Hello")
    ids = tokenizer.encode(" world", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    assert detok.add(ids) == " world"


def test_window_stays_bounded(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    spy = _DecodeSpy(tokenizer)
    detok = IncrementalDetokenizer(spy, tokenizer.encode("a long prompt " * 50))  # type: ignore[arg-type]
    _stream(detok, ids, 1)
    assert len(ids) > 500
    assert spy.longest <= 16
    assert detok.output_text == tokenizer.decode(ids)


def test_sentencepiece_leading_spaces(spm_gguf_path: Path) -> None:
    """Metaspace decoders drop a leading space when decoding alone; the prompt window keeps it."""
    pytest.importorskip("transformers")
    spm = load_tokenizer(spm_gguf_path, "gguf")
    prompt = spm.encode("the a")
    ids = spm.encode(" the a the", add_special_tokens=False)
    detok = IncrementalDetokenizer(spm, prompt)
    chunks = _stream(detok, ids, 1)
    full = spm.decode(prompt + ids)
    assert "".join(chunks) == full[len(spm.decode(prompt)) :]
    assert chunks[0].startswith(" ")


@pytest.mark.parametrize("text", TEXTS)
def test_rust_stream_emits_what_the_python_form_emits(tokenizer: Tokenizer, text: str) -> None:
    """The DecodeStream path and the Python form (a tokenizer without ``backend``) give the same chunks."""
    if IncrementalDetokenizer(tokenizer, [])._stream is None:
        pytest.skip("tokenizers without DecodeStream: only the Python form exists")
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    ids = tokenizer.encode(text + " and more", add_special_tokens=False)
    fast = _stream(IncrementalDetokenizer(tokenizer, prompt), ids, 1)
    slow = _stream(IncrementalDetokenizer(_DecodeSpy(tokenizer), prompt), ids, 1)  # type: ignore[arg-type]
    assert fast == slow


@pytest.mark.parametrize("text", [TEXTS[1], TEXTS[4]])
@pytest.mark.parametrize("split", [0.2, 0.35, 0.5, 0.65, 0.8])
def test_a_failing_stream_falls_back_to_the_python_form(tokenizer: Tokenizer, text: str, split: float) -> None:
    """When DecodeStream raises (its ``Invalid prefix`` error), the request goes on with the same text,
    also when the stream held back part of a multi-byte character."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello"))
    if detok._stream is None:
        pytest.skip("tokenizers without DecodeStream: only the Python form exists")
    half = int(len(ids) * split)
    first = _stream(detok, ids[:half], 1)

    class _Broken:
        def step(self, backend, token_id):
            raise Exception("Invalid prefix encountered")

    detok._stream = _Broken()
    rest = _stream(detok, ids[half:], 1)
    assert detok._stream is None
    assert "".join(first + rest) == detok.output_text == tokenizer.decode(ids)
