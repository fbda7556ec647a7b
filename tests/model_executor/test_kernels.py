"""The Triton kernels against the PyTorch paths of the layers (under Triton's interpreter on a CPU)."""

import math

import pytest
import torch

pytest.importorskip("triton")

from shardserve.model_executor.kernels import TRITON_INTERPRET
from shardserve.model_executor.kernels.attention import paged_attention, store_kvcache
from shardserve.model_executor.kernels.elementwise import rms_norm, rotary_embedding, silu_and_mul
from shardserve.model_executor.kernels.gemv import KERNEL_MAX_ROWS, gemv
from shardserve.model_executor.layers.activation import SiluAndMul
from shardserve.model_executor.layers.attention import Attention, AttentionMetadata
from shardserve.model_executor.layers.layernorm import RMSNorm
from shardserve.model_executor.layers.rotary_embedding import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not TRITON_INTERPRET:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


def _metadata(q_lens, seq_lens, block_size, num_blocks, gen):
    """Random disjoint block tables for requests with the given new-token and context lengths."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for q_len, seq_len in zip(q_lens, seq_lens):
        n = math.ceil(seq_len / block_size)
        blocks, perm = perm[:n], perm[n:]
        tables.append(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
    width = max(len(t) for t in tables)
    bt = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=DEVICE),
        query_start_loc=qsl.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=bt.to(DEVICE),
        query_lens_cpu=list(q_lens),
        seq_lens_cpu=list(seq_lens),
        block_size=block_size,
    )


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,q_lens,seq_lens",
    [
        (8, 4, 8, [5, 3, 1], [5, 20, 9]),  # whole prompt, chunked prefill, decode in one batch
        (9, 3, 64, [1, 1, 1], [1, 17, 40]),  # decode only, group of 3 (padded to 4)
        (4, 4, 16, [70], [70]),  # prompt longer than one query tile
    ],
)
def test_paged_attention_matches_torch_path(num_heads, num_kv_heads, head_dim, q_lens, seq_lens):
    gen = torch.Generator().manual_seed(0)
    block_size, num_blocks = 4, 64
    meta = _metadata(q_lens, seq_lens, block_size, num_blocks, gen)
    n = sum(q_lens)
    q = torch.randn(n, num_heads * head_dim, generator=gen).to(DEVICE)
    k = torch.randn(n, num_kv_heads * head_dim, generator=gen).to(DEVICE)
    v = torch.randn(n, num_kv_heads * head_dim, generator=gen).to(DEVICE)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE)

    ref = Attention(num_heads, num_kv_heads, head_dim, scale=head_dim**-0.5)
    ref.kv_cache = cache.clone()
    ref._store(k.view(n, num_kv_heads, head_dim), v.view(n, num_kv_heads, head_dim), meta.slot_mapping)
    expected = ref._varlen(
        q.view(n, num_heads, head_dim), k.view(n, num_kv_heads, head_dim), v.view(n, num_kv_heads, head_dim), meta
    )

    got_cache = cache.clone()
    store_kvcache(k.view(n, num_kv_heads, head_dim), v.view(n, num_kv_heads, head_dim), got_cache, meta.slot_mapping)
    torch.testing.assert_close(got_cache, ref.kv_cache)
    got = paged_attention(
        q.view(n, num_heads, head_dim),
        got_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.max_query_len,
        head_dim**-0.5,
    )
    torch.testing.assert_close(got, expected.view(n, num_heads, head_dim), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_kv_splits", [2, 3, 16])
def test_split_kv_decode_matches_one_pass(num_kv_splits):
    """Flash-Decoding: context ranges merged by log-sum-exp equal one pass over the whole context, including
    ranges left empty (16 splits of a 9-token context) and a padding row (context 0)."""
    gen = torch.Generator().manual_seed(4)
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 32, 4
    seq_lens = [9, 150, 37, 1]
    meta = _metadata([1] * len(seq_lens), seq_lens, block_size, 128, gen)
    cache = torch.randn(2, 128, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(DEVICE)
    seq_lens_t = meta.seq_lens.clone()
    seq_lens_t[-1] = 0  # padding row of a captured batch
    args = (q, cache, meta.block_tables, seq_lens_t, meta.query_start_loc, 1, head_dim**-0.5)
    want = paged_attention(*args, num_kv_splits=1)
    got = paged_attention(*args, num_kv_splits=num_kv_splits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[-1].abs().sum() == 0
    assert want[:-1].abs().sum(-1).gt(0).all()


def test_split_decode_merge_writes_the_int8_gemv_input():
    """With ``int8_out`` the merge of a split decode also writes its bf16 output rounded to int8 per 32, bit
    for bit what ``quantize_activations`` gives for that output; where no merge runs it is refused."""
    from shardserve.model_executor.kernels.attention import fuses_int8_output
    from shardserve.model_executor.kernels.gguf_dp4a import _int8_arrays, quantize_activations

    gen = torch.Generator().manual_seed(6)
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 64, 4
    seq_lens = [9, 70, 1]
    meta = _metadata([1] * len(seq_lens), seq_lens, block_size, 64, gen)
    cache = torch.randn(2, 64, block_size, num_kv_heads, head_dim, generator=gen).to(torch.bfloat16).to(DEVICE)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(torch.bfloat16).to(DEVICE)
    args = (q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 1, head_dim**-0.5)
    int8_out = _int8_arrays(q.view(len(seq_lens), -1), 0)
    out = paged_attention(*args, num_kv_splits=4, int8_out=int8_out)
    torch.testing.assert_close(out, paged_attention(*args, num_kv_splits=4), atol=0, rtol=0)
    want = quantize_activations(out.view(len(seq_lens), -1))
    for got_part, want_part in zip(int8_out, want):
        assert torch.equal(got_part, want_part)
    assert int8_out[0].abs().max() == 127
    assert fuses_int8_output(4, 1, 64) and not fuses_int8_output(1, 1, 64) and not fuses_int8_output(4, 5, 64)
    assert not fuses_int8_output(4, 1, 96)  # not a power of two: the merge pads heads
    with pytest.raises(ValueError, match="int8_out"):
        paged_attention(*args, num_kv_splits=1, int8_out=int8_out)


@pytest.mark.parametrize("fp8", [False, True])
def test_split_decode_rotates_and_stores_the_new_kv_itself(fp8):
    """``rope_kv``: the split decode attention rotates q and k and writes the new K/V into their slots; the
    output, the whole cache and q equal ``rotary_embedding(..., kv_cache=...)`` then ``paged_attention`` (q,
    k, v as views into one fused QKV row, a padding row with slot -1 and context 0, an FP8 cache with its
    scales); where the step is not a split decode it is refused."""
    from shardserve.model_executor.kernels.attention import fuses_rope

    gen = torch.Generator().manual_seed(8)
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 8, 2, 64, 4, 96
    seq_lens = [9, 150, 37, 1, 1]  # 16 splits of 9 tokens leave most ranges empty; the last row pads
    meta = _metadata([1] * len(seq_lens), seq_lens, block_size, num_blocks, gen)
    n = len(seq_lens)
    seq_lens_t, slots = meta.seq_lens.clone(), meta.slot_mapping.clone()
    seq_lens_t[-1], slots[-1] = 0, -1
    rope = RotaryEmbedding(head_dim, 512, 10000.0).to(DEVICE)
    positions = (seq_lens_t.long() - 1).clamp(min=0)
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(torch.bfloat16).to(DEVICE)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    scales = dict(k_scale=0.5, v_scale=0.25) if fp8 else {}
    cache = (cache / 0.5).to(torch.float8_e4m3fn) if fp8 else cache.to(torch.bfloat16)

    def views(buf):
        q, k, v = buf.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        return q.view(n, num_heads, head_dim), k.view(n, num_kv_heads, head_dim), v.view(n, num_kv_heads, head_dim)

    for splits in (16, 3):
        want_qkv, want_cache = qkv.clone(), cache.clone()
        q, k, v = views(want_qkv)
        rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache, v=v, kv_cache=want_cache,
                         slot_mapping=slots, **scales)  # fmt: skip
        args = (meta.block_tables, seq_lens_t, meta.query_start_loc, 1, head_dim**-0.5)
        want = paged_attention(q, want_cache, *args, num_kv_splits=splits, **scales)

        got_qkv, got_cache = qkv.clone(), cache.clone()
        q, k, v = views(got_qkv)
        rope_kv = (k, v, rope.cos_cache, rope.sin_cache, slots)
        got = paged_attention(q, got_cache, *args, num_kv_splits=splits, rope_kv=rope_kv, **scales)
        assert torch.equal(got_cache.view(torch.uint8), want_cache.view(torch.uint8))
        assert torch.equal(got, want)
        assert got[:-1].float().abs().sum(-1).gt(0).all() and got[-1].float().abs().sum() == 0
        assert torch.equal(got_qkv, qkv)  # q and k are read, not rotated in place
    assert not torch.equal(got_cache.view(torch.uint8), cache.view(torch.uint8))
    assert fuses_rope(4, 1) and not fuses_rope(1, 1) and not fuses_rope(4, 3)
    with pytest.raises(ValueError, match="rope_kv"):
        paged_attention(q, got_cache, *args, num_kv_splits=1, rope_kv=rope_kv, **scales)


def test_padding_rows_are_skipped():
    """Captured decode batches pad with slot -1 and context 0: no cache write, zero output."""
    cache = torch.zeros(2, 4, 4, 2, 16, device=DEVICE)
    k = torch.ones(2, 2, 16, device=DEVICE)
    store_kvcache(k, k, cache, torch.tensor([5, -1], device=DEVICE))
    assert cache.view(2, -1, 2, 16)[:, 5].eq(1).all() and cache.sum() == 2 * 16 * 2  # one token: 2 heads x 16, K and V
    q = torch.ones(2, 4, 16, device=DEVICE)
    out = paged_attention(
        q,
        cache,
        torch.tensor([[1], [0]], dtype=torch.int32, device=DEVICE),
        torch.tensor([2, 0], dtype=torch.int32, device=DEVICE),
        torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE),
        1,
        0.25,
    )
    assert out[1].abs().sum() == 0
    assert out[0].isfinite().all()


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(with_residual):
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48, generator=gen)
    x = torch.randn(5, 48, generator=gen)
    res = torch.randn(5, 48, generator=gen)
    if with_residual:
        want, want_res = norm(x, res.clone())
        got_res = res.clone().to(DEVICE)
        got = rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), 1e-5, got_res)
        torch.testing.assert_close(got_res.cpu(), want_res)
    else:
        want = norm(x)
        got = rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), 1e-5)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_silu_and_mul_matches_torch():
    x = torch.randn(3, 2 * 40, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(silu_and_mul(x.to(DEVICE)).cpu(), SiluAndMul()(x), atol=1e-6, rtol=1e-5)


def test_rotary_matches_torch_on_fused_qkv_views():
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, d = 6, 2, 16
    rope = RotaryEmbedding(d, 64, 10000.0)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * d, generator=gen)
    positions = torch.tensor([0, 7, 3, 63])
    q, k, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    want_q, want_k = rope(positions, q.reshape(4, heads, d), k.reshape(4, kv_heads, d))
    dev = qkv.to(DEVICE)
    gq, gk, gv = dev.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    gq, gk = gq.view(4, heads, d), gk.view(4, kv_heads, d)
    rotary_embedding(positions.to(DEVICE), gq, gk, rope.cos_cache.to(DEVICE), rope.sin_cache.to(DEVICE))
    torch.testing.assert_close(gq.cpu(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gk.cpu(), want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gv.cpu(), qkv[:, (heads + kv_heads) * d :])  # V untouched


@pytest.mark.parametrize(
    "rows,n,k,bias,config",
    [
        (1, 64, 1024, False, None),  # even: unmasked loads
        (1, 37, 300, True, None),  # ragged N and K, bias
        (2, 40, 1024, False, (8, 256, 4, 2)),  # several rows share each weight tile
        (3, 40, 1024, False, (8, 256, 4, 2)),
        (KERNEL_MAX_ROWS, 13, 77, True, (4, 64, 4, 1)),
    ],
)
def test_gemv_matches_linear(rows, n, k, bias, config):
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    got = gemv(x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), config=config)
    torch.testing.assert_close(got.cpu(), torch.nn.functional.linear(x, w, b), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    "rows,inter,k,config", [(1, 64, 512, None), (2, 20, 300, (8, 128, 4, 1)), (3, 48, 256, (4, 256, 4, 2))]
)
def test_gemv_fused_silu_and_mul_matches_unfused(rows, inter, k, config):
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(2 * inter, k, generator=gen) * 0.1
    got = gemv(x.to(DEVICE), w.to(DEVICE), config=config, silu_and_mul=True)
    want = SiluAndMul()(torch.nn.functional.linear(x, w))
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_gemv_refuses_a_large_batch():
    with pytest.raises(ValueError, match="at most"):
        gemv(torch.zeros(KERNEL_MAX_ROWS + 1, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE))


def test_rotary_fused_with_kv_store_matches_rotary_then_store():
    """RoPE fused with the cache write: q rotated in place, rotated K and V in their slots, -1 skipped."""
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, d, block_size = 6, 2, 16, 4
    rope = RotaryEmbedding(d, 64, 10000.0)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * d, generator=gen).to(DEVICE)
    positions = torch.tensor([0, 7, 3, 63], device=DEVICE)
    slots = torch.tensor([5, 0, -1, 17], device=DEVICE)
    cos, sin = rope.cos_cache.to(DEVICE), rope.sin_cache.to(DEVICE)

    def split(t):
        q, k, v = t.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        return q.view(4, heads, d), k.view(4, kv_heads, d), v.view(4, kv_heads, d)

    want_qkv, want_cache = qkv.clone(), torch.zeros(2, 8, block_size, kv_heads, d, device=DEVICE)
    q, k, v = split(want_qkv)
    rotary_embedding(positions, q, k, cos, sin)
    store_kvcache(k, v, want_cache, slots)
    got_qkv, got_cache = qkv.clone(), torch.zeros_like(want_cache)
    q, k, v = split(got_qkv)
    rotary_embedding(positions, q, k, cos, sin, v=v, kv_cache=got_cache, slot_mapping=slots)
    torch.testing.assert_close(got_cache, want_cache, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_qkv[:, : heads * d], want_qkv[:, : heads * d], atol=1e-5, rtol=1e-5)
    assert got_cache.abs().sum() > 0


def test_prefill_tile_shape_does_not_change_the_result():
    """128-row tiles and 8 warps (a tuning choice) compute the same causal attention as the default."""
    gen = torch.Generator().manual_seed(8)
    meta = _metadata([37, 20], [37, 45], 4, 64, gen)
    cache = torch.randn(2, 64, 4, 2, 16, generator=gen).to(DEVICE)
    q = torch.randn(57, 8, 16, generator=gen).to(DEVICE)
    args = (q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 37, 0.25)
    torch.testing.assert_close(
        paged_attention(*args, block_m=128, num_warps=8), paged_attention(*args), atol=1e-5, rtol=1e-5
    )
