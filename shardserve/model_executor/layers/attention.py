"""Paged attention over a block-structured KV cache.

The KV cache of one layer is one tensor of shape ``(2, num_blocks, block_size, num_kv_heads, head_dim)``
(keys at index 0, values at 1). A token's slot is ``block_id * block_size + offset``. The metadata is
built by the model runner once per step and passed explicitly down the model (no module global).

With ``--kv-cache-dtype fp8`` the tensor is ``float8_e4m3fn`` and the layer's ``k_scale``/``v_scale``
(1.0 unless the checkpoint gives them, as vLLM does without calibration) dequantize it:
``k = fp8 * k_scale``. The PyTorch path below stores and reads it the same way as the Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shardserve.model_executor.kernels import use_triton

FP8_E4M3_MAX = 448.0
"""Largest finite ``float8_e4m3fn`` value."""
FUSE_ROPE = True
"""GPU decode steps split over the context: RoPE and the KV store inside the attention kernel
(``kernels/attention.paged_attention``'s ``rope_kv``) instead of their own launch before it."""


@dataclass
class AttentionMetadata:
    """Where each scheduled token sits in the batch and in the KV cache.

    The batch is the concatenation of each request's new tokens (``num_tokens`` in all).
    """

    slot_mapping: torch.Tensor
    """``(num_tokens,)`` int64: KV cache slot that receives each new token's K and V."""
    query_start_loc: torch.Tensor
    """``(num_seqs + 1,)`` int32: offsets of each request's new tokens in the batch."""
    seq_lens: torch.Tensor
    """``(num_seqs,)`` int32: context length of each request after this step (tokens)."""
    block_tables: torch.Tensor
    """``(num_seqs, max_num_blocks)`` int32: KV block ids of each request, padded with 0."""
    query_lens_cpu: np.ndarray
    """``(num_seqs,)`` new tokens per request (host copy, used to split the batch)."""
    seq_lens_cpu: np.ndarray
    """``(num_seqs,)`` context length per request (host copy)."""
    block_size: int
    """Tokens per KV block."""
    max_query_len: int = field(init=False)
    """Most new tokens of any request this step (1 for a decode-only step)."""
    rope_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False)
    """The eager CPU path's cos/sin rows of this step's positions, computed once for every layer."""
    decode_layout: tuple | None = field(default=None, init=False)
    """The eager CPU decode's gather of this step's KV blocks (cache rows to read, padding mask), computed
    once for every layer (:meth:`Attention._decode`)."""

    def __post_init__(self) -> None:
        self.query_lens_cpu = np.asarray(self.query_lens_cpu)
        self.seq_lens_cpu = np.asarray(self.seq_lens_cpu)
        self.max_query_len = int(self.query_lens_cpu.max()) if len(self.query_lens_cpu) else 0

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class Attention(nn.Module):
    """Scaled dot-product attention of this rank's heads against the paged KV cache.

    ``kv_cache`` is bound by the model runner after the cache is allocated. With ``rotary_emb`` the layer
    applies RoPE to the new queries and keys itself: on the GPU one kernel rotates them and writes K and V
    into the cache.
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, rotary_emb: nn.Module | None = None
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.rotary_emb = rotary_emb
        self.kv_cache: torch.Tensor | None = None
        self.k_scale = 1.0
        """Dequantization scale of the K cache when it is FP8 (from the checkpoint's ``k_scale``, else 1)."""
        self.v_scale = 1.0
        """Dequantization scale of the V cache when it is FP8."""

    def forward_int8(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """:meth:`forward`, and its output rounded to int8 for the int8 GEMV after it (``(xq, dx, xs)`` of
        ``kernels/gguf_dp4a.quantize_activations`` in file order) where the decode attention's merge kernel
        can write that too (``kernels/attention.fuses_int8_output``), which saves the GEMV's own rounding
        launch; else None, and the GEMV rounds its input itself.

        Raises:
            as :meth:`forward`.
        """
        from shardserve.model_executor.kernels.attention import fuses_int8_output, num_kv_splits_for

        n = q.shape[0]
        splits = num_kv_splits_for(meta.seq_lens.shape[0], self.num_kv_heads, q.device) if use_triton(q) else 1
        if not fuses_int8_output(splits, meta.max_query_len, self.head_dim):
            return self.forward(q, k, v, meta, positions), None
        from shardserve.model_executor.kernels.gguf_dp4a import _int8_arrays

        int8_out = _int8_arrays(q.view(n, self.num_heads * self.head_dim), 0)
        return self._forward(q, k, v, meta, positions, splits, int8_out), int8_out

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend the new tokens' queries over their requests' whole contexts.

        Args:
            q: ``(num_tokens, num_heads * head_dim)`` (or already split into heads); may be a view into a
                fused QKV output, and is rotated in place on the GPU path.
            k, v: ``(num_tokens, num_kv_heads * head_dim)`` (or split into heads).
            meta: positions of the tokens in the batch and the cache.
            positions: ``(num_tokens,)`` int64 token positions, for ``rotary_emb``.

        Returns:
            ``(num_tokens, num_heads * head_dim)``.

        Raises:
            RuntimeError: the KV cache is not bound yet.
            ValueError: ``positions`` missing for a layer with ``rotary_emb``.
        """
        return self._forward(q, k, v, meta, positions)

    def _forward(self, q, k, v, meta, positions, splits: int | None = None, int8_out: tuple | None = None):
        """:meth:`forward`; on the GPU path ``splits`` and ``int8_out`` go to ``paged_attention``."""
        n = q.shape[0]
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.kv_cache is None:
            raise RuntimeError("Attention.kv_cache is unbound: the model runner allocates it before the first step")
        rope = self.rotary_emb
        if rope is not None and positions is None:
            raise ValueError("this attention layer applies RoPE and needs the token positions")
        if use_triton(q):
            from shardserve.model_executor.kernels import attention as kernels
            from shardserve.model_executor.kernels.elementwise import rotary_embedding

            scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
            if splits is None and meta.max_query_len <= 1:
                splits = kernels.num_kv_splits_for(meta.seq_lens.shape[0], self.num_kv_heads, q.device)
            rope_kv = None
            if rope is not None and FUSE_ROPE and kernels.fuses_rope(splits or 1, meta.max_query_len):
                # the decode attention rotates q and k and stores K/V itself: one launch fewer per layer
                rope_kv = (k, v, rope.cos_cache, rope.sin_cache, meta.slot_mapping)
            elif rope is not None:
                rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache, v=v, kv_cache=self.kv_cache,
                                 slot_mapping=meta.slot_mapping, **scales)  # fmt: skip
            else:
                kernels.store_kvcache(k, v, self.kv_cache, meta.slot_mapping, **scales)
            out = torch.empty((n, self.num_heads, self.head_dim), dtype=q.dtype, device=q.device)
            kernels.paged_attention(
                q,
                self.kv_cache,
                meta.block_tables,
                meta.seq_lens,
                meta.query_start_loc,
                meta.max_query_len,
                self.scale,
                out,
                num_kv_splits=splits,
                int8_out=int8_out,
                rope_kv=rope_kv,
                **scales,
            )
            return out.view(n, self.num_heads * self.head_dim)
        if rope is not None:
            if meta.rope_cos_sin is None:  # once per step, shared by every layer
                meta.rope_cos_sin = rope.cos_sin(positions, q.dtype)
            q, k = rope.apply(q, k, *meta.rope_cos_sin)
        self._store(k, v, meta.slot_mapping)
        if meta.is_decode_only:
            out = self._decode(q, meta)
        else:
            out = self._varlen(q, k, v, meta)
        return out.reshape(n, self.num_heads * self.head_dim)

    @property
    def fp8_cache(self) -> bool:
        """Whether the bound cache stores e4m3."""
        return self.kv_cache is not None and self.kv_cache.dtype == torch.float8_e4m3fn

    def _store(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        cache = self.kv_cache.view(2, -1, self.num_kv_heads, self.head_dim)
        if self.fp8_cache:  # CPU index_copy_ has no float8 kernel: copy the bytes
            cache = cache.view(torch.uint8)
            k, v = quantize_fp8(k, self.k_scale).view(torch.uint8), quantize_fp8(v, self.v_scale).view(torch.uint8)
        cache[0].index_copy_(0, slot_mapping, k.to(cache.dtype))
        cache[1].index_copy_(0, slot_mapping, v.to(cache.dtype))

    def _read(self, kv: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of gathered cache entries ``(2, ...)`` in ``dtype``, dequantized when FP8."""
        if not self.fp8_cache:
            return kv[0], kv[1]
        return dequantize_fp8(kv[0], self.k_scale, dtype), dequantize_fp8(kv[1], self.v_scale, dtype)

    def _gather(self, block_table: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one request's first ``seq_len`` tokens, ``(seq_len, num_kv_heads, head_dim)``."""
        bs = self.kv_cache.shape[2]
        k, v = self._read(self._blocks(block_table[: (seq_len + bs - 1) // bs])[:, :seq_len], dtype)
        return k, v

    def _blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """The cache's K and V of blocks ``blocks`` ``(n,)``: ``(2, n * block_size, num_kv_heads, head_dim)``
        in the cache's dtype.

        One ``index_select`` along dim 0 of the cache seen as ``(2 * num_blocks, block elements)``, K blocks
        then V blocks: a row copy per block, about 2x faster on a CPU than ``index_select`` along dim 1 or
        advanced indexing of the 5-d cache (256 contexts of 6 blocks of the hidden-64 model of
        ``benchmarks/bench_host_overhead.py``: 0.52 against 1.11 and 1.23 ms on 2 cores).
        """
        total = self.kv_cache.shape[1]
        return self._cache_rows(torch.cat([blocks, blocks + total]))

    def _cache_rows(self, index: torch.Tensor) -> torch.Tensor:
        """:meth:`_blocks` given its ``index`` into the cache seen as ``(2 * num_blocks, block elements)``."""
        cache = self.kv_cache.view(torch.uint8) if self.fp8_cache else self.kv_cache
        kv = cache.reshape(2 * self.kv_cache.shape[1], -1).index_select(0, index)
        return kv.view(self.kv_cache.dtype).view(2, -1, self.num_kv_heads, self.head_dim)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``q`` ``(B, H, Lq, D)`` over ``k``, ``v`` ``(B, Hkv, Lk, D)``; ``mask`` ``(B or 1, 1, Lq, Lk)`` bool.

        GQA without repeating K/V: the ``H / Hkv`` query heads of a KV head become extra query rows,
        ``(B, Hkv, rep * Lq, D)``, so each K/V head is read once and nothing of size Lk is copied.
        """
        b, h, lq, d = q.shape
        hkv = k.shape[1]
        rep = h // hkv
        if mask is not None and mask.dim() == 2:
            mask = mask[None, None]
        if rep > 1:
            q = q.reshape(b, hkv, rep * lq, d)
            if mask is not None:
                mask = mask.expand(-1, -1, lq, -1).repeat(1, 1, rep, 1) if lq > 1 else mask
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=self.scale)
        return out.reshape(b, h, lq, d)

    def _varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            end = start + q_len
            if q_len == seq_len and not self.fp8_cache:  # whole prompt in this step: its K/V are the new ones
                ks, vs = k[start:end], v[start:end]
            else:  # read back from the cache (an FP8 cache as the kernels see it)
                ks, vs = self._gather(meta.block_tables[i], seq_len, q.dtype)
            # Query j sits at absolute position seq_len - q_len + j and sees keys up to it.
            pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = pos_q[:, None] >= torch.arange(seq_len, device=q.device)[None, :]
            o = self._sdpa(q[start:end].transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], mask)
            out[start:end] = o[0].transpose(0, 1)
            start = end
        return out

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One query per request: gather every context padded to the longest, mask the padding. The gather's
        rows and the mask depend only on the step (every layer's cache has the same shape): made once, by
        the first layer, in ``meta.decode_layout``."""
        total, bs = self.kv_cache.shape[1], self.kv_cache.shape[2]
        layout = meta.decode_layout
        if layout is None or layout[0] != total:
            num_blocks = -(-int(meta.seq_lens_cpu.max()) // bs)
            blocks = meta.block_tables[:, :num_blocks].reshape(-1)
            valid = torch.arange(num_blocks * bs, device=q.device)[None, :] < meta.seq_lens[:, None]
            layout = meta.decode_layout = (total, num_blocks, torch.cat([blocks, blocks + total]), valid[:, None, None])
        _, num_blocks, index, mask = layout  # mask: (B, 1, 1, L)
        kv = self._cache_rows(index).view(2, meta.num_seqs, num_blocks * bs, self.num_kv_heads, self.head_dim)
        keys, values = self._read(kv, q.dtype)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (B, Hkv, L, D)
        o = self._sdpa(q[:, :, None, :], keys, values, mask)  # (B, H, 1, D)
        return o[:, :, 0, :]


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x / scale`` saturated to +-448 and rounded to ``float8_e4m3fn`` (as the Triton KV-store kernels do)."""
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype) * scale`` for a ``float8_e4m3fn`` tensor, computed on its bits: the e4m3 sign, exponent and
    mantissa moved into place in an fp32 word, times 2^(127 - 7) to re-bias the exponent (subnormals too).
    Same values as the cast (NaN aside, which :func:`quantize_fp8` never stores), about 3x faster on a CPU,
    where the float8 cast is a scalar loop."""
    b = x.view(torch.uint8).to(torch.int32)
    bits = ((b & 0x7F) << 20) | ((b & 0x80) << 24)
    return (bits.view(torch.float32) * (2.0**120 * scale)).to(dtype)
