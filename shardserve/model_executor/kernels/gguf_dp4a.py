"""Decode GEMV for the common GGUF types on int8 dot products: ``y = x @ W.T`` for ``x`` of 1-4 rows.

The FMA GEMV of ``kernels/gguf_gemv.py`` spends about four instructions per weight element (decode the
code, two FMAs, address work) and reads its blocks byte by byte; at 4.5 bits per weight an H200 must
retire ~29 weight elements per SM per clock, which leaves no room, so it runs at a small fraction of the
copy bandwidth. This path does what llama.cpp's ``mul_mat_vec_q`` does (``ggml/src/ggml-cuda/mmvq.cu``,
``vecdotq.cuh``): the activations are quantized to int8 in groups of 32 (llama.cpp's ``block_q8_1``:
``dx = max|x| / 127``, ``xq = round(x / dx)``, and the group's ``dx * sum(xq)`` per 16 elements), and the
weights are read as 32-bit words whose four bytes hold four codes, multiplied by four int8 activations in
one ``dp4a`` (PTX ``dp4a.u32.s32``; emulated with shifts under the Triton interpreter). A word of Q4_K
codes costs one AND (low nibbles), a shift and an AND (high nibbles) and one ``dp4a`` per half, per row
of ``x``: about one instruction per weight element. The sub-block's scale and offset are applied once per
16 or 32 elements::

    sum_e w_e x_e ~= sum_sub [ s_sub * dx_g * sum_e q_e xq_e  -  m_sub * dx_g * sum_e xq_e ]

(``w = s q - m``: Q4_K ``s = d sc``, ``m = dmin mn``; Q6_K ``s = d sc``, ``m = 32 d sc``; Q8_0 ``s = d``,
``m = 0``), which is the exact dot product of the weights with the quantized activations: the only error
is int8 rounding of ``x`` (at most ``dx / 2`` per element, about 0.4% of the group's largest value).

Types: Q4_K, Q6_K and Q8_0 (what llama.cpp's Q4_K_M, Q6_K and Q8_0 files are made of), with bf16 or fp16
activations; fp32 activations and the other types use the exact FMA GEMV. Q6_K (210-byte blocks) and Q8_0
(34) are not 4-byte aligned: their words are read as two aligned words and funnel-shifted.

Two kernel designs. For rows in file order (the default) each block (Q6_K: unit of 2 or 4 blocks; Q8_0:
pair) is split across S = 4 or 8 consecutive threads, each taking a few of its 32-element slices, with
the partial sums added across the warp at the end (``_q4_k_split_kernel``, ``_q6_k_split_kernel``,
``_q8_0_split_kernel``; tiling by :func:`split_tiling`): S times the threads of one per block, and a
block's threads read consecutive bytes of it and of x. On an H200 that took the 8B Q4_K_M decode step
from 3.10 to 2.64 ms (296 to 352 tok/s); the Q4_K GEMVs from 0.36-0.52 of copy bandwidth to 0.39-0.62,
the Q6_K LM head from 0.48 to 0.82, Q8_0 from 0.51-0.62 to 0.59-0.76 (``benchmarks/RESULTS.md``). They
launch with programmatic dependent launch (``kernels/pdl.py``) where the GPU has it: before waiting for
the kernel that wrote x, each thread asks L2 for its first weight sectors (:func:`prefetch_sectors`).

The thread-per-unit kernels (``_q4_k_kernel``, ``_q6_k_kernel``, ``_q8_0_kernel``; tiling by
:func:`tiling`) take rows packed (``gguf_blocks.row_layout``: chunk-major across a row's units,
``packed=True``) with x in the matching packed x layout (:func:`quantize_activations` with the unit's
elements), so that consecutive threads read consecutive bytes of both. Measured on an H200 packing was no
faster (Q4_K: equal on 4096/6144 rows, slower on the gate/up and down weights; 8B Q4_K_M end to end 276
against 296 tok/s in file order, both thread-per-unit), so the layers keep file order by default
(``GGUFConfig.pack_rows``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from shardserve.model_executor.kernels.elementwise import rms_norm_apply, rms_norm_input, rms_norm_rstd
from shardserve.model_executor.kernels.gemv import gate_up_rows, gate_up_rows_of, silu_mul_rounded
from shardserve.model_executor.kernels.gguf_dequant import _i2f, kernel_layout
from shardserve.model_executor.kernels.int8_groups import int8_groups
from shardserve.model_executor.kernels.pdl import pdl_launch, pdl_wait, prefetch_l2
from shardserve.model_executor.layers.quantization.gguf_blocks import MIN_UNIT, row_layout

DP4A_TYPES = {12: "Q4_K", 14: "Q6_K", 8: "Q8_0"}
"""``ggml_type`` -> name of the types with an int8 dot-product GEMV."""
DP4A_MAX_ROWS = 4
"""Most rows of ``x`` the kernels take (the weights are decoded once for all of them; each row adds 16
x words per 64 weights to a thread's registers)."""
_TYPE_SIZE = {12: 144, 14: 210, 8: 34}
_BLOCK_SIZE = {12: 256, 14: 256, 8: 32}


def _unit(qtype: int, nb: int) -> int:
    """Blocks per thread for a row of ``nb`` blocks (the unit of ``gguf_blocks.row_layout``)."""
    return row_layout(qtype, nb)[0]


def supports(x: torch.Tensor, weight: torch.Tensor, qtype: int) -> bool:
    """Whether :func:`gguf_gemv_dp4a` takes this call: a type above, bf16/fp16 activations of at most
    :data:`DP4A_MAX_ROWS` rows, and a weight whose first byte is 4-byte aligned (a view of a flat buffer may
    not be) and rows of a whole number of thread units (one block, or a pair of blocks for Q6_K and Q8_0:
    4-byte aligned)."""
    return (
        qtype in DP4A_TYPES
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.dim() == 2
        and 0 < x.shape[0] <= DP4A_MAX_ROWS
        and weight.data_ptr() % 4 == 0
        and weight.stride(1) == 1
        and x.shape[1] % (_BLOCK_SIZE[qtype] * MIN_UNIT[qtype]) == 0
        and weight.stride(0) % 4 == 0
    )


# -- activations ---------------------------------------------------------------------------------------


@triton.jit
def _quantize_kernel(X, XQ, XD, XS, K, stride_xm, GROUPS: tl.constexpr, UE: tl.constexpr,
                     PDL: tl.constexpr = False):  # fmt: skip
    # One program: GROUPS groups of 32 elements of one row of x. UE: the packed x layout's unit (elements),
    # 0 for plain rows.
    pdl_wait(PDL)
    row = tl.program_id(1)
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)[:, None]
    lane = tl.arange(0, 32)[None, :]
    k = g * 32 + lane
    ok = k < K
    UNIT: tl.constexpr = UE if UE > 0 else 1
    units = K // UNIT
    x = tl.load(X + row.to(tl.int64) * stride_xm + k, mask=ok, other=0.0).to(tl.float32)
    gv = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    int8_groups(x, k, gv, row, K, units, XQ, XD, XS, GROUPS, UE)


