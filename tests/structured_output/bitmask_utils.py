"""Reading a token bitmask back as token ids (for the structured-output tests)."""

from __future__ import annotations

import numpy as np
import torch


def allowed_ids(bitmask: torch.Tensor, row: int, vocab_size: int) -> np.ndarray:
    """Token ids whose bit is set in ``bitmask[row]`` (xgrammar's little-endian bit order)."""
    bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size])
