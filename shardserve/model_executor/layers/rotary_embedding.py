"""Rotary position embedding (RoPE, Su et al. 2021) with Llama-3.1 frequency scaling.

The rotation is the "rotate_half" (GPT-NeoX) form that Hugging Face Llama applies: each head vector is
split into halves ``(x1, x2)`` and becomes ``x * cos + cat(-x2, x1) * sin``. llama.cpp stores Q/K rows in
the interleaved form; the GGUF loader undoes that permutation so this one form serves both sources.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from shardserve.model_executor.kernels import use_triton


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """``1 / base ** (2i / head_dim)`` for ``i < head_dim / 2``, fp32 ``(head_dim // 2,)``.

    Same arithmetic as ``transformers.modeling_rope_utils._compute_default_rope_parameters``.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (base**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 scaling of ``inv_freq``: long wavelengths divided by ``factor``, a smooth ramp between.

    Formula of ``transformers.modeling_rope_utils._compute_llama3_parameters`` (Meta's reference code).

    Raises:
        ValueError: a required key (factor, low_freq_factor, high_freq_factor,
            original_max_position_embeddings) is missing.
    """
    try:
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context_len = float(scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise ValueError(f"rope_scaling of type llama3 lacks {e.args[0]!r}: {scaling}") from None
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(head_dim: int, base: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies ``(head_dim // 2,)`` fp32 for the configured scaling.

    Supported ``rope_type`` values: default (or no scaling), linear, llama3, and ``freq_factors``
    (llama.cpp's ``rope_freqs`` tensor: ``inv_freq / freq_factors``, as ``ggml_rope_ext`` applies it).

    Raises:
        ValueError: an unsupported ``rope_type``.
    """
    inv_freq = default_inv_freq(head_dim, base)
    if not rope_scaling:
        return inv_freq
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, rope_scaling)
    if rope_type == "freq_factors":
        factors = torch.tensor(rope_scaling["freq_factors"], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope freq_factors has {factors.numel()} entries, expected {inv_freq.numel()}")
        return inv_freq / factors
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; shardserve supports default, linear and llama3")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to query and key heads from a cos/sin cache indexed by position.

    The cache holds ``cos`` and ``sin`` of ``position * inv_freq`` in fp32 for positions
    ``[0, max_position)``, shape ``(max_position, head_dim)`` each (frequencies repeated for both halves).
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, base, rope_scaling).to(torch.get_default_device())
        t = torch.arange(max_position, dtype=torch.int64, device=inv_freq.device).to(torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` ``(num_tokens, num_heads, head_dim)`` and ``k`` ``(num_tokens, num_kv_heads, head_dim)``.

        ``positions`` is ``(num_tokens,)`` int64. cos/sin are cast to the activation dtype before the
        multiply, as Hugging Face does.

        Raises:
            IndexError: a position beyond the cache (longer than ``max_position``).
        """
        if use_triton(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
            from shardserve.model_executor.kernels.elementwise import rotary_embedding

            rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)  # in place, in fp32
            return q, k
        return self.apply(q, k, *self.cos_sin(positions, q.dtype))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos rows of ``positions`` and sin rows with their first half negated, ``(num_tokens, 1, head_dim)``
        in ``dtype``: what :meth:`apply` takes (one gather per step)."""
        cos = self.cos_cache.index_select(0, positions).to(dtype).unsqueeze(1)
        sin = self.sin_cache.index_select(0, positions).to(dtype).unsqueeze(1)
        half = self.head_dim // 2
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    @staticmethod
    def apply(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k`` with rows from :meth:`cos_sin` (Hugging Face's ``apply_rotary_pos_emb``):
        ``rotate_half(x) * sin`` is ``roll(x, head_dim / 2) * signed_sin`` (``-x2 * sin = x2 * -sin``
        exactly), two operators where ``rotate_half`` takes four; bit for bit the same values."""
        half = q.shape[-1] // 2
        return q * cos + q.roll(half, -1) * signed_sin, k * cos + k.roll(half, -1) * signed_sin
