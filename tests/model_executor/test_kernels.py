"""The Triton kernels against the PyTorch paths of the layers (under Triton's interpreter on a CPU)."""

import math

import pytest
import torch

pytest.importorskip("triton")

from shardserve.model_executor.kernels import TRITON_INTERPRET  # noqa: E402
from shardserve.model_executor.kernels.attention import paged_attention, store_kvcache  # noqa: E402
from shardserve.model_executor.kernels.elementwise import rms_norm, rotary_embedding, silu_and_mul  # noqa: E402
from shardserve.model_executor.layers.activation import SiluAndMul  # noqa: E402
from shardserve.model_executor.layers.attention import Attention, AttentionMetadata  # noqa: E402
from shardserve.model_executor.layers.layernorm import RMSNorm  # noqa: E402
from shardserve.model_executor.layers.rotary_embedding import RotaryEmbedding  # noqa: E402

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
    expected = ref._varlen(q.view(n, num_heads, head_dim), k.view(n, num_kv_heads, head_dim),
                           v.view(n, num_kv_heads, head_dim), meta)

    got_cache = cache.clone()
    store_kvcache(k.view(n, num_kv_heads, head_dim), v.view(n, num_kv_heads, head_dim), got_cache, meta.slot_mapping)
    torch.testing.assert_close(got_cache, ref.kv_cache)
    got = paged_attention(q.view(n, num_heads, head_dim), got_cache, meta.block_tables, meta.seq_lens,
                          meta.query_start_loc, meta.max_query_len, head_dim**-0.5)
    torch.testing.assert_close(got, expected.view(n, num_heads, head_dim), atol=1e-4, rtol=1e-4)


def test_padding_rows_are_skipped():
    """Captured decode batches pad with slot -1 and context 0: no cache write, zero output."""
    cache = torch.zeros(2, 4, 4, 2, 16, device=DEVICE)
    k = torch.ones(2, 2, 16, device=DEVICE)
    store_kvcache(k, k, cache, torch.tensor([5, -1], device=DEVICE))
    assert cache.view(2, -1, 2, 16)[:, 5].eq(1).all() and cache.sum() == 2 * 16 * 2  # one token: 2 heads x 16, K and V
    q = torch.ones(2, 4, 16, device=DEVICE)
    out = paged_attention(q, cache, torch.tensor([[1], [0]], dtype=torch.int32, device=DEVICE),
                          torch.tensor([2, 0], dtype=torch.int32, device=DEVICE),
                          torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE), 1, 0.25)
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
