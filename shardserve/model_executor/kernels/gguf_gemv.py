"""``y = x @ W.T`` with ``W`` in GGUF blocks, dequantized inside the kernel.

Three paths, picked by the number of rows ``M`` of ``x`` (:func:`gguf_linear`), after two others for Q4_K, Q6_K
and Q8_0 weights with bf16/fp16 activations (rounded to int8 per 32, as llama.cpp's ``mul_mat_vec_q``): up to
``DP4A_MAX_ROWS`` rows the int8 dot-product GEMV of ``kernels/gguf_dp4a.py``, up to ``MMA_MAX_ROWS`` the int8
tensor-core kernel of ``kernels/gguf_mma.py``.

- ``M <= GEMV_MAX_ROWS`` (decode at 1-2 rows): :func:`gguf_gemv`, CUDA-core FMAs in the layout of
  ``kernels/gemv.py``: each program owns ``BLOCK_N`` weight rows, walks all of K and reads every weight
  block once for all rows of ``x``; per-sub-block partial sums stay in registers and are reduced once after
  the K loop. With the decoding of :func:`~.gguf_dequant.gguf_parts` a weight element costs one LOP3 (two or
  three integer ops for the 5- and 6-bit types) and two FMAs per row of ``x``. At 4.5 bits per weight an H200 (4.3 TB/s,
  132 SMs at 1.98 GHz) must retire ~29 weights per SM per clock against 128 instructions per clock: that
  leaves ~4 instructions per weight, which is what this spends at one row. SwiGLU can be fused: the program
  then owns ``BLOCK_N / 2`` gate rows and the matching up rows.
- ``GEMV_MAX_ROWS < M < dequant_min_rows`` (decode batches of 3-16 and more, short prefills):
  :func:`gguf_matmul`, tiles dequantized to the activation dtype in registers and fed to tensor cores with
  ``tl.dot``; with ``M <= BLOCK_M`` (16 for decode batches) the grid has one row of tiles, so each weight
  block is still read once. The GEMV's two FMAs per weight and row would make it compute-bound from ~3 rows.
- ``M >= dequant_min_rows`` (long prefills): the layer's weight is dequantized into a scratch buffer
  (:func:`~.gguf_dequant.dequantize`) and multiplied by cuBLAS. Per weight element that costs reading
  ~0.6 B and writing and re-reading 2 B (~1.1 ps at 4.3 TB/s per element) against ``2 M`` FLOPs of the
  matmul (4096 FLOPs = 5.9 ps at 700 TFLOP/s for M = 2048), so it is within ~20% of a bf16 matmul, while
  the fused kernel pays its in-loop dequantization once per ``BLOCK_M`` rows and Triton's mainloop runs
  below cuBLAS; below a few hundred rows the scratch traffic dominates and the fused kernel wins. The
  crossover is a knob (``GGUFConfig.dequant_min_rows``, default :data:`DEQUANT_MIN_ROWS`) that
  ``benchmarks/bench_quant.py`` flips.

Tile sizes come from ``triton.autotune`` over a few configs per path (the first call for a shape times
them; decode shapes are tuned during the CUDA-graph warm-up, outside capture). Under the interpreter one
config is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from shardserve.model_executor.kernels.gemv import gate_up_rows, silu_mul_rounded
from shardserve.model_executor.kernels.gguf_dequant import (
    dequantize,
    gguf_parts,
    gguf_weights,
    kernel_layout,
    kernel_type,
    tile_k,
)
from shardserve.model_executor.kernels.gguf_dp4a import DP4A_MAX_ROWS, gguf_gemv_dp4a
from shardserve.model_executor.kernels.gguf_dp4a import supports as dp4a_supports
from shardserve.model_executor.kernels.gguf_mma import MMA_MAX_ROWS, gguf_mma
from shardserve.model_executor.kernels.gguf_mma import supports as mma_supports
from shardserve.model_executor.layers.quantization.gguf_blocks import (
    DEQUANT_MIN_ROWS,
    GEMV_KERNEL_MAX_ROWS,
    GEMV_MAX_ROWS,
)


def _interpreting(args: dict) -> bool:
    return not args["W"].is_cuda


def _prune_gemv(configs, named_args, **kwargs):
    """Drop tiles longer than the row; under the interpreter keep one (large tiles: fewer Python loops)."""
    k = named_args["NSUB"] * kwargs["SUB"]
    if _interpreting(named_args):
        return [triton.Config({"BLOCK_N": 16, "TILE_K": tile_k(k, 256)}, num_warps=4)]
    keep = [c for c in configs if c.kwargs["TILE_K"] <= triton.next_power_of_2(k)]
    return keep or configs[-1:]


_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "TILE_K": tk}, num_warps=w, num_stages=s)
    for bn, tk, w, s in (
        (4, 256, 4, 3),
        (8, 256, 4, 3),
        (16, 256, 4, 3),  # several rows per thread: the activation work is shared by them
        (32, 128, 4, 3),
        (16, 512, 8, 2),
        (8, 128, 4, 3),  # short rows (small models, TP shards)
    )
]


@triton.jit
def _fold(acc, accm):
    """Per-row sums of the accumulators: ``(BLOCK_N,)``."""
    return tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(tl.sum(accm, axis=2), axis=1)


@triton.jit
def _epilogue(y, OUT_DTYPE: tl.constexpr, SILU_MUL: tl.constexpr, HALF: tl.constexpr):
    """``(BLOCK_N,)`` results to the output; with SILU_MUL the first half are gate, the second up features,
    rounded as the unfused path rounds (gate and up to the model dtype, silu, product)."""
    if SILU_MUL:
        gate, up = tl.split(tl.trans(tl.reshape(y, (2, HALF))))
        y = silu_mul_rounded(gate, up, OUT_DTYPE)
    return y.to(OUT_DTYPE)


@triton.jit
def _row_step(acc, accm, f, s, m, xp, kmask, EVEN: tl.constexpr):
    """Accumulate one row of ``x`` against a decoded tile: ``acc += s * round(v x)``, ``accm += m * sum(x)``."""
    if EVEN:
        x = tl.load(xp).to(tl.float32)
    else:
        x = tl.load(xp, mask=kmask, other=0.0).to(tl.float32)
    acc = tl.fma(tl.fma(f, x, -8388608.0 * x), s, acc)
    accm += m * tl.sum(x, axis=2, keep_dims=True)
    return acc, accm


@triton.autotune(
    configs=_GEMV_CONFIGS,
    key=["N", "NSUB", "QTYPE", "BLOCK_M", "SILU_MUL"],
    prune_configs_by={"early_config_prune": _prune_gemv},
)
@triton.heuristics(
    {
        "EVEN": lambda a: (
            a["N"] % (a["BLOCK_N"] // (2 if a["SILU_MUL"] else 1)) == 0 and (a["NSUB"] * a["SUB"]) % a["TILE_K"] == 0
        )
    }
)
@triton.jit
def _gguf_gemv_kernel(
    X,
    W,
    Y,
    M,
    N,
    NSUB,
    stride_xm,
    stride_wn,
    stride_ym,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    TS: tl.constexpr,
    SUB: tl.constexpr,
    PER: tl.constexpr,
    V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SILU_MUL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_K: tl.constexpr,
    EVEN: tl.constexpr,
):
    # A program owns BLOCK_N weight rows: output features [pid * BLOCK_N, +BLOCK_N), or with SILU_MUL the
    # gate rows and the up rows (N further down) of output features [pid * HALF, +HALF). TILE_K elements
    # (G sub-blocks) per step; rows of x past M (BLOCK_M is M rounded up to a power of two) load zeros.
    HALF: tl.constexpr = BLOCK_N // 2
    OUT_N: tl.constexpr = HALF if SILU_MUL else BLOCK_N
    G: tl.constexpr = TILE_K // SUB
    feature, rows = gate_up_rows(BLOCK_N, N, SILU_MUL)
    n_ok = (feature < N)[:, None, None]
    wrow = (W + rows.to(tl.int64) * stride_wn)[:, None, None]
    g = tl.arange(0, G)[None, :, None]
    lane = tl.arange(0, SUB)[None, None, :]
    K = NSUB * SUB
    K1, K2, K3 = tl.where(M > 1, K, 0), tl.where(M > 2, K, 0), tl.where(M > 3, K, 0)
    acc0 = tl.zeros([BLOCK_N, G, SUB], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, G, SUB], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, G, SUB], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, G, SUB], dtype=tl.float32)
    accm0 = tl.zeros([BLOCK_N, G, 1], dtype=tl.float32)
    accm1 = tl.zeros([BLOCK_N, G, 1], dtype=tl.float32)
    accm2 = tl.zeros([BLOCK_N, G, 1], dtype=tl.float32)
    accm3 = tl.zeros([BLOCK_N, G, 1], dtype=tl.float32)
    for sb0 in range(0, NSUB, G):
        sb = sb0 + g
        mask = n_ok & (sb < NSUB)
        f, s, m = gguf_parts(wrow, sb, lane, mask, NSUB, QTYPE, BS, TS, SUB, EVEN, PER, V)
        k = sb * SUB + lane
        acc0, accm0 = _row_step(acc0, accm0, f, s, m, X + k, k < K, EVEN)
        if BLOCK_M > 1:
            acc1, accm1 = _row_step(acc1, accm1, f, s, m, X + stride_xm + k, k < K1, False)
        if BLOCK_M > 2:
            acc2, accm2 = _row_step(acc2, accm2, f, s, m, X + 2 * stride_xm + k, k < K2, False)
            acc3, accm3 = _row_step(acc3, accm3, f, s, m, X + 3 * stride_xm + k, k < K3, False)
    out_ty = Y.dtype.element_ty
    cols = tl.program_id(0) * OUT_N + tl.arange(0, OUT_N)
    N1, N2, N3 = tl.where(M > 1, N, 0), tl.where(M > 2, N, 0), tl.where(M > 3, N, 0)
    tl.store(Y + cols, _epilogue(_fold(acc0, accm0), out_ty, SILU_MUL, HALF), mask=cols < N)
    if BLOCK_M > 1:
        tl.store(Y + stride_ym + cols, _epilogue(_fold(acc1, accm1), out_ty, SILU_MUL, HALF), mask=cols < N1)
    if BLOCK_M > 2:
        tl.store(Y + 2 * stride_ym + cols, _epilogue(_fold(acc2, accm2), out_ty, SILU_MUL, HALF), mask=cols < N2)
        tl.store(Y + 3 * stride_ym + cols, _epilogue(_fold(acc3, accm3), out_ty, SILU_MUL, HALF), mask=cols < N3)


def _prune_matmul(configs, named_args, **kwargs):
    k, m = named_args["NSUB"] * kwargs["SUB"], named_args["M"]
    if _interpreting(named_args):
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "TILE_K": tile_k(k, 256)}, num_warps=4)]
    keep = [
        c
        for c in configs
        if c.kwargs["TILE_K"] <= triton.next_power_of_2(k) and c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))
    ]
    return keep or configs[:1]


_MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TILE_K": tk}, num_warps=w, num_stages=s)
    for bm, bn, tk, w, s in (
        (16, 64, 128, 4, 3),  # decode batches: one row tile, the weights read once
        (16, 128, 64, 4, 3),
        (64, 64, 64, 4, 3),
        (64, 128, 64, 8, 3),
        (128, 64, 64, 8, 3),
        (128, 128, 64, 8, 3),
    )
]


@triton.jit
def _dot(x, w, acc, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc + x @ w.T``; DOT_FP32 widens bf16 operands first (Triton's interpreter multiplies bf16 bit
    patterns as integers in ``tl.dot``), the values being the same."""
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)


