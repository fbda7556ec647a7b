"""GGUF weights kept in their blocks from file to kernel (vLLM's ``GGUFConfig``/``GGUFLinearMethod`` idea,
with kernels of our own in ``kernels/gguf_gemv.py`` and ``kernels/gguf_dequant.py``).

A layer's weight is one flat uint8 parameter holding this rank's rows of blocks as in the file (with
``GGUFConfig.pack_rows``, Q4_K/Q6_K/Q8_0 rows are reordered in place after loading into the packed layout
of ``gguf_blocks.row_layout``: same bytes and row length, so sharding and byte counts are unchanged).
A fused layer whose parts have different types (Q4_K_M: ``attn_q``/``attn_k`` Q4_K, ``attn_v`` Q6_K) keeps
one group of rows per run of equal types and runs one kernel per group into column slices of the output;
gate and up of the same type stay one group, so SwiGLU is fused into the decode GEMV. The embedding table
gathers and dequantizes the looked-up rows; the LM head (often Q6_K) is a GGUF linear.

On CUDA the Triton kernels run; on the CPU (``--quantization gguf``) each call dequantizes the layer with
the ``gguf`` package's formulas (:func:`~.gguf_blocks.dequantize_blocks`) and uses ``F.linear``: small
memory, slower steps. Without ``--quantization`` a
GGUF file on the CPU is dequantized at load instead (``loader/weights.py``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.model_executor.layers.activation import SiluAndMul
from shardserve.model_executor.layers.quantization.base import (
    LinearMethod,
    ModelWeightBytes,
    QuantizationConfig,
    WeightShard,
    check_full_dim,
    copy_checked,
    load_unquantized,
)
from shardserve.model_executor.layers.quantization.gguf_blocks import (
    DEQUANT_MIN_ROWS,
    FLOAT_TYPES,
    block_type,
    dequantize_blocks,
    gguf_tensor_bytes,
    pack_rows,
    type_name,
    unpack_rows,
)

logger = logging.getLogger(__name__)

__all__ = ["GGUFConfig", "GGUFLinearMethod", "gguf_tensor_bytes", "gguf_weight_bytes"]


class GGUFConfig(QuantizationConfig):
    """The tensor types of one GGUF file, by Hugging Face name.

    Args:
        tensor_types: ``{"model.layers.0.self_attn.q_proj.weight": ggml_type, ...}``.
        dequant_min_rows: matmuls over at least this many rows dequantize the weight to a scratch buffer
            and use cuBLAS (see ``kernels/gguf_gemv.py``); fewer use the fused kernels.
        kernels_on_cpu: run the Triton kernels for CPU tensors too (under ``TRITON_INTERPRET=1``: tests).
    """

    name = "gguf"
    pack_rows = False
    """Reorder the rows that the Triton kernels read into the packed layout after loading
    (:meth:`GGUFLinearMethod.process_weights_after_loading`). Off: on an H200 the Llama-3.1-8B Q4_K_M
    decodes at 296 tok/s with rows in file order and 276 packed (``benchmarks/bench_quant.py
    --gguf-row-layout packed,file``, one run; ``benchmarks/RESULTS.md``). Packing removes most of the
    cache lines a warp's loads touch, but Nsight Compute puts the int8 GEMV's stalls in the latency of its
    loads at 36-43% occupancy, not in L1 throughput, and packed x costs a mixed q/k/v projection a second
    activation quantization."""

    def __init__(self, tensor_types: dict[str, int], dequant_min_rows: int | None = None, kernels_on_cpu=False):
        super().__init__()
        self.tensor_types = dict(tensor_types)
        self.dequant_min_rows = DEQUANT_MIN_ROWS if dequant_min_rows is None else dequant_min_rows
        self.kernels_on_cpu = kernels_on_cpu

    @classmethod
    def from_reader(cls, reader: Any, **kwargs: Any) -> GGUFConfig:
        """From an open ``gguf.GGUFReader``; logs one warning naming the matrix types without a kernel
        (IQ*, TQ*, ...), which are dequantized at load to the model dtype."""
        from shardserve.model_executor.loader.weights import gguf_to_hf_name

        types: dict[str, int] = {}
        missing: Counter[str] = Counter()
        for tensor in reader.tensors:
            hf = gguf_to_hf_name(tensor.name)
            if hf is None:
                continue
            types[hf] = int(tensor.tensor_type)
            name = tensor.tensor_type.name
            if len(tensor.shape) == 2 and name not in FLOAT_TYPES and block_type(name) is None:
                missing[name] += 1
        if missing:
            logger.warning(
                "GGUF tensor types without a kernel, dequantized at load to the model dtype: %s",
                ", ".join(f"{t} ({n} tensors)" for t, n in sorted(missing.items())),
            )
        return cls(types, **kwargs)

    def layer_types(self, prefix: str) -> list[int] | None:
        """The ggml types of the checkpoint tensors behind layer ``prefix`` (None if one is missing)."""
        names = [f"{n}.weight" for n in self.checkpoint_names(prefix)]
        if names == ["lm_head.weight"] and names[0] not in self.tensor_types:
            names = ["model.embed_tokens.weight"]  # tied: the head reads the embedding table
        types = [self.tensor_types.get(n) for n in names]
        return None if any(t is None for t in types) else types  # type: ignore[misc]

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """A :class:`GGUFLinearMethod` when every part of the layer is a block type with a kernel."""
        types = self.layer_types(prefix)
        if types is None or any(block_type(t) is None for t in types):
            return None
        return GGUFLinearMethod(self, types, prefix)

    def weight_bytes(
        self,
        name: str,
        shape: tuple[int, ...],
        params_dtype: torch.dtype,
        tp_size: int = 1,
        split_dim: int | None = None,
    ) -> int:
        qtype = self.tensor_types.get(name)
        if qtype is None:
            return super().weight_bytes(name, shape, params_dtype, tp_size, split_dim)
        return gguf_tensor_bytes(qtype, shape, tp_size, split_dim, params_dtype)


@dataclass
class _Group:
    """Consecutive parts of one type: rows ``[out_offset, out_offset + rows)`` of the layer's output."""

    qtype: int
    byte_offset: int
    rows: int
    row_bytes: int
    out_offset: int


