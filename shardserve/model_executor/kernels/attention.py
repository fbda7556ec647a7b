"""Triton kernels for the paged KV cache: writing new K/V, and attention over the cache.

One attention kernel serves prefill, chunked prefill and decode (the "unified" layout of vLLM's Triton
backend): a program takes ``BLOCK_Q`` query tokens of one request and the ``GROUP`` query heads that share
one KV head, stacked into the M dimension of the tile, and walks the request's KV blocks with the online
softmax of FlashAttention (Dao et al. 2022, Algorithm 1). Query ``j`` of a request whose context is
``seq_len`` tokens long sits at position ``seq_len - q_len + j`` and sees keys up to it (causal).

Decode at small batch has too few (request, KV head) programs to fill the GPU, and each would walk the
whole context alone. There the context is split into ``num_kv_splits`` ranges walked by separate
programs, each writing its unnormalised output with its running max and sum, and a second kernel merges
them with the log-sum-exp rescaling of Flash-Decoding (Dao et al. 2023, "Flash-Decoding for long-context
inference"; vLLM's and SGLang's split-KV decode kernels).

Cache layout (see :mod:`shardserve.model_executor.layers.attention`): one tensor per layer of shape
``(2, num_blocks, block_size, num_kv_heads, head_dim)``, keys at index 0, values at 1.

FP8 cache (``--kv-cache-dtype fp8``): the tensor is ``torch.float8_e4m3fn`` and each layer has one scale for
K and one for V (vLLM's ``k_scale``/``v_scale``): the cache holds ``clamp(k / k_scale, -448, 448)`` rounded to
e4m3, and reads give ``fp8 * k_scale``. The attention kernel converts each loaded tile to the query dtype
for the dot products and folds the scales into the softmax scale (K) and into the output (V).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.model_executor.kernels.int8_groups import int8_groups
from shardserve.model_executor.kernels.pdl import pdl_launch, pdl_wait

FP8_E4M3_MAX = 448.0
"""Largest finite ``float8_e4m3fn`` value (OCP 8-bit floating point spec, 2023)."""
FP8_F16_DOT = True
"""Default of :func:`paged_attention`'s ``f16_dot`` for an FP8 cache. Measured on an H200 (decode, 256 requests of
1,152 tokens, Llama-3.1-8B heads, ``benchmarks/bench_attention.py --kv-cache-dtype fp8``): 269 us per layer
with fp16 dot products and 128-key tiles against 347 us before (bf16 dots, 64-key tiles); the widening to
bf16 made the FP8 cache slower than a bf16 one (292 us) although it reads half the bytes."""


@triton.jit
def round_to_e4m3(y):
    """fp32 ``y`` rounded to the nearest e4m3 value (ties to even) and saturated to +-448, still in fp32.

    Rounding here makes the cast that follows exact. Triton's interpreter truncates where rounding carries
    into the exponent (7.99 -> 4) and in the subnormal range, and rounds ties away from zero; the GPU's
    ``cvt.rn.satfinite`` agrees with this rounding either way, and so does torch's ``.to(float8_e4m3fn)``.
    """
    # Normal range: keep 3 of fp32's 23 mantissa bits, as fp32 -> bf16 rounds (sign-magnitude bits, so the
    # carry goes into the exponent). Subnormals (below 2^-6) are multiples of 2^-9: adding 1.5 * 2^14 makes
    # the fp32 adder round there (on the magnitude; the sign bit is put back, so -0.001 gives -0 as torch does).
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    magnitude = (tl.abs(y) + 24576.0) - 24576.0
    subnormal = (magnitude.to(tl.int32, bitcast=True) | (bits & -0x80000000)).to(tl.float32, bitcast=True)
    r = tl.where(tl.abs(y) < 0.015625, subnormal, normal)
    return tl.minimum(tl.maximum(r, -448.0), 448.0)


@triton.jit
def to_cache(x, inv_scale, dtype: tl.constexpr, FP8: tl.constexpr):
    """``x`` as stored in a cache of element type ``dtype``: divided by the scale and rounded to e4m3 for FP8."""
    if FP8:
        return round_to_e4m3(x.to(tl.float32) * inv_scale).to(dtype)
    return x.to(dtype)


@triton.jit
def _store_kv_kernel(
    K,
    V,
    KC,
    VC,
    SLOTS,
    stride_k,
    stride_v,
    k_inv_scale,
    v_inv_scale,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t)
    if slot < 0:  # padding row of a captured batch
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < WIDTH
    k = tl.load(K + t * stride_k + offs, mask=mask)
    v = tl.load(V + t * stride_v + offs, mask=mask)
    tl.store(KC + slot * WIDTH + offs, to_cache(k, k_inv_scale, KC.dtype.element_ty, FP8), mask=mask)
    tl.store(VC + slot * WIDTH + offs, to_cache(v, v_inv_scale, VC.dtype.element_ty, FP8), mask=mask)


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    """Whether the cache stores e4m3 (``--kv-cache-dtype fp8``)."""
    return kv_cache.dtype == torch.float8_e4m3fn


def store_kvcache(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's K and V into its cache slot; slots < 0 are skipped.

    Args:
        k, v: ``(num_tokens, num_kv_heads, head_dim)``, each token's heads contiguous.
        kv_cache: ``(2, num_blocks, block_size, num_kv_heads, head_dim)``, contiguous; model dtype or
            ``float8_e4m3fn``.
        slot_mapping: ``(num_tokens,)`` int64, ``block_id * block_size + offset`` or -1.
        k_scale, v_scale: dequantization scales of an FP8 cache (stored ``k / k_scale``); ignored otherwise.
    """
    n, hkv, d = k.shape
    width = hkv * d
    if k.stride(2) != 1 or k.stride(1) != d or v.stride(2) != 1 or v.stride(1) != d:
        raise ValueError("store_kvcache needs each token's K/V heads contiguous")
    _store_kv_kernel[(n,)](
        k,
        v,
        kv_cache[0],
        kv_cache[1],
        slot_mapping,
        k.stride(0),
        v.stride(0),
        1.0 / k_scale,
        1.0 / v_scale,
        WIDTH=width,
        BLOCK=triton.next_power_of_2(width),
        FP8=is_fp8_cache(kv_cache),
    )


