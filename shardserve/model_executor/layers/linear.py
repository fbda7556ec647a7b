"""Tensor-parallel linear layers (Megatron-LM, Shoeybi et al. 2019) that load their own shard.

``ColumnParallelLinear`` splits the output features over the TP ranks, ``RowParallelLinear`` the input
features, followed by an all-reduce in ``forward``. Each parameter carries a
``weight_loader(param, loaded_weight, shard_id=None)`` that takes the FULL checkpoint tensor (or a lazy
:class:`~shardserve.model_executor.loader.weights.WeightSource`, which then reads only this rank's slice),
works out this rank's slice as a :class:`~.quantization.base.WeightShard` and lets the layer's quant method
copy it into its storage (plain tensors, GGUF blocks, FP8 and scales: :mod:`.quantization`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_tp_group
from shardserve.model_executor.layers.quantization.base import (
    LinearMethod,
    QuantizationConfig,
    UnquantizedLinearMethod,
    WeightShard,
    check_full_dim,
    copy_checked,
    linear,
    load_slice,
    use_gemv,
)

__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "RowParallelLinear",
    "check_full_dim",
    "copy_checked",
    "divide",
    "linear",
    "load_slice",
    "source_shape",
    "use_gemv",
]


def source_shape(source: Any) -> tuple[int, ...]:
    """Shape of a tensor or of a lazy weight source."""
    return tuple(source.shape)


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact integer division, with an actionable error.

    Raises:
        ValueError: ``numerator`` is not divisible by ``denominator``.
    """
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by the tensor parallel size ({denominator}); "
            "choose a --tensor-parallel-size that divides it"
        )
    return numerator // denominator


def get_quant_method(layer: nn.Module, quant_config: QuantizationConfig | None, prefix: str) -> LinearMethod:
    """The config's method for ``layer``, or :class:`UnquantizedLinearMethod` when there is none."""
    method = quant_config.get_quant_method(layer, prefix) if quant_config is not None else None
    return method if method is not None else UnquantizedLinearMethod()


def create_weights(
    layer: nn.Module,
    input_size_per_partition: int,
    output_partition_sizes: list[int],
    input_size: int,
    output_size: int,
    loader: Any,
) -> None:
    """Let ``layer.quant_method`` register its weights (in the default dtype) and attach ``loader`` to each."""
    before = set(layer._parameters)
    layer.quant_method.create_weights(
        layer, input_size_per_partition, output_partition_sizes, input_size, output_size, torch.get_default_dtype()
    )
    for name in set(layer._parameters) - before:
        layer._parameters[name].weight_loader = loader  # type: ignore[union-attr]


def _bias(layer: nn.Module, size: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(size), requires_grad=False)
    param.weight_loader = layer.weight_loader  # type: ignore[attr-defined]
    return param


class LinearBase(nn.Module):
    """What the parallel linear layers share (vLLM's name): a ``quant_method`` that owns the storage."""

    quant_method: LinearMethod

    def int8_input_unit(self, x: torch.Tensor) -> int | None:
        """The quant method's :meth:`~.LinearMethod.int8_input_unit` for input ``x``."""
        return self.quant_method.int8_input_unit(self, x)