class GGUFLinearMethod(LinearMethod):
    """A linear layer, embedding table or LM head whose weight stays in GGUF blocks.

    ``layer.weight`` is ``(total_bytes,)`` uint8: per group, ``rows x (input_size_per_partition /
    block_size * type_size)`` bytes, as in the file.

    Args:
        config: the file's :class:`GGUFConfig`.
        part_types: ggml type of each output part (q, k, v; gate, up; or one).
        prefix: the layer's name, for messages.
    """

    def __init__(self, config: GGUFConfig, part_types: list[int], prefix: str = ""):
        self.config = config
        self.part_types = list(part_types)
        self.prefix = prefix
        self.groups: list[_Group] = []
        self.part_loc: list[tuple[int, int]] = []
        self.in_features = 0
        self.out_features = 0
        self.params_dtype = torch.float32
        self.dequant_min_rows: int | None = None
        """None: the config's; the LM head never dequantizes to a scratch buffer (its rows are sequences,
        and a 70B Q6_K head would need 2 GB)."""
        self._views: list[tuple[torch.Tensor, int, int, int]] | None = None
        self.packed = False
        """The weight's rows are in the packed layout (:meth:`process_weights_after_loading`)."""

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        """Raises:
        ValueError: the number of parts does not match, or this rank's input features are not whole blocks
            (the TP size cuts a block)."""
        if len(self.part_types) != len(output_partition_sizes):
            raise ValueError(
                f"{self.prefix}: {len(self.part_types)} GGUF tensor types for {len(output_partition_sizes)} parts"
            )
        from shardserve.model_executor.layers.embed_head import VocabParallelEmbedding

        self.in_features, self.out_features = input_size_per_partition, sum(output_partition_sizes)
        self.params_dtype = params_dtype
        if isinstance(layer, VocabParallelEmbedding):
            self.dequant_min_rows = 1 << 62
        offset = out = 0
        for qtype, rows in zip(self.part_types, output_partition_sizes):
            t = block_type(qtype)
            if input_size_per_partition % t.block_size:
                raise ValueError(
                    f"{self.prefix}: this rank's {input_size_per_partition} input features (of {input_size}) are "
                    f"not whole {t.name} blocks of {t.block_size}; choose a --tensor-parallel-size that splits "
                    f"{input_size} into multiples of {t.block_size}"
                )
            row_bytes = input_size_per_partition // t.block_size * t.type_size
            if self.groups and self.groups[-1].qtype == qtype:
                group = self.groups[-1]
                self.part_loc.append((len(self.groups) - 1, group.rows))
                group.rows += rows
            else:
                self.part_loc.append((len(self.groups), 0))
                self.groups.append(_Group(qtype, offset, rows, row_bytes, out))
            offset += rows * row_bytes
            out += rows
        weight = torch.empty(offset, dtype=torch.uint8)
        layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))

    def _group_views(self, layer: nn.Module) -> list[tuple[torch.Tensor, int, int, int]]:
        """``(blocks (rows, row_bytes), qtype, out_offset, rows)`` per group, views of ``layer.weight``."""
        flat = layer.weight.data
        return [
            (flat[g.byte_offset : g.byte_offset + g.rows * g.row_bytes].view(g.rows, g.row_bytes), *_meta(g))
            for g in self.groups
        ]

    def load_weight(self, layer: nn.Module, param: nn.Parameter, loaded_weight: Any, shard: WeightShard) -> None:
        """Copy the raw blocks of this rank's rows (or block-aligned columns) into their group.

        Raises:
            ValueError: the source is not a GGUF tensor of the expected type, or its slice does not fit.
        """
        if param is not layer.weight:
            load_unquantized(param, loaded_weight, shard)  # biases: plain tensors
            return
        if self.packed:
            raise ValueError(f"{self.prefix}: its rows were packed after loading; load the model again instead")
        group_index, row0 = self.part_loc[shard.part or 0]
        group = self.groups[group_index]
        if not hasattr(loaded_weight, "load_blocks"):
            raise ValueError(f"{self.prefix} keeps GGUF blocks and loads from a GGUF tensor, got {type(loaded_weight)}")
        if int(loaded_weight.tensor_type) != group.qtype:
            raise ValueError(
                f"{self.prefix}: GGUF tensor of type {type_name(int(loaded_weight.tensor_type))}, "
                f"expected {type_name(group.qtype)}"
            )
        if shard.dim is not None and shard.full_size is not None:
            check_full_dim(loaded_weight, shard.dim, shard.full_size)
        if shard.dim != 1 and loaded_weight.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.prefix}: GGUF tensor of shape {loaded_weight.shape}, expected rows of {self.in_features}"
            )
        raw = loaded_weight.load_blocks(shard.dim, shard.start, shard.size)
        view = self._group_views(layer)[group_index][0]
        copy_checked(view[row0 : row0 + raw.shape[0]], raw)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """With ``GGUFConfig.pack_rows``, where the Triton kernels will read the weight (CUDA, or
        ``kernels_on_cpu``), put each group's rows in the packed layout of ``gguf_blocks.row_layout`` (the
        same bytes, reordered within each row so that a warp of the int8 decode GEMV reads consecutive
        bytes); every kernel then reads that layout. The CPU formulas keep file order."""
        views = self._group_views(layer)
        if not self.packed and self.config.pack_rows and self._on_kernels(layer.weight):
            for blocks, qtype, _, _ in views:
                packed = pack_rows(blocks, qtype)
                if packed is not blocks:
                    blocks.copy_(packed)
                    del packed
            self.packed = True
        self._views = views

    # -- compute ------------------------------------------------------------------------------------
    def _views_of(self, layer: nn.Module) -> list:
        """The layer's groups (:meth:`_group_views`), kept from :meth:`process_weights_after_loading`."""
        return self._views if self._views is not None else self._group_views(layer)

    def _on_kernels(self, t: torch.Tensor) -> bool:
        """Whether the Triton kernels compute on ``t``'s device (CUDA, or ``kernels_on_cpu``)."""
        return t.is_cuda or self.config.kernels_on_cpu

    def _matmul(
        self,
        x: torch.Tensor,
        blocks: torch.Tensor,
        qtype: int,
        silu: bool = False,
        out: torch.Tensor | None = None,
        quantized: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        if self._on_kernels(x):
            from shardserve.model_executor.kernels.gguf_gemv import gguf_linear

            rows = self.config.dequant_min_rows if self.dequant_min_rows is None else self.dequant_min_rows
            return gguf_linear(x, blocks, qtype, silu, out, rows, packed=self.packed, quantized=quantized)
        y = F.linear(x, dequantize_blocks(unpack_rows(blocks, qtype) if self.packed else blocks, qtype, x.dtype))
        if silu:
            y = SiluAndMul()(y)
        if out is None:
            return y
        out.copy_(y)
        return out

    def apply(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        x_int8: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """``(num_tokens, in)`` -> ``(num_tokens, out)``: one kernel per group of equal types. ``x_int8``:
        ``x`` rounded to int8 in the layout :meth:`int8_input_unit` named (for the first group)."""
        views = self._views_of(layer)
        if len(views) == 1:
            y = self._matmul(x, views[0][0], views[0][1], quantized=x_int8)
        else:
            y = torch.empty((x.shape[0], self.out_features), dtype=x.dtype, device=x.device)
            given = {} if x_int8 is None else {self._x_unit(x, views[0][0], views[0][1]): x_int8}
            shared = self._shared_int8_inputs(x, views, given)
            for i, (blocks, qtype, offset, rows) in enumerate(views):
                if shared is not None:  # every group takes the int8 GEMV (gguf_linear's routing)
                    part = shared[self._x_unit(x, blocks, qtype)]
                else:
                    part = x_int8 if i == 0 else None
                self._matmul(x, blocks, qtype, out=y[:, offset : offset + rows], quantized=part)
        return y if bias is None else y + bias

    def int8_input_unit(self, layer: nn.Module, x: torch.Tensor) -> int | None:
        """The x layout of the first group's int8 decode GEMV when ``x`` goes to one (``gguf_linear``'s rule:
        Q4_K/Q6_K/Q8_0, bf16/fp16, at most ``DP4A_MAX_ROWS`` rows), else None."""
        if not self._on_kernels(x) or x.dim() != 2:
            return None
        from shardserve.model_executor.kernels.gguf_dp4a import DP4A_MAX_ROWS, supports

        views = self._views_of(layer)
        blocks, qtype = views[0][0], views[0][1]
        if x.shape[0] > DP4A_MAX_ROWS or not supports(x, blocks, qtype):
            return None
        return self._x_unit(x, blocks, qtype)

    def _x_unit(self, x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> int:
        from shardserve.model_executor.kernels.gguf_dp4a import _BLOCK_SIZE, x_unit

        return x_unit(qtype, x.shape[1] // _BLOCK_SIZE[qtype], self.packed)

    def _shared_int8_inputs(
        self, x: torch.Tensor, views: list, given: dict[int, tuple[torch.Tensor, ...]]
    ) -> dict[int, tuple[torch.Tensor, ...]] | None:
        """When every group takes the int8 decode GEMV (a q/k Q4_K + v Q6_K projection): ``x`` rounded to
        int8 once per x layout they read (``gguf_dp4a.x_unit``: one for all in file order, one per type over
        packed rows), by unit, taking those ``given``; else None (each group's kernel prepares its own input)."""
        if not self._on_kernels(x):
            return None
        from shardserve.model_executor.kernels.gguf_dp4a import quantize_activations, supports

        if not all(supports(x, blocks, qtype) for blocks, qtype, _, _ in views):
            return None
        units = {self._x_unit(x, blocks, qtype) for blocks, qtype, _, _ in views}
        return {unit: given[unit] if unit in given else quantize_activations(x, unit) for unit in sorted(units)}

    def apply_silu_and_mul(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        x_int8: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        views = self._views_of(layer)
        if bias is None and len(views) == 1:  # gate and up of one type: SwiGLU fused into the kernel
            return self._matmul(x, views[0][0], views[0][1], silu=True, quantized=x_int8)
        return SiluAndMul()(self.apply(layer, x, bias, x_int8=x_int8))

    def embedding(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Gather rows ``input_ids`` and dequantize them: ``(T,)`` -> ``(T, embedding_dim)`` in the model dtype."""
        views = self._views_of(layer)
        blocks, qtype = views[0][0], views[0][1]
        if self._on_kernels(input_ids):
            from shardserve.model_executor.kernels.gguf_dequant import embedding

            return embedding(blocks, qtype, self.in_features, input_ids, self.params_dtype, packed=self.packed)
        rows = blocks.index_select(0, input_ids)
        return dequantize_blocks(unpack_rows(rows, qtype) if self.packed else rows, qtype, self.params_dtype)


def _meta(g: _Group) -> tuple[int, int, int]:
    return g.qtype, g.out_offset, g.rows


def gguf_weight_bytes(
    reader: Any,
    num_kv_heads: int,
    tp_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    keep_quantized: bool = True,
) -> ModelWeightBytes:
    """Bytes one TP rank holds of each part of a GGUF model, as :func:`gguf_tensor_bytes` counts them.

    Column-parallel tensors (q/k/v, gate/up, embedding, LM head) split rows, row-parallel ones (o, down)
    split columns; with ``tp_size > num_kv_heads`` each rank holds one KV head. With
    ``keep_quantized=False`` (the CPU default) every tensor counts as dequantized to ``dtype``, and so does
    every part of a fused layer (q/k/v, gate/up: ``LlamaForCausalLM.packed_modules_mapping``) of which a
    part has no kernel (:meth:`GGUFConfig.get_quant_method` dequantizes the whole layer at load: an IQ4_XS
    file's Q5_K ``attn_v`` is held in ``dtype`` beside its IQ4_XS ``attn_q``).
    Without ``output.weight`` (tied embeddings) ``lm_head`` is the embedding table's size. ``scratch`` is
    the largest layer weight of one rank in ``dtype``: a prefill of at least ``GGUFConfig.dequant_min_rows``
    tokens dequantizes each layer into such a buffer before its cuBLAS matmul (transient, one at a time).

    Raises:
        ValueError: a TP size that cuts a block of a row-parallel tensor.
    """
    import re

    from shardserve.model_executor.loader.weights import gguf_to_hf_name
    from shardserve.model_executor.models.llama import LlamaForCausalLM

    layer_re = re.compile(r"^model\.layers\.(\d+)\.")
    packed = LlamaForCausalLM.packed_modules_mapping
    part_of = {f".{p}.": f".{fused}." for fused, parts in packed.items() for p in parts}

    def fused_layer(hf_name: str) -> str | None:
        return next((hf_name.replace(p, f) for p, f in part_of.items() if p in hf_name), None)

    named = [(gguf_to_hf_name(t.name), t) for t in reader.tensors]
    dequantized = {fused_layer(name) for name, t in named if name is not None and len(t.shape) == 2
                   and t.tensor_type.name not in FLOAT_TYPES and block_type(int(t.tensor_type)) is None}  # fmt: skip
    dequantized.discard(None)
    layers: dict[int, int] = {}
    embed = norm = scratch = 0
    head: int | None = None
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, tensor in named:
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        kept = keep_quantized and fused_layer(name) not in dequantized
        qtype = int(tensor.tensor_type) if kept else 0  # 0 = F32: plain bytes in dtype
        split, tp = None, tp_size
        if any(p in name for p in (".q_proj.", ".gate_proj.", ".up_proj.", "embed_tokens", "lm_head")):
            split = 0
        elif ".k_proj." in name or ".v_proj." in name:
            split, tp = 0, min(tp_size, num_kv_heads)
        elif (".o_proj." in name or ".down_proj." in name) and len(shape) == 2:
            split = 1
        nbytes = gguf_tensor_bytes(qtype, shape, tp, split, dtype)
        m = layer_re.match(name)
        if m is not None:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + nbytes
            if len(shape) == 2 and block_type(qtype) is not None:  # a prefill dequantizes it to a scratch buffer
                rows = -(-shape[0] // tp) if split == 0 else shape[0]
                cols = shape[1] // tp if split == 1 else shape[1]
                fused = 2 if ".gate_proj." in name or ".up_proj." in name else 1  # gate_up is one matrix
                scratch = max(scratch, fused * rows * cols * itemsize)
        elif "embed_tokens" in name:
            embed = nbytes
        elif name == "lm_head.weight":
            head = nbytes
        else:
            norm += nbytes
    return ModelWeightBytes(
        [layers[i] for i in sorted(layers)],
        embed,
        embed if head is None else head,
        norm,
        tied=head is None,
        scratch=scratch,
    )
