"""Small host arrays to the device without making the host wait for the device."""

from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``. On CUDA through pinned memory with a non-blocking copy: a copy from pageable
    memory, or a blocking one, synchronizes with the stream, so the host would wait for the work queued
    before it (a step's forward) and launch what follows only then. Elsewhere a tensor sharing the array's
    memory."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
