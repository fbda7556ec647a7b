"""Llama-family decoder (llama, mistral, qwen2, qwen3) with tensor and pipeline parallelism.

One implementation driven by :class:`~shardserve.config.ModelArchConfig`: qwen2 adds a bias to the q/k/v
projections, qwen3 applies RMSNorm to each q and k head before RoPE. Parameter names match Hugging Face
(``model.layers.N.self_attn.qkv_proj`` fuses ``q_proj``/``k_proj``/``v_proj``, ``mlp.gate_up_proj`` fuses
``gate_proj``/``up_proj``). A pipeline stage builds only its own decoder layers; the embedding lives on the
first stage and the final norm + LM head on the last.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shardserve.config import ModelArchConfig
from shardserve.distributed.parallel_state import get_tp_group
from shardserve.model_executor.layers.attention import Attention, AttentionMetadata
from shardserve.model_executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shardserve.model_executor.layers.layernorm import RMSNorm
from shardserve.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    copy_checked,
    load_slice,
)
from shardserve.model_executor.layers.quantization.base import QuantizationConfig
from shardserve.model_executor.layers.rotary_embedding import RotaryEmbedding

logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Per-tensor FP8 KV-cache scales: compressed-tensors' ``self_attn.k_scale``, AutoFP8's ``k_proj.output_scale``.
_KV_SCALE_RE = re.compile(r"^(model\.layers\.\d+\.self_attn)\.(?:([kv])_scale|([kv])_proj\.output_scale)$")

# Checkpoint name fragment -> (fused parameter fragment, shard id).
_STACKED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


@dataclass
class IntermediateTensors:
    """What one pipeline stage hands to the next."""

    hidden_states: torch.Tensor
    """``(num_tokens, hidden_size)``: output of the stage's last decoder layer (before its residual add)."""
    residual: torch.Tensor
    """``(num_tokens, hidden_size)``: the residual stream to add in the next layer's input norm."""


class LlamaAttention(nn.Module):
    """Self-attention of one decoder layer over this rank's heads."""

    def __init__(
        self,
        config: ModelArchConfig,
        rotary: RotaryEmbedding,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim,
            config.hidden_size,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim**-0.5, rotary_emb=rotary
        )

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        meta: AttentionMetadata,
        x_int8: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """``(num_tokens, hidden_size)`` -> ``(num_tokens, hidden_size)`` (all-reduced in ``o_proj``); ``x_int8``
        as ``ColumnParallelLinear.forward`` takes it."""
        n = x.shape[0]
        q, k, v = self.qkv_proj(x, x_int8).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim))
        # RoPE inside, fused with the KV-cache write on the GPU; where o_proj takes the int8 GEMV, the decode
        # attention's merge also rounds its output to int8 for it
        if self.o_proj.int8_input_unit(q.reshape(n, self.q_size)) == 0:
            out, out_int8 = self.attn.forward_int8(q, k, v, meta, positions)
            return self.o_proj(out, out_int8)
        return self.o_proj(self.attn(q, k, v, meta, positions))


class LlamaMLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``, gate and up fused and column-split, down row-split."""

    def __init__(self, config: ModelArchConfig, quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], quant_config=quant_config, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            size, config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.down_proj"
        )

    def forward(self, x: torch.Tensor, x_int8: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``(num_tokens, hidden_size)`` -> ``(num_tokens, hidden_size)`` (all-reduced in ``down_proj``)."""
        # silu(gate) * up; at decode batches gate, up and SiLU run as one kernel
        return self.down_proj(self.gate_up_proj.forward_silu_and_mul(x, x_int8))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer; the residual add is fused into the next norm (vLLM's layout)."""

    def __init__(
        self,
        config: ModelArchConfig,
        rotary: RotaryEmbedding,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp_output, residual)``, both ``(num_tokens, hidden_size)``; their sum is the layer output.

        Where ``qkv_proj`` or ``gate_up_proj`` would round its input to int8 first (GGUF int8 decode GEMVs:
        ``int8_input_unit``), the norm before it does that rounding in its own kernel."""
        unit = self.self_attn.qkv_proj.int8_input_unit(x)
        x_int8 = None
        if unit is not None:
            h, residual_sum, x_int8 = self.input_layernorm.forward_int8(x, residual, unit)
            residual = x if residual is None else residual_sum  # the first layer's residual is its input
            x = h
        elif residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta, x_int8)
        unit = self.mlp.gate_up_proj.int8_input_unit(x)
        if unit is not None:
            x, residual, x_int8 = self.post_attention_layernorm.forward_int8(x, residual, unit)
        else:
            x, residual, x_int8 = (*self.post_attention_layernorm(x, residual), None)
        return self.mlp(x, x_int8), residual


class LlamaModel(nn.Module):
    """Embedding (first stage), decoder layers ``[start, end)``, final norm (last stage)."""

    def __init__(
        self, config: ModelArchConfig, layer_range: tuple[int, int], quant_config: QuantizationConfig | None = None
    ):
        super().__init__()
        start, end = layer_range
        self.start_layer, self.end_layer = start, end
        self.embed_tokens = None
        if start == 0:
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, quant_config=quant_config, prefix="model.embed_tokens"
            )
        rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        # Keys are global layer indices so parameter names match the checkpoint on every stage.
        self.layers = nn.ModuleDict(
            {
                str(i): LlamaDecoderLayer(config, rotary, quant_config, prefix=f"model.layers.{i}")
                for i in range(start, end)
            }
        )
        last = end == config.num_hidden_layers
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if last else None

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        intermediate: IntermediateTensors | None,
    ) -> torch.Tensor | IntermediateTensors:
        if self.embed_tokens is not None:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            x, residual = self.embed_tokens(input_ids), None
        else:
            if intermediate is None:
                raise ValueError("a pipeline stage after the first needs the previous stage's IntermediateTensors")
            x, residual = intermediate.hidden_states, intermediate.residual
        for layer in self.layers.values():
            x, residual = layer(positions, x, residual, meta)
        if self.norm is None:
            return IntermediateTensors(x, torch.zeros_like(x) if residual is None else residual)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """This rank's share of a Llama-family causal LM (see module docstring).

    ``quant_config`` (see :mod:`shardserve.model_executor.layers.quantization`) picks each layer's weight
    storage; None keeps every weight in the model dtype.
    """

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    """Fused layers and the checkpoint modules behind them (vLLM's attribute of the same name)."""

    def __init__(
        self,
        config: ModelArchConfig,
        layer_range: tuple[int, int] | None = None,
        quant_config: QuantizationConfig | None = None,
    ):
        super().__init__()
        layer_range = layer_range or (0, config.num_hidden_layers)
        start, end = layer_range
        if not 0 <= start <= end <= config.num_hidden_layers:
            raise ValueError(f"layer_range {layer_range} is outside [0, {config.num_hidden_layers}]")
        self.config = config
        self.layer_range = (start, end)
        self.tp_size = get_tp_group().world_size
        self.is_first_stage = start == 0
        self.is_last_stage = end == config.num_hidden_layers
        self.quant_config = quant_config
        self.model = LlamaModel(config, self.layer_range, quant_config)
        self.lm_head = None
        if self.is_last_stage:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, quant_config=quant_config, prefix="lm_head"
            )
            if config.tie_word_embeddings and self.model.embed_tokens is not None:
                self.lm_head.tie_weights(self.model.embed_tokens)

    @property
    def attention_layers(self) -> list[Attention]:
        """This stage's attention modules in layer order (the model runner binds ``kv_cache`` on each)."""
        return [layer.self_attn.attn for layer in self.model.layers.values()]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """Run this stage's layers.

        Args:
            input_ids: ``(num_tokens,)`` int64 (first stage only).
            positions: ``(num_tokens,)`` int64 absolute positions.
            meta: attention metadata of the step.
            intermediate: the previous stage's output (every stage but the first).

        Returns:
            ``(num_tokens, hidden_size)`` after the final norm on the last stage, else
            :class:`IntermediateTensors`.

        Raises:
            ValueError: the stage's required input is missing.
        """
        return self.model(input_ids, positions, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(num_seqs, hidden_size)`` -> ``(num_seqs, vocab_size)`` fp32, full vocabulary on every TP rank.

        Raises:
            RuntimeError: called on a stage that is not the last.
        """
        if self.lm_head is None:
            raise RuntimeError("compute_logits runs on the last pipeline stage only")
        return self.lm_head.compute_logits(hidden)

    # -- weights -------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Load Hugging Face-named checkpoint tensors (full tensors or lazy ``WeightSource``s).

        Names of layers this stage does not own are skipped without being read. With tied embeddings
        ``model.embed_tokens.weight`` also fills the LM head (on the last stage) and ``lm_head.weight``
        is ignored.

        Raises:
            ValueError: a tensor does not fit its parameter, or a parameter of this stage is left unloaded.
        """
        params = dict(self.named_parameters())
        expected = self._expected_shards(params)
        loaded: set[tuple[str, Any]] = set()
        for name, source in weights:
            for param_name, shard_id in self.weight_targets(name):
                if param_name.endswith(("attn.k_scale", "attn.v_scale")):
                    self._load_kv_scale(param_name, source)
                    continue
                if param_name not in params:
                    logger.debug("skipping checkpoint tensor %s (no parameter %s)", name, param_name)
                    continue
                param = params[param_name]
                loader = getattr(param, "weight_loader", _default_weight_loader)
                try:
                    loader(param, source, shard_id) if shard_id is not None else loader(param, source)
                except ValueError as e:
                    raise ValueError(f"cannot load checkpoint tensor {name} into {param_name}: {e}") from None
                loaded.add((param_name, shard_id))
        missing = sorted(f"{p}[{s}]" if s is not None else p for p, s in expected - loaded)
        if missing:
            raise ValueError(
                f"checkpoint leaves {len(missing)} parameter(s) of layers {self.layer_range} unloaded: "
                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
            )
        self.process_weights_after_loading()

    def process_weights_after_loading(self) -> None:
        """Let each layer's quant method repack its loaded weights (once per method: tied layers share one)."""
        done: set[int] = set()
        for module in self.modules():
            method = getattr(module, "quant_method", None)
            if method is not None and id(method) not in done:
                done.add(id(method))
                method.process_weights_after_loading(module)

    def weight_targets(self, name: str) -> list[tuple[str, Any]]:
        """``(parameter name, shard id)`` pairs a checkpoint tensor loads into (empty to skip it)."""
        m = _LAYER_RE.match(name)
        if m is not None and not self.layer_range[0] <= int(m.group(1)) < self.layer_range[1]:
            return []
        if "rotary_emb.inv_freq" in name:
            return []
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return []
        if name == "model.embed_tokens.weight":
            targets = [(name, None)] if self.model.embed_tokens is not None else []
            tied_elsewhere = self.config.tie_word_embeddings and self.lm_head is not None
            if tied_elsewhere and self.model.embed_tokens is None:
                targets.append(("lm_head.weight", None))
            return targets
        kv_scale = _KV_SCALE_RE.match(name)
        if kv_scale is not None:
            return [(f"{kv_scale.group(1)}.attn.{kv_scale.group(2) or kv_scale.group(3)}_scale", None)]
        for ckpt, fused, shard_id in _STACKED:
            if ckpt in name:
                return [(name.replace(ckpt, fused), shard_id)]
        return [(name, None)]

    def _load_kv_scale(self, target: str, source: Any) -> None:
        """Set an attention layer's FP8 KV-cache scale (a float, used only with ``--kv-cache-dtype fp8``).

        Raises:
            ValueError: the scale is not positive and finite.
        """
        module, attr = target.rsplit(".", 1)
        value = float(load_slice(source).float().max())  # per-tensor; several entries (split q/k/v): the largest
        if not 0.0 < value < float("inf"):
            raise ValueError(f"KV-cache scale {target} must be positive and finite, got {value}")
        setattr(self.get_submodule(module), attr, value)

    @staticmethod
    def _expected_shards(params: dict[str, nn.Parameter]) -> set[tuple[str, Any]]:
        expected: set[tuple[str, Any]] = set()
        for name in params:
            if ".qkv_proj." in name:
                expected.update((name, s) for s in ("q", "k", "v"))
            elif ".gate_up_proj." in name:
                expected.update((name, s) for s in (0, 1))
            else:
                expected.add((name, None))
        return expected


def _default_weight_loader(param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
    """Copy a replicated parameter (norm weights) whole."""
    copy_checked(param.data, load_slice(loaded_weight))
