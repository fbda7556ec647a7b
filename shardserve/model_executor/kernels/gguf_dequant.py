"""GGUF blocks in Triton: the per-type decoding shared by every GGUF kernel, whole-matrix dequantization
and the embedding lookup.

Block layouts and formulas follow llama.cpp (``ggml/src/ggml-common.h`` ``block_q4_0`` ... ``block_q6_K``,
``ggml/src/ggml-quants.c`` ``dequantize_row_*``) as the ``gguf`` Python package implements them
(``gguf/quants.py`` ``Q4_0.dequantize_blocks`` ...), which the tests use as the reference.

Decoding (:func:`gguf_parts`) yields, for a tile of ``BLOCK_N`` weight rows by ``G`` sub-blocks of ``SUB``
elements in natural element order, three tensors with ``w = s * (f - 2**23) - m``:

- ``f`` ``(BLOCK_N, G, SUB)`` fp32: ``2**23 + v`` where ``v`` is the element's unsigned code, possibly
  shifted left in place (a high nibble is used as ``16 * q`` without a shift). Built by OR-ing the code
  into the exponent bits of 2**23 and bit-casting: no int-to-float conversion instruction, which runs at
  a quarter of the FP32 rate on Ampere/Hopper (CUDA C++ Programming Guide, arithmetic instruction
  throughput).
- ``s`` ``(BLOCK_N, G, 1)``: the sub-block's scale, with the in-place shift divided out.
- ``m`` ``(BLOCK_N, G, 1)``: the sub-block's offset (``8 d`` for Q4_0, ``-min`` for Q4_1, ``dmin * m`` for
  Q4_K, ...).

``fma(f, x, -2**23 x)`` is then exactly ``round(v * x)`` (one rounding), so a GEMV spends two FMAs per
weight element; a matmul forms ``w = fma(f, s, -2**23 s) - m`` once per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.model_executor.layers.quantization.gguf_blocks import GGUFBlockType, block_type, row_layout

MAGIC = 8388608.0
"""2**23: floats in [2**23, 2**24) have unit spacing, so ``bits(2**23) | v`` is ``2**23 + v``."""


@triton.jit
def _ld(ptr, mask, EVEN: tl.constexpr):
    """A uint8 load widened to int32 (masked to 0 unless EVEN)."""
    if EVEN:
        return tl.load(ptr).to(tl.int32)
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, mask, EVEN: tl.constexpr):
    """The fp16 at byte address ``ptr`` (2-byte aligned: every GGUF scale is) as fp32."""
    p = ptr.to(tl.pointer_type(tl.float16))
    if EVEN:
        return tl.load(p).to(tl.float32)
    return tl.load(p, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _i2f(v, OFFSET: tl.constexpr = 0):
    """Float of small integers ``v`` (``-OFFSET <= v < 2**23 - OFFSET``) by the 2**23 bit trick: two
    full-rate instructions instead of an int-to-float conversion."""
    return ((v + OFFSET) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _inv_pow4(sft):
    """``4 ** -sft`` for the 2-bit fields of Q2_K/Q3_K used in place (``sft`` in 0..3)."""
    return tl.where(sft == 0, 1.0, tl.where(sft == 1, 0.25, tl.where(sft == 2, 0.0625, 0.015625)))


@triton.jit
def _k_scale_min(bp, j, mask, EVEN: tl.constexpr):
    """6-bit scale and min of sub-block ``j`` (0..7) of a Q4_K/Q5_K super-block (``get_scale_min_k4``)."""
    ja = j % 4
    a = _ld(bp + 4 + ja, mask, EVEN)  # scales[j % 4]
    b = _ld(bp + 8 + ja, mask, EVEN)  # scales[4 + j % 4]
    c = _ld(bp + 12 + ja, mask, EVEN)  # scales[8 + j % 4]
    low = j < 4
    sc = tl.where(low, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
    return _i2f(sc), _i2f(mn)


@triton.jit
def block_byte(bp, r, off, cs, V: tl.constexpr):
    """Address of byte ``off`` of a block (``off`` may be a tensor; 2-byte fields at even offsets stay in one
    chunk). File order (V = 0): ``bp`` is the block's first byte, ``bp + off``. Packed
    (``gguf_blocks.row_layout``): ``bp`` is the first byte of the block's unit in its row's first chunk,
    ``r`` the block's first byte within its unit and ``cs`` the row's chunk stride (units per row x V)."""
    if V == 0:
        p = bp + off
    else:
        o = r + off
        p = bp + (o // V) * cs + o % V
    return p


@triton.jit
def gguf_parts(
    wrow,
    sb,
    lane,
    mask,
    NSUB,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    TS: tl.constexpr,
    SUB: tl.constexpr,
    EVEN: tl.constexpr,
    PER: tl.constexpr = 1,
    V: tl.constexpr = 0,
):
    """Decode a tile: ``f (BLOCK_N, G, SUB)``, ``s, m (BLOCK_N, G, 1)`` with ``w = s * (f - 2**23) - m``.

    Args:
        wrow: ``(BLOCK_N, 1, 1)`` uint8 pointers to the first byte of each weight row.
        sb: ``(1, G, 1)`` index of each sub-block within the row (elements ``[sb * SUB, (sb + 1) * SUB)``).
        lane: ``(1, 1, SUB)`` element within a sub-block.
        mask: ``(BLOCK_N, G, 1)`` rows and sub-blocks that exist (ignored when EVEN).
        NSUB: sub-blocks per row.
        QTYPE, BS, TS, SUB: the ``ggml_type``, elements and bytes per block, elements per sub-block.
        PER, V: the packed row layout (``gguf_blocks.row_layout``: units of PER blocks in chunks of V
            bytes); V = 0 for file order.
    """
    SPB: tl.constexpr = BS // SUB  # sub-blocks per block
    j = sb % SPB
    blk = sb // SPB
    if V == 0:
        bp = wrow + blk.to(tl.int64) * TS  # (BLOCK_N, G, 1) block start
        r = 0
        cs = 0
    else:  # the unit's first chunk, the block's byte in its unit, the chunk stride
        bp = wrow + (blk // PER).to(tl.int64) * V
        r = (blk % PER) * TS
        cs = NSUB // SPB // PER * V
    if QTYPE == 8:  # Q8_0: d, qs[32] int8; w = d * q
        d = _f16(block_byte(bp, r, 0, cs, V), mask, EVEN)
        v = _ld(block_byte(bp, r, 2 + lane, cs, V), mask, EVEN) ^ 0x80  # q + 128
        s = d
        m = 128.0 * d
    elif QTYPE == 2 or QTYPE == 3:  # Q4_0: d, qs[16]; w = d * (q - 8). Q4_1: d, m, qs[16]; w = d * q + m
        QS: tl.constexpr = 2 if QTYPE == 2 else 4
        d = _f16(bp, mask, EVEN)
        v = _ld(bp + QS + lane, mask, EVEN) & (0x0F << (4 * j))  # sub-block j: low (0) or high (1) nibbles
        s = d * tl.where(j == 1, 0.0625, 1.0)
        if QTYPE == 2:
            m = 8.0 * d
        else:
            m = -_f16(bp + 2, mask, EVEN)
    elif QTYPE == 6 or QTYPE == 7:  # Q5_0: d, qh[4], qs[16]; w = d * (q - 16). Q5_1: d, m, qh, qs; w = d q + m
        QH: tl.constexpr = 2 if QTYPE == 6 else 4
        e = j * 16 + lane  # element within the block
        d = _f16(bp, mask, EVEN)
        qs = _ld(bp + QH + 4 + lane, mask, EVEN) & (0x0F << (4 * j))
        hbit = (_ld(bp + QH + (e >> 3), mask, EVEN) >> (e & 7)) & 1
        v = qs | (hbit << (4 + 4 * j))
        s = d * tl.where(j == 1, 0.0625, 1.0)
        if QTYPE == 6:
            m = 16.0 * d
        else:
            m = -_f16(bp + 2, mask, EVEN)
    elif QTYPE == 10:  # Q2_K: scales[16], qs[64], d, dmin; w = d * (sc & 15) * q - dmin * (sc >> 4)
        sft = (j % 8) // 2
        v = _ld(bp + 16 + (j // 8) * 32 + (j % 2) * 16 + lane, mask, EVEN) & (3 << (2 * sft))
        sc = _ld(bp + j, mask, EVEN)
        d = _f16(bp + 80, mask, EVEN)
        s = d * _i2f(sc & 15) * _inv_pow4(sft)
        m = _f16(bp + 82, mask, EVEN) * _i2f(sc >> 4)
    elif QTYPE == 11:  # Q3_K: hmask[32], qs[64], scales[12], d; w = d * (sc - 32) * (q - 4 * !hbit)
        sft = (j % 8) // 2
        ll = (j % 2) * 16 + lane
        ql = _ld(bp + 32 + (j // 8) * 32 + ll, mask, EVEN) & (3 << (2 * sft))
        hbit = (_ld(bp + ll, mask, EVEN) >> (j // 2)) & 1
        v = ql | (hbit << (2 * sft + 2))  # 4**sft * (q + 4)
        lo = _ld(bp + 96 + (j % 8), mask, EVEN)
        lo = tl.where(j < 8, lo & 15, lo >> 4)
        hi = (_ld(bp + 104 + (j % 4), mask, EVEN) >> (2 * (j // 4))) & 3
        dl = _f16(bp + 108, mask, EVEN) * _i2f((lo | (hi << 4)) - 32, 32)
        s = dl * _inv_pow4(sft)
        m = 4.0 * dl
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K: d, dmin, scales[12], qs[128]. Q5_K adds qh[32] before qs
        hi = j % 2
        d = _f16(bp, mask, EVEN)
        sc, mn = _k_scale_min(bp, j, mask, EVEN)
        if QTYPE == 12:  # (packed: the first 16 bytes are the unit's first chunk)
            v = _ld(block_byte(bp, r, 16 + (j // 2) * 32 + lane, cs, V), mask, EVEN) & (0x0F << (4 * hi))
        else:
            qs = _ld(bp + 48 + (j // 2) * 32 + lane, mask, EVEN) & (0x0F << (4 * hi))
            hbit = (_ld(bp + 16 + lane, mask, EVEN) >> j) & 1
            v = qs | (hbit << (4 + 4 * hi))
        s = d * sc * tl.where(hi == 1, 0.0625, 1.0)
        m = _f16(bp + 2, mask, EVEN) * mn
    else:  # Q6_K (14): ql[128], qh[64], scales[16] int8, d; w = d * sc * (q - 32)
        t = (j % 8) // 2  # which 32 of the 128-element half
        nib = t // 2
        lp = (j % 2) * 16 + lane
        h = j // 8
        ql = _ld(block_byte(bp, r, h * 64 + (t % 2) * 32 + lp, cs, V), mask, EVEN) & (0x0F << (4 * nib))
        qh = (_ld(block_byte(bp, r, 128 + h * 32 + lp, cs, V), mask, EVEN) >> (2 * t)) & 3
        v = ql | (qh << (4 + 4 * nib))
        sc = _ld(block_byte(bp, r, 192 + j, cs, V), mask, EVEN)
        dl = _f16(block_byte(bp, r, 208, cs, V), mask, EVEN) * _i2f(tl.where(sc > 127, sc - 256, sc), 128)
        s = dl * tl.where(nib == 1, 0.0625, 1.0)
        m = 32.0 * dl
    f = (v | 0x4B000000).to(tl.float32, bitcast=True)
    return f, s, m


@triton.jit
def gguf_weights(f, s, m):
    """Dequantized weights ``s * (f - 2**23) - m`` (exactly rounded product, then the offset)."""
    return tl.fma(f, s, -8388608.0 * s) - m


@triton.jit
def _dequant_kernel(
    W,
    Y,
    N,
    NSUB,
    stride_wn,
    stride_yn,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    TS: tl.constexpr,
    SUB: tl.constexpr,
    PER: tl.constexpr,
    V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_K: tl.constexpr,
):
    # One program: BLOCK_N rows x TILE_K elements of the matrix, written in Y's dtype.
    G: tl.constexpr = TILE_K // SUB
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    sb = tl.program_id(1) * G + tl.arange(0, G)[None, :, None]
    lane = tl.arange(0, SUB)[None, None, :]
    mask = (rows < N)[:, None, None] & (sb < NSUB)
    wrow = (W + rows.to(tl.int64) * stride_wn)[:, None, None]
    f, s, m = gguf_parts(wrow, sb, lane, mask, NSUB, QTYPE, BS, TS, SUB, False, PER, V)
    ptrs = Y + rows.to(tl.int64)[:, None, None] * stride_yn + sb * SUB + lane
    tl.store(ptrs, gguf_weights(f, s, m).to(Y.dtype.element_ty), mask=mask & (lane < SUB))


@triton.jit
def _embedding_kernel(
    IDS,
    W,
    Y,
    T,
    NSUB,
    stride_wn,
    stride_yt,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    TS: tl.constexpr,
    SUB: tl.constexpr,
    PER: tl.constexpr,
    V: tl.constexpr,
    BLOCK_T: tl.constexpr,
    TILE_K: tl.constexpr,
):
    # One program: BLOCK_T looked-up rows x TILE_K elements of the embedding dimension.
    G: tl.constexpr = TILE_K // SUB
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ids = tl.load(IDS + tok, mask=tok < T, other=0)
    sb = tl.program_id(1) * G + tl.arange(0, G)[None, :, None]
    lane = tl.arange(0, SUB)[None, None, :]
    mask = (tok < T)[:, None, None] & (sb < NSUB)
    wrow = (W + ids.to(tl.int64) * stride_wn)[:, None, None]
    f, s, m = gguf_parts(wrow, sb, lane, mask, NSUB, QTYPE, BS, TS, SUB, False, PER, V)
    ptrs = Y + tok.to(tl.int64)[:, None, None] * stride_yt + sb * SUB + lane
    tl.store(ptrs, gguf_weights(f, s, m).to(Y.dtype.element_ty), mask=mask & (lane < SUB))


def tile_k(k: int, elements: int = 512) -> int:
    """Elements per tile: ``elements``, or the row's length rounded up to a power of two if shorter."""
    return min(elements, triton.next_power_of_2(k))


