"""Tensor-parallel linear layers (Megatron-LM, Shoeybi et al. 2019) that load their own shard.

``ColumnParallelLinear`` splits the output features over the TP ranks, ``RowParallelLinear`` the input
features, followed by an all-reduce in ``forward``. Each parameter carries a
``weight_loader(param, loaded_weight, shard_id=None)`` that takes the FULL checkpoint tensor (or a lazy
:class:`~shardserve.model_executor.loader.weights.WeightSource`, which then reads only this rank's slice)
and copies this rank's part into ``param``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.distributed.parallel_state import get_tp_group
from shardserve.model_executor.kernels import use_triton


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` runs as our GEMV (:mod:`..kernels.gemv`): a decode batch of at most
    ``MAX_ROWS`` rows on the GPU, contiguous along K."""
    if not (use_triton(x) and x.dim() == 2 and x.stride(-1) == 1 and weight.stride(-1) == 1):
        return False
    from shardserve.model_executor.kernels.gemv import MAX_ROWS

    return x.shape[0] <= MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or our GEMV where :func:`use_gemv`.

    ``x`` is ``(num_tokens, in_features)``, ``weight`` ``(out_features, in_features)``.
    """
    if use_gemv(x, weight):
        from shardserve.model_executor.kernels.gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def load_slice(source: Any, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
    """``source.narrow(dim, start, size)`` for a tensor, ``source.load(dim, start, size)`` for a lazy source."""
    if isinstance(source, torch.Tensor):
        if dim is None:
            return source
        return source.narrow(dim, start, source.shape[dim] - start if size is None else size)
    return source.load(dim, start, size)


def source_shape(source: Any) -> tuple[int, ...]:
    """Shape of a tensor or of a lazy weight source."""
    return tuple(source.shape)


def copy_checked(dest: torch.Tensor, loaded: torch.Tensor) -> None:
    """``dest.copy_(loaded)`` after checking shapes match.

    Raises:
        ValueError: the shapes differ (checkpoint does not fit the configured architecture).
    """
    if tuple(dest.shape) != tuple(loaded.shape):
        raise ValueError(f"checkpoint slice has shape {tuple(loaded.shape)}, parameter expects {tuple(dest.shape)}")
    dest.copy_(loaded)


def check_full_dim(source: Any, dim: int, expected: int) -> None:
    """Check the checkpoint tensor's full size along ``dim`` before taking a slice of it.

    Raises:
        ValueError: the checkpoint's size differs (it would otherwise be silently truncated).
    """
    shape = source_shape(source)
    if len(shape) <= dim or shape[dim] != expected:
        raise ValueError(f"checkpoint tensor has shape {shape}, expected size {expected} along dim {dim}")


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


def _attach(param: nn.Parameter, loader: Any) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` ``(output_size, input_size)`` split along the output dimension.

    Rank ``r`` holds rows ``[r * output_size / tp, (r + 1) * output_size / tp)``; the output of
    ``forward`` is this rank's ``(num_tokens, output_size / tp)`` slice unless ``gather_output``.

    Raises:
        ValueError: ``output_size`` is not divisible by the TP size.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False):
        super().__init__()
        self.tp = get_tp_group()
        self.tp_rank = self.tp.rank_in_group
        self.tp_size = self.tp.world_size
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, self.tp_size, "output features")
        self.gather_output = gather_output
        self.weight = _attach(nn.Parameter(torch.empty(self.output_size_per_partition, input_size)), self.weight_loader)
        self.bias = None
        if bias:
            self.bias = _attach(nn.Parameter(torch.empty(self.output_size_per_partition)), self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Copy rows ``[rank * n, (rank + 1) * n)`` of the full weight (or bias) into ``param``."""
        n = param.shape[0]
        check_full_dim(loaded_weight, 0, n * self.tp_size)
        copy_checked(param.data, load_slice(loaded_weight, 0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(num_tokens, input_size)`` -> ``(num_tokens, output_size / tp)`` (or full when gathering)."""
        y = linear(x, self.weight, self.bias)
        if self.gather_output:
            y = self.tp.all_gather(y, dim=-1)
        return y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate and up).

    ``output_sizes`` are the full widths of the parts; each rank holds the concatenation of its slice
    of every part. ``shard_id`` in the weight loader is the part index.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        for size in output_sizes:
            divide(size, get_tp_group().world_size, "merged projection width")
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Copy this rank's slice of part ``shard_id`` (full checkpoint tensor) into its place in ``param``.

        Raises:
            ValueError: ``shard_id`` is missing or out of range.
        """
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"merged linear needs a part index in [0, {len(self.output_sizes)}), got {shard_id!r}")
        sizes = [s // self.tp_size for s in self.output_sizes]
        offset, n = sum(sizes[:shard_id]), sizes[shard_id]
        check_full_dim(loaded_weight, 0, self.output_sizes[shard_id])
        copy_checked(param.data.narrow(0, offset, n), load_slice(loaded_weight, 0, self.tp_rank * n, n))


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
        super().__init__(hidden_size, (self.q_size + 2 * self.kv_size) * tp_size, bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Copy this rank's heads of the full ``q``, ``k`` or ``v`` projection (``shard_id``) into ``param``.

        Raises:
            ValueError: ``shard_id`` is not one of ``"q"``, ``"k"``, ``"v"``.
        """
        if shard_id == "q":
            offset, n, start = 0, self.q_size, self.tp_rank * self.q_size
            total = self.total_num_heads * self.head_dim
        elif shard_id in ("k", "v"):
            kv_group = self.tp_rank // self.num_kv_head_replicas
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            n, start = self.kv_size, kv_group * self.kv_size
            total = self.total_num_kv_heads * self.head_dim
        else:
            raise ValueError(f"QKV linear needs shard_id 'q', 'k' or 'v', got {shard_id!r}")
        check_full_dim(loaded_weight, 0, total)
        copy_checked(param.data.narrow(0, offset, n), load_slice(loaded_weight, 0, start, n))


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` ``(output_size, input_size)`` split along the input dimension.

    Rank ``r`` holds columns ``[r * input_size / tp, (r + 1) * input_size / tp)`` and receives the
    matching slice of ``x`` (the output of a column-parallel layer); the partial products are summed
    with an all-reduce over the TP group, then the (unsplit) bias is added once.

    Raises:
        ValueError: ``input_size`` is not divisible by the TP size.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, reduce_results: bool = True):
        super().__init__()
        self.tp = get_tp_group()
        self.tp_rank = self.tp.rank_in_group
        self.tp_size = self.tp.world_size
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, self.tp_size, "input features")
        self.reduce_results = reduce_results
        self.weight = _attach(nn.Parameter(torch.empty(output_size, self.input_size_per_partition)), self.weight_loader)
        self.bias = None
        if bias:
            self.bias = _attach(nn.Parameter(torch.empty(output_size)), self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Copy this rank's input columns of the full weight; the bias is copied whole."""
        if param.dim() == 1:
            copy_checked(param.data, load_slice(loaded_weight))
            return
        n = param.shape[1]
        check_full_dim(loaded_weight, 1, self.input_size)
        copy_checked(param.data, load_slice(loaded_weight, 1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(num_tokens, input_size / tp)`` -> ``(num_tokens, output_size)``, summed over TP ranks."""
        y = linear(x, self.weight)
        if self.reduce_results:
            y = self.tp.all_reduce(y)
        if self.bias is not None and (self.reduce_results or self.tp_rank == 0):
            y = y + self.bias  # once over the group when the caller reduces
        return y
