"""check_parallel_layout agrees with what the layers and the loader accept."""

from __future__ import annotations

import types

import pytest
import torch

from shardserve.config import ModelArchConfig, check_parallel_layout, tensor_parallel_sizes
from shardserve.distributed import parallel_state as ps
from shardserve.model_executor.models.llama import LlamaForCausalLM

ARCHS = {
    "smollm2": ModelArchConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, tie_word_embeddings=True),
    "gqa8": ModelArchConfig("llama", 1000, 256, 768, 4, 8, 2, 32),
    "mha6": ModelArchConfig("qwen2", 999, 192, 320, 3, 6, 6, 32, attention_bias=True),
}


def builds_with_tp(arch: ModelArchConfig, tp: int) -> bool:
    """Whether the real model class accepts ``tp``: built on the meta device with a stand-in TP group."""
    group = types.SimpleNamespace(world_size=tp, rank_in_group=tp - 1, rank=tp - 1, ranks=list(range(tp)))
    ps._STATE = ps._State(world=group, tp=group, pp=group)
    try:
        with torch.device("meta"):
            LlamaForCausalLM(arch, (0, arch.num_hidden_layers))
        return True
    except ValueError:
        return False
    finally:
        ps._STATE = None


@pytest.mark.parametrize("name", list(ARCHS))
def test_tp_rule_matches_the_layers(name):
    arch = ARCHS[name]
    for tp in range(1, 2 * arch.num_attention_heads + 1):
        assert (tp in tensor_parallel_sizes(arch)) == builds_with_tp(arch, tp), tp


def test_messages_name_the_sizes_that_work():
    smol = ARCHS["smollm2"]
    assert tensor_parallel_sizes(smol) == [1, 3]  # 9 divides the heads but not the MLP width 1536
    with pytest.raises(ValueError) as err:
        check_parallel_layout(smol, 2, 1, model="SmolLM2")
    msg = str(err.value)
    assert "9 attention heads" in msg and "work: 1, 3 " in msg and "1, 3, 9" in msg and "1536" in msg
    with pytest.raises(ValueError, match=r"31 pipeline stages exceed the model's 30 layers.*1\.\.30"):
        check_parallel_layout(smol, 1, 31)
    with pytest.raises(ValueError, match="summing to the model's 30 layers"):
        check_parallel_layout(smol, 1, 2, [10, 10])
    check_parallel_layout(smol, 3, 30)
    check_parallel_layout(smol, 1, 2, [0, 30])  # the loader accepts an empty stage