@triton.jit
def _rope(x, partner, COS, SIN, pos, stride_cos, offs_d, HALF: tl.constexpr):
    """RoPE of head vectors ``x`` (``(..., HEAD_DIM_PAD)``, element d along the last axis) given ``partner``
    (element d + HALF for d < HALF, d - HALF above): ``x1 cos - x2 sin`` and ``x2 cos + x1 sin`` in fp32,
    the arithmetic of ``kernels/elementwise._rotate_heads`` (whose cos/sin row repeats each frequency for both
    halves). Returns fp32."""
    valid = offs_d < 2 * HALF
    cos = tl.load(COS + pos * stride_cos + offs_d, mask=valid, other=0.0)
    sin = tl.load(SIN + pos * stride_cos + offs_d, mask=valid, other=0.0)
    a, b = x.to(tl.float32), partner.to(tl.float32)
    return tl.where(offs_d < HALF, a * cos - b * sin, a * cos + b * sin)


@triton.jit
def _paged_attention_kernel(
    Q,
    KC,
    VC,
    OUT,
    BLOCK_TABLES,
    SEQ_LENS,
    QUERY_START_LOC,
    PART_ACC,
    PART_ML,
    scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    F16_DOT: tl.constexpr = False,
    PDL: tl.constexpr = False,
    K_NEW=None,
    V_NEW=None,
    COS=None,
    SIN=None,
    SLOTS=None,
    stride_kt=0,
    stride_kh=0,
    stride_vt=0,
    stride_vh=0,
    stride_cos=0,
    k_inv_scale=1.0,
    v_inv_scale=1.0,
    ROPE: tl.constexpr = False,
    FP8: tl.constexpr = False,
):
    # ROPE (decode, NUM_SPLITS > 1): the step's q, K and V are not rotated or stored yet. Each program
    # rotates its queries (RoPE, rotate-half form, as _rotary_kernel in kernels/elementwise.py; the new
    # token sits at position seq_len - 1, so its cos/sin rows load beside q, not after a load of the
    # positions), and the program whose context range holds the new token rotates its K, writes K and V
    # into the token's cache slot, and waits on a CTA barrier before its loop reads that slot back: what
    # _rotary_kernel's launch did, without that launch.
    pdl_wait(PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    if NUM_SPLITS == 1:
        qb = tl.program_id(2)
        split = 0
    else:  # decode: one query tile, the third axis walks ranges of the context
        qb = 0
        split = tl.program_id(2)
    q_start = tl.load(QUERY_START_LOC + seq)
    q_len = tl.load(QUERY_START_LOC + seq + 1) - q_start
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(SEQ_LENS + seq)
    ctx = seq_len - q_len  # position of the request's first new token

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    offs_m = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + offs_m // GROUP_PAD
    g = offs_m % GROUP_PAD
    m_valid = (tok < q_len) & (g < GROUP)
    head = kvh * GROUP + g
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM

    q_ptrs = Q + (q_start + tok)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if ROPE:  # q_len == 1: every valid row is token q_start, at position seq_len - 1 (0 for padding rows)
        HALF: tl.constexpr = HEAD_DIM // 2
        pos = tl.maximum(seq_len - 1, 0)
        partner = tl.where(offs_d < HALF, HALF, -HALF)  # offset of each element's rotation partner
        q = _rope(q, tl.load(q_ptrs + partner[None, :], mask=m_valid[:, None] & d_valid[None, :], other=0.0), COS,
                  SIN, pos, stride_cos, offs_d, HALF).to(q.dtype)  # fmt: skip
    if F16_DOT:  # FP8 cache: e4m3 widens to fp16 in one instruction (exactly); q is clamped into fp16's range
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    q_pos = ctx + tok
    kv_len = tl.minimum(seq_len, ctx + (qb + 1) * BLOCK_Q)  # keys the tile's last query sees
    kv_start = 0
    if NUM_SPLITS > 1:  # this program's range: whole BLOCK_N tiles, the last range may be short or empty
        chunk = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_start = split * chunk
        kv_len = tl.minimum(kv_len, kv_start + chunk)
    if ROPE:
        slot = tl.load(SLOTS + q_start)
        if (slot >= 0) & (kv_start <= seq_len - 1) & (seq_len - 1 < kv_len):  # this range holds the new token
            kp = K_NEW + q_start.to(tl.int64) * stride_kt + kvh * stride_kh + offs_d
            k_rot = _rope(tl.load(kp, mask=d_valid), tl.load(kp + partner, mask=d_valid), COS, SIN, pos, stride_cos,
                          offs_d, HALF)  # fmt: skip
            dst = slot * stride_cs + kvh * stride_ch + offs_d
            tl.store(KC + dst, to_cache(k_rot, k_inv_scale, KC.dtype.element_ty, FP8), mask=d_valid)
            v_new = tl.load(V_NEW + q_start.to(tl.int64) * stride_vt + kvh * stride_vh + offs_d, mask=d_valid)
            tl.store(VC + dst, to_cache(v_new, v_inv_scale, VC.dtype.element_ty, FP8), mask=d_valid)
            tl.debug_barrier()  # the slot's K/V visible to this CTA's loads below

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for start in range(kv_start, kv_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_len
        block = tl.load(BLOCK_TABLES + seq * stride_bt + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
        row = block.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        k = tl.load(KC + row[None, :] + offs_d[:, None], mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        k = k.to(q.dtype)  # an FP8 cache is widened here; its scale is in ``scale``
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * scale
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VC + row[:, None] + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        v = v.to(q.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc * v_scale  # 1.0 unless the cache is FP8
    if NUM_SPLITS > 1:  # partial results, merged by _merge_splits_kernel
        part = ((q_start + tok).to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(PART_ACC + part[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=m_valid[:, None])
        tl.store(PART_ML + 2 * part, m_i, mask=m_valid)
        tl.store(PART_ML + 2 * part + 1, l_i, mask=m_valid)
        return
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows with no key (padding) give 0
    o_ptrs = OUT + (q_start + tok)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


@triton.jit
def _merge_splits_kernel(
    PART_ACC,
    PART_ML,
    OUT,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    XQ=None,
    XD=None,
    XS=None,
    INT8: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    # With INT8, the head's output (rounded to OUT's dtype) also goes to XQ/XD/XS rounded to int8 per 32
    # (kernels/int8_groups.py; row t of NUM_HEADS * HEAD_DIM elements, file order): the o projection's
    # int8 GEMV input, bit for bit what quantize_activations(out) writes, without its launch.
    pdl_wait(PDL)
    t = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    part = (t.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + offs_s
    s_valid = offs_s < NUM_SPLITS
    m = tl.load(PART_ML + 2 * part, mask=s_valid, other=float("-inf"))
    l_sum = tl.load(PART_ML + 2 * part + 1, mask=s_valid, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty ranges: exp(-inf) = 0
    acc = tl.load(PART_ACC + part[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=s_valid[:, None], other=0.0)
    denom = tl.sum(w * l_sum, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(OUT + t * stride_ot + head * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)
    if INT8:  # HEAD_DIM == HEAD_DIM_PAD >= 32
        G: tl.constexpr = HEAD_DIM // 32
        y = tl.reshape(out.to(OUT.dtype.element_ty).to(tl.float32), (G, 32))
        k = head * HEAD_DIM + tl.reshape(offs_d, (G, 32))
        K: tl.constexpr = NUM_HEADS * HEAD_DIM
        int8_groups(y, k, head * G + tl.arange(0, G), t, K, K, XQ, XD, XS, G, 0)


_NUM_SMS: dict[int, int] = {}


def num_kv_splits_for(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Context ranges per (request, KV head) for a decode step: enough programs for two per SM, at most 16.

    CPU tensors (Triton's interpreter) get 1.
    """
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    programs = max(1, num_seqs * num_kv_heads)
    return max(1, min(16, -(-2 * _NUM_SMS[index] // programs)))


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
    block_m: int | None = None,
    num_warps: int = 4,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    block_n: int | None = None,
    num_stages: int | None = None,
    f16_dot: bool | None = None,
    int8_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    rope_kv: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new queries over its whole context in the paged cache.

    The new tokens' K/V must already be in the cache (:func:`store_kvcache`), unless ``rope_kv`` gives them.

    Args:
        q: ``(num_tokens, num_heads, head_dim)``, last dimension contiguous.
        kv_cache: ``(2, num_blocks, block_size, num_kv_heads, head_dim)``.
        block_tables: ``(num_seqs, max_num_blocks)`` int32.
        seq_lens: ``(num_seqs,)`` int32 context length after this step (0 for padding rows).
        query_start_loc: ``(num_seqs + 1,)`` int32 offsets of each request's queries in ``q``.
        max_query_len: the longest request's new tokens (host int: sets the launch grid).
        scale: softmax scale, usually ``head_dim ** -0.5``.
        out: optional ``(num_tokens, num_heads, head_dim)`` output buffer.
        num_kv_splits: context ranges per (request, KV head) for decode steps (``max_query_len <= 1``);
            ``None`` picks by the GPU's SM count (:func:`num_kv_splits_for`). Ignored for prefill.
        block_m: rows of a tile (query tokens x query heads of one KV head, padded to a power of two);
            default 16 for decode, 64 for prefill. ``num_warps``: Triton warps per program.
        block_n: keys per inner-loop tile (default 64; 128 for decode over an FP8 cache; 32 above head size
            128); ``num_stages``: Triton's
            software-pipelining depth (default: Triton's). Tuning knobs (``benchmarks/bench_attention.py``).
        f16_dot: FP8 cache, half-precision queries: take the dot products in fp16 (e4m3 widens to fp16 exactly
            in one instruction; to bf16 it takes three) with q clamped to fp16's range. Default: FP8_F16_DOT.
        k_scale, v_scale: dequantization scales of an FP8 cache (see module docstring); ignored otherwise.
        int8_out: ``(xq, dx, xs)`` of ``gguf_dp4a.quantize_activations`` for ``(num_tokens, num_heads *
            head_dim)`` in file order (empty arrays: ``gguf_dp4a._int8_arrays``): the merge of a split decode
            writes the output rounded to int8 there too (an int8 GEMV's input), bit for bit what
            ``quantize_activations`` gives. Needs ``num_kv_splits > 1``, a decode step and ``head_dim`` a
            power of two of at least 32 (:func:`fuses_int8_output`).
        rope_kv: ``(k, v, cos_cache, sin_cache, slot_mapping)`` of a decode step split over the context
            (:func:`fuses_rope`), as :func:`kernels.elementwise.rotary_embedding` takes them: ``q`` and ``k``
            not yet rotated, K and V not yet in the cache; each request's new token at position
            ``seq_lens - 1``. The attention kernel rotates the queries
            (``q`` itself is left as it was), and the program whose range holds each new token rotates its K
            and writes K and V into the token's slot before reading the range: the outputs and the cache
            equal those of ``rotary_embedding(..., kv_cache=...)`` then this function, without that launch.
            Needs a contiguous cache.

    Returns:
        ``(num_tokens, num_heads, head_dim)`` in ``q``'s dtype.

    Raises:
        ValueError: ``int8_out`` where the merge does not run (:func:`fuses_int8_output`); ``rope_kv`` where
            the step is not a split decode (:func:`fuses_rope`) or the cache is not contiguous.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # tl.dot wants M >= 16: decode packs several query tokens' worth of rows, prefill takes 64-row tiles.
    if block_m is None:
        block_m = 16 if max_query_len <= 1 else 64
    block_q = max(1, block_m // group_pad)
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    kc, vc = kv_cache[0], kv_cache[1]
    fp8 = is_fp8_cache(kv_cache)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    splits = 1
    if max_query_len <= 1:
        splits = num_kv_splits if num_kv_splits is not None else num_kv_splits_for(num_seqs, num_kv_heads, q.device)
    if int8_out is not None and not fuses_int8_output(splits, max_query_len, head_dim):
        raise ValueError("int8_out needs a decode step split over the context and a power-of-two head_dim >= 32")
    rope = {}
    if rope_kv is not None:
        if not fuses_rope(splits, max_query_len) or not kv_cache.is_contiguous():
            raise ValueError("rope_kv needs a decode step split over the context and a contiguous cache")
        k_new, v_new, cos_cache, sin_cache, slot_mapping = rope_kv
        rope = dict(K_NEW=k_new, V_NEW=v_new, COS=cos_cache, SIN=sin_cache, SLOTS=slot_mapping,
                    stride_kt=k_new.stride(0), stride_kh=k_new.stride(1), stride_vt=v_new.stride(0),
                    stride_vh=v_new.stride(1), stride_cos=cos_cache.stride(0), k_inv_scale=1.0 / k_scale,
                    v_inv_scale=1.0 / v_scale, ROPE=True, FP8=fp8)  # fmt: skip
    part_acc = part_ml = out  # unused unless split
    if splits > 1:
        part_acc = torch.empty((num_tokens, num_heads, splits, head_dim_pad), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((num_tokens, num_heads, splits, 2), dtype=torch.float32, device=q.device)
        grid = (num_seqs, num_kv_heads, splits)
    else:
        grid = (num_seqs, num_kv_heads, triton.cdiv(max(max_query_len, 1), block_q))
    _paged_attention_kernel[grid](
        q,
        kc,
        vc,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        part_acc,
        part_ml,
        scale * k_scale if fp8 else scale,
        v_scale if fp8 else 1.0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kc.stride(0),
        kc.stride(1),
        kc.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n or (32 if head_dim > 128 else 128 if fp8 and max_query_len <= 1 else 64),
        IEEE=q.dtype == torch.float32,
        NUM_SPLITS=splits,
        F16_DOT=fp8 and q.dtype != torch.float32 and (FP8_F16_DOT if f16_dot is None else f16_dot),
        num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
        **rope,
        **pdl_launch(q),
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_acc,
            part_ml,
            out,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            NUM_SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            **(dict(XQ=int8_out[0], XD=int8_out[1], XS=int8_out[2], INT8=True) if int8_out is not None else {}),
            num_warps=4,
            **pdl_launch(q),
        )
    return out


def fuses_int8_output(num_kv_splits: int, max_query_len: int, head_dim: int) -> bool:
    """Whether :func:`paged_attention` can write its output rounded to int8 (``int8_out``): a decode step
    split over the context (the merge kernel writes it) and heads of a power-of-two size of at least 32."""
    return num_kv_splits > 1 and max_query_len <= 1 and head_dim >= 32 and head_dim & (head_dim - 1) == 0


def fuses_rope(num_kv_splits: int, max_query_len: int) -> bool:
    """Whether :func:`paged_attention` can rotate the step's queries and keys and store its K/V itself
    (``rope_kv``): a decode step split over the context (one new token per request)."""
    return num_kv_splits > 1 and max_query_len <= 1
