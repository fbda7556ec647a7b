"""Triton kernels of the GPU path; the layers fall back to PyTorch where these do not apply.

``use_triton(x)`` is the one switch: the kernels run for CUDA tensors when Triton imports, and for CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the CPU test suite checks them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Whether the layers should run the Triton kernels for tensors like ``x``."""
    return HAS_TRITON and x.is_cuda
