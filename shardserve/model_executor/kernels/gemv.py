"""Matrix-vector products for decode at small batch: ``y = x @ W.T`` with ``x`` of one or two rows.

At batch 1 a decoder layer's time is its weights streamed from memory once. On an H100, in CUDA graphs
with the weights cold in L2 (``benchmarks/bench_gemv.py``), cuBLAS reaches 0.80 of the copy bandwidth
on Llama-3.1-8B's QKV projection and 0.67 on the 4096 x 4096 output projection. Here each program owns
``BLOCK_N`` weight rows and walks all of K, accumulating ``BLOCK_N x BLOCK_K`` products in registers and
reducing across threads once at the end (as batch-1 GEMV kernels such as llama.cpp's ``mul_mat_vec`` do),
with no split-K reduction kernel: 0.89 and 0.82 of copy there, 1.01 on the MLP's gate/up projection (L2 helps).
SwiGLU can be fused into the epilogue of the gate/up projection. At 4 rows cuBLAS is faster, so
:data:`MAX_ROWS` is 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 2
"""Largest number of rows of ``x`` the layers send here; bigger batches go to cuBLAS."""
KERNEL_MAX_ROWS = 4
"""Largest number of rows the kernel itself takes."""


@triton.jit
def gate_up_rows(BLOCK_N: tl.constexpr, N, SILU_MUL: tl.constexpr):
    """The weight rows ``(BLOCK_N,)`` of this program and the output feature each feeds: features
    ``[pid * BLOCK_N, +BLOCK_N)``, or with SILU_MUL the gate rows of features ``[pid * HALF, +HALF)`` and
    then the matching up rows, ``N`` further down (a merged gate/up weight). Every decode GEMV (bf16, FP8,
    GGUF) lays its programs out this way. Returns ``(feature, rows)``."""
    return gate_up_rows_of(tl.arange(0, BLOCK_N), BLOCK_N, N, SILU_MUL)


@triton.jit
def gate_up_rows_of(r, BLOCK_N: tl.constexpr, N, SILU_MUL: tl.constexpr):
    """:func:`gate_up_rows` for a tensor ``r`` of the program's row indices (``0 <= r < BLOCK_N``), any shape."""
    HALF: tl.constexpr = BLOCK_N // 2
    if SILU_MUL:
        feature = tl.program_id(0) * HALF + r % HALF
        rows = tl.where(r < HALF, feature, N + feature)
    else:
        feature = tl.program_id(0) * BLOCK_N + r
        rows = feature
    return feature, rows


@triton.jit
def silu_mul_rounded(gate, up, OUT_DTYPE: tl.constexpr):
    """``silu(gate) * up`` (fp32 in, fp32 out) rounded as the unfused path rounds: gate and up to the model
    dtype, silu, the product."""
    g = gate.to(OUT_DTYPE).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(OUT_DTYPE)
    return act.to(tl.float32) * up.to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _row_output(acc, bias, OUT_DTYPE: tl.constexpr, SILU_MUL: tl.constexpr, HALF: tl.constexpr):
    """One row's ``(BLOCK_N,)`` result from its accumulator; with SILU_MUL the first half of the tile's
    rows are gate features and the second half the matching up features."""
    y = tl.sum(acc, axis=1) + bias
    if SILU_MUL:
        gate, up = tl.split(tl.trans(tl.reshape(y, (2, HALF))))
        y = silu_mul_rounded(gate, up, OUT_DTYPE)
    return y.to(OUT_DTYPE)


