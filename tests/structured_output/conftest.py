"""Fixtures: the embedded SmolLM2 tokenizer and a structured-output manager over it (built once)."""

from __future__ import annotations

import pytest

from shardserve.model_executor.loader.resolve import default_model_path
from shardserve.structured_output import StructuredOutputManager
from shardserve.transformers_utils.tokenizer import load_gguf_tokenizer


@pytest.fixture(scope="session")
def smollm_tokenizer():
    return load_gguf_tokenizer(default_model_path())


@pytest.fixture(scope="session")
def manager(smollm_tokenizer):
    mgr = StructuredOutputManager(smollm_tokenizer)
    yield mgr
    mgr.shutdown()
