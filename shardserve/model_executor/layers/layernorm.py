"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.model_executor.kernels import use_triton


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in fp32 like Hugging Face Llama.

    ``y = weight * (x / sqrt(mean(x**2, -1) + eps))``: the normalisation runs in fp32, the result is cast
    back to the input dtype before the weight multiply (``LlamaRMSNorm.forward``).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same operations in one operator (the eager CPU path's default dtype; bit-equal, tested)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise ``x`` of shape ``(..., hidden_size)`` over its last dimension.

        With ``residual``, first form ``x + residual`` (in the model dtype, as Hugging Face does) and
        return ``(norm(x + residual), x + residual)``; the second is the next layer's residual.
        """
        if use_triton(x) and x.dim() == 2:
            from shardserve.model_executor.kernels.elementwise import rms_norm

            # The fused kernel writes x + residual into ``residual`` in place.
            return (
                rms_norm(x, self.weight, self.eps)
                if residual is None
                else (rms_norm(x, self.weight, self.eps, residual), residual)
            )
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def forward_int8(
        self, x: torch.Tensor, residual: torch.Tensor | None, unit: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]:
        """:meth:`forward` and its output rounded to int8 for an int8 GEMV in one Triton kernel
        (``kernels/gguf_dp4a.rms_norm_int8``; the caller got ``unit`` from the consumer's
        ``int8_input_unit``).

        Returns:
            ``(norm(x [+ residual]), x + residual (None without residual), (xq, dx, xs))``; the sum is a
            new tensor (the kernel's programs each read the whole of ``residual``, so none writes it).
        """
        from shardserve.model_executor.kernels.gguf_dp4a import rms_norm_int8

        return rms_norm_int8(x, self.weight, self.eps, residual, unit)
