"""Single-rank layers against their transformers counterparts."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from shardserve.distributed import parallel_state as ps  # noqa: E402
from shardserve.model_executor.layers.activation import SiluAndMul  # noqa: E402
from shardserve.model_executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding  # noqa: E402
from shardserve.model_executor.layers.layernorm import RMSNorm  # noqa: E402
from shardserve.model_executor.layers.linear import QKVParallelLinear  # noqa: E402
from shardserve.model_executor.layers.rotary_embedding import RotaryEmbedding, compute_inv_freq  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def groups():
    ps.init_single_process(torch.device("cpu"))
    yield
    ps.destroy_model_parallel()


def test_llama3_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = transformers.LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling=scaling,
        max_position_embeddings=131072,
    )
    ref, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = compute_inv_freq(64, 500000.0, scaling)
    assert attention_factor == 1.0
    assert not torch.equal(ours, compute_inv_freq(64, 500000.0, None))  # the scaling changes something
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=0)


def test_rope_matches_transformers_apply():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=10000.0)
    rope = RotaryEmbedding(16, 256, 10000.0)
    positions = torch.tensor([0, 1, 5, 100, 255])
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_out, k_out = rope(positions, q, k)
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_roll_form_is_rotate_half_bit_for_bit(dtype):
    """``apply`` with the signed sin rows of ``cos_sin`` gives the values of ``x cos + rotate_half(x) sin``
    (Hugging Face's form and its ``rotate_half``, with the cache's own cos/sin rows) bit for bit."""
    from transformers.models.llama.modeling_llama import rotate_half

    rope = RotaryEmbedding(64, 512, 10000.0)
    positions = torch.tensor([0, 3, 77, 511])
    q, k = torch.randn(4, 8, 64).to(dtype), torch.randn(4, 2, 64).to(dtype)
    cos = rope.cos_cache[positions].to(dtype).unsqueeze(1)
    sin = rope.sin_cache[positions].to(dtype).unsqueeze(1)
    q_out, k_out = rope(positions, q, k)
    assert torch.equal(q_out, q * cos + rotate_half(q) * sin)
    assert torch.equal(k_out, k * cos + rotate_half(k) * sin)
    assert not torch.equal(q_out[1:], q[1:])
    with pytest.raises(IndexError):
        rope(torch.tensor([512]), q[:1], k[:1])


def test_unknown_rope_type():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        compute_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 4.0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(7, 32), (256, 4096)])
def test_rmsnorm_matches_transformers(dtype, rows, hidden):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(hidden, eps=1e-6).to(dtype)
    ours = RMSNorm(hidden, eps=1e-6).to(dtype)
    w = torch.randn(hidden).to(dtype)
    ref.weight.data.copy_(w)
    ours.weight.data.copy_(w)
    x, res = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    assert torch.equal(ours(x), ref(x))
    y, new_res = ours(x, res)
    assert torch.equal(new_res, x + res) and torch.equal(y, ref(x + res))


def test_silu_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])


def test_qkv_loader_and_shard_errors():
    layer = QKVParallelLinear(8, 2, total_num_heads=4, total_num_kv_heads=2)
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    for sid, w in zip("qkv", (q, k, v)):
        layer.weight.weight_loader(layer.weight, w, sid)
    assert torch.equal(layer.weight, torch.cat([q, k, v]))
    with pytest.raises(ValueError, match="shard_id"):
        layer.weight.weight_loader(layer.weight, q, "x")
    with pytest.raises(ValueError, match="expected size 4"):
        layer.weight.weight_loader(layer.weight, torch.randn(6, 8), "k")


def test_embedding_and_head_single_rank():
    emb = VocabParallelEmbedding(10, 4)
    head = ParallelLMHead(10, 4)
    table = torch.randn(10, 4)
    emb.weight.weight_loader(emb.weight, table)
    head.weight.weight_loader(head.weight, table)
    ids = torch.tensor([0, 9, 3])
    assert torch.equal(emb(ids), table[ids])
    h = torch.randn(2, 4)
    logits = head.compute_logits(h)
    assert logits.dtype == torch.float32 and logits.shape == (2, 10)
    torch.testing.assert_close(logits, h @ table.T)
    with pytest.raises(ValueError, match="expected"):
        emb.weight.weight_loader(emb.weight, torch.randn(11, 4))
