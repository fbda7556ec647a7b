"""Decode batches of 5-16 rows over GGUF Q4_K weights on int8 tensor cores.

``y = x @ W.T`` for ``x`` of at most :data:`MMA_MAX_ROWS` rows. The activations are rounded to int8 per 32
elements exactly as for the dp4a GEMV (``kernels/gguf_dp4a.py``, llama.cpp's ``block_q8_1``); the weight's
4-bit codes (0..15) are widened to int8 in registers, and each 32-element sub-block of K is one ``tl.dot`` of
int8 ``(16, 32) x (32, BLOCK_N)`` with int32 accumulation (``IMMA.16832`` on sm_90), scaled into the fp32
accumulator::

    acc += dx_g * (d sc_sub) * (xq_g . q_sub)  -  (dx_g * sum xq_g) * (dmin mn_sub)

(``w = d sc q - dmin mn``). The result is the exact product of the weights with the quantized activations
(integer products, fp32 sums), so its error is that of the dp4a GEMV.

Why: from 5 rows the dp4a GEMV pays its per-row dot products on CUDA cores (4 rows cost 3-4x one row), and
``gguf_matmul`` (tiles dequantized to bf16 for bf16 tensor cores) was slow: Llama-3.1-70B Q4_K_M at 16
requests took 137 ms per step on an H200 against 22 ms for one. Measured at 16 rows on the H200 (Llama-3.1-8B
shapes, ``benchmarks/bench_quant.py --parts kernels --kernel-paths tensor_core,mma``): qkv_proj 298 against
217 GB/s of weight, o_proj 234 against 145, gate_up_proj 612 against 340 (1.4-1.8x; still 0.05-0.15 of copy
bandwidth: the per-sub-block scaling of the accumulator and the byte unpacking dominate). The same scheme
for Q6_K (two dots per 32 elements for its per-16 scales, 6-bit codes assembled from two arrays) ran at
0.75x ``gguf_matmul`` and was dropped; Q6_K keeps the bf16 tensor-core tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.model_executor.kernels.gemv import gate_up_rows
from shardserve.model_executor.kernels.gguf_dequant import kernel_layout
from shardserve.model_executor.kernels.gguf_dp4a import _store, launch_shape, quantize_activations

MMA_TYPES = {12: "Q4_K"}
"""``ggml_type`` -> name of the types with an int8 tensor-core kernel (see the module docstring for Q6_K)."""
MMA_MAX_ROWS = 16
"""Most rows of ``x``: one 16-row tile, so every weight block is read once per call."""
_TYPE_SIZE = {12: 144}
_BLOCK_SIZE = {12: 256}
_BLOCK_M = 16


def supports(x: torch.Tensor, weight: torch.Tensor, qtype: int) -> bool:
    """Whether :func:`gguf_mma` takes this call: Q4_K, bf16/fp16 ``x`` of 1 to :data:`MMA_MAX_ROWS`
    rows contiguous along K, and an even weight row stride (the fp16 scales are read as fp16)."""
    return (
        qtype in MMA_TYPES
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.dim() == 2
        and 0 < x.shape[0] <= MMA_MAX_ROWS
        and x.stride(1) == 1
        and x.shape[1] % _BLOCK_SIZE[qtype] == 0
        and weight.stride(1) == 1
        and weight.stride(0) % 2 == 0
        and weight.data_ptr() % 2 == 0
    )


def _prune(configs, named_args, **kwargs):
    """Under the interpreter one config (tl.dot needs 16 columns at least)."""
    if not named_args["W"].is_cuda:
        return [triton.Config({"BLOCK_N": 16}, num_warps=1)]
    return configs


_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in ((32, 2), (64, 4), (128, 4), (64, 2))]
_KEY = ["N", "NB", "SILU_MUL"]


def _autotuned(fn):
    return triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(fn)


@triton.jit
def _x_group(XQ, XD, XS, m, m_ok, K, g):
    """Group ``g`` (32 elements) of every row: ``xq (BLOCK_M, 32)`` int8, ``dx (BLOCK_M,)`` and ``dx * sum xq``
    over its two halves ``(BLOCK_M,)`` each."""
    kk = tl.arange(0, 32)
    xq = tl.load(XQ + m[:, None].to(tl.int64) * K + g * 32 + kk[None, :], mask=m_ok[:, None], other=0)
    dx = tl.load(XD + m * (K // 32) + g, mask=m_ok, other=0.0)
    s0 = tl.load(XS + m * (K // 16) + 2 * g, mask=m_ok, other=0.0)
    s1 = tl.load(XS + m * (K // 16) + 2 * g + 1, mask=m_ok, other=0.0)
    return xq, dx, s0, s1


@triton.jit
def _codes(W, base, offset: tl.constexpr, n_ok, cs, V: tl.constexpr):
    """``(32, BLOCK_N)`` bytes ``offset + k`` of each row's block at ``base`` (k down, weight rows across), as
    int32; packed (V = 16) the 32 bytes are two chunks ``cs`` apart."""
    kk = tl.arange(0, 32)[:, None]
    if V == 0:
        p = W + base[None, :] + offset + kk
    else:
        p = W + base[None, :] + (offset // V + kk // V) * cs + kk % V
    return tl.load(p, mask=n_ok[None, :], other=0).to(tl.int32)


@triton.jit
def _scale_byte(W, base, offset, n_ok):
    return tl.load(W + base + offset, mask=n_ok, other=0).to(tl.int32)


@triton.jit
def _q4_k_scale_min(W, base, n_ok, j: tl.constexpr):
    """6-bit scale and min of sub-block ``j`` (``get_scale_min_k4``; the 12 scale bytes start at byte 4)."""
    if j < 4:
        sc = _scale_byte(W, base, 4 + j, n_ok) & 63
        mn = _scale_byte(W, base, 8 + j, n_ok) & 63
    else:
        hi = _scale_byte(W, base, 8 + j, n_ok)
        sc = (hi & 15) | ((_scale_byte(W, base, j, n_ok) >> 6) << 4)
        mn = (hi >> 4) | ((_scale_byte(W, base, 4 + j, n_ok) >> 6) << 4)
    return sc.to(tl.float32), mn.to(tl.float32)


@_autotuned
@triton.jit
def _q4_k_mma_kernel(XQ, XD, XS, W, Y, M, N, NB, stride_wn, stride_ym, SILU_MUL: tl.constexpr, V: tl.constexpr,
                     CS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # Block (144 B): d, dmin (fp16), scales[12], qs[128]; qs byte 32c + l holds element 64c + l of the block
    # in its low nibble (sub-block 2c) and element 64c + 32 + l in its high nibble (sub-block 2c + 1).
    # Packed rows (V = 16, ``gguf_blocks.row_layout``): a block's 16-byte chunk c is at 16 b + c * CS
    # (CS = 16 NB, a compile-time constant as in the int8 GEMV); d, dmin and the scales are its chunk 0.
    feature, rows = gate_up_rows(BLOCK_N, N, SILU_MUL)
    n_ok = feature < N
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    K = NB * 256
    W16 = W.to(tl.pointer_type(tl.float16))
    wrow = rows.to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    BSTRIDE: tl.constexpr = 144 if V == 0 else V
    cs = CS
    for b in range(NB):
        base = wrow + b * BSTRIDE
        d = tl.load(W16 + base // 2, mask=n_ok, other=0.0).to(tl.float32)
        dmin = tl.load(W16 + base // 2 + 1, mask=n_ok, other=0.0).to(tl.float32)
        for c in tl.static_range(4):
            q = _codes(W, base, 16 + 32 * c, n_ok, cs, V)
            for h in tl.static_range(2):
                codes = (q & 15) if h == 0 else (q >> 4)
                xq, dx, s0, s1 = _x_group(XQ, XD, XS, m, m_ok, K, b * 8 + 2 * c + h)
                dot = tl.dot(xq, codes.to(tl.int8), out_dtype=tl.int32).to(tl.float32)
                sc, mn = _q4_k_scale_min(W, base, n_ok, 2 * c + h)
                acc += dx[:, None] * dot * (d * sc)[None, :] - (s0 + s1)[:, None] * (dmin * mn)[None, :]
    _store(Y, acc, M, N, stride_ym, BLOCK_M, BLOCK_N, SILU_MUL)


_KERNELS = {12: _q4_k_mma_kernel}


def gguf_mma(
    x: torch.Tensor,
    weight: torch.Tensor,
    qtype: int,
    silu_and_mul: bool = False,
    out: torch.Tensor | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """``x @ W.T`` (or SwiGLU) on int8 tensor cores, for a call :func:`supports` accepts.

    Args:
        x: ``(M, K)`` bf16/fp16, ``M <= MMA_MAX_ROWS``, contiguous along K (a multiple of 256).
        weight: ``(N, K / 256 * 144)`` uint8 Q4_K blocks (``qtype`` 12).
        silu_and_mul: ``weight`` is gate rows then up rows; the result is ``silu(x gate^T) * (x up^T)``.
        out: optional ``(M, N)`` (``(M, N / 2)``) output with a contiguous last dimension.
        packed: ``weight``'s rows are in the packed layout (``gguf_blocks.pack_rows``), not file order.

    Returns:
        ``(M, N)`` (``(M, N / 2)`` with ``silu_and_mul``) in ``x``'s dtype; the error is that of rounding ``x``
        to int8 per 32 elements (module docstring).

    Raises:
        ValueError: a call :func:`supports` refuses, or shapes that do not fit.
    """
    if not supports(x, weight, qtype):
        raise ValueError(
            f"gguf_mma takes Q4_K weights and 1-{MMA_MAX_ROWS} bf16/fp16 rows, got type {qtype}, "
            f"x {tuple(x.shape)} {x.dtype}"
        )
    m, n_out, nb, out, grid = launch_shape(x, weight, _BLOCK_SIZE[qtype], _TYPE_SIZE[qtype], silu_and_mul, out)
    xq, xd, xs = quantize_activations(x)
    v = kernel_layout(qtype, nb, packed)[1]
    _KERNELS[qtype][grid](
        xq, xd, xs, weight, out, m, n_out, nb, weight.stride(0), out.stride(0), SILU_MUL=silu_and_mul,
        V=v, CS=nb * v, BLOCK_M=_BLOCK_M,
    )  # fmt: skip
    return out
