"""Activations rounded to int8 in groups of 32 (llama.cpp's ``block_q8_1``) inside a Triton kernel: the code
shared by every kernel that writes the input of an int8 GEMV (``kernels/gguf_dp4a.quantize_activations``, the
RMSNorm with int8 output, the merge of a split decode attention), so that all give the same bits. The
arrays and layouts are :func:`~shardserve.model_executor.kernels.gguf_dp4a.quantize_activations`'s.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def x_chunked(f, PER_UNIT: tl.constexpr, units, CH: tl.constexpr):
    """Where element ``f`` of a row of one of x's arrays goes in the packed x layout: units of ``PER_UNIT``
    elements, chunk-major (``CH`` elements per chunk) across the row's ``units`` units; unchanged when
    PER_UNIT is 0 (file order) or not a whole number of chunks."""
    if PER_UNIT == 0 or PER_UNIT % CH != 0:
        p = f
    else:
        i = f % PER_UNIT
        p = (i // CH) * (units * CH) + (f // PER_UNIT) * CH + i % CH
    return p


@triton.jit
def int8_groups(x, k, gv, row, K, units, XQ, XD, XS, GROUPS: tl.constexpr, UE: tl.constexpr):
    """Round ``x`` ``(GROUPS, 32)`` fp32 (elements ``k`` of row ``row``; groups ``gv``) to int8 per group and
    store codes, ``dx`` (``max|x| / 127``) and the sums ``dx * sum(xq)`` per 16 elements, rounding half away
    from zero (layout ``UE``: 0 for file order, else ``quantize_activations``' packed x layout)."""
    ok = k < K
    amax = tl.max(tl.abs(x), axis=1, keep_dims=True)
    d = amax / 127.0
    inv = tl.where(amax > 0.0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    v = x * inv
    q = tl.where(v >= 0.0, tl.floor(v + 0.5), -tl.floor(0.5 - v)).to(tl.int32)  # round half away from 0
    tl.store(XQ + row.to(tl.int64) * K + x_chunked(k, UE, units, 16), q.to(tl.int8), mask=ok)
    tl.store(XD + row * (K // 32) + x_chunked(gv, UE // 32, units, 4), tl.reshape(d, (GROUPS,)), mask=gv < K // 32)
    sums = tl.sum(tl.reshape(q, (GROUPS, 2, 16)), axis=2).to(tl.float32) * d  # (GROUPS, 2): dx * sum(xq) per 16
    h = tl.arange(0, 2)[None, :]
    xs_at = x_chunked(gv[:, None] * 2 + h, UE // 16, units, 4)
    tl.store(XS + row * (K // 16) + xs_at, sums, mask=(gv < K // 32)[:, None])