class ColumnParallelLinear(LinearBase):
    """``y = x W^T + b`` with ``W`` ``(output_size, input_size)`` split along the output dimension.

    Rank ``r`` holds rows ``[r * output_size / tp, (r + 1) * output_size / tp)``; the output of
    ``forward`` is this rank's ``(num_tokens, output_size / tp)`` slice unless ``gather_output``.
    ``quant_config`` picks the weight storage (``prefix`` is the layer's Hugging Face name).

    Raises:
        ValueError: ``output_size`` is not divisible by the TP size, or a quantized storage cannot be split
            (e.g. a GGUF block would be cut).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.tp = get_tp_group()
        self.tp_rank = self.tp.rank_in_group
        self.tp_size = self.tp.world_size
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, self.tp_size, "output features")
        self.gather_output = gather_output
        self.prefix = prefix
        self.quant_method = get_quant_method(self, quant_config, prefix)
        create_weights(self, input_size, self.output_partition_sizes, input_size, output_size, self.weight_loader)
        self.bias = _bias(self, self.output_size_per_partition) if bias else None

    @property
    def output_partition_sizes(self) -> list[int]:
        """Per-rank output features of each part (one part here)."""
        return [self.output_size_per_partition]

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Load rows ``[rank * n, (rank + 1) * n)`` of the full weight (or bias) into ``param``."""
        n = self.output_size_per_partition
        shard = WeightShard(dim=0, start=self.tp_rank * n, size=n, full_size=n * self.tp_size)
        self.quant_method.load_weight(self, param, loaded_weight, shard)

    def forward(self, x: torch.Tensor, x_int8: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``(num_tokens, input_size)`` -> ``(num_tokens, output_size / tp)`` (or full when gathering).
        ``x_int8``: ``x`` already rounded for the int8 GEMV (:meth:`int8_input_unit`)."""
        if x_int8 is None:
            y = self.quant_method.apply(self, x, self.bias)
        else:
            y = self.quant_method.apply(self, x, self.bias, x_int8=x_int8)
        if self.gather_output:
            y = self.tp.all_gather(y, dim=-1)
        return y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate and up).

    ``output_sizes`` are the full widths of the parts; each rank holds the concatenation of its slice
    of every part. ``shard_id`` in the weight loader is the part index.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        for size in output_sizes:
            divide(size, get_tp_group().world_size, "merged projection width")
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias, quant_config=quant_config, prefix=prefix)

    @property
    def output_partition_sizes(self) -> list[int]:
        return [s // self.tp_size for s in self.output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Load this rank's slice of part ``shard_id`` (full checkpoint tensor) into its place in ``param``.

        Raises:
            ValueError: ``shard_id`` is missing or out of range.
        """
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"merged linear needs a part index in [0, {len(self.output_sizes)}), got {shard_id!r}")
        sizes = self.output_partition_sizes
        offset, n = sum(sizes[:shard_id]), sizes[shard_id]
        shard = WeightShard(
            dim=0,
            start=self.tp_rank * n,
            size=n,
            full_size=self.output_sizes[shard_id],
            output_offset=offset,
            part=shard_id,
            shard_id=shard_id,
        )
        self.quant_method.load_weight(self, param, loaded_weight, shard)

    def forward_silu_and_mul(self, x: torch.Tensor, x_int8: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """SwiGLU of a gate/up pair: ``silu(x gate^T) * (x up^T)``, ``(num_tokens, input_size)`` ->
        ``(num_tokens, output_sizes[0] / tp)``; one fused kernel where the quant method has one. ``x_int8``
        as for :meth:`forward`."""
        if x_int8 is None:
            return self.quant_method.apply_silu_and_mul(self, x, self.bias)
        return self.quant_method.apply_silu_and_mul(self, x, self.bias, x_int8=x_int8)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections, split by attention head over TP ranks.

    Each rank computes ``num_heads = total_num_heads / tp`` query heads and ``num_kv_heads`` KV heads.
    When ``tp > total_num_kv_heads`` the KV heads are replicated: ``replicas = tp / total_num_kv_heads``
    ranks share one KV head, and rank ``r`` uses KV head ``r // replicas`` (vLLM's scheme).
    Output layout per rank: ``[q (num_heads * head_dim) | k (num_kv_heads * head_dim) | v (same)]``.

    Raises:
        ValueError: query heads not divisible by TP, or KV heads neither divisible by TP nor dividing it.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        tp_size = get_tp_group().world_size
        self.head_dim = head_dim
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= total_num_kv_heads:
            if tp_size % total_num_kv_heads:
                raise ValueError(
                    f"tensor parallel size ({tp_size}) must be a multiple of the number of KV heads "
                    f"({total_num_kv_heads}) when it exceeds it"
                )
            self.num_kv_heads = 1
            self.num_kv_head_replicas = tp_size // total_num_kv_heads
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, "number of KV heads")
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # Pass the padded total so that the per-rank width is q + 2 kv even with KV replication.
        super().__init__(
            hidden_size, (self.q_size + 2 * self.kv_size) * tp_size, bias=bias, quant_config=quant_config, prefix=prefix
        )

    @property
    def output_partition_sizes(self) -> list[int]:
        return [self.q_size, self.kv_size, self.kv_size]

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Load this rank's heads of the full ``q``, ``k`` or ``v`` projection (``shard_id``) into ``param``.

        Raises:
            ValueError: ``shard_id`` is not one of ``"q"``, ``"k"``, ``"v"``.
        """
        if shard_id == "q":
            part, offset, n, start = 0, 0, self.q_size, self.tp_rank * self.q_size
            total = self.total_num_heads * self.head_dim
        elif shard_id in ("k", "v"):
            kv_group = self.tp_rank // self.num_kv_head_replicas
            part = 1 if shard_id == "k" else 2
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            n, start = self.kv_size, kv_group * self.kv_size
            total = self.total_num_kv_heads * self.head_dim
        else:
            raise ValueError(f"QKV linear needs shard_id 'q', 'k' or 'v', got {shard_id!r}")
        shard = WeightShard(
            dim=0, start=start, size=n, full_size=total, output_offset=offset, part=part, shard_id=shard_id
        )
        self.quant_method.load_weight(self, param, loaded_weight, shard)


class RowParallelLinear(LinearBase):
    """``y = x W^T + b`` with ``W`` ``(output_size, input_size)`` split along the input dimension.

    Rank ``r`` holds columns ``[r * input_size / tp, (r + 1) * input_size / tp)`` and receives the
    matching slice of ``x`` (the output of a column-parallel layer); the partial products are summed
    with an all-reduce over the TP group, then the (unsplit) bias is added once.

    Raises:
        ValueError: ``input_size`` is not divisible by the TP size, or a quantized storage cannot be split
            there (a GGUF block would be cut).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        reduce_results: bool = True,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.tp = get_tp_group()
        self.tp_rank = self.tp.rank_in_group
        self.tp_size = self.tp.world_size
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, self.tp_size, "input features")
        self.reduce_results = reduce_results
        self.prefix = prefix
        self.quant_method = get_quant_method(self, quant_config, prefix)
        create_weights(self, self.input_size_per_partition, [output_size], input_size, output_size, self.weight_loader)
        self.bias = _bias(self, output_size) if bias else None

    @property
    def output_partition_sizes(self) -> list[int]:
        """Per-rank output features (the whole output: only the input is split)."""
        return [self.output_size]

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Load this rank's input columns of the full weight; the bias is loaded whole."""
        if param is self.bias:
            shard = WeightShard()
        else:
            n = self.input_size_per_partition
            shard = WeightShard(dim=1, start=self.tp_rank * n, size=n, full_size=self.input_size)
        self.quant_method.load_weight(self, param, loaded_weight, shard)

    def forward(self, x: torch.Tensor, x_int8: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``(num_tokens, input_size / tp)`` -> ``(num_tokens, output_size)``, summed over TP ranks. ``x_int8``:
        ``x`` already rounded for the int8 GEMV (:meth:`int8_input_unit`)."""
        y = self.quant_method.apply(self, x) if x_int8 is None else self.quant_method.apply(self, x, x_int8=x_int8)
        if self.reduce_results:
            y = self.tp.all_reduce(y)
        if self.bias is not None and (self.reduce_results or self.tp_rank == 0):
            y = y + self.bias  # once over the group when the caller reduces
        return y
