"""Activation functions of the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.model_executor.kernels import use_triton


class SiluAndMul(nn.Module):
    """SwiGLU gate: ``silu(x[..., :d]) * x[..., d:]`` for ``x`` of width ``2 * d``.

    Matches Hugging Face Llama's ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` when the gate and
    up projections are fused into one ``(..., 2 * intermediate)`` output, gate first.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., 2 * d)`` -> ``(..., d)``."""
        if use_triton(x) and x.dim() == 2:
            from shardserve.model_executor.kernels.elementwise import silu_and_mul

            return silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