@triton.jit
def _rms_norm_int8_kernel(X, R, RO, W, Y, XQ, XD, XS, stride_x, stride_r, K, eps, HAS_RESIDUAL: tl.constexpr,
                          BLOCK: tl.constexpr, CHUNK: tl.constexpr, UE: tl.constexpr,
                          PDL: tl.constexpr = False):  # fmt: skip
    # Program (row, p): the row's rstd from all of it (kernels/elementwise.py's RMSNorm code), then
    # elements [p CHUNK, +CHUNK) normalised, written (and x + residual to RO), and rounded to int8 as
    # _quantize_kernel does. One program per row took 5.2 us on an H200 for K = 4096, 2.5x a plain
    # RMSNorm (a whole row's int8 rounding in one CTA); with the row's CHUNKs on several SMs, 2.3 us. RO
    # is not R: other programs of the row still read R.
    pdl_wait(PDL)
    row = tl.program_id(0)
    full = rms_norm_input(X, R, RO, row, tl.arange(0, BLOCK), stride_x, stride_r, K, K, HAS_RESIDUAL, False)
    rstd = rms_norm_rstd(full, K, eps)
    G: tl.constexpr = CHUNK // 32
    gv = tl.program_id(1) * G + tl.arange(0, G)
    offs = gv[:, None] * 32 + tl.arange(0, 32)[None, :]  # (G, 32)
    x = rms_norm_input(X, R, RO, row, offs, stride_x, stride_r, K, K, HAS_RESIDUAL, True)
    y = rms_norm_apply(x, rstd, W, offs, K)
    tl.store(Y + row * K + offs, y, mask=offs < K)
    UNIT: tl.constexpr = UE if UE > 0 else 1
    int8_groups(y.to(Y.dtype.element_ty).to(tl.float32), offs, gv, row, K, K // UNIT, XQ, XD, XS, G, UE)


def rms_norm_int8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, unit: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """RMSNorm of ``x`` (``kernels/elementwise.rms_norm``, optionally of ``x + residual``) and its output
    rounded to int8 for an int8 GEMV, in one kernel: the activation rounding that would otherwise be a
    launch of its own before each such GEMV. A row is cut into chunks of 512 elements, one program each.

    Args:
        x: ``(M, K)`` bf16/fp16 with contiguous rows, ``K`` a multiple of 32 (and of ``unit``).
        weight: ``(K,)``; residual: optional ``(M, K)``, same dtype, contiguous rows.
        unit: the x layout of :func:`quantize_activations`.

    Returns:
        ``(y (M, K) in x's dtype, x + residual (M, K) in a new tensor or None, (xq, dx, xs))``, bit for bit
        what ``rms_norm`` (which writes the sum into ``residual`` instead) and then
        ``quantize_activations(y, unit)`` give. ``x`` and ``residual`` are not written.

    Raises:
        ValueError: a shape :func:`quantize_activations` refuses, or rows that are not contiguous.
    """
    m, k = x.shape
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm_int8 takes rows with a contiguous last dimension")
    xq, xd, xs = _int8_arrays(x, unit)
    y = torch.empty((m, k), dtype=x.dtype, device=x.device)
    r = residual if residual is not None else x
    out = torch.empty((m, k), dtype=x.dtype, device=x.device) if residual is not None else x
    block = triton.next_power_of_2(k)
    chunk = min(512, block)
    _rms_norm_int8_kernel[(m, triton.cdiv(k, chunk))](
        x, r, out, weight, y, xq, xd, xs, x.stride(0), r.stride(0), k, eps, HAS_RESIDUAL=residual is not None,
        BLOCK=block, CHUNK=chunk, UE=unit, num_warps=8 if k >= 4096 else 4, **pdl_launch(x),
    )  # fmt: skip
    return y, (out if residual is not None else None), (xq, xd, xs)


def quantize_activations(x: torch.Tensor, unit: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` in int8 groups of 32 (llama.cpp's ``block_q8_1``, in three arrays).

    Args:
        x: ``(M, K)``, ``K`` a multiple of 32, contiguous along K.
        unit: 0 for rows in element order; else the packed x layout that a GEMV over packed weight rows
            reads (:func:`x_unit`): each row cut into units of ``unit`` elements (a thread's weight unit)
            and each array stored chunk-major across the units, 16 bytes per chunk (16 codes of ``xq``, 4
            floats of ``dx`` and ``xs``; an array with less than a chunk per unit stays in order), so that
            threads working on consecutive units read consecutive bytes, as for the weights
            (``gguf_blocks.row_layout``).

    Returns:
        ``xq (M, K)`` int8 ``round(x / dx)``; ``dx (M, K / 32)`` fp32 ``max|x| / 127`` per group;
        ``xs (M, K / 16)`` fp32 ``dx * sum(xq)`` per 16 elements; each row in the layout ``unit`` says.

    Raises:
        ValueError: ``K`` is not a multiple of 32 (or of ``unit``).
    """
    m, k = x.shape
    xq, xd, xs = _int8_arrays(x, unit)
    groups = min(32, triton.next_power_of_2(k // 32))
    _quantize_kernel[(triton.cdiv(k // 32, groups), m)](
        x, xq, xd, xs, k, x.stride(0), GROUPS=groups, UE=unit, num_warps=4, **pdl_launch(x)
    )
    return xq, xd, xs


def _int8_arrays(x: torch.Tensor, unit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty ``xq (M, K)`` int8, ``dx (M, K / 32)`` and ``xs (M, K / 16)`` fp32 for ``x`` ``(M, K)``.

    Raises:
        ValueError: ``K`` is not whole groups of 32, or not whole units of ``unit`` (a multiple of 64).
    """
    m, k = x.shape
    if k % 32 or (unit and (k % unit or unit % 64)):
        raise ValueError(f"activations are quantized in whole groups of 32 (units of {unit or 32}), got {k} features")
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    xd = torch.empty((m, k // 32), dtype=torch.float32, device=x.device)
    xs = torch.empty((m, k // 16), dtype=torch.float32, device=x.device)
    return xq, xd, xs


def x_unit(qtype: int, blocks_per_row: int, packed: bool) -> int:
    """The ``unit`` of :func:`quantize_activations` that :func:`gguf_gemv_dp4a` reads for a weight of
    ``qtype`` whose rows are packed (``packed``; the elements of its thread unit), else 0."""
    per, v = kernel_layout(qtype, blocks_per_row, packed)
    return per * _BLOCK_SIZE[qtype] if v else 0


# -- shared pieces -------------------------------------------------------------------------------------
# Layout: every tensor of a program is (BLOCK_M, BLOCK_N, NBT) (x row, weight row, block or block pair),
# or with ROWS_FAST (BLOCK_M, NBT, BLOCK_N), sometimes with a trailing 4 for a 16-byte vector; Triton's
# blocked layout then gives each thread whole blocks (the configs have BLOCK_N * NBT = 32 * num_warps), so
# the sums over a block's words stay in one thread (dp4a chains, no shuffles) and a block's scales are
# decoded once, in the thread that uses them. Which axis varies fastest across a warp's threads is the
# compiler's choice: after the contiguous 16-byte axis, Triton orders axes of equal contiguity by index,
# and 3.9 puts the trailing one (NBT) fastest where 3.6 puts the leading one (for BLOCK_N = 8, NBT = 16 a
# 3.6 warp is 8 rows x 4 blocks, 3.9's 2 rows x 16 blocks; ttgir of both), so ROWS_FAST swaps which axis
# leads, not which is fastest, and every figure measured on the device (3.6) is for its order. In file
# order a thread's unit is contiguous but the units of a warp's threads are not, so every weight load
# instruction of a warp touches 32 cache lines (one per thread); Q4_K (16-byte loads) was faster without
# ROWS_FAST, Q8_0 (4-byte loads, more x per weight byte) with it (``benchmarks/sweep_dp4a.py``). The split
# kernels below avoid the choice with one-dimensional tensors. In the packed layout of
# ``gguf_blocks.row_layout`` (V != 0 here; the layers' choice with ``GGUFConfig.pack_rows``) chunk c of
# consecutive units is contiguous, so a warp's load reads runs of consecutive bytes (at BLOCK_N = 8, NBT =
# 16: 2 rows x 16 units x 16 bytes for Q4_K under 3.9, 8 rows x 4 units under 3.6), the same instructions
# at other addresses (the chunk stride CSW is a compile-time constant, so
# the offsets stay immediates: same SASS instruction counts as file order for sm_90). x pointers carry the
# full shape with a zero stride along BLOCK_N to get the same layout.

M4 = tl.constexpr(0x0F0F0F0F)
M2 = tl.constexpr(0x03030303)


@triton.jit
def _dp4a(a, b, c, SIGNED_A: tl.constexpr, ASM: tl.constexpr):
    """Per element, ``c + sum_k a_k * b_k`` over the four bytes of int32 ``a`` (unsigned, or signed with
    SIGNED_A) and ``b`` (signed), broadcast together; ``c`` None starts a sum. PTX ``dp4a``, or the same sum
    by shifts (the interpreter)."""
    a, b = tl.broadcast(a, b)
    if ASM:
        op: tl.constexpr = "dp4a.s32.s32" if SIGNED_A else "dp4a.u32.s32"
        if c is None:
            r = tl.inline_asm_elementwise(
                op + " $0, $1, $2, 0;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
            )
        else:
            a, c = tl.broadcast(a, c)
            b, c = tl.broadcast(b, c)
            r = tl.inline_asm_elementwise(
                op + " $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
            )
    else:
        if c is None:
            r = tl.zeros(a.shape, dtype=tl.int32)
        else:
            r = c
        for i in tl.static_range(4):
            if SIGNED_A:
                ai = (a << (24 - 8 * i)) >> 24
            else:
                ai = (a >> (8 * i)) & 0xFF
            r += ai * ((b << (24 - 8 * i)) >> 24)
    return r


@triton.jit
def _split4(t):
    """The four words of a trailing dimension of 4 (one thread's 16-byte vector) as four tensors."""
    a, b = tl.split(tl.reshape(t, t.shape[:-1] + [2, 2]))
    w0, w2 = tl.split(a)
    w1, w3 = tl.split(b)
    return w0, w1, w2, w3


@triton.jit
def _v4(p, mask, EVEN: tl.constexpr):
    """The four int32/fp32 at ``p .. p + 3`` (16-byte aligned) of a pointer tensor of any rank, 0 where
    ``mask`` is false unless EVEN: one 16-byte load."""
    return _split4(_ld(tl.expand_dims(p, -1) + tl.arange(0, 4), tl.expand_dims(mask, -1), EVEN))


@triton.jit
def _pick4(i: tl.constexpr, t0, t1, t2, t3):
    """``(t0, t1, t2, t3)[i]`` for a compile-time ``i`` (the pieces of one vector load, by static index)."""
    if i == 0:
        t = t0
    elif i == 1:
        t = t1
    elif i == 2:
        t = t2
    else:
        t = t3
    return t


@triton.jit
def _funnel16(lo, hi):
    """The int32 made of the high half of ``lo`` and the low half of ``hi`` (a word at 2 mod 4)."""
    return ((lo >> 16) & 0xFFFF) | (hi << 16)


@triton.jit
def _half(word, HIGH: tl.constexpr):
    """The fp16 in the low (or high) half of int32 ``word``, as fp32."""
    if HIGH:
        word = word >> 16
    return word.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(word, k: tl.constexpr):
    """Byte ``k`` of int32 ``word`` (unsigned)."""
    return (word >> (8 * k)) & 0xFF


@triton.jit
def _store(Y, y, M, N, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SILU_MUL: tl.constexpr):
    """``y (BLOCK_M, BLOCK_N)`` fp32 to the output rows < M; with SILU_MUL the first half of the columns are
    gate and the second up features, rounded as the unfused path rounds."""
    HALF: tl.constexpr = BLOCK_N // 2
    out_ty = Y.dtype.element_ty
    if SILU_MUL:
        gate, up = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        y = silu_mul_rounded(gate, up, out_ty)
        cols = tl.program_id(0) * HALF + tl.arange(0, HALF)
    else:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)[:, None]
    tl.store(Y + rows * stride_ym + cols[None, :], y.to(out_ty), mask=(rows < M) & (cols < N)[None, :])


@triton.jit
def _ld(p, mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(p)
    return tl.load(p, mask=mask, other=0)


@triton.jit
def _wordp(wp, w: tl.constexpr, csw, VW: tl.constexpr):
    """Pointer to int32 word ``w`` of a thread's unit whose first word is at ``wp``: ``wp + w`` in file order
    (VW = the unit's words); in the packed row layout (``gguf_blocks.row_layout``, VW words per chunk)
    word ``w % VW`` of chunk ``w // VW``, the chunks ``csw`` words apart."""
    C: tl.constexpr = w // VW
    R: tl.constexpr = w % VW
    if C == 0:
        p = wp + R
    else:
        p = wp + C * csw + R
    return p


def _even(a: dict) -> bool:
    per = 2 if a["SILU_MUL"] else 1
    return a["N"] % (a["BLOCK_N"] // per) == 0 and a["NB"] % (a["NBT"] * a["PER"]) == 0


_THREADS_PER_SM = 1024
"""Threads per SM a launch aims for (half of an H100/H200 SM's 2048): with it :func:`tiling` picks, on the
Llama-3.1-8B shapes timed on an H200 (``benchmarks/sweep_dp4a.py``), the fastest tiling timed or one within
0.03 of copy bandwidth of it."""


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tiling(rows: int, units: int, num_sms: int, chunk_bytes: int = 0) -> tuple[int, int, int]:
    """``(BLOCK_N, NBT, num_warps)`` for a weight of ``rows`` rows (gate and up rows both counted) of
    ``units`` thread units each (blocks, or block pairs / fours: :func:`_unit`).

    A launch has ``rows * NBT`` threads, one unit each, whatever ``BLOCK_N`` (``BLOCK_N * NBT`` = 128: 4
    warps), so ``NBT`` is what fills the GPU: the smallest power of two that gives every SM about
    :data:`_THREADS_PER_SM` threads, at most 16 and at most the row's units. A fixed rule instead of
    autotuning: the fastest tiling differs little between similar shapes, and autotuning compiled and
    timed every candidate for every shape and batch size at load (minutes for a GGUF model). Measured on
    an H200 at one row, cold weights, in fractions of copy bandwidth (``benchmarks/RESULTS.md``): (8, 16, 4)
    for the 4096- and 6144-row weights (Q4_K 0.28-0.40, where the tilings autotuned before reached
    0.25-0.33; Q8_0 0.43-0.61); (32, 4, 4) for the 28672-row gate/up weight (Q4_K 0.51 when autotuning
    picked it, against 0.43-0.48 for 8 or 16 blocks in flight); (128, 1, 4) for the 128k-row LM head (Q6_K
    0.41, the other tilings 0.22-0.27). Those figures are for rows in file order.

    ``chunk_bytes``: the rows are packed (``gguf_blocks.row_layout``) in chunks of that many bytes. A warp
    of blocks-fastest threads then reads ``32 / NBT`` runs of ``NBT * chunk_bytes`` consecutive bytes per
    load, so ``NBT`` is raised (where the row has the units) until a run is at least 64 bytes: two full
    32-byte sectors of one line per row, where ``NBT = 1`` would have the warp read 32 lines for 8 or 16
    bytes each. Reasoned from the access pattern; on an H200 packed rows were no faster than file order at
    any tiling timed (``benchmarks/RESULTS.md``), which is why the layers keep file order.
    """
    want = max(1, num_sms * _THREADS_PER_SM // max(rows, 1))
    nbt = min(16, triton.next_power_of_2(units), triton.next_power_of_2(want))
    if chunk_bytes:
        nbt = max(nbt, min(16, triton.next_power_of_2(units), max(1, 64 // chunk_bytes)))
    return 128 // nbt, nbt, 4


_SPLIT_THREADS_PER_SM = 2048
"""Threads per SM a split-kernel launch aims for: one full wave at an H100/H200 SM's 2048 threads."""
_SPLIT_PER_ROW = {12: (8, 32), 14: (16, 64), 8: (16, 64)}
"""Per type, the fewest and most threads per weight row (``S * NBT``) that :func:`split_tiling` gives."""


def split_tiling(qtype: int, rows: int, units: int, num_sms: int) -> tuple[int, tuple[int, int, int]]:
    """``(S, (BLOCK_N, NBT, num_warps))`` of the split kernels for a Q4_K/Q6_K/Q8_0 weight of ``rows`` rows
    (gate and up rows both counted) of ``units`` thread units (blocks; Q6_K: fours or pairs of blocks; Q8_0:
    pairs).

    Threads per row (``S * NBT``): the power of two that fills every SM with :data:`_SPLIT_THREADS_PER_SM`, within
    :data:`_SPLIT_PER_ROW`, except that a Q8_0 weight with more rows than one such wave at its fewest threads a row
    takes its most; S = 8 (a 32-element slice per thread) except for Q4_K and for Q8_0 at 64 threads a row, which
    take S = 4 (a 64-element chunk); 4 warps, a thread per slice, except for Q4_K weights of more than 5120 rows:
    S = 4, NBT = 8 (16 for rows of at least 32 blocks) and two rows' slices a thread (BLOCK_N = 8 or 4 on 128
    threads), so that each thread has two blocks' loads in flight. A rule fitted to an H200 at one row of x, cold
    weights (``sweep_dp4a.py --split-cells``; fraction of copy bandwidth, the thread-per-unit kernel at its rule's
    tiling in brackets): Q4_K qkv 6144 x 4096 4 x 8 two a thread 0.56 (0.41; 8 x 4 0.50), q/k 5120 x 4096 4 x 8 0.51
    (0.38; 8 x 4 0.43), o 4096 x 4096 4 x 8 0.43 (0.35; two a thread 0.39), gate/up 28672 x 4096 4 x 8 two a thread
    0.80 (0.54; 8 x 1 0.61, 4 x 8 0.58, 8 x 4 two a thread 0.71), down 4096 x 14336 4 x 8 0.53 (0.43; two a thread
    0.53); Q6_K down 8 x 8 0.53 (0.47), LM head 128256 x 4096 8 x 2 0.82 (0.48). Q8_0 (pairs of blocks; Q6_K's
    bounds): qkv 8 x 4 0.60 (0.57; 4 x 16 0.57), o 4 x 16 0.64 (0.51), down 4 x 16 0.77 (0.63), gate/up 28672 x 4096
    4 x 16 0.84 (0.53; 8 x 2 0.66, 8 x 4 0.70), LM head 4 x 16 0.95 (0.22; 8 x 2 0.75). At 70B (K = 8192 or 28672)
    Q4_K 4 x 16 two a thread: qkv 10240 x 8192 0.72 (4 x 8 two a thread 0.65, the old rule's 8 x 2 0.50), o
    8192 x 8192 0.64 (0.54; 8 x 4 0.46), gate/up 57344 x 8192 0.97 (0.94; 8 x 1 0.70), down 8192 x 28672 0.72 (0.64;
    8 x 4 0.45); on the 8B's q/k (16 blocks) 0.49 against 4 x 8's 0.51. Compiling for fewer registers (more programs
    resident) gained nothing (Q4_K gate/up 8 x 1 at 32 registers 0.61, as at 40; ``max_registers`` of
    :func:`gguf_gemv_dp4a`), so the rule leaves registers to the compiler.
    """
    if qtype == 12 and rows > 5120:  # Q4_K, many rows: S = 4, NBT 8 (16 from 32 blocks), two rows' slices a thread
        nbt = 16 if units >= 32 else min(8, triton.next_power_of_2(units))
        return 4, (2 * 128 // (4 * nbt), nbt, 4)
    lo, hi = _SPLIT_PER_ROW.get(qtype, _SPLIT_PER_ROW[14])
    fill = num_sms * _SPLIT_THREADS_PER_SM // max(rows, 1)
    per_row = min(hi, max(lo, 1 << max(fill, 1).bit_length() - 1))
    if qtype == 8 and fill < lo:  # Q8_0 past one wave at its fewest threads a row: the most (measured)
        per_row = hi
    s = 4 if qtype == 12 or (qtype == 8 and per_row == hi) else 8
    nbt = max(1, min(per_row // s, triton.next_power_of_2(units)))
    return s, (max(1, 128 // (s * nbt)), nbt, 4)


_PREFETCH_BYTES = 16 << 20
"""The most weight bytes a GEMV asks L2 for before its PDL wait: well inside an H100/H200's 50 MB L2,
which the previous kernel's traffic shares."""


def prefetch_sectors(unit_bytes: int, rows: int, units: int, nbt: int, s: int) -> int:
    """``PF`` of the split kernels (:func:`_prefetch_first`): the 32-byte sectors each thread asks L2 for
    before its PDL wait. Enough for each row's first tile (``min(units, nbt)`` units of ``unit_bytes``)
    where ``rows`` rows of them fit :data:`_PREFETCH_BYTES`, else fewer (0 for a 128k-row LM head)."""
    per_row = nbt * s * 32  # bytes a row's threads ask for with one sector each
    return min(-(-min(units, nbt) * unit_bytes // per_row), _PREFETCH_BYTES // (rows * per_row))


def _jit(fn):
    return triton.heuristics({"EVEN": _even})(triton.jit(fn))


@triton.jit
def _program(W, XQ, N, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBT: tl.constexpr,
             SILU_MUL: tl.constexpr, ROWS_FAST: tl.constexpr):  # fmt: skip
    """What every kernel below starts from: the weight and x as int32 words, ``(BLOCK_M, 1, 1)`` x rows,
    ``(1, 1, NBT)`` block (or pair) offsets, a ``(1, BLOCK_N, 1)`` zero (to give x pointers the full shape),
    the ``(1, BLOCK_N, 1)`` first word of each weight row and which rows exist (``gate_up_rows``); with
    ROWS_FAST the last two axes swapped."""
    feature, rows = gate_up_rows(BLOCK_N, N, SILU_MUL)
    W32 = W.to(tl.pointer_type(tl.int32))
    XQ32 = XQ.to(tl.pointer_type(tl.int32))
    mi = tl.arange(0, BLOCK_M)[:, None, None]
    wrow = rows.to(tl.int64) * (stride_wn // 4)
    if ROWS_FAST:
        bi = tl.arange(0, NBT)[None, :, None]
        zn = tl.arange(0, BLOCK_N)[None, None, :] * 0
        wrow = wrow[None, None, :]
        n_ok = (feature < N)[None, None, :]
    else:
        bi = tl.arange(0, NBT)[None, None, :]
        zn = tl.arange(0, BLOCK_N)[None, :, None] * 0
        wrow = wrow[None, :, None]
        n_ok = (feature < N)[None, :, None]
    return W32, XQ32, mi, bi, zn, wrow, n_ok


@triton.jit
def _zero_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBT: tl.constexpr, ROWS_FAST: tl.constexpr):
    """The fp32 accumulator in the program's layout."""
    if ROWS_FAST:
        acc = tl.zeros([BLOCK_M, NBT, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, NBT], dtype=tl.float32)
    return acc


@triton.jit
def _row_sums(acc, ROWS_FAST: tl.constexpr):
    """``(BLOCK_M, BLOCK_N)``: the accumulator summed over its blocks."""
    if ROWS_FAST:
        y = tl.sum(acc, axis=1)
    else:
        y = tl.sum(acc, axis=2)
    return y


# -- Q4_K ----------------------------------------------------------------------------------------------


@triton.jit
def _q4_k_scale_min(h1, h2, h3, j: tl.constexpr):
    """6-bit scale and min of sub-block ``j`` from the 12 scale bytes in words h1..h3 (``get_scale_min_k4``)."""
    if j < 4:
        sc = _byte(h1, j) & 63
        mn = _byte(h2, j) & 63
    else:
        sc = (_byte(h3, j - 4) & 15) | ((_byte(h1, j - 4) >> 6) << 4)
        mn = (_byte(h3, j - 4) >> 4) | ((_byte(h2, j - 4) >> 6) << 4)
    return _i2f(sc), _i2f(mn)


@_jit
def _q4_k_kernel(
    XQ, XD, XS, W, Y, M, N, NB, stride_wn, stride_ym,
    PER: tl.constexpr, BLOCK_M: tl.constexpr, SILU_MUL: tl.constexpr, ASM: tl.constexpr, ROWS_FAST: tl.constexpr,
    V: tl.constexpr, CSW: tl.constexpr, XP: tl.constexpr, XCS: tl.constexpr, BLOCK_N: tl.constexpr,
    NBT: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    # Block (144 B = 36 words): d, dmin (fp16), scales[12], qs[128]. qs word t = 8c + 4v + w (chunk c of 64
    # elements): its low nibbles are elements 4(4v + w)..+3 of sub-block 2c, its high nibbles the same of
    # sub-block 2c + 1 (gguf Q4_K.dequantize_blocks), i.e. x words 64 b + 16 c + 4 v + w and that + 8.
    W32, XQ32, mi, bi, zn, wrow, n_ok = _program(W, XQ, N, stride_wn, BLOCK_M, BLOCK_N, NBT, SILU_MUL, ROWS_FAST)
    K = NB * 256
    VW: tl.constexpr = 36 if V == 0 else V // 4  # words per chunk (file order: the block is one chunk)
    csw = CSW
    XVQ: tl.constexpr = 4 if XP else 64  # x words, dx and dx * sum floats per chunk (per block in plain rows)
    XVD: tl.constexpr = 4 if XP else 8
    XVS: tl.constexpr = 4 if XP else 16
    vec = tl.arange(0, 4)[None, None, None, :]
    acc = _zero_acc(BLOCK_M, BLOCK_N, NBT, ROWS_FAST)
    for b0 in range(0, NB, NBT):
        blk = b0 + bi
        wmask = n_ok & (blk < NB)
        xmask = (mi < M) & (blk < NB)
        wp = W32 + wrow + blk * VW  # (1, BLOCK_N, NBT)
        h0, h1, h2, h3 = _split4(_ld(wp[:, :, :, None] + vec, wmask[:, :, :, None], EVEN))
        d = _half(h0, False)
        dmin = _half(h0, True)
        # the block's x (64 words), dx (8) and dx * sum (16): one chunk each in plain rows, else 4 per chunk
        xp = XQ32 + mi * (K // 4) + zn + blk * XVQ  # (BLOCK_M, BLOCK_N, NBT)
        dp = XD + mi * (K // 32) + zn + blk * XVD
        sp = XS + mi * (K // 16) + zn + blk * XVS
        dx0, dx1, dx2, dx3 = _v4(_wordp(dp, 0, XCS, XVD), xmask, False)
        dx4, dx5, dx6, dx7 = _v4(_wordp(dp, 4, XCS, XVD), xmask, False)
        for c in tl.static_range(4):
            s_lo = None
            s_hi = None
            for v in tl.static_range(2):
                qp = _wordp(wp, 4 + 8 * c + 4 * v, csw, VW)
                q0, q1, q2, q3 = _split4(_ld(qp[:, :, :, None] + vec, wmask[:, :, :, None], EVEN))
                l0, l1, l2, l3 = _v4(_wordp(xp, 16 * c + 4 * v, XCS, XVQ), xmask, False)
                u0, u1, u2, u3 = _v4(_wordp(xp, 16 * c + 8 + 4 * v, XCS, XVQ), xmask, False)
                s_lo = _dp4a(q0 & M4, l0, s_lo, False, ASM)
                s_lo = _dp4a(q1 & M4, l1, s_lo, False, ASM)
                s_lo = _dp4a(q2 & M4, l2, s_lo, False, ASM)
                s_lo = _dp4a(q3 & M4, l3, s_lo, False, ASM)
                s_hi = _dp4a((q0 >> 4) & M4, u0, s_hi, False, ASM)
                s_hi = _dp4a((q1 >> 4) & M4, u1, s_hi, False, ASM)
                s_hi = _dp4a((q2 >> 4) & M4, u2, s_hi, False, ASM)
                s_hi = _dp4a((q3 >> 4) & M4, u3, s_hi, False, ASM)
            sc_lo, mn_lo = _q4_k_scale_min(h1, h2, h3, 2 * c)
            sc_hi, mn_hi = _q4_k_scale_min(h1, h2, h3, 2 * c + 1)
            dx_lo = _pick4(c, dx0, dx2, dx4, dx6)
            dx_hi = _pick4(c, dx1, dx3, dx5, dx7)
            # dx * sum(xq) per 16 elements of sub-blocks 2c and 2c + 1: one 16-byte vector
            e0, e1, e2, e3 = _v4(_wordp(sp, 4 * c, XCS, XVS), xmask, False)
            acc += d * (sc_lo * dx_lo * s_lo.to(tl.float32) + sc_hi * dx_hi * s_hi.to(tl.float32))
            acc -= dmin * (mn_lo * (e0 + e1) + mn_hi * (e2 + e3))
    _store(Y, _row_sums(acc, ROWS_FAST), M, N, stride_ym, BLOCK_M, BLOCK_N, SILU_MUL)


# -- Q6_K ----------------------------------------------------------------------------------------------


@triton.jit
def _ld2(p, mask, EVEN: tl.constexpr):
    """The two int32 at ``p`` and ``p + 1`` (8-byte aligned): one 8-byte load."""
    return tl.split(_ld(tl.expand_dims(p, -1) + tl.arange(0, 2), tl.expand_dims(mask, -1), EVEN))


@triton.jit
def _q6_k_word(wp, o: tl.constexpr, mask, csw, VW: tl.constexpr, EVEN: tl.constexpr, WIDE: tl.constexpr):
    """The int32 at byte ``o`` (even) of a thread's unit of blocks at int32 pointer ``wp`` (words by
    :func:`_wordp`). WIDE: the unit is 8-byte aligned and read as 8-byte words (half the loads); else word
    by word."""
    if WIDE:
        lo, hi = _ld2(_wordp(wp, 2 * (o // 8), csw, VW), mask, EVEN)
        if o % 8 == 0:
            word = lo
        elif o % 8 == 2:
            word = _funnel16(lo, hi)
        elif o % 8 == 4:
            word = hi
        else:
            nxt, _ = _ld2(_wordp(wp, 2 * (o // 8) + 2, csw, VW), mask, EVEN)
            word = _funnel16(hi, nxt)
    else:
        if o % 4 == 0:
            word = _ld(_wordp(wp, o // 4, csw, VW), mask, EVEN)
        else:
            lo = _ld(_wordp(wp, o // 4, csw, VW), mask, EVEN)
            word = _funnel16(lo, _ld(_wordp(wp, o // 4 + 1, csw, VW), mask, EVEN))
    return word


@triton.jit
def _q6_k_half(wp, o: tl.constexpr, mask, csw, VW: tl.constexpr, EVEN: tl.constexpr, WIDE: tl.constexpr):
    """The fp16 at byte ``o`` (even) of the unit at ``wp``, as fp32, read from the word that holds it (a
    block's ``d`` ends its block, and for the last block of a unit the next word is past the unit)."""
    if WIDE:
        lo, hi = _ld2(_wordp(wp, 2 * (o // 8), csw, VW), mask, EVEN)
        word = lo if o % 8 < 4 else hi
    else:
        word = _ld(_wordp(wp, o // 4, csw, VW), mask, EVEN)
    return _half(word, o % 4 == 2)


@triton.jit
def _q6_k_block(acc, wp, mask, csw, VW: tl.constexpr, xp, dp, sp, xmask, XCS: tl.constexpr, XVQ: tl.constexpr,
                XVD: tl.constexpr, XVS: tl.constexpr, EVEN: tl.constexpr, B: tl.constexpr, WIDE: tl.constexpr,
                ASM: tl.constexpr):  # fmt: skip
    """``acc`` plus block ``B`` of the thread's unit of Q6_K blocks (210 B: ql[128], qh[64], scales[16] int8,
    d; at byte 210 B of the unit at ``wp``) times its 256 x values (words and floats of the unit's x arrays
    at ``xp``, ``dp``, ``sp``, chunks as :func:`_wordp` reads them).

    Element e = 128 h + 32 t + 4 w + i (half h, quarter t, word w, byte i): low 4 bits in ql word
    16 h + 8 (t % 2) + w, nibble t // 2; high 2 bits in qh word 32 + 8 h + w, bits 2 t of each byte;
    w = d sc[e // 16] (q - 32) (gguf Q6_K.dequantize_blocks). x word e / 4 = 32 h + 8 t + w.
    """
    OFF: tl.constexpr = 210 * B
    d = _q6_k_half(wp, OFF + 208, mask, csw, VW, EVEN, WIDE)
    for h in tl.static_range(2):
        # dx of x groups 4h .. 4h + 3 and dx * sum(xq) of its 16-element halves 8h .. 8h + 7, as vectors
        dx0, dx1, dx2, dx3 = _v4(_wordp(dp, 8 * B + 4 * h, XCS, XVD), xmask, False)
        e0, e1, e2, e3 = _v4(_wordp(sp, 16 * B + 8 * h, XCS, XVS), xmask, False)
        e4, e5, e6, e7 = _v4(_wordp(sp, 16 * B + 8 * h + 4, XCS, XVS), xmask, False)
        for t2 in tl.static_range(2):
            for wq in tl.static_range(2):
                # x words 64 B + 32 h + 8 t2 + 4 wq (and that + 16); offsets inline: Triton turns a plain
                # local into a tensor, and a constexpr local cannot be reassigned in a static_range loop
                l0, l1, l2, l3 = _v4(_wordp(xp, 64 * B + 32 * h + 8 * t2 + 4 * wq, XCS, XVQ), xmask, False)
                u0, u1, u2, u3 = _v4(_wordp(xp, 64 * B + 32 * h + 8 * t2 + 4 * wq + 16, XCS, XVQ), xmask, False)
                s_lo = None  # sub-block 8h + 2 t2 + wq (quarter t2)
                s_hi = None  # sub-block 8h + 2 t2 + 4 + wq (quarter t2 + 2)
                for w4 in tl.static_range(4):
                    ql = _q6_k_word(wp, OFF + 4 * (16 * h + 8 * t2 + 4 * wq + w4), mask, csw, VW, EVEN, WIDE)
                    qh = _q6_k_word(wp, OFF + 4 * (32 + 8 * h + 4 * wq + w4), mask, csw, VW, EVEN, WIDE)
                    q_lo = (ql & M4) | (((qh >> (2 * t2)) & M2) << 4)
                    q_hi = ((ql >> 4) & M4) | (((qh >> (2 * t2 + 4)) & M2) << 4)
                    s_lo = _dp4a(q_lo, _pick4(w4, l0, l1, l2, l3), s_lo, False, ASM)
                    s_hi = _dp4a(q_hi, _pick4(w4, u0, u1, u2, u3), s_hi, False, ASM)
                sw_lo = _q6_k_word(wp, OFF + 4 * (48 + (8 * h + 2 * t2 + wq) // 4), mask, csw, VW, EVEN, WIDE)
                sw_hi = _q6_k_word(wp, OFF + 4 * (48 + (8 * h + 2 * t2 + wq + 4) // 4), mask, csw, VW, EVEN, WIDE)
                sc_lo = _i2f((sw_lo << (24 - 8 * ((8 * h + 2 * t2 + wq) % 4))) >> 24, 128)
                sc_hi = _i2f((sw_hi << (24 - 8 * ((8 * h + 2 * t2 + wq + 4) % 4))) >> 24, 128)
                dx_lo, dx_hi = _pick4(t2, dx0, dx1, dx2, dx3), _pick4(t2 + 2, dx0, dx1, dx2, dx3)  # groups 4h + t2, +2
                xs_lo = _pick4(2 * t2 + wq, e0, e1, e2, e3)  # halves 8h + 2 t2 + wq
                xs_hi = _pick4(2 * t2 + wq, e4, e5, e6, e7)  # and that + 4
                acc += d * (sc_lo * (dx_lo * s_lo.to(tl.float32) - 32.0 * xs_lo))
                acc += d * (sc_hi * (dx_hi * s_hi.to(tl.float32) - 32.0 * xs_hi))
    return acc


@_jit
def _q6_k_kernel(
    XQ, XD, XS, W, Y, M, N, NB, stride_wn, stride_ym,
    PER: tl.constexpr, BLOCK_M: tl.constexpr, SILU_MUL: tl.constexpr, ASM: tl.constexpr, ROWS_FAST: tl.constexpr,
    V: tl.constexpr, CSW: tl.constexpr, XP: tl.constexpr, XCS: tl.constexpr, BLOCK_N: tl.constexpr,
    NBT: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    # A thread takes a unit of PER consecutive blocks (PER * 210 B): PER = 4 (840 B, 8-byte aligned: read
    # as 8-byte words) when the row's blocks divide by 4, else a pair (420 B, 4-byte aligned: word by word).
    # Block b of the unit starts at byte 210 b, read by funnel shifts where that is not word-aligned.
    W32, XQ32, mi, bi, zn, wrow, n_ok = _program(W, XQ, N, stride_wn, BLOCK_M, BLOCK_N, NBT, SILU_MUL, ROWS_FAST)
    K = NB * 256
    VW: tl.constexpr = PER * 210 // 4 if V == 0 else V // 4  # words per chunk (file order: one per unit)
    csw = CSW
    XVQ: tl.constexpr = 4 if XP else PER * 64  # x words, dx and dx * sum floats per chunk (per unit in plain rows)
    XVD: tl.constexpr = 4 if XP else PER * 8
    XVS: tl.constexpr = 4 if XP else PER * 16
    acc = _zero_acc(BLOCK_M, BLOCK_N, NBT, ROWS_FAST)
    for p0 in range(0, NB // PER, NBT):
        pr = p0 + bi
        wmask = n_ok & (pr < NB // PER)
        xmask = (mi < M) & (pr < NB // PER)
        wp = W32 + wrow + pr * VW
        xp = XQ32 + mi * (K // 4) + zn + pr * XVQ
        dp = XD + mi * (K // 32) + zn + pr * XVD
        sp = XS + mi * (K // 16) + zn + pr * XVS
        for b in tl.static_range(PER):
            acc = _q6_k_block(acc, wp, wmask, csw, VW, xp, dp, sp, xmask, XCS, XVQ, XVD, XVS, EVEN, b, PER == 4, ASM)
    _store(Y, _row_sums(acc, ROWS_FAST), M, N, stride_ym, BLOCK_M, BLOCK_N, SILU_MUL)


# -- Q8_0 ----------------------------------------------------------------------------------------------


@_jit
def _q8_0_kernel(
    XQ, XD, XS, W, Y, M, N, NB, stride_wn, stride_ym,
    PER: tl.constexpr, BLOCK_M: tl.constexpr, SILU_MUL: tl.constexpr, ASM: tl.constexpr, ROWS_FAST: tl.constexpr,
    V: tl.constexpr, CSW: tl.constexpr, XP: tl.constexpr, XCS: tl.constexpr, BLOCK_N: tl.constexpr,
    NBT: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    # Block (34 B): d (fp16), qs[32] int8; w = d q. A thread takes a pair of blocks (68 B = 17 words,
    # 4-byte aligned): the first's d in the low half of word 0 and its codes 2 bytes into words 0..8, the
    # second's d in the high half of word 8 and its codes in words 9..16. NB is even (the caller checks).
    W32, XQ32, mi, bi, zn, wrow, n_ok = _program(W, XQ, N, stride_wn, BLOCK_M, BLOCK_N, NBT, SILU_MUL, ROWS_FAST)
    K = NB * 32
    VW: tl.constexpr = 17 if V == 0 else V // 4  # words per chunk (file order: the pair is one chunk)
    csw = CSW
    XVQ: tl.constexpr = 4 if XP else 16  # x words per chunk (per pair in plain rows)
    acc = _zero_acc(BLOCK_M, BLOCK_N, NBT, ROWS_FAST)
    for p0 in range(0, NB // 2, NBT):
        pr = p0 + bi
        wmask = n_ok & (pr < NB // 2)
        xmask = (mi < M) & (pr < NB // 2)
        wp = W32 + wrow + pr * VW
        xp = XQ32 + mi * (K // 4) + zn + pr * XVQ  # the pair's 16 x words (dx: 2 floats, in order either way)
        x0, x1, x2, x3 = _v4(xp, xmask, False)
        x4, x5, x6, x7 = _v4(_wordp(xp, 4, XCS, XVQ), xmask, False)
        y0, y1, y2, y3 = _v4(_wordp(xp, 8, XCS, XVQ), xmask, False)
        y4, y5, y6, y7 = _v4(_wordp(xp, 12, XCS, XVQ), xmask, False)
        w0 = _ld(wp, wmask, EVEN)
        w1 = _ld(_wordp(wp, 1, csw, VW), wmask, EVEN)
        w2 = _ld(_wordp(wp, 2, csw, VW), wmask, EVEN)
        w3 = _ld(_wordp(wp, 3, csw, VW), wmask, EVEN)
        w4 = _ld(_wordp(wp, 4, csw, VW), wmask, EVEN)
        w5 = _ld(_wordp(wp, 5, csw, VW), wmask, EVEN)
        w6 = _ld(_wordp(wp, 6, csw, VW), wmask, EVEN)
        w7 = _ld(_wordp(wp, 7, csw, VW), wmask, EVEN)
        w8 = _ld(_wordp(wp, 8, csw, VW), wmask, EVEN)
        d_a = _half(w0, False)
        d_b = _half(w8, True)
        s_a = _dp4a(_funnel16(w0, w1), x0, None, True, ASM)
        s_a = _dp4a(_funnel16(w1, w2), x1, s_a, True, ASM)
        s_a = _dp4a(_funnel16(w2, w3), x2, s_a, True, ASM)
        s_a = _dp4a(_funnel16(w3, w4), x3, s_a, True, ASM)
        s_a = _dp4a(_funnel16(w4, w5), x4, s_a, True, ASM)
        s_a = _dp4a(_funnel16(w5, w6), x5, s_a, True, ASM)
        s_a = _dp4a(_funnel16(w6, w7), x6, s_a, True, ASM)
        s_a = _dp4a(_funnel16(w7, w8), x7, s_a, True, ASM)
        s_b = _dp4a(_ld(_wordp(wp, 9, csw, VW), wmask, EVEN), y0, None, True, ASM)
        s_b = _dp4a(_ld(_wordp(wp, 10, csw, VW), wmask, EVEN), y1, s_b, True, ASM)
        s_b = _dp4a(_ld(_wordp(wp, 11, csw, VW), wmask, EVEN), y2, s_b, True, ASM)
        s_b = _dp4a(_ld(_wordp(wp, 12, csw, VW), wmask, EVEN), y3, s_b, True, ASM)
        s_b = _dp4a(_ld(_wordp(wp, 13, csw, VW), wmask, EVEN), y4, s_b, True, ASM)
        s_b = _dp4a(_ld(_wordp(wp, 14, csw, VW), wmask, EVEN), y5, s_b, True, ASM)
        s_b = _dp4a(_ld(_wordp(wp, 15, csw, VW), wmask, EVEN), y6, s_b, True, ASM)
        s_b = _dp4a(_ld(_wordp(wp, 16, csw, VW), wmask, EVEN), y7, s_b, True, ASM)
        gd = mi * (K // 32) + zn + 2 * pr
        dx_a = tl.load(XD + gd, mask=xmask, other=0.0)
        dx_b = tl.load(XD + gd + 1, mask=xmask, other=0.0)
        acc += d_a * dx_a * s_a.to(tl.float32) + d_b * dx_b * s_b.to(tl.float32)
    _store(Y, _row_sums(acc, ROWS_FAST), M, N, stride_ym, BLOCK_M, BLOCK_N, SILU_MUL)


# -- blocks split across threads -----------------------------------------------------------------------
# The kernels above give a thread whole blocks, so a launch has one thread per block (or unit) of the
# weight: 98k threads for the 8B's q/k/v weight, a third of an H200's thread slots, and Nsight Compute
# found them latency-bound (each warp waiting on its loads, nothing else to issue). These give each block
# (Q4_K) or unit (Q6_K) to S consecutive threads, each of which takes 8 / S of a block's eight 32-element
# slices (llama.cpp's mul_mat_vec_q does the same with vdr, ``mmvq.cu``): S times the threads, and the S
# threads of a block read consecutive bytes of it and of x. Each thread keeps fp32 partial sums across the
# loop over blocks; they are added across the warp once, at the end.
#
# A program's tensors are one-dimensional, (T,) with T = BLOCK_N * NBT * S, thread t taking slice
# t % S of block (t // S) % NBT of row t // (NBT * S), plus a trailing 4 for a 16-byte load. With more
# dimensions the thread order across a warp is Triton's choice among dimensions of equal contiguity, and
# versions differ (3.6 puts the leading dimension fastest, 3.9 the trailing one: the kernels above get
# different warp layouts from the two); with one there is nothing to choose. Rows of x are each a (T,)
# accumulator (up to 4, in separate variables), so that no load has x rows as a thread dimension either.
# Rows in file order only (the packed layout gave nothing: see the module docstring).


@triton.jit
def _program_split(W, XQ, N, stride_wn, BLOCK_N: tl.constexpr, NBT: tl.constexpr, S: tl.constexpr,
                   SILU_MUL: tl.constexpr):  # fmt: skip
    """The split kernels' start: weight and x as int32 words, each thread's block offset and slice, its
    weight row's first word and whether that row exists, all ``(T,)`` (T = BLOCK_N * NBT * S)."""
    T: tl.constexpr = BLOCK_N * NBT * S
    t = tl.arange(0, T)
    feature, rows = gate_up_rows_of(t // (NBT * S), BLOCK_N, N, SILU_MUL)
    bi = (t // S) % NBT
    si = t % S
    wrow = rows.to(tl.int64) * (stride_wn // 4)
    return W.to(tl.pointer_type(tl.int32)), XQ.to(tl.pointer_type(tl.int32)), bi, si, wrow, feature < N


@triton.jit
def _prefetch_first(W, wrow, n_ok, bi, si, units, UB: tl.constexpr, NBT: tl.constexpr, S: tl.constexpr,
                    PF: tl.constexpr):  # fmt: skip
    """Ask L2 for the start of each weight row's first tile (its first NBT units of UB bytes): the row's
    NBT * S threads take consecutive 32-byte sectors, PF each (0: none), wrapping within the tile (so that
    no address is shared by many rows: one sector asked by every warp would queue at one L2 slice).
    Weights only, so a GEMV does this before its PDL wait, while the previous kernel runs."""
    span = tl.minimum(units, NBT) * UB
    j = bi * S + si
    for p in tl.static_range(PF):
        off = ((j + p * (NBT * S)) * 32) % span
        prefetch_l2(tl.where(n_ok, W + wrow * 4 + off, W))


@triton.jit
def _split_rows(si, M, T: tl.constexpr):
    """A ``(T,)`` fp32 zero (the accumulators' start) and whether x rows 1, 2 and 3 exist, ``(T,)`` each."""
    return tl.zeros([T], dtype=tl.float32), si * 0 + 1 < M, si * 0 + 2 < M, si * 0 + 3 < M


@triton.jit
def _split_store(Y, a0, a1, a2, a3, M, N, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 NBT: tl.constexpr, S: tl.constexpr, SILU_MUL: tl.constexpr):  # fmt: skip
    """The per-thread sums ``a0 .. a3`` ``(T,)`` of x rows 0 .. BLOCK_M - 1 added per weight row and stored
    (:func:`_store`)."""
    y0 = tl.sum(tl.reshape(a0, (BLOCK_N, NBT * S)), axis=1)
    if BLOCK_M == 1:
        y = y0[None, :]
    else:
        y1 = tl.sum(tl.reshape(a1, (BLOCK_N, NBT * S)), axis=1)
        if BLOCK_M == 2:
            y = tl.permute(tl.join(y0, y1), (1, 0))
        else:
            y2 = tl.sum(tl.reshape(a2, (BLOCK_N, NBT * S)), axis=1)
            y3 = tl.sum(tl.reshape(a3, (BLOCK_N, NBT * S)), axis=1)
            # join(join(y0, y2), join(y1, y3))[n, j, k] is row 2 j + k
            y = tl.permute(tl.reshape(tl.join(tl.join(y0, y2), tl.join(y1, y3)), (BLOCK_N, 4)), (1, 0))
    _store(Y, y, M, N, stride_ym, BLOCK_M, BLOCK_N, SILU_MUL)


@triton.jit
def _q4_k_chunk(wp, xp, dp, sp, wmask, xmask, ch, si, d, dmin, sc_lo, sc_hi, mn_lo, mn_hi, HPT: tl.constexpr,
                EVEN: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """One x row's part of a Q4_K block from one thread: its slices of chunk ``ch`` (both halves when HPT
    >= 2, else slice ``si``) against that row's x words (``xp``), dx (``dp``) and sums (``sp``) of the
    block. Returns fp32 ``(T,)``."""
    s_lo = None
    s_hi = None
    for v in tl.static_range(2 if HPT >= 2 else 1):
        if HPT >= 2:
            h = 2 * ch + v
        else:
            h = si
        q0, q1, q2, q3 = _v4(wp + 4 + 4 * h, wmask, EVEN)
        xo = 16 * ch + 4 * (h % 2)
        l0, l1, l2, l3 = _v4(xp + xo, xmask, EVEN)
        u0, u1, u2, u3 = _v4(xp + xo + 8, xmask, EVEN)
        s_lo = _dp4a(q0 & M4, l0, s_lo, False, ASM)
        s_lo = _dp4a(q1 & M4, l1, s_lo, False, ASM)
        s_lo = _dp4a(q2 & M4, l2, s_lo, False, ASM)
        s_lo = _dp4a(q3 & M4, l3, s_lo, False, ASM)
        s_hi = _dp4a((q0 >> 4) & M4, u0, s_hi, False, ASM)
        s_hi = _dp4a((q1 >> 4) & M4, u1, s_hi, False, ASM)
        s_hi = _dp4a((q2 >> 4) & M4, u2, s_hi, False, ASM)
        s_hi = _dp4a((q3 >> 4) & M4, u3, s_hi, False, ASM)
    dx_lo = _ld(dp + 2 * ch, xmask, EVEN)
    dx_hi = _ld(dp + 2 * ch + 1, xmask, EVEN)
    e0, e1, e2, e3 = _v4(sp + 4 * ch, xmask, EVEN)  # dx * sum(xq) per 16 of sub-blocks 2 ch and 2 ch + 1
    if HPT >= 2:
        m_lo = e0 + e1
        m_hi = e2 + e3
    else:
        first = si % 2 == 0
        m_lo = tl.where(first, e0, e1)
        m_hi = tl.where(first, e2, e3)
    return d * (sc_lo * dx_lo * s_lo.to(tl.float32) + sc_hi * dx_hi * s_hi.to(tl.float32)) - dmin * (
        mn_lo * m_lo + mn_hi * m_hi
    )


@_jit
def _q4_k_split_kernel(
    XQ, XD, XS, W, Y, M, N, NB, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, SILU_MUL: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, NBT: tl.constexpr,
    S: tl.constexpr, PER: tl.constexpr, EVEN: tl.constexpr, PF: tl.constexpr = 0, PDL: tl.constexpr = False,
):  # fmt: skip
    # Q4_K block (144 B = 36 words; the layout of _q4_k_kernel): the 128 code bytes are eight 16-byte
    # slices; slice h = 2c + v (chunk c of 64 elements, half v) holds in its low nibbles elements 16v .. 16v
    # + 15 of sub-block 2c and in its high nibbles the same of sub-block 2c + 1 (x words 16c + 4v and + 8).
    # Thread s of a block takes slices s * 8 / S .. + 8 / S (a whole chunk when S <= 4) and decodes the
    # scales of its chunk from the block's 12 scale bytes (all S threads read the same 16-byte header).
    W32, XQ32, bi, si, wrow, n_ok = _program_split(W, XQ, N, stride_wn, BLOCK_N, NBT, S, SILU_MUL)
    _prefetch_first(W, wrow, n_ok, bi, si, NB, 144, NBT, S, PF)
    pdl_wait(PDL)
    T: tl.constexpr = BLOCK_N * NBT * S
    K = NB * 256
    HPT: tl.constexpr = 8 // S  # slices per thread
    c = (si * HPT) // 2  # the thread's (first) chunk
    a0, on1, on2, on3 = _split_rows(si, M, T)  # one accumulator per x row
    a1 = a0
    a2 = a0
    a3 = a0
    for b0 in range(0, NB, NBT):
        blk = b0 + bi
        wmask = n_ok & (blk < NB)
        wp = W32 + wrow + blk * 36
        xp = XQ32 + blk * 64
        dp = XD + blk * 8
        sp = XS + blk * 16
        h0, h1, h2, h3 = _v4(wp, wmask, EVEN)
        d = _half(h0, False)
        dmin = _half(h0, True)
        for cc in tl.static_range((HPT + 1) // 2):  # the thread's chunks: one, or two when S == 2
            ch = c + cc
            # 6-bit scales and mins of sub-blocks 2 ch and 2 ch + 1 (get_scale_min_k4, j = 2 ch and + 1)
            sh = 16 * (ch % 2)
            g1 = h1 >> sh
            g2 = h2 >> sh
            g3 = h3 >> sh
            low = ch < 2
            sc_lo = _i2f(tl.where(low, g1 & 63, (g3 & 15) | ((g1 >> 2) & 48)))
            sc_hi = _i2f(tl.where(low, (g1 >> 8) & 63, ((g3 >> 8) & 15) | ((g1 >> 10) & 48)))
            mn_lo = _i2f(tl.where(low, g2 & 63, ((g3 >> 4) & 15) | ((g2 >> 2) & 48)))
            mn_hi = _i2f(tl.where(low, (g2 >> 8) & 63, ((g3 >> 12) & 15) | ((g2 >> 10) & 48)))
            a0 += _q4_k_chunk(wp, xp, dp, sp, wmask, blk < NB, ch, si, d, dmin, sc_lo, sc_hi, mn_lo, mn_hi,
                              HPT, EVEN, ASM)  # fmt: skip
            if BLOCK_M > 1:
                a1 += _q4_k_chunk(wp, xp + K // 4, dp + K // 32, sp + K // 16, wmask, (blk < NB) & on1, ch,
                                  si, d, dmin, sc_lo, sc_hi, mn_lo, mn_hi, HPT, False, ASM)  # fmt: skip
            if BLOCK_M > 2:
                a2 += _q4_k_chunk(wp, xp + K // 2, dp + K // 16, sp + K // 8, wmask, (blk < NB) & on2, ch,
                                  si, d, dmin, sc_lo, sc_hi, mn_lo, mn_hi, HPT, False, ASM)  # fmt: skip
                a3 += _q4_k_chunk(wp, xp + 3 * (K // 4), dp + 3 * (K // 32), sp + 3 * (K // 16), wmask,
                                  (blk < NB) & on3, ch, si, d, dmin, sc_lo, sc_hi, mn_lo, mn_hi, HPT, False,
                                  ASM)  # fmt: skip
    _split_store(Y, a0, a1, a2, a3, M, N, stride_ym, BLOCK_M, BLOCK_N, NBT, S, SILU_MUL)


@triton.jit
def _q6_k_slice(wp, xp, dp, sp, wmask, xmask, b: tl.constexpr, g, d, PER: tl.constexpr, EVEN: tl.constexpr,
                ASM: tl.constexpr):  # fmt: skip
    """One x row's part of slice ``g`` of block ``b`` of the Q6_K units at ``wp`` (the slice numbering of
    _q6_k_split_kernel), against that row's x words (``xp``), dx (``dp``) and sums (``sp``) of the unit.
    Returns fp32 ``(T,)``."""
    VW: tl.constexpr = PER * 210 // 4
    hh = g // 4
    t2 = (g // 2) % 2
    wq = g % 2
    # the slice's ql and qh words, by the word reader of _q6_k_kernel at a per-thread offset (16 g and
    # 32 h + 16 wq bytes: multiples of 8, so the alignment class stays the block's)
    wl = wp + 4 * g
    wh = wp + 8 * hh + 4 * wq
    s_lo = None
    s_hi = None
    xo = 64 * b + 32 * hh + 8 * t2 + 4 * wq
    l0, l1, l2, l3 = _v4(xp + xo, xmask, EVEN)
    u0, u1, u2, u3 = _v4(xp + xo + 16, xmask, EVEN)
    for w4 in tl.static_range(4):
        ql = _q6_k_word(wl, 210 * b + 4 * w4, wmask, 0, VW, EVEN, PER == 4)
        qh = _q6_k_word(wh, 210 * b + 128 + 4 * w4, wmask, 0, VW, EVEN, PER == 4)
        q_lo = (ql & M4) | (((qh >> (2 * t2)) & M2) << 4)
        q_hi = ((ql >> 4) & M4) | (((qh >> (2 * t2 + 4)) & M2) << 4)
        s_lo = _dp4a(q_lo, _pick4(w4, l0, l1, l2, l3), s_lo, False, ASM)
        s_hi = _dp4a(q_hi, _pick4(w4, u0, u1, u2, u3), s_hi, False, ASM)
    # scales j = 8 h + 2 t2 + wq and j + 4: bytes 192 + j of the block, in the unit's words
    j = 8 * hh + 2 * t2 + wq
    o = 210 * b + 192 + j  # byte of the unit
    sw_lo = _ld(wp + (o >> 2), wmask, EVEN)
    sw_hi = _ld(wp + (o >> 2) + 1, wmask, EVEN)
    sc_lo = _i2f((sw_lo << (24 - 8 * (o & 3))) >> 24, 128)
    sc_hi = _i2f((sw_hi << (24 - 8 * (o & 3))) >> 24, 128)
    dx_lo = _ld(dp + 8 * b + 4 * hh + t2, xmask, EVEN)  # groups of 32: quarters t2 and t2 + 2
    dx_hi = _ld(dp + 8 * b + 4 * hh + t2 + 2, xmask, EVEN)
    xs_lo = _ld(sp + 16 * b + j, xmask, EVEN)  # halves of 16: 8 h + 2 t2 + wq, and + 4
    xs_hi = _ld(sp + 16 * b + j + 4, xmask, EVEN)
    lo = sc_lo * (dx_lo * s_lo.to(tl.float32) - 32.0 * xs_lo)
    return d * (lo + sc_hi * (dx_hi * s_hi.to(tl.float32) - 32.0 * xs_hi))


@_jit
def _q6_k_split_kernel(
    XQ, XD, XS, W, Y, M, N, NB, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, SILU_MUL: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, NBT: tl.constexpr,
    S: tl.constexpr, PER: tl.constexpr, EVEN: tl.constexpr, PF: tl.constexpr = 0, PDL: tl.constexpr = False,
):  # fmt: skip
    # Units of PER Q6_K blocks as _q6_k_kernel reads them (4 blocks, 840 B, 8-byte aligned: 8-byte words;
    # else pairs, 420 B: 4-byte words; a block at byte 210 b of its unit, funnel-shifted where that is not
    # word-aligned). A block's 256 elements are eight 32-element slices g = 4 h + 2 t2 + wq (half h,
    # quarter pair t2, word quad wq; the element numbering of _q6_k_block): 16 ql bytes at 16 g (low
    # nibbles: quarter t2, high: t2 + 2), 16 qh bytes at 128 + 32 h + 16 wq (bits 2 t2 and 2 t2 + 4), the
    # scales sc[8 h + 2 t2 + wq] and that + 4, x words 32 h + 8 t2 + 4 wq and + 16. Thread s of a unit takes
    # slices s * 8 / S .. + 8 / S of each of its blocks.
    W32, XQ32, bi, si, wrow, n_ok = _program_split(W, XQ, N, stride_wn, BLOCK_N, NBT, S, SILU_MUL)
    _prefetch_first(W, wrow, n_ok, bi, si, NB // PER, PER * 210, NBT, S, PF)
    pdl_wait(PDL)
    T: tl.constexpr = BLOCK_N * NBT * S
    K = NB * 256
    GPT: tl.constexpr = 8 // S  # slices per thread
    VW: tl.constexpr = PER * 210 // 4
    a0, on1, on2, on3 = _split_rows(si, M, T)  # one accumulator per x row
    a1 = a0
    a2 = a0
    a3 = a0
    for p0 in range(0, NB // PER, NBT):
        pr = p0 + bi
        ok = pr < NB // PER
        wmask = n_ok & ok
        wp = W32 + wrow + pr * VW
        xp = XQ32 + pr * (PER * 64)
        dp = XD + pr * (PER * 8)
        sp = XS + pr * (PER * 16)
        for b in tl.static_range(PER):
            d = _q6_k_half(wp, 210 * b + 208, wmask, 0, VW, EVEN, PER == 4)
            for r in tl.static_range(GPT):
                g = si * GPT + r
                a0 += _q6_k_slice(wp, xp, dp, sp, wmask, ok, b, g, d, PER, EVEN, ASM)
                if BLOCK_M > 1:
                    a1 += _q6_k_slice(wp, xp + K // 4, dp + K // 32, sp + K // 16, wmask, ok & on1, b, g, d,
                                      PER, False, ASM)  # fmt: skip
                if BLOCK_M > 2:
                    a2 += _q6_k_slice(wp, xp + K // 2, dp + K // 16, sp + K // 8, wmask, ok & on2, b, g, d,
                                      PER, False, ASM)  # fmt: skip
                    a3 += _q6_k_slice(wp, xp + 3 * (K // 4), dp + 3 * (K // 32), sp + 3 * (K // 16), wmask,
                                      ok & on3, b, g, d, PER, False, ASM)  # fmt: skip
    _split_store(Y, a0, a1, a2, a3, M, N, stride_ym, BLOCK_M, BLOCK_N, NBT, S, SILU_MUL)


@triton.jit
def _q8_0_slice(wp, xp, dp, wmask, xmask, g, EVEN: tl.constexpr, ASM: tl.constexpr):
    """One x row's part of slice ``g`` (8 codes) of the Q8_0 block pair at ``wp``, against that row's x words
    (``xp``) and dx (``dp``) of the pair. Returns fp32 ``(T,)``."""
    blk = g // 4
    o = 2 + 34 * blk + 8 * (g % 4)  # the slice's first code byte in the pair: 2 mod 4 in the first block
    w0 = _ld(wp + (o >> 2), wmask, EVEN)
    w1 = _ld(wp + (o >> 2) + 1, wmask, EVEN)
    odd = blk == 0
    w2 = tl.load(wp + (o >> 2) + 2, mask=wmask & odd, other=0)  # past the pair for the second block's last
    c0 = tl.where(odd, _funnel16(w0, w1), w0)
    c1 = tl.where(odd, _funnel16(w1, w2), w1)
    x0, x1 = _ld2(xp + 2 * g, xmask, EVEN)
    s = _dp4a(c0, x0, None, True, ASM)
    s = _dp4a(c1, x1, s, True, ASM)
    dw = _ld(wp + 8 * blk, wmask, EVEN)  # d: low half of word 0 (first block), high half of word 8 (second)
    d = (dw >> (16 * blk)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return d * _ld(dp + blk, xmask, EVEN) * s.to(tl.float32)


@_jit
def _q8_0_split_kernel(
    XQ, XD, XS, W, Y, M, N, NB, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, SILU_MUL: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, NBT: tl.constexpr,
    S: tl.constexpr, PER: tl.constexpr, EVEN: tl.constexpr, PF: tl.constexpr = 0, PDL: tl.constexpr = False,
):  # fmt: skip
    # Pairs of Q8_0 blocks as _q8_0_kernel reads them (68 B = 17 words, 4-byte aligned; NB even). A pair's
    # 64 codes are eight slices of 8 (slice g: block g // 4, bytes 2 + 34 (g // 4) + 8 (g % 4); x words 2g
    # and 2g + 1); thread s of a pair takes slices s * 8 / S .. + 8 / S.
    W32, XQ32, bi, si, wrow, n_ok = _program_split(W, XQ, N, stride_wn, BLOCK_N, NBT, S, SILU_MUL)
    _prefetch_first(W, wrow, n_ok, bi, si, NB // 2, 68, NBT, S, PF)
    pdl_wait(PDL)
    T: tl.constexpr = BLOCK_N * NBT * S
    K = NB * 32
    GPT: tl.constexpr = 8 // S  # slices per thread
    a0, on1, on2, on3 = _split_rows(si, M, T)  # one accumulator per x row
    a1 = a0
    a2 = a0
    a3 = a0
    for p0 in range(0, NB // 2, NBT):
        pr = p0 + bi
        ok = pr < NB // 2
        wmask = n_ok & ok
        wp = W32 + wrow + pr * 17
        xp = XQ32 + pr * 16
        dp = XD + pr * 2
        for r in tl.static_range(GPT):
            g = si * GPT + r
            a0 += _q8_0_slice(wp, xp, dp, wmask, ok, g, EVEN, ASM)
            if BLOCK_M > 1:
                a1 += _q8_0_slice(wp, xp + K // 4, dp + K // 32, wmask, ok & on1, g, False, ASM)
            if BLOCK_M > 2:
                a2 += _q8_0_slice(wp, xp + K // 2, dp + K // 16, wmask, ok & on2, g, False, ASM)
                a3 += _q8_0_slice(wp, xp + 3 * (K // 4), dp + 3 * (K // 32), wmask, ok & on3, g, False, ASM)
    _split_store(Y, a0, a1, a2, a3, M, N, stride_ym, BLOCK_M, BLOCK_N, NBT, S, SILU_MUL)


_KERNELS = {12: _q4_k_kernel, 14: _q6_k_kernel, 8: _q8_0_kernel}
_SPLIT_KERNELS = {12: _q4_k_split_kernel, 14: _q6_k_split_kernel, 8: _q8_0_split_kernel}
_ROWS_FAST = {12: False, 14: False, 8: True}
"""Per type, whether weight rows are the fastest axis across threads (see the layout note above)."""


def gguf_gemv_dp4a(
    x: torch.Tensor,
    weight: torch.Tensor,
    qtype: int,
    silu_and_mul: bool = False,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int] | tuple[int, int, int, bool] | None = None,
    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    packed: bool = False,
    x_packed: bool | None = None,
    split: int | None = None,
    max_registers: int | None = None,
) -> torch.Tensor:
    """``x @ W.T`` (or SwiGLU) on int8 dot products, for a call :func:`supports` accepts.

    Args:
        x: ``(M, K)`` bf16/fp16, ``M <= DP4A_MAX_ROWS``, contiguous along K (a multiple of 512 for Q6_K, 64
            for Q8_0).
        weight: ``(N, K / block_size * type_size)`` uint8 blocks of ``qtype`` (Q4_K, Q6_K, Q8_0).
        silu_and_mul: ``weight`` is gate rows then up rows; the result is ``silu(x gate^T) * (x up^T)``.
        out: optional ``(M, N)`` (``(M, N / 2)``) output with a contiguous last dimension.
        config: ``(BLOCK_N, NBT, num_warps)`` instead of the rule's (for benchmarks and tests): for the
            thread-per-unit kernel (optionally with ROWS_FAST; a tiling with ``BLOCK_N * NBT != 32 *
            num_warps`` is correct but gives a thread parts of blocks) unless ``split`` says otherwise, else
            for the split kernel (``BLOCK_N * NBT * split = 32 * num_warps``).
        split: threads per Q4_K block (Q6_K unit, Q8_0 pair): the kernels that split blocks across
            threads (S > 1, rows in file order only) or the thread-per-unit kernel (1). Default: what
            :func:`split_tiling` picks, with ``config`` given 1, and 1 for packed rows.
        quantized: ``quantize_activations(x, x_unit(qtype, K / block_size, x packed))`` when the caller
            already has it (one input, several weights of the same unit).
        packed: ``weight``'s rows are in the packed layout (``gguf_blocks.pack_rows``), not file order.
            Packed rows default to blocks as the fastest axis across threads (a warp then reads
            consecutive bytes of a row in every load), file order to :data:`_ROWS_FAST`.
        x_packed: read x in the packed x layout of :func:`quantize_activations` (its unit: the weight's
            thread unit), so that a warp's x loads are consecutive bytes too; default: when ``packed``
            (only packed rows take it).
        max_registers: registers per thread the split kernel is compiled for (PTX ``.maxnreg``, Triton's
            ``maxnreg``; the compiler spills what does not fit), so that more programs are resident per SM;
            default: none (the compiler's choice). Split kernels only; the Triton interpreter ignores it.

    Returns:
        ``(M, N)`` (``(M, N / 2)`` with ``silu_and_mul``) in ``x``'s dtype. The error against the exact
        product is that of rounding ``x`` to int8 per 32 elements (module docstring).

    Raises:
        ValueError: a call :func:`supports` refuses, or shapes that do not fit.
    """
    if not supports(x, weight, qtype):
        raise ValueError(
            f"gguf_gemv_dp4a takes Q4_K/Q6_K/Q8_0 weights (4-byte aligned) and 1-{DP4A_MAX_ROWS} bf16/fp16 "
            f"rows, got type {qtype}, x {tuple(x.shape)} {x.dtype}"
        )
    m, n_out, nb, out, grid = launch_shape(x, weight, _BLOCK_SIZE[qtype], _TYPE_SIZE[qtype], silu_and_mul, out)
    per, v = kernel_layout(qtype, nb, packed)
    xp = bool(v) if x_packed is None else x_packed and bool(v)
    xq, xd, xs = quantize_activations(x, x_unit(qtype, nb, xp)) if quantized is None else quantized
    splits = qtype in _SPLIT_KERNELS and not v
    if split is None:
        split = 0 if splits and config is None else 1  # 0: the rule's
    if split != 1 and (not splits or config is not None and len(config) != 3):
        raise ValueError(f"blocks are split across threads for Q4_K/Q6_K/Q8_0 rows in file order, got type {qtype}")
    if config is None or split == 0:
        rows = weight.shape[0]
        if not x.is_cuda:  # the Triton interpreter: its cost is per program, so one tile of rows (up to 128)
            picked = (8 if split != 1 else 1), (min(128, max(4, triton.next_power_of_2(rows))), 2, 1)
        elif split == 1:
            picked = 1, tiling(rows, nb // per, _num_sms(x.device.index or 0), v)
        else:
            picked = split_tiling(qtype, rows, nb // per, _num_sms(x.device.index or 0))
            if split:  # S asked for: the rule's NBT and warps, BLOCK_N for 32 threads a warp at that S
                nbt, warps = picked[1][1:]
                picked = split, (max(1, 32 * warps // (split * nbt)), nbt, warps)
        split = split or picked[0]
        config = config or picked[1]
    bn, nbt, warps = config[:3]
    if split > 1:
        pdl = pdl_launch(x)
        pf = prefetch_sectors(_TYPE_SIZE[qtype] * per, weight.shape[0], nb // per, nbt, split) if pdl else 0
        regs = {"maxnreg": max_registers} if max_registers and x.is_cuda else {}
        _SPLIT_KERNELS[qtype][grid](
            xq, xd, xs, weight, out, m, n_out, nb, weight.stride(0), out.stride(0),
            BLOCK_M=triton.next_power_of_2(m), SILU_MUL=silu_and_mul, ASM=x.is_cuda, BLOCK_N=bn, NBT=nbt, S=split,
            PER=per, PF=pf, **pdl, **regs, num_warps=warps,
        )  # fmt: skip
        return out
    if max_registers:
        raise ValueError("max_registers is for the kernels that split blocks across threads")
    _KERNELS[qtype][grid](
        xq, xd, xs, weight, out, m, n_out, nb, weight.stride(0), out.stride(0),
        PER=per, BLOCK_M=triton.next_power_of_2(m), SILU_MUL=silu_and_mul, ASM=x.is_cuda,
        ROWS_FAST=config[3] if len(config) > 3 else _ROWS_FAST[qtype] and not v, V=v, CSW=nb // per * v // 4,
        XP=xp, XCS=nb // per * 4, BLOCK_N=bn, NBT=nbt, num_warps=warps,
    )  # fmt: skip
    return out


def launch_shape(x: torch.Tensor, weight: torch.Tensor, block_size: int, type_size: int, silu_and_mul: bool,
                 out: torch.Tensor | None):  # fmt: skip
    """The shape checks and output of the int8 kernels (this module's and ``kernels/gguf_mma.py``'s).

    Returns:
        ``(M, output features, blocks per weight row, out, grid)``; ``grid(meta)`` gives one program per
        ``BLOCK_N`` weight rows (gate and up rows together with ``silu_and_mul``).

    Raises:
        ValueError: the weight's bytes do not match ``x``, an odd gate/up weight, or an ``out`` that does not fit.
    """
    m, k = x.shape
    n = weight.shape[0]
    if k % block_size or weight.shape[1] != k // block_size * type_size or x.stride(1) != 1:
        raise ValueError(f"weight of {tuple(weight.shape)} bytes does not match x of {tuple(x.shape)}")
    if silu_and_mul and n % 2:
        raise ValueError("silu_and_mul needs an even number of weight rows (gate rows, then up rows)")
    n_out = n // 2 if silu_and_mul else n
    if out is None:
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (m, n_out) or out.stride(1) != 1:
        raise ValueError(f"out must be ({m}, {n_out}) with a contiguous last dimension, got {tuple(out.shape)}")
    per = 2 if silu_and_mul else 1

    def grid(meta):
        return (triton.cdiv(n_out, meta["BLOCK_N"] // per),)

    return m, n_out, k // block_size, out, grid