def _m_bucket(m: int) -> int:
    """Autotune key for the number of rows: decode batches (<= 16), small (<= 64), medium (<= 256), prefill."""
    return next((b for b in (16, 64, 256) if m <= b), 4096)


@triton.autotune(
    configs=_MATMUL_CONFIGS,
    key=["N", "NSUB", "QTYPE", "M_BUCKET", "SILU_MUL"],
    prune_configs_by={"early_config_prune": _prune_matmul},
)
@triton.jit
def _gguf_matmul_kernel(
    X,
    W,
    Y,
    M,
    N,
    NSUB,
    stride_xm,
    stride_wn,
    stride_ym,
    M_BUCKET,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    TS: tl.constexpr,
    SUB: tl.constexpr,
    PER: tl.constexpr,
    V: tl.constexpr,
    SILU_MUL: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_K: tl.constexpr,
):
    # Program (pid_n, pid_m): output tile rows [pid_m * BLOCK_M, +BLOCK_M) x features [pid_n * BLOCK_N,
    # +BLOCK_N); with SILU_MUL a second accumulator holds the matching up features (rows N further down).
    G: tl.constexpr = TILE_K // SUB
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    feature = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (feature < N)[:, None, None]
    g = tl.arange(0, G)[None, :, None]
    lane = tl.arange(0, SUB)[None, None, :]
    wrow = (W + feature.to(tl.int64) * stride_wn)[:, None, None]
    wrow_up = (W + (N + feature).to(tl.int64) * stride_wn)[:, None, None]
    offs_k = tl.arange(0, TILE_K)
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    K = NSUB * SUB
    in_ty = X.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for sb0 in range(0, NSUB, G):
        k0 = sb0 * SUB
        x = tl.load(x_ptrs + k0, mask=(offs_m < M)[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
        sb = sb0 + g
        mask = n_ok & (sb < NSUB)
        f, s, m = gguf_parts(wrow, sb, lane, mask, NSUB, QTYPE, BS, TS, SUB, False, PER, V)
        w = tl.reshape(gguf_weights(f, s, m), (BLOCK_N, TILE_K)).to(in_ty)
        acc = _dot(x, w, acc, PRECISION, DOT_FP32)
        if SILU_MUL:
            f, s, m = gguf_parts(wrow_up, sb, lane, mask, NSUB, QTYPE, BS, TS, SUB, False, PER, V)
            w = tl.reshape(gguf_weights(f, s, m), (BLOCK_N, TILE_K)).to(in_ty)
            acc_up = _dot(x, w, acc_up, PRECISION, DOT_FP32)
    out_ty = Y.dtype.element_ty
    if SILU_MUL:
        acc = silu_mul_rounded(acc, acc_up, out_ty)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + feature[None, :]
    tl.store(y_ptrs, acc.to(out_ty), mask=(offs_m < M)[:, None] & (feature < N)[None, :])


def _check(x: torch.Tensor, weight: torch.Tensor, qtype: int, silu_and_mul: bool):
    t = kernel_type(qtype)
    m, k = x.shape
    if k % t.block_size or weight.shape[1] != k // t.block_size * t.type_size:
        raise ValueError(
            f"{t.name} weight of {tuple(weight.shape)} bytes does not match x of {tuple(x.shape)} "
            f"(rows of {k // t.block_size} blocks of {t.type_size} bytes expected)"
        )
    if weight.dtype != torch.uint8 or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("GGUF kernels take uint8 blocks and activations with a contiguous last dimension")
    n = weight.shape[0]
    if silu_and_mul and n % 2:
        raise ValueError("silu_and_mul needs an even number of weight rows (gate rows, then up rows)")
    return t, m, k, n // 2 if silu_and_mul else n


def _out(x: torch.Tensor, m: int, n: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out must be ({m}, {n}) with a contiguous last dimension, got {tuple(out.shape)}")
    return out


def gguf_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    qtype: int,
    silu_and_mul: bool = False,
    out: torch.Tensor | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """``x @ W.T`` for ``x`` of at most :data:`GEMV_KERNEL_MAX_ROWS` rows, ``W`` in GGUF blocks; fp32
    accumulation.

    Args:
        x: ``(M, K)``, ``M <= GEMV_KERNEL_MAX_ROWS``, contiguous along K.
        weight: ``(N, K / block_size * type_size)`` uint8 rows of blocks of type ``qtype``.
        silu_and_mul: ``weight`` is gate rows then up rows (``(2 I, ...)``); the result is
            ``silu(x gate^T) * (x up^T)``, ``(M, I)``.
        out: optional ``(M, N)`` output (may be a column slice of a wider tensor).
        packed: ``weight``'s rows are in the packed layout (``gguf_blocks.pack_rows``), not file order.

    Returns:
        ``(M, N)`` (``(M, N / 2)`` with ``silu_and_mul``) in ``x``'s dtype.

    Raises:
        ValueError: too many rows, or shapes and dtypes that do not fit.
    """
    t, m, k, n = _check(x, weight, qtype, silu_and_mul)
    if m > GEMV_KERNEL_MAX_ROWS:
        raise ValueError(f"gguf_gemv takes at most {GEMV_KERNEL_MAX_ROWS} rows, got {m}")
    y = _out(x, m, n, out)
    per = 2 if silu_and_mul else 1

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"] // per),)

    unit, v = kernel_layout(qtype, k // t.block_size, packed)
    _gguf_gemv_kernel[grid](
        x, weight, y, m, n, k // t.sub_size, x.stride(0), weight.stride(0), y.stride(0),
        QTYPE=qtype, BS=t.block_size, TS=t.type_size, SUB=t.sub_size, PER=unit, V=v, BLOCK_M=triton.next_power_of_2(m),
        SILU_MUL=silu_and_mul,
    )  # fmt: skip
    return y


def gguf_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    qtype: int,
    silu_and_mul: bool = False,
    out: torch.Tensor | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """``x @ W.T`` with tiles of ``W`` dequantized in registers and multiplied on tensor cores (``tl.dot``,
    fp32 accumulation). Arguments and result as :func:`gguf_gemv`, any number of rows."""
    t, m, k, n = _check(x, weight, qtype, silu_and_mul)
    y = _out(x, m, n, out)
    if m == 0:
        return y

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))

    unit, v = kernel_layout(qtype, k // t.block_size, packed)
    _gguf_matmul_kernel[grid](
        x, weight, y, m, n, k // t.sub_size, x.stride(0), weight.stride(0), y.stride(0), _m_bucket(m),
        QTYPE=qtype, BS=t.block_size, TS=t.type_size, SUB=t.sub_size, PER=unit, V=v, SILU_MUL=silu_and_mul,
        PRECISION="ieee" if x.dtype == torch.float32 else None, DOT_FP32=not x.is_cuda and x.dtype == torch.bfloat16,
    )  # fmt: skip
    return y


def gguf_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    qtype: int,
    silu_and_mul: bool = False,
    out: torch.Tensor | None = None,
    dequant_min_rows: int = DEQUANT_MIN_ROWS,
    packed: bool = False,
    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x @ W.T`` (or SwiGLU with ``silu_and_mul``) by the path that fits ``M`` (see the module docstring).

    Args:
        x: ``(M, K)`` activations; weight: ``(N, K / block_size * type_size)`` uint8 of type ``qtype``.
        dequant_min_rows: from this many rows, dequantize ``W`` to a scratch buffer and use cuBLAS.
        packed: ``weight``'s rows are in the packed layout (``gguf_blocks.pack_rows``), not file order.
        quantized: ``x`` already rounded for the int8 GEMV (``gguf_gemv_dp4a``'s argument); used on that
            path only.
        Q4_K/Q6_K/Q8_0 with bf16/fp16 ``x`` of at most ``DP4A_MAX_ROWS`` rows take the int8 GEMV, of at most
        ``MMA_MAX_ROWS`` the int8 tensor-core kernel.

    Returns:
        ``(M, N)`` (``(M, N / 2)`` with ``silu_and_mul``) in ``x``'s dtype.
    """
    m = x.shape[0]
    if m <= DP4A_MAX_ROWS and dp4a_supports(x, weight, qtype):
        return gguf_gemv_dp4a(x, weight, qtype, silu_and_mul, out, quantized=quantized, packed=packed)
    if m <= MMA_MAX_ROWS and mma_supports(x, weight, qtype):
        return gguf_mma(x, weight, qtype, silu_and_mul, out, packed=packed)
    if m <= GEMV_MAX_ROWS:
        return gguf_gemv(x, weight, qtype, silu_and_mul, out, packed)
    if m < dequant_min_rows:
        return gguf_matmul(x, weight, qtype, silu_and_mul, out, packed)
    w = dequantize(weight, qtype, x.shape[1], x.dtype, packed=packed)
    y = F.linear(x, w)
    del w
    if silu_and_mul:
        from shardserve.model_executor.layers.activation import SiluAndMul

        y = SiluAndMul()(y)
    if out is not None:
        out.copy_(y)
        return out
    return y
