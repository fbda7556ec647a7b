"""Quantization interface of the linear and embedding layers (after vLLM's ``QuantizationConfig`` and
``LinearMethodBase``, ``vllm/model_executor/layers/quantization/base_config.py``).

A :class:`QuantizationConfig` describes one checkpoint's scheme and hands each layer a
:class:`LinearMethod` (or None: the layer stays unquantized). The method owns the layer's weight tensors:
:meth:`LinearMethod.create_weights` registers them on the layer, :meth:`LinearMethod.load_weight` copies
this rank's piece of a checkpoint tensor into one of them, :meth:`LinearMethod.process_weights_after_loading`
repacks once everything is loaded, and :meth:`LinearMethod.apply` computes ``y = x W^T + b``.

Weight loading contract. The layer's ``weight_loader(param, loaded_weight, shard_id)`` (called by the
model's ``load_weights`` with a full checkpoint tensor or a lazy
:class:`~shardserve.model_executor.loader.weights.WeightSource`) works out which slice of the checkpoint
tensor this rank needs, in the logical (unquantized, Hugging Face ``(out_features, in_features)``) layout,
as a :class:`WeightShard`, and passes it to ``quant_method.load_weight(layer, param, loaded_weight, shard)``.
The method translates it into its own storage: an unquantized weight reads
``loaded_weight.load(shard.dim, shard.start, shard.size)``; GGUF reads the raw blocks of those rows or
columns (:class:`~shardserve.model_executor.loader.weights.GGUFSource.load_blocks`); FP8 reads the weight
slice and its scales. Every parameter that ``create_weights`` registers is expected to be loaded from the
checkpoint (``LlamaForCausalLM.load_weights`` reports any left over); tensors computed after loading should
be plain attributes or buffers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.model_executor.kernels import use_triton
from shardserve.model_executor.layers.activation import SiluAndMul

_silu_and_mul = SiluAndMul()


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


@dataclass(frozen=True)
class WeightShard:
    """This rank's piece of one checkpoint tensor, in the logical (unquantized) layout.

    The checkpoint tensor is sliced along ``dim`` (0: output rows, 1: input columns, None: read whole) to
    ``[start, start + size)``; with ``dim == 0`` the rows land at ``[output_offset, output_offset + size)``
    of the layer's per-rank output features (the part's place in a merged or QKV layer).
    """

    dim: int | None = None
    """Checkpoint dimension this rank slices: 0 (column-parallel), 1 (row-parallel) or None (whole)."""
    start: int = 0
    """First row/column of the slice (elements, logical)."""
    size: int | None = None
    """Rows/columns of the slice; None reads to the end."""
    full_size: int | None = None
    """Expected size of the checkpoint tensor along ``dim`` (checked before slicing); None skips the check."""
    output_offset: int = 0
    """First per-rank output feature the rows fill (``dim == 0`` only)."""
    part: int | None = None
    """Index of the part in ``output_partition_sizes`` (merged/QKV layers), None for a single projection."""
    shard_id: Any = None
    """The model loader's shard id (``"q"``/``"k"``/``"v"``, 0/1), None for a single projection."""