@triton.jit
def _gemv_kernel(
    X,
    W,
    WS,
    B,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    HAS_SCALE: tl.constexpr = False,
):
    # With HAS_SCALE the weight holds FP8 codes and WS one dequantization scale per row, applied once after
    # the K loop (kernels/fp8.py); W is read in its own dtype and widened to fp32 either way.
    # A program owns BLOCK_N weight rows: output features [pid * BLOCK_N, +BLOCK_N), or with SILU_MUL the
    # gate rows and the up rows (N further down) of output features [pid * HALF, +HALF).
    HALF: tl.constexpr = BLOCK_N // 2
    OUT_N: tl.constexpr = HALF if SILU_MUL else BLOCK_N
    feature, rows = gate_up_rows(BLOCK_N, N, SILU_MUL)
    n_mask = feature < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    # One register accumulator of products per row, reduced across threads once after the K loop; each
    # weight tile is loaded once for all rows. Rows past M (BLOCK_M is M rounded up) load zeros.
    K1, K2, K3 = tl.where(M > 1, K, 0), tl.where(M > 2, K, 0), tl.where(M > 3, K, 0)
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        if EVEN:
            w = tl.load(w_ptrs + k0).to(tl.float32)
        else:
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc0 += w * tl.load(X + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        if BLOCK_M > 1:
            x1 = tl.load(X + stride_xm + k0 + offs_k, mask=k0 + offs_k < K1, other=0.0)
            acc1 += w * x1.to(tl.float32)[None, :]
        if BLOCK_M > 2:
            x2 = tl.load(X + 2 * stride_xm + k0 + offs_k, mask=k0 + offs_k < K2, other=0.0)
            acc2 += w * x2.to(tl.float32)[None, :]
            x3 = tl.load(X + 3 * stride_xm + k0 + offs_k, mask=k0 + offs_k < K3, other=0.0)
            acc3 += w * x3.to(tl.float32)[None, :]
    if HAS_SCALE:
        scale = tl.load(WS + rows, mask=n_mask, other=0.0)[:, None]
        acc0 *= scale
        if BLOCK_M > 1:
            acc1 *= scale
        if BLOCK_M > 2:
            acc2 *= scale
            acc3 *= scale
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(B + rows, mask=n_mask, other=0.0).to(tl.float32)
    out_ty = Y.dtype.element_ty
    cols = tl.program_id(0) * OUT_N + tl.arange(0, OUT_N)
    N1, N2, N3 = tl.where(M > 1, N, 0), tl.where(M > 2, N, 0), tl.where(M > 3, N, 0)
    tl.store(Y + cols, _row_output(acc0, bias, out_ty, SILU_MUL, HALF), mask=cols < N)
    if BLOCK_M > 1:
        tl.store(Y + stride_ym + cols, _row_output(acc1, bias, out_ty, SILU_MUL, HALF), mask=cols < N1)
    if BLOCK_M > 2:
        tl.store(Y + 2 * stride_ym + cols, _row_output(acc2, bias, out_ty, SILU_MUL, HALF), mask=cols < N2)
        tl.store(Y + 3 * stride_ym + cols, _row_output(acc3, bias, out_ty, SILU_MUL, HALF), mask=cols < N3)


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` for an ``n x k`` weight: the best of the sweep in
    ``benchmarks/bench_gemv.py --sweep`` on an H100 for every Llama-3.1-8B shape at 1 and 2 rows."""
    block_k = next((b for b in (1024, 512, 256) if k % b == 0), 256)
    return 4, block_k, 4, 3


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    silu_and_mul: bool = False,
) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for ``x`` of at most :data:`KERNEL_MAX_ROWS` rows, fp32 accumulation.

    With ``silu_and_mul`` the weight is a fused gate/up projection ``(2 * I, K)`` (gate rows first, as
    ``MergedColumnParallelLinear`` stacks them) and the result is SwiGLU's ``silu(x @ gate.T) * (x @ up.T)``,
    ``(M, I)``, without writing the ``(M, 2 * I)`` intermediate.

    Args:
        x: ``(M, K)`` with a contiguous last dimension, ``M <= KERNEL_MAX_ROWS``.
        weight: ``(N, K)`` with a contiguous last dimension (an ``nn.Linear`` weight).
        bias: optional ``(N,)``; not with ``silu_and_mul``.
        config: ``(BLOCK_N, BLOCK_K, num_warps, num_stages)``; default :func:`gemv_config`.

    Returns:
        ``(M, N)`` (``(M, N / 2)`` with ``silu_and_mul``) in ``x``'s dtype.

    Raises:
        ValueError: too many rows, a non-contiguous last dimension, or a bias with ``silu_and_mul``.
    """
    m, k = x.shape
    n = weight.shape[0]
    if m > KERNEL_MAX_ROWS or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"gemv takes at most {KERNEL_MAX_ROWS} rows with contiguous K, got {tuple(x.shape)}")
    if silu_and_mul and (bias is not None or n % 2):
        raise ValueError("gemv(silu_and_mul=True) takes an even number of weight rows and no bias")
    block_n, block_k, warps, stages = config or gemv_config(n, k)
    out_n = n // 2 if silu_and_mul else n
    per_program = block_n // 2 if silu_and_mul else block_n
    y = torch.empty((m, out_n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(out_n, per_program),)](
        x,
        weight,
        weight,
        bias if bias is not None else weight,
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
        num_warps=warps,
        num_stages=stages,
    )
    return y
