"""Tokenizer from GGUF metadata and from a HF directory, checked against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardserve.transformers_utils.tokenizer import Tokenizer, bytes_to_unicode, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "hello",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple    inner     spaces",
    "line one\nline two\n\n\nafter blank lines\r\nwindows",
    "\ttabs\tand\nnewlines\n",
    "digits 0 12 345 67890 3.14159 1,000,000",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Accents: café, naïve, Ångström, façade, São Paulo",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are nice.<|im_end|>\n<|im_start|>assistant\n",
    "don't we'll I'm they've",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_matches_transformers(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == hf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_decode_round_trip(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_gguf_special_tokens_match_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    assert tokenizer.vocab_size == len(hf_tokenizer)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == (hf_tokenizer.bos_token, hf_tokenizer.bos_token_id)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == (hf_tokenizer.eos_token, hf_tokenizer.eos_token_id)
    assert tokenizer.add_bos_token == bool(hf_tokenizer.add_bos_token)
    hf_special = {i for i, tok in hf_tokenizer.added_tokens_decoder.items() if tok.special}
    assert {i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)} == hf_special
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert {hf_tokenizer.eos_token_id, im_end} <= tokenizer.eos_token_ids
    assert tokenizer.chat_template == hf_tokenizer.chat_template


def test_gguf_tokens_and_pieces_match_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    ids = hf_tokenizer.encode("<|im_start|>Héllo wörld 😀 123")
    assert tokenizer.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)
    assert [tokenizer.id_to_piece_text(i) for i in ids] == [hf_tokenizer.decode([i]) for i in ids]


def test_generation_config_eos_joins_eos_ids(hf_tokenizer, tmp_path: Path) -> None:
    hf_tokenizer.save_pretrained(tmp_path)
    assert 7 not in load_tokenizer(tmp_path, "hf").eos_token_ids
    tok = load_tokenizer(tmp_path, "hf", generation_config={"eos_token_id": [2, 7]})
    assert {2, 7} <= tok.eos_token_ids
    assert 9 in load_tokenizer(tmp_path, "hf", generation_config={"eos_token_id": 9}).eos_token_ids


def test_bad_format_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        load_tokenizer(tmp_path, "sentencepiece")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path, "hf")
    with pytest.raises(ValueError, match="gguf"):
        load_tokenizer(tmp_path, "gguf")


# ------------------------------------------------------------------------------------------ HF dir


def _hf_dir(hf_tokenizer, tmp_path: Path) -> Path:
    hf_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_hf_dir_matches_transformers(hf_tokenizer, tmp_path: Path) -> None:
    directory = _hf_dir(hf_tokenizer, tmp_path)
    ours = load_tokenizer(directory, "hf")
    for text in TEXTS:
        assert ours.encode(text) == hf_tokenizer.encode(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert (ours.bos_token_id, ours.eos_token_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)
    assert ours.chat_template == hf_tokenizer.chat_template
    assert not ours.add_bos_token


def test_hf_dir_post_processor_with_bos(hf_tokenizer, tmp_path: Path) -> None:
    """A tokenizer.json whose post-processor prepends BOS: add_bos_token is detected, encode matches."""
    directory = _hf_dir(hf_tokenizer, tmp_path)
    tokenizer_file = directory / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text())
    bos, bos_id = hf_tokenizer.bos_token, hf_tokenizer.bos_token_id
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    tokenizer_file.write_text(json.dumps(spec))
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = load_tokenizer(directory, "hf")
    assert ours.add_bos_token
    for text in ["Hello world", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == reference.encode(text)
        assert ours.encode(text)[0] == bos_id
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------- synthetic GGUF files


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_synthetic_byte_level_gguf_matches_transformers(tmp_path: Path, pre: str, write_tokenizer_gguf) -> None:
    """Split regexes by ``tokenizer.ggml.pre``, BOS insertion, user-defined tokens, raw-text tokens."""
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2", "12 3", "Ċ Ċ"]
    special = ["<|begin_of_text|>", "<|eot_id|>", "<think>", "日本"]
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges] + special
    types = [1] * (len(tokens) - 4) + [3, 3, 4, 1]
    bos, eos = len(tokens) - 4, len(tokens) - 3
    write_tokenizer_gguf(
        tmp_path / "tiny.gguf", tokens, types, model="gpt2", pre=pre, merges=merges, bos=bos, eos=eos, add_bos=True
    )
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    ours = load_tokenizer(tmp_path / "tiny.gguf", "gguf")
    assert ours.add_bos_token and ours.bos_token_id == bos
    assert eos in ours.eos_token_ids
    for text in ["the thin 1234 in a<think>x</think>", "  the\n\n  123456 ", "héllo 日本 😀", "'s 's"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text)
        assert ids[0] == bos
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_synthetic_sentencepiece_gguf_uses_transformers_fallback(spm_gguf_path: Path) -> None:
    reference = transformers.AutoTokenizer.from_pretrained(str(spm_gguf_path.parent), gguf_file=spm_gguf_path.name)
    ours = load_tokenizer(spm_gguf_path, "gguf")
    assert ours.add_bos_token and ours.bos_token_id == 1
    for text in ["the a the", " the", "thé"]:
        assert ours.encode(text) == reference.encode(text)
        assert ours.encode(text)[0] == 1
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text), skip_special_tokens=True)