def load_slice(source: Any, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
    """``source.narrow(dim, start, size)`` for a tensor, ``source.load(dim, start, size)`` for a lazy source."""
    if isinstance(source, torch.Tensor):
        if dim is None:
            return source
        return source.narrow(dim, start, source.shape[dim] - start if size is None else size)
    return source.load(dim, start, size)


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
    shape = tuple(source.shape)
    if len(shape) <= dim or shape[dim] != expected:
        raise ValueError(f"checkpoint tensor has shape {shape}, expected size {expected} along dim {dim}")


def load_unquantized(param: torch.Tensor, source: Any, shard: WeightShard) -> None:
    """Copy ``shard`` of ``source`` into a plain ``(out_features, in_features)`` (or 1-D) parameter.

    Raises:
        ValueError: the checkpoint tensor's size along ``shard.dim`` or the slice's shape does not fit.
    """
    if shard.dim is not None and shard.full_size is not None:
        check_full_dim(source, shard.dim, shard.full_size)
    loaded = load_slice(source, shard.dim, shard.start, shard.size)
    dest = param.data
    if shard.dim == 0:
        dest = dest.narrow(0, shard.output_offset, loaded.shape[0])
    copy_checked(dest, loaded)


class LinearMethod(ABC):
    """How one layer stores its weight and computes ``x W^T``; one instance per layer (it may hold state).

    Shapes: ``x`` is ``(num_tokens, input_size_per_partition)``; the result ``(num_tokens,
    sum(output_partition_sizes))`` in ``x``'s dtype.
    """

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        """Register the layer's weight parameter(s) (named ``weight``, ``weight_scale``, ...) on ``layer``,
        on the current default device.

        Args:
            layer: the layer; the layer attaches its ``weight_loader`` to every registered parameter.
            input_size_per_partition: input features this rank holds.
            output_partition_sizes: per-rank output features of each part (one entry unless merged/QKV).
            input_size, output_size: the layer's full (unsplit) sizes.
            params_dtype: the model's compute dtype.
        """

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T (+ bias)``: ``(num_tokens, in)`` -> ``(num_tokens, out)`` for this rank."""

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """SwiGLU of a merged gate/up layer: ``silu(x @ gate^T) * (x @ up^T)``, ``(num_tokens, in)`` ->
        ``(num_tokens, out / 2)``. Methods with a fused kernel override this."""
        return _silu_and_mul(self.apply(layer, x, bias))

    def int8_input_unit(self, layer: nn.Module, x: torch.Tensor) -> int | None:
        """When :meth:`apply` would first round ``x`` to int8 for an int8 GEMV (GGUF decode rows), the x
        layout it reads (``gguf_dp4a.quantize_activations``'s ``unit``), so that the producer of ``x`` can
        do the rounding in its own kernel (RMSNorm) and hand it over as ``x_int8``; None otherwise."""
        return None

    def embedding(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows ``input_ids`` of an embedding table: ``(num_tokens,)`` -> ``(num_tokens, embedding_dim)``.

        Raises:
            NotImplementedError: the method does not serve embedding tables.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement embedding lookups")

    def load_weight(self, layer: nn.Module, param: nn.Parameter, loaded_weight: Any, shard: WeightShard) -> None:
        """Copy this rank's ``shard`` of the checkpoint tensor ``loaded_weight`` into ``param``.

        The default copies a plain tensor (see :func:`load_unquantized`); a method with its own storage
        overrides this for its parameters.

        Raises:
            ValueError: the checkpoint tensor does not fit ``param``.
        """
        load_unquantized(param, loaded_weight, shard)

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Repack or derive tensors once every checkpoint tensor is loaded (default: nothing)."""


class UnquantizedLinearMethod(LinearMethod):
    """Weights in the model dtype, ``(out_features, in_features)``: our GEMV for decode batches of 1-2 rows
    on CUDA (:func:`~shardserve.model_executor.layers.linear.linear`), ``F.linear`` (cuBLAS) otherwise."""

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        weight = torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype)
        layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, layer.weight, bias)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is None and use_gemv(x, layer.weight):  # decode batch: gate, up and SiLU in one kernel
            from shardserve.model_executor.kernels.gemv import gemv

            return gemv(x, layer.weight, silu_and_mul=True)
        return super().apply_silu_and_mul(layer, x, bias)

    def embedding(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, layer.weight)


