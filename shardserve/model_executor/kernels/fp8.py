"""Triton kernels for FP8 (e4m3) linear layers: a GEMV over FP8 weights for decode at 1-2 rows, and the
per-token activation quantization that feeds ``torch._scaled_mm`` at larger batches.

The GEMV is :mod:`.gemv`'s kernel with ``HAS_SCALE`` (each program owns ``BLOCK_N`` weight rows, walks
all of K accumulating ``BLOCK_N x BLOCK_K`` products in fp32 registers, one cross-thread reduction at the
end, SwiGLU fused into the epilogue of the gate/up projection). The weights are e4m3 bytes ``(N, K)`` with
one fp32 scale per row (per output channel: ``W = fp8 * scale[:, None]``), the activations stay in the
model dtype, so a batch-1 step reads each weight byte once and quantizes nothing. The row scale is applied
once per row after the K loop (``y_n = scale_n * sum_k fp8_nk x_k``).

Activations for ``torch._scaled_mm`` are quantized per token (one scale per row, ``amax / 448``, as vLLM's
``scaled_fp8_quant(use_per_token_if_dynamic=True)`` and fbgemm's ``quantize_fp8_per_row``), optionally with
an upper bound on the row amax (fbgemm's ``activation_scale_ub``), or with a static per-tensor scale from
the checkpoint (compressed-tensors / AutoFP8 ``input_scale``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.model_executor.kernels.attention import FP8_E4M3_MAX, round_to_e4m3
from shardserve.model_executor.kernels.gemv import KERNEL_MAX_ROWS, _gemv_kernel

MIN_SCALE = 1.0 / (FP8_E4M3_MAX * 512.0)
"""Smallest per-token scale (vLLM's ``MIN_SCALING_FACTOR``): an all-zero row still divides safely."""


@triton.jit
def _quant_per_token_kernel(
    X,
    Q,
    S,
    STATIC_SCALE,
    stride_x,
    stride_q,
    K,
    scale_ub,
    BLOCK: tl.constexpr,
    STATIC: tl.constexpr,
    HAS_UB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(STATIC_SCALE)
    else:  # first pass: the row's amax (rows are short enough to stay in L1/L2 for the second)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(X + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        m = tl.max(amax, 0)
        if HAS_UB:
            m = tl.minimum(m, scale_ub)
        scale = tl.maximum(m / 448.0, 1.0 / (448.0 * 512.0))
    tl.store(S + row, scale)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(X + row * stride_x + k0 + offs, mask=mask, other=0.0)
        q = round_to_e4m3(x.to(tl.float32) * inv)
        tl.store(Q + row * stride_q + k0 + offs, q.to(Q.dtype.element_ty), mask=mask)


def quantize_per_token(
    x: torch.Tensor, static_scale: torch.Tensor | None = None, scale_ub: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to e4m3 with one scale per row: ``x ~= q * scale``.

    Args:
        x: ``(M, K)``, last dimension contiguous, any float dtype.
        static_scale: a one-element fp32 tensor: every row uses it (static activation scheme); None computes
            ``max(amax_row, ...) / 448`` per row.
        scale_ub: upper bound on a row's amax before it becomes the scale (fbgemm's ``activation_scale_ub``);
            values past it saturate at +-448.

    Returns:
        ``q`` ``(M, K)`` ``float8_e4m3fn`` and ``scale`` ``(M, 1)`` fp32 (the layout ``torch._scaled_mm``'s
        row-wise ``scale_a`` wants).
    """
    m, k = x.shape
    if x.stride(1) != 1:
        raise ValueError("quantize_per_token needs a contiguous last dimension")
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    _quant_per_token_kernel[(m,)](
        x,
        q,
        s,
        static_scale if static_scale is not None else s,
        x.stride(0),
        q.stride(0),
        k,
        float(scale_ub) if scale_ub is not None else 0.0,
        BLOCK=min(4096, triton.next_power_of_2(k)),
        STATIC=static_scale is not None,
        HAS_UB=scale_ub is not None,
    )
    return q, s


FP8_GEMV_MAX_ROWS = 2
"""Rows of ``x`` the FP8 GEMV takes (decode at batch 1-2); larger batches quantize and use ``_scaled_mm``."""


def fp8_gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` for an ``n x k`` FP8 weight at 1-2 rows.

    Fitted on nvidia-h200 (``benchmarks/bench_fp8.py --parts hw,kernels --kernel-rows 1 --sweep``, the
    Llama-3.1-8B shapes, weights cold in L2): each shape takes the sweep's fastest tiling. As a fraction of
    copy bandwidth, with the tile used before in brackets (the bf16 GEMV's 4 rows x 1024, 4 warps, 3 stages):
    where K is at least N, 8 rows x 1024 (o_proj 0.56 [0.46], down_proj 0.78 [0.59]); from N = 4 K, 8 rows
    x 512 (gate_up_proj, N = 7 K: 0.79 [0.77]); in between, 16 rows x 512 on 8 warps (qkv_proj, N = 1.5 K:
    0.65 [0.59]). End to end, these tilings took 8B batch-1 decode from 308.7 to 338.1 tok/s in one run
    (``bench_fp8.py`` part ``fp8s``). ``BLOCK_K`` halves (down to 256) until it divides K; otherwise the
    kernel masks the last tile."""
    if k >= n:
        block_n, block_k, warps, stages = 8, 1024, 4, 3
    elif n >= 4 * k:
        block_n, block_k, warps, stages = 8, 512, 4, 3
    else:
        block_n, block_k, warps, stages = 16, 512, 8, 2
    while block_k > 256 and k % block_k:
        block_k //= 2
    return block_n, block_k, warps, stages


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    silu_and_mul: bool = False,
) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None]).T (+ bias)`` for ``x`` of at most :data:`FP8_GEMV_MAX_ROWS` rows,
    fp32 accumulation; ``silu_and_mul`` as :func:`.gemv.gemv` (gate rows first, then up rows).

    Args:
        x: ``(M, K)`` in the model dtype, contiguous last dimension.
        weight: ``(N, K)`` ``float8_e4m3fn``, contiguous last dimension.
        weight_scale: ``(N,)`` fp32, one dequantization scale per output channel (row).
        bias: optional ``(N,)``; not with ``silu_and_mul``.
        config: ``(BLOCK_N, BLOCK_K, num_warps, num_stages)``; default :func:`fp8_gemv_config`.

    Returns:
        ``(M, N)`` (``(M, N / 2)`` with ``silu_and_mul``) in ``x``'s dtype.

    Raises:
        ValueError: too many rows, a non-contiguous last dimension, a weight that is not e4m3, a scale that is
            not ``(N,)`` fp32, or a bias with ``silu_and_mul``.
    """
    m, k = x.shape
    n = weight.shape[0]
    if m > min(FP8_GEMV_MAX_ROWS, KERNEL_MAX_ROWS) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"fp8_gemv takes at most {FP8_GEMV_MAX_ROWS} rows with contiguous K, got {tuple(x.shape)}")
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_gemv needs a float8_e4m3fn weight, got {weight.dtype}")
    if weight_scale.dtype != torch.float32 or weight_scale.shape != (n,) or not weight_scale.is_contiguous():
        raise ValueError(f"fp8_gemv needs a contiguous ({n},) fp32 weight_scale, got {tuple(weight_scale.shape)}")
    if silu_and_mul and (bias is not None or n % 2):
        raise ValueError("fp8_gemv(silu_and_mul=True) takes an even number of weight rows and no bias")
    block_n, block_k, warps, stages = config or fp8_gemv_config(n, k)
    out_n = n // 2 if silu_and_mul else n
    per_program = block_n // 2 if silu_and_mul else block_n
    y = torch.empty((m, out_n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(out_n, per_program),)](
        x,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,
        y,
        m,
        out_n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVEN=out_n % per_program == 0 and k % block_k == 0,
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_and_mul,
        HAS_SCALE=True,
        num_warps=warps,
        num_stages=stages,
    )
    return y
