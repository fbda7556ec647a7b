"""Fixtures: the embedded SmolLM2 tokenizer and a structured-output manager over it (built once)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def allowed_ids(bitmask: torch.Tensor, row: int, vocab_size: int) -> np.ndarray:
    """Token ids whose bit is set in ``bitmask[row]`` (xgrammar's little-endian bit order)."""
    bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size])