class QuantizationConfig(ABC):
    """One checkpoint's quantization scheme: which layers are quantized and how.

    Set by the loader before the model is built: :attr:`packed_modules_mapping` (the model's fused layers,
    e.g. ``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``) so that :meth:`get_quant_method` can look up the
    checkpoint tensors behind a fused layer's prefix.
    """

    name: str = ""
    """The ``--quantization`` name (``gguf``, ``fp8``)."""
    min_capability: int | None = None
    """Lowest CUDA compute capability (major * 10 + minor) the kernels need; None: any (and CPU)."""

    def __init__(self) -> None:
        self.packed_modules_mapping: dict[str, list[str]] = {}

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """The method for ``layer`` (Hugging Face name ``prefix``, e.g. ``model.layers.0.self_attn.qkv_proj``),
        or None to leave it unquantized."""

    def checkpoint_names(self, prefix: str) -> list[str]:
        """Checkpoint module names behind a layer: the parts of a fused layer, else ``[prefix]``."""
        head, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        if not parts:
            return [prefix]
        return [f"{head}.{p}" if head else p for p in parts]

    def verify_device(self, device: torch.device) -> None:
        """Check the device can run this scheme.

        Raises:
            ValueError: a CUDA device below :attr:`min_capability`.
        """
        if self.min_capability is None or device.type != "cuda":
            return
        major, minor = torch.cuda.get_device_capability(device)
        if major * 10 + minor < self.min_capability:
            raise ValueError(
                f"--quantization {self.name} needs a GPU of compute capability >= "
                f"{self.min_capability // 10}.{self.min_capability % 10}; {torch.cuda.get_device_name(device)} "
                f"has {major}.{minor}"
            )

    def weight_bytes(
        self,
        name: str,
        shape: tuple[int, ...],
        params_dtype: torch.dtype,
        tp_size: int = 1,
        split_dim: int | None = None,
    ) -> int:
        """Bytes one rank holds of checkpoint tensor ``name`` (logical Hugging Face ``shape``) split over
        ``tp_size`` ranks along ``split_dim`` (None: replicated), for plan and memory accounting.

        The default is the unquantized size, ``ceil(shape[split_dim] / tp_size) * rest * dtype bytes``;
        schemes override it with their storage (blocks, scales).
        """
        return unquantized_bytes(shape, params_dtype, tp_size, split_dim)


def unquantized_bytes(
    shape: tuple[int, ...], params_dtype: torch.dtype, tp_size: int = 1, split_dim: int | None = None
) -> int:
    """Bytes one rank holds of a plain tensor of ``shape`` split along ``split_dim`` over ``tp_size`` ranks
    (the split dimension rounded up, as the vocabulary is padded)."""
    dims = list(shape)
    if split_dim is not None:
        dims[split_dim] = -(-dims[split_dim] // tp_size)
    return math.prod(dims) * torch.empty((), dtype=params_dtype).element_size()


@dataclass
class ModelWeightBytes:
    """Bytes one TP rank holds of each part of a model (for pipeline partitioning and plan)."""

    layers: list[int]
    """Per decoder layer (norms included), in layer order."""
    embed: int
    """The token embedding table (first pipeline stage)."""
    lm_head: int
    """The LM head (last stage); with tied embeddings the table's size, as a last stage without the
    embedding holds its own copy (a single stage shares one)."""
    final_norm: int
    """The final RMSNorm (last stage)."""
    tied: bool = False
    """The LM head is the embedding table."""
    scratch: int = 0
    """Largest transient buffer a prefill allocates to dequantize one layer's weight (bytes); 0 if none."""

    @property
    def total(self) -> int:
        """Bytes of a single-stage rank (a tied table counted once)."""
        return sum(self.layers) + self.embed + (0 if self.tied else self.lm_head) + self.final_norm


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights ``model`` holds (tied tensors once): every parameter, and the persistent buffers
    that belong with them (FP8 weight scales). Non-persistent buffers, such as the rotary cos/sin cache,
    are derived tables, not weights, and are not counted."""
    tensors = list(model.parameters())
    for module in model.modules():
        skip = module._non_persistent_buffers_set
        tensors += [b for name, b in module.named_buffers(recurse=False) if name not in skip]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