def kernel_type(qtype: int) -> GGUFBlockType:
    """The block type, for a ``ggml_type`` the kernels implement.

    Raises:
        ValueError: no kernel for ``qtype``.
    """
    t = block_type(qtype)
    if t is None:
        raise ValueError(f"no GGUF kernel for ggml_type {qtype}")
    return t


def kernel_layout(qtype: int, blocks_per_row: int, packed: bool) -> tuple[int, int]:
    """``(PER, V)`` constants of the row layout for the kernels: ``gguf_blocks.row_layout``, with V = 0 for
    file order."""
    per, v = row_layout(qtype, blocks_per_row, packed)
    return per, (0 if v == per * kernel_type(qtype).type_size else v)


def dequantize(
    weight: torch.Tensor,
    qtype: int,
    k: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    packed: bool = False,
):
    """Dequantize a whole GGUF matrix on the device (the scratch buffer of the prefill cuBLAS path).

    Args:
        weight: ``(N, K / block_size * type_size)`` uint8, contiguous rows.
        qtype: its ``ggml_type``; k: elements per row.
        dtype: of the result; out: optional ``(N, K)`` buffer to write.
        packed: ``weight``'s rows are in the packed layout (``gguf_blocks.pack_rows``), not file order.

    Returns:
        ``(N, K)`` in ``dtype``.
    """
    t = kernel_type(qtype)
    n = weight.shape[0]
    y = out if out is not None else torch.empty((n, k), dtype=dtype, device=weight.device)
    tk, block_n = max(t.sub_size, tile_k(k)), 16
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, tk))
    per, v = kernel_layout(qtype, k // t.block_size, packed)
    _dequant_kernel[grid](
        weight, y, n, k // t.sub_size, weight.stride(0), y.stride(0), qtype, t.block_size, t.type_size,
        t.sub_size, per, v, BLOCK_N=block_n, TILE_K=tk, num_warps=4,
    )  # fmt: skip
    return y


def embedding(
    weight: torch.Tensor, qtype: int, k: int, ids: torch.Tensor, dtype: torch.dtype, packed: bool = False
) -> torch.Tensor:
    """Rows ``ids`` of a GGUF embedding table, dequantized: ``(T,)`` -> ``(T, K)`` in ``dtype``.

    Args:
        weight: ``(V, K / block_size * type_size)`` uint8; ids: ``(T,)`` integer row indices (in range).
        packed: as for :func:`dequantize`.
    """
    t = kernel_type(qtype)
    ids = ids.contiguous()
    y = torch.empty((ids.shape[0], k), dtype=dtype, device=weight.device)
    if ids.shape[0] == 0:
        return y
    tk, block_t = max(t.sub_size, tile_k(k)), 4
    grid = (triton.cdiv(ids.shape[0], block_t), triton.cdiv(k, tk))
    per, v = kernel_layout(qtype, k // t.block_size, packed)
    _embedding_kernel[grid](
        ids, weight, y, ids.shape[0], k // t.sub_size, weight.stride(0), y.stride(0), qtype, t.block_size,
        t.type_size, t.sub_size, per, v, BLOCK_T=block_t, TILE_K=tk, num_warps=4,
    )  # fmt: skip
    return y
