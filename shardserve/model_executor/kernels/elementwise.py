"""Fused Triton kernels for the row-wise work between the matmuls of a decoder layer.

Each replaces several PyTorch kernels with one, which is what decode at small batch needs: there the
GPU time of a layer is a few matmuls reading weights, and every extra kernel adds a launch gap. The
arithmetic follows the PyTorch paths in ``layers/`` (Hugging Face Llama's order of operations).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.model_executor.kernels.attention import is_fp8_cache, to_cache
from shardserve.model_executor.kernels.pdl import pdl_launch, pdl_wait


@triton.jit
def _rms_norm_kernel(
    X,
    R,
    W,
    Y,
    stride_x,
    stride_r,
    stride_y,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    y = rms_norm_row(X, R, W, row, offs, stride_x, stride_r, N, eps, HAS_RESIDUAL)
    tl.store(Y + row * stride_y + offs, y, mask=offs < N)


@triton.jit
def rms_norm_row(X, R, W, row, offs, stride_x, stride_r, N, eps, HAS_RESIDUAL: tl.constexpr):
    """RMSNorm of elements ``offs`` (``(BLOCK,)``, the whole row, masked past ``N``) of row ``row``, after
    ``x += residual`` written back into ``R`` with HAS_RESIDUAL: ``(BLOCK,)`` in x's dtype times the
    weight's (the order of Hugging Face's ``LlamaRMSNorm``): :func:`rms_norm_input`, :func:`rms_norm_rstd`,
    :func:`rms_norm_apply`, which the norm that also rounds its output to int8
    (``kernels/gguf_dp4a.rms_norm_int8``) calls too, so that the two give the same bits."""
    x = rms_norm_input(X, R, R, row, offs, stride_x, stride_r, stride_r, N, HAS_RESIDUAL, True)
    return rms_norm_apply(x, rms_norm_rstd(x, N, eps), W, offs, N)


@triton.jit
def rms_norm_input(X, R, RO, row, offs, stride_x, stride_r, stride_ro, N, HAS_RESIDUAL: tl.constexpr,
                   STORE: tl.constexpr):  # fmt: skip
    """Elements ``offs`` (any shape, masked past ``N``) of row ``row`` of ``x``, plus the residual's with
    HAS_RESIDUAL (in the model dtype, as HF adds; written to ``RO`` with STORE), in the model dtype."""
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(R + row * stride_r + offs, mask=mask, other=0.0)
        if STORE:
            tl.store(RO + row * stride_ro + offs, x, mask=mask)
    return x


@triton.jit
def rms_norm_rstd(x, N, eps):
    """``1 / sqrt(mean(x**2) + eps)`` in fp32 of a whole row ``x`` ``(BLOCK,)`` of ``N`` elements (0 past them)."""
    h = x.to(tl.float32)
    return tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)


@triton.jit
def rms_norm_apply(x, rstd, W, offs, N):
    """``x`` (elements ``offs`` of a row, in the model dtype) normalised by the row's ``rstd`` and times
    the weight, rounded as Hugging Face rounds: fp32, the input dtype, then the weight multiply."""
    w = tl.load(W + offs, mask=offs < N, other=0.0)
    return (x.to(tl.float32) * rstd).to(x.dtype) * w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019) of ``x`` ``(num_tokens, hidden_size)``, optionally after ``x += residual``.

    With ``residual`` (same shape, contiguous rows) the sum ``x + residual`` is written back into
    ``residual`` in place, so the caller keeps it as the next residual stream.

    Returns:
        ``(num_tokens, hidden_size)`` in ``x``'s dtype.
    """
    n, hidden = x.shape
    y = torch.empty((n, hidden), dtype=x.dtype, device=x.device)
    r = residual if residual is not None else x
    _rms_norm_kernel[(n,)](
        x,
        r,
        weight,
        y,
        x.stride(0),
        r.stride(0),
        y.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(hidden),
        num_warps=8 if hidden >= 4096 else 4,
        **pdl_launch(x),
    )
    return y


