"""The quantization interface: layers hand their quant method the right shard; plain-weight accounting."""

from __future__ import annotations

import pytest
import torch

from shardserve.distributed import parallel_state as ps
from shardserve.model_executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shardserve.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardserve.model_executor.layers.quantization.base import (
    QuantizationConfig,
    UnquantizedLinearMethod,
    WeightShard,
    model_weight_bytes,
    unquantized_bytes,
)


@pytest.fixture(autouse=True, scope="module")
def groups():
    ps.init_single_process(torch.device("cpu"))
    yield
    ps.destroy_model_parallel()


class Recording(UnquantizedLinearMethod):
    """Plain weights stored transposed, recording every shard it is handed: a method with its own layout."""

    def __init__(self):
        self.shards: list[WeightShard] = []
        self.processed = 0

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, dt):
        w = torch.empty(input_size_per_partition, sum(output_partition_sizes), dtype=dt)
        layer.register_parameter("weight", torch.nn.Parameter(w, requires_grad=False))

    def load_weight(self, layer, param, loaded_weight, shard):
        self.shards.append(shard)
        rows = loaded_weight if shard.dim is None else loaded_weight.narrow(shard.dim, shard.start, shard.size)
        if param is layer.weight:
            param.data.narrow(1, shard.output_offset, rows.shape[0]).copy_(rows.T)
        else:
            super().load_weight(layer, param, loaded_weight, shard)

    def apply(self, layer, x, bias=None):
        y = x @ layer.weight
        return y if bias is None else y + bias

    def process_weights_after_loading(self, layer):
        self.processed += 1


class Config(QuantizationConfig):
    name = "recording"

    def __init__(self):
        super().__init__()
        self.prefixes: list[str] = []

    def get_quant_method(self, layer, prefix):
        self.prefixes.append(prefix)
        return None if prefix.endswith("skip") else Recording()


def test_qkv_shards_reach_the_method():
    cfg = Config()
    layer = QKVParallelLinear(8, 2, total_num_heads=4, total_num_kv_heads=2, bias=True, quant_config=cfg, prefix="a")
    assert cfg.prefixes == ["a"] and isinstance(layer.quant_method, Recording)
    assert layer.weight.shape == (8, 16) and layer.weight.weight_loader == layer.weight_loader
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    for sid, w in zip("qkv", (q, k, v)):
        layer.weight.weight_loader(layer.weight, w, sid)
        layer.bias.weight_loader(layer.bias, w[:, 0], sid)
    shards = layer.quant_method.shards[::2]
    assert [(s.part, s.shard_id, s.output_offset, s.start, s.size, s.full_size) for s in shards] == [
        (0, "q", 0, 0, 8, 8),
        (1, "k", 8, 0, 4, 4),
        (2, "v", 12, 0, 4, 4),
    ]
    x = torch.randn(3, 8)
    full = torch.cat([q, k, v])
    torch.testing.assert_close(layer(x), x @ full.T + full[:, 0])


def test_merged_row_and_unquantized_fallback():
    cfg = Config()
    merged = MergedColumnParallelLinear(8, [6, 6], quant_config=cfg, prefix="m")
    gate, up = torch.randn(6, 8), torch.randn(6, 8)
    merged.weight.weight_loader(merged.weight, gate, 0)
    merged.weight.weight_loader(merged.weight, up, 1)
    x = torch.randn(2, 8)
    expected = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    torch.testing.assert_close(merged.forward_silu_and_mul(x), expected)  # default: apply, then SiLU-and-mul
    row = RowParallelLinear(8, 4, quant_config=cfg, prefix="o.skip")
    assert type(row.quant_method) is UnquantizedLinearMethod and row.weight.shape == (4, 8)
    w = torch.randn(4, 8)
    row.weight.weight_loader(row.weight, w)
    torch.testing.assert_close(row(x), x @ w.T)


def test_embedding_head_tie_shares_method_and_storage():
    cfg = Config()
    emb = VocabParallelEmbedding(10, 4, prefix="model.embed_tokens")
    head = ParallelLMHead(10, 4, quant_config=cfg, prefix="lm_head")
    head.tie_weights(emb)
    assert head.weight is emb.weight and head.quant_method is emb.quant_method
    table = torch.randn(10, 4)
    emb.weight.weight_loader(emb.weight, table)
    h = torch.randn(2, 4)
    torch.testing.assert_close(head.compute_logits(h), h @ table.T)
    assert model_weight_bytes(torch.nn.ModuleList([emb, head])) == 10 * 4 * 4


def test_checkpoint_names_and_bytes():
    cfg = Config()
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert cfg.checkpoint_names("model.layers.3.self_attn.qkv_proj") == [
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.self_attn.k_proj",
        "model.layers.3.self_attn.v_proj",
    ]
    assert cfg.checkpoint_names("lm_head") == ["lm_head"]
    assert unquantized_bytes((49153, 64), torch.bfloat16, tp_size=2, split_dim=0) == 24577 * 64 * 2
    assert cfg.weight_bytes("x", (8, 6), torch.float32, tp_size=3, split_dim=1) == 8 * 2 * 4
    cfg.verify_device(torch.device("cpu"))  # no capability needed off CUDA