@triton.jit
def _silu_and_mul_kernel(X, Y, stride_x, stride_y, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + D + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(Y + row * stride_y + offs, act * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: ``(num_tokens, 2 * d)`` -> ``silu(x[:, :d]) * x[:, d:]``, ``(num_tokens, d)``."""
    n, width = x.shape
    d = width // 2
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    block = min(2048, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(n, triton.cdiv(d, block))](x, y, x.stride(0), y.stride(0), d, BLOCK=block)
    return y


@triton.jit
def _rotate_heads(
    src,
    stride_h,
    dst,
    dst_stride_h,
    heads,
    cos,
    sin,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    inv_scale,
    FP8: tl.constexpr,
):
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h < heads)[:, None] & (offs_d < HALF)[None, :]
    p1 = src + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    d1 = dst + offs_h[:, None] * dst_stride_h + offs_d[None, :]
    ty = dst.dtype.element_ty
    tl.store(d1, to_cache(a * cos - b * sin, inv_scale, ty, FP8), mask=mask)
    tl.store(d1 + HALF, to_cache(b * cos + a * sin, inv_scale, ty, FP8), mask=mask)


@triton.jit
def _rotary_kernel(
    Q,
    K,
    V,
    POS,
    COS,
    SIN,
    KC,
    VC,
    SLOTS,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache,
    k_inv_scale,
    v_inv_scale,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    STORE_KV: tl.constexpr,
    FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    t = tl.program_id(0)
    pos = tl.load(POS + t)
    offs_d = tl.arange(0, HALF_PAD)
    cos = tl.load(COS + pos * stride_cache + offs_d, mask=offs_d < HALF, other=0.0)[None, :]
    sin = tl.load(SIN + pos * stride_cache + offs_d, mask=offs_d < HALF, other=0.0)[None, :]
    q = Q + t * stride_qt
    _rotate_heads(q, stride_qh, q, stride_qh, NUM_Q_HEADS, cos, sin, HEADS_PAD, HALF, HALF_PAD, 1.0, False)
    if STORE_KV:  # rotated K and V straight into the token's cache slot (skipped for slot < 0: padding)
        slot = tl.load(SLOTS + t)
        if slot >= 0:
            width: tl.constexpr = NUM_K_HEADS * 2 * HALF
            _rotate_heads(
                K + t * stride_kt,
                stride_kh,
                KC + slot * width,
                2 * HALF,
                NUM_K_HEADS,
                cos,
                sin,
                HEADS_PAD,
                HALF,
                HALF_PAD,
                k_inv_scale,
                FP8,
            )
            offs_h = tl.arange(0, HEADS_PAD)
            offs_e = tl.arange(0, 2 * HALF_PAD)
            mask = (offs_h < NUM_K_HEADS)[:, None] & (offs_e < 2 * HALF)[None, :]
            v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_e[None, :], mask=mask)
            v = to_cache(v, v_inv_scale, VC.dtype.element_ty, FP8)
            tl.store(VC + slot * width + offs_h[:, None] * (2 * HALF) + offs_e[None, :], v, mask=mask)
    else:
        k = K + t * stride_kt
        _rotate_heads(k, stride_kh, k, stride_kh, NUM_K_HEADS, cos, sin, HEADS_PAD, HALF, HALF_PAD, 1.0, False)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    v: torch.Tensor | None = None,
    kv_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Rotate ``q`` and ``k`` with RoPE in the rotate-half (GPT-NeoX) form (Su et al. 2021).

    Without ``kv_cache``, ``q`` and ``k`` are rotated in place. With it (and ``v``, ``slot_mapping``),
    ``q`` is rotated in place and the rotated ``k`` and ``v`` go straight into each token's cache slot,
    which replaces a separate KV-store kernel (``k`` is left as it was); slots < 0 are skipped.

    Args:
        positions: ``(num_tokens,)`` int64.
        q: ``(num_tokens, num_heads, head_dim)``; k, v: ``(num_tokens, num_kv_heads, head_dim)``; the last
            dimension contiguous (they may be views into the fused QKV output).
        cos_cache, sin_cache: ``(max_position, head_dim)`` fp32, each frequency repeated for both halves.
        kv_cache: ``(2, num_blocks, block_size, num_kv_heads, head_dim)``, contiguous; model dtype or
            ``float8_e4m3fn`` (see :mod:`.attention`).
        slot_mapping: ``(num_tokens,)`` int64, ``block_id * block_size + offset`` or -1.
        k_scale, v_scale: dequantization scales of an FP8 cache (stored ``k / k_scale``); ignored otherwise.
    """
    n, hq, d = q.shape
    hk = k.shape[1]
    store = kv_cache is not None
    if store and (v is None or slot_mapping is None or not kv_cache.is_contiguous()):
        raise ValueError("rotary_embedding with kv_cache needs v, slot_mapping and a contiguous cache")
    v_ = v if store else k
    kc, vc = (kv_cache[0], kv_cache[1]) if store else (k, k)
    _rotary_kernel[(n,)](
        q,
        k,
        v_,
        positions,
        cos_cache,
        sin_cache,
        kc,
        vc,
        slot_mapping if store else positions,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v_.stride(0),
        v_.stride(1),
        cos_cache.stride(0),
        1.0 / k_scale,
        1.0 / v_scale,
        NUM_Q_HEADS=hq,
        NUM_K_HEADS=hk,
        HEADS_PAD=triton.next_power_of_2(max(hq, hk)),
        HALF=d // 2,
        HALF_PAD=triton.next_power_of_2(d // 2),
        STORE_KV=store,
        FP8=store and is_fp8_cache(kv_cache),
        **pdl_launch(q),
    )
