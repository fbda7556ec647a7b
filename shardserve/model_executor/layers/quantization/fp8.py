"""FP8 (e4m3) weights: the checkpoint formats published for Llama-3.1, and ``--quantization fp8`` at load.

Formats (config.json ``quantization_config``):

- ``compressed-tensors``, format ``float-quantized`` (llm-compressor; e.g. the ``-FP8`` and ``-FP8-dynamic``
  Llama-3.1 checkpoints): ``*.weight`` in ``float8_e4m3fn`` with ``*.weight_scale`` per tensor (``[1]``) or per
  output channel (``[N, 1]``); activations with a static per-tensor ``*.input_scale`` or dynamic per token.
  Layers in ``ignore`` (names or ``re:`` regexes, ``lm_head`` usually) stay unquantized.
- ``fbgemm_fp8`` (Meta's Llama-3.1-405B-Instruct-FP8): per-row ``*.weight_scale`` ``[N, 1]``, activations
  dynamic per token with the row amax clamped to ``activation_scale_ub``; ``modules_to_not_convert`` stay
  unquantized.
- ``fp8`` (AutoFP8 / vLLM's serialized FP8): per-tensor ``weight_scale``, ``activation_scheme`` static or
  dynamic, ``ignored_layers``.
- ``--quantization fp8`` on a bf16/fp16/fp32 checkpoint: each rank quantizes its own slice as it loads,
  one scale per output row (``amax / 448`` over the row's columns on this rank), activations per token.

Storage on the device: the weight as ``(N, K)`` e4m3 bytes and one fp32 scale per output row (a per-tensor
scale is repeated over its rows, so a fused QKV keeps q, k and v's own scales exactly). Compute
(:class:`Fp8LinearMethod`): at 1-2 rows our FP8 GEMV (:mod:`~shardserve.model_executor.kernels.fp8`) on
model-dtype activations; above, activations are quantized per token (or with the static scale) and
multiplied by ``torch._scaled_mm`` with row-wise scales (cuBLASLt / CUTLASS), bf16 out. On a CPU the weights
are dequantized to the model dtype at load. CUDA GPUs below compute capability 8.9 are refused.

TP: a column-parallel layer's rows are split with their scales; a row-parallel layer's columns are split and
its per-row scales replicated (static input scales are per tensor: replicated).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.config import check_fp8_device
from shardserve.model_executor.layers.quantization.base import (
    LinearMethod,
    QuantizationConfig,
    WeightShard,
    check_full_dim,
    copy_checked,
    load_slice,
    unquantized_bytes,
)

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite e4m3 value."""
CHECKPOINT_METHODS = ("compressed-tensors", "fbgemm_fp8", "fp8")
"""config.json ``quant_method`` values read as FP8 checkpoints."""
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
"""Module names (last component) of the decoder's linear layers, checkpoint and fused."""


def fp8_linear_bytes(
    shape: tuple[int, ...], tp_size: int = 1, split_dim: int | None = None, static_input_scale: bool = False
) -> int:
    """Bytes one rank holds of an FP8 linear weight of logical shape ``(N, K)``: one byte per element of its
    slice, a 4-byte fp32 scale per output row it holds (all ``N`` rows for a row-parallel split, ``N / tp``
    for a column-parallel one), and 4 bytes for a static input scale.

    Args:
        shape: ``(out_features, in_features)`` of the full (unsplit) weight.
        tp_size: ranks the weight is split over.
        split_dim: 0 (column-parallel: rows), 1 (row-parallel: columns) or None (replicated).
        static_input_scale: the scheme keeps a static activation scale for the layer.
    """
    rows, cols = shape
    if split_dim == 0:
        rows = -(-rows // tp_size)
    elif split_dim == 1:
        cols = -(-cols // tp_size)
    return rows * cols + 4 * rows + (4 if static_input_scale else 0)


def _matches(name: str, patterns: list[str]) -> bool:
    """compressed-tensors matching: an exact module name, or ``re:REGEX`` matched against the name."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name:
            return True
    return False


class Fp8Config(QuantizationConfig):
    """One FP8 scheme: where the scales come from and which layers it covers.

    Args:
        checkpoint_format: ``compressed-tensors``, ``fbgemm_fp8``, ``fp8`` (weights stored in FP8), or
            ``online`` (``--quantization fp8``: quantized at load).
        weight_strategy: ``tensor`` or ``channel`` (per output row): how the checkpoint's scales are laid out.
        static_activations: activations use the checkpoint's per-tensor ``input_scale``; else per token.
        ignore: checkpoint module names (or ``re:`` patterns) left unquantized.
        activation_scale_ub: upper bound of a token's amax (fbgemm), or None.
    """

    name = "fp8"
    min_capability = 89

    def __init__(
        self,
        checkpoint_format: str = "online",
        weight_strategy: str = "channel",
        static_activations: bool = False,
        ignore: list[str] | None = None,
        activation_scale_ub: float | None = None,
    ):
        super().__init__()
        if weight_strategy not in ("tensor", "channel"):
            raise ValueError(f"FP8 weight scales must be per tensor or per channel, got {weight_strategy!r}")
        self.checkpoint_format = checkpoint_format
        self.weight_strategy = weight_strategy
        self.static_activations = static_activations
        self.ignore = list(ignore or [])
        self.activation_scale_ub = activation_scale_ub
        self.cpu_dequantize = True
        """On a CPU, dequantize weights at load and use plain matmuls. False keeps FP8 and runs the GPU path's
        kernels (Triton's interpreter, CPU ``torch._scaled_mm``): tests of that path."""

    @property
    def serialized(self) -> bool:
        """The checkpoint holds FP8 weights and their scales (not ``--quantization fp8`` of a bf16 one)."""
        return self.checkpoint_format != "online"

    def __repr__(self) -> str:
        act = "static" if self.static_activations else "per-token"
        return f"Fp8Config({self.checkpoint_format}, weights per {self.weight_strategy}, activations {act})"

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> Fp8Config:
        """Read config.json's ``quantization_config``.

        Raises:
            ValueError: a method or scheme other than FP8 e4m3 W8A8/W8A16 with per-tensor or per-channel
                weight scales (e.g. int8, 4-bit, block-wise FP8), named in the message.
        """
        method = cfg.get("quant_method")
        if method == "compressed-tensors":
            return cls._from_compressed_tensors(cfg)
        if method == "fbgemm_fp8":
            return cls(
                "fbgemm_fp8",
                "channel",
                static_activations=False,
                ignore=list(cfg.get("modules_to_not_convert") or []),
                activation_scale_ub=float(cfg["activation_scale_ub"]) if cfg.get("activation_scale_ub") else None,
            )
        if method == "fp8":
            if cfg.get("weight_block_size"):
                raise ValueError("block-wise FP8 checkpoints (weight_block_size) are not supported")
            scheme = cfg.get("activation_scheme", "dynamic")
            if scheme not in ("static", "dynamic"):
                raise ValueError(f"FP8 activation_scheme must be static or dynamic, got {scheme!r}")
            return cls("fp8", "tensor", static_activations=scheme == "static", ignore=cfg.get("ignored_layers"))
        raise ValueError(f"quantization method {method!r} is not an FP8 format ({', '.join(CHECKPOINT_METHODS)})")

    @classmethod
    def _from_compressed_tensors(cls, cfg: dict[str, Any]) -> Fp8Config:
        fmt = cfg.get("format")
        groups = list((cfg.get("config_groups") or {}).values())
        if fmt not in ("float-quantized", "naive-quantized") or len(groups) != 1:
            raise ValueError(
                f"compressed-tensors checkpoint with format {fmt!r} and {len(groups)} config group(s): shardserve "
                "loads one float-quantized (FP8 e4m3) group"
            )
        group = groups[0]
        weights, acts = group.get("weights") or {}, group.get("input_activations")
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise ValueError(
                f"compressed-tensors weights of type {weights.get('type')!r} with {weights.get('num_bits')} bits: "
                "only FP8 (type float, 8 bits) is supported"
            )
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("tensor", "channel"):
            raise ValueError(f"compressed-tensors FP8 weight strategy {strategy!r}: tensor or channel are supported")
        targets = group.get("targets") or ["Linear"]
        if "Linear" not in targets:
            raise ValueError(f"compressed-tensors targets {targets}: only ['Linear'] (every linear layer) is supported")
        static = bool(acts) and not acts.get("dynamic", False)
        if static and acts.get("strategy", "tensor") != "tensor":
            raise ValueError(f"static activation scales per {acts.get('strategy')!r}: only per tensor is supported")
        return cls("compressed-tensors", strategy, static_activations=static, ignore=cfg.get("ignore"))

    # -- the QuantizationConfig interface ---------------------------------------------------------
    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """:class:`Fp8LinearMethod` for the decoder's linear layers not ignored; None (plain) for the
        embedding, the LM head and ignored layers.

        Raises:
            ValueError: a fused layer whose parts disagree (some ignored, some quantized).
        """
        from shardserve.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

        if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            return None
        if self.is_ignored(prefix):
            return None
        return Fp8LinearMethod(self)

    def is_ignored(self, prefix: str) -> bool:
        """Whether the layer ``prefix`` (our name; a fused layer is looked up by its checkpoint parts) is
        left unquantized.

        Raises:
            ValueError: some parts of a fused layer are ignored and others are not.
        """
        parts = self.checkpoint_names(prefix)
        ignored = [_matches(p, self.ignore) for p in parts]
        if any(ignored) and not all(ignored):
            raise ValueError(f"{prefix}: checkpoint quantizes some of {parts} but not all; they are fused into one")
        return all(ignored)

    def verify_device(self, device: torch.device) -> None:
        """Raises ValueError on a CUDA GPU below compute capability 8.9."""
        what = "--quantization fp8" if not self.serialized else f"an FP8 checkpoint ({self.checkpoint_format})"
        check_fp8_device(device, what)

    def weight_bytes(
        self,
        name: str,
        shape: tuple[int, ...],
        params_dtype: torch.dtype,
        tp_size: int = 1,
        split_dim: int | None = None,
    ) -> int:
        """Bytes one rank holds on the GPU of checkpoint tensor ``name``: :func:`fp8_linear_bytes` for the
        weight of a quantized linear layer (its scales included), 0 for the scale tensors themselves, the
        unquantized size for everything else (embedding, norms, LM head, ignored layers)."""
        module, _, leaf = name.rpartition(".")
        if leaf in ("weight_scale", "input_scale"):
            return 0
        quantized = leaf == "weight" and len(shape) == 2 and module.rpartition(".")[2] in LINEAR_NAMES
        if not quantized or _matches(module, self.ignore):
            return unquantized_bytes(shape, params_dtype, tp_size, split_dim)
        return fp8_linear_bytes(shape, tp_size, split_dim, self.static_activations)  # type: ignore[arg-type]


def checkpoint_quantization_config(source: Any) -> dict[str, Any] | None:
    """``quantization_config`` of a Hugging Face directory's config.json, or None (GGUF, no config.json on disk,
    or none given).

    Raises:
        ValueError: config.json is unreadable.
    """
    if getattr(source, "format", None) != "hf":
        return None
    path = Path(source.path) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    quant = cfg.get("quantization_config")
    return quant if isinstance(quant, dict) else None


def fp8_config_for(quantization: str | None, source: Any) -> Fp8Config | None:
    """The FP8 config for loading ``source`` with ``--quantization`` ``quantization``, or None when neither
    the flag nor the checkpoint asks for FP8.

    Raises:
        ValueError: ``--quantization fp8`` on a GGUF file or on a checkpoint quantized otherwise; another
            ``--quantization`` on an FP8 checkpoint; an unsupported FP8 scheme.
    """
    hf_quant = checkpoint_quantization_config(source)
    method = hf_quant.get("quant_method") if hf_quant else None
    if method in CHECKPOINT_METHODS:
        if quantization not in (None, "fp8"):
            raise ValueError(
                f"{source.path} is an FP8 checkpoint ({method}); --quantization {quantization} does not apply"
            )
        config = Fp8Config.from_hf_config(hf_quant)  # type: ignore[arg-type]
    elif quantization == "fp8":
        if getattr(source, "format", None) != "hf":
            raise ValueError(
                f"--quantization fp8 quantizes a safetensors checkpoint's weights at load; {source.path} is not one"
            )
        if method is not None:
            raise ValueError(f"--quantization fp8 needs unquantized weights; {source.path} is quantized ({method})")
        config = Fp8Config()
    else:
        return None
    logger.info("FP8 weights: %s", config)
    return config


class Fp8LinearMethod(LinearMethod):
    """One linear layer in FP8: ``weight`` ``(N, K)`` e4m3 and ``weight_scale`` ``(N,)`` fp32 per output row,
    plus ``input_scale`` (one per fused part) for static activations. See the module docstring for the
    kernels. On a CPU (with :attr:`Fp8Config.cpu_dequantize`) ``weight`` becomes the dequantized model-dtype
    weight after loading."""

    def __init__(self, config: Fp8Config):
        self.config = config
        self.params_dtype = torch.float32
        self.dequantized = False
        """``weight`` holds the dequantized model-dtype weight (CPU)."""
        self.use_scaled_mm = False
        """Batches above the GEMV's rows go to ``torch._scaled_mm`` (else: dequantize and ``F.linear``)."""

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        self.params_dtype = params_dtype
        n = sum(output_partition_sizes)
        weight = torch.empty(n, input_size_per_partition, dtype=FP8_DTYPE)
        layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))
        scale = torch.ones(n, dtype=torch.float32)
        if self.config.serialized:  # loaded from the checkpoint (a parameter, so a missing one is reported)
            layer.register_parameter("weight_scale", nn.Parameter(scale, requires_grad=False))
        else:  # computed while the weight loads
            layer.register_buffer("weight_scale", scale)
        if self.config.serialized and self.config.static_activations:
            parts = torch.ones(len(output_partition_sizes), dtype=torch.float32)
            layer.register_parameter("input_scale", nn.Parameter(parts, requires_grad=False))

    # -- loading ----------------------------------------------------------------------------------
    def load_weight(self, layer: nn.Module, param: nn.Parameter, loaded_weight: Any, shard: WeightShard) -> None:
        """Copy (or, online, quantize) this rank's slice of a weight, its scale or its input scale.

        Raises:
            ValueError: the checkpoint tensor does not fit, a weight that should be FP8 is not, or a scale of
                the wrong size.
        """
        if param is layer.weight:
            if self.config.serialized:
                self._load_fp8_weight(layer, loaded_weight, shard)
            else:
                self._quantize_weight(layer, loaded_weight, shard)
        elif param is getattr(layer, "weight_scale", None):
            self._load_weight_scale(layer, loaded_weight, shard)
        elif param is getattr(layer, "input_scale", None):
            value = load_slice(loaded_weight).float().reshape(-1)
            if value.numel() != 1:
                raise ValueError(f"a static input_scale is one number per tensor, got shape {tuple(value.shape)}")
            param.data[shard.part or 0] = value[0]
        else:  # bias
            super().load_weight(layer, param, loaded_weight, shard)

    def _load_fp8_weight(self, layer: nn.Module, source: Any, shard: WeightShard) -> None:
        if shard.dim is not None and shard.full_size is not None:
            check_full_dim(source, shard.dim, shard.full_size)
        w = load_slice(source, shard.dim, shard.start, shard.size)
        if w.dtype != FP8_DTYPE:
            raise ValueError(
                f"weight is {w.dtype}, but config.json says the checkpoint is FP8 e4m3 "
                f"({self.config.checkpoint_format})"
            )
        copy_checked(layer.weight.data[self._rows(layer, shard, w.shape[0])], w)

    def _quantize_weight(self, layer: nn.Module, source: Any, shard: WeightShard) -> None:
        """``--quantization fp8``: this rank's slice, one scale per row over the columns it holds."""
        if shard.dim is not None and shard.full_size is not None:
            check_full_dim(source, shard.dim, shard.full_size)
        w = load_slice(source, shard.dim, shard.start, shard.size)
        rows = self._rows(layer, shard, w.shape[0])
        q, scale = quantize_weight_per_row(w.to(layer.weight.device))
        copy_checked(layer.weight.data[rows], q)
        layer.weight_scale.data[rows] = scale

    def _load_weight_scale(self, layer: nn.Module, source: Any, shard: WeightShard) -> None:
        total = 1
        for d in source.shape:
            total *= int(d)
        if total == 1:  # per tensor: the same scale for every row of this part
            value = load_slice(source).float().reshape(-1)[0]
            rows = self._rows(layer, shard, shard.size if shard.dim == 0 and shard.size else None)
            layer.weight_scale.data[rows] = value
            return
        if shard.dim == 0:  # column-parallel: this rank's rows
            if shard.full_size is not None and total != shard.full_size:
                raise ValueError(f"per-channel weight_scale has {total} entries, the weight {shard.full_size} rows")
            scale = load_slice(source, 0, shard.start, shard.size).float().reshape(-1)
        else:  # row-parallel or whole: every output row
            scale = load_slice(source).float().reshape(-1)
        rows = self._rows(layer, shard, scale.numel())
        if layer.weight_scale.data[rows].numel() != scale.numel():
            raise ValueError(f"weight_scale has {scale.numel()} entries, the layer {layer.weight_scale.numel()} rows")
        layer.weight_scale.data[rows] = scale.to(layer.weight_scale.device)

    @staticmethod
    def _rows(layer: nn.Module, shard: WeightShard, size: int | None) -> slice:
        """The layer's output rows a shard fills: its part's rows for a column split, all rows otherwise."""
        if shard.dim == 0 and size is not None:
            return slice(shard.output_offset, shard.output_offset + size)
        return slice(0, layer.weight.shape[0])

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Static activations: one input scale per layer (the largest of the fused parts', as vLLM takes).
        CPU: replace the weight by its dequantized model-dtype copy. CUDA: check ``torch._scaled_mm``."""
        if hasattr(layer, "input_scale"):
            layer.static_input_scale = layer.input_scale.data.max().reshape(1).contiguous()
        w = layer.weight
        if w.device.type == "cpu" and self.config.cpu_dequantize:
            deq = (w.data.to(torch.float32) * layer.weight_scale.data[:, None]).to(self.params_dtype)
            layer.weight = nn.Parameter(deq, requires_grad=False)
            self.dequantized = True
            return
        n, k = w.shape
        self.use_scaled_mm = n % 16 == 0 and k % 16 == 0 and scaled_mm_works(w.device)

    # -- compute ----------------------------------------------------------------------------------
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.dequantized:
            from shardserve.model_executor.layers.quantization.base import linear

            return linear(x, layer.weight, bias)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        y = self._matmul(layer, x2, bias)
        return y.reshape(*lead, y.shape[-1])

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.dequantized and bias is None and x.dim() == 2 and _use_fp8_gemv(x):
            from shardserve.model_executor.kernels.fp8 import fp8_gemv

            return fp8_gemv(x, layer.weight, layer.weight_scale, silu_and_mul=True)
        return super().apply_silu_and_mul(layer, x, bias)

    def _matmul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``(M, K)`` -> ``(M, N)``: FP8 GEMV at 1-2 rows, ``_scaled_mm`` above, dequantized matmul otherwise."""
        w, scale = layer.weight, layer.weight_scale
        if _use_fp8_gemv(x):
            from shardserve.model_executor.kernels.fp8 import fp8_gemv

            return fp8_gemv(x, w, scale, bias)
        if not self.use_scaled_mm:
            return F.linear(x, (w.to(torch.float32) * scale[:, None]).to(x.dtype), bias)
        static = getattr(layer, "static_input_scale", None)
        xq, x_scale = quantize_activations(x.contiguous(), static, self.config.activation_scale_ub)
        y = scaled_mm_rowwise(xq, w, x_scale, scale).to(x.dtype)
        return y if bias is None else y + bias


def scaled_mm_rowwise(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``(xq * x_scale) @ (wq * w_scale[:, None]).T`` through ``torch._scaled_mm`` with row-wise scales (cuBLASLt
    or CUTLASS on sm90; fast accumulation on CUDA, as vLLM's FP8 GEMMs use).

    Args:
        xq: ``(M, K)`` e4m3, row-major; x_scale: ``(M, 1)`` fp32.
        wq: ``(N, K)`` e4m3, row-major (passed transposed: the column-major ``(K, N)`` operand cuBLASLt wants);
            w_scale: ``(N,)`` fp32. K and N multiples of 16.

    Returns:
        ``(M, N)`` bf16 (row-wise scaling writes bf16).
    """
    return torch._scaled_mm(
        xq, wq.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16, use_fast_accum=xq.is_cuda
    )


def _use_fp8_gemv(x: torch.Tensor) -> bool:
    """A batch of at most ``FP8_GEMV_MAX_ROWS`` rows that Triton can run (CUDA, or the interpreter)."""
    from shardserve.model_executor.kernels import HAS_TRITON, TRITON_INTERPRET
    from shardserve.model_executor.kernels.fp8 import FP8_GEMV_MAX_ROWS

    runs = HAS_TRITON and (x.is_cuda or TRITON_INTERPRET)
    return runs and x.dim() == 2 and x.shape[0] <= FP8_GEMV_MAX_ROWS and x.stride(-1) == 1


def quantize_weight_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)`` float weight -> e4m3 ``(N, K)`` and fp32 ``(N,)`` scales with ``w ~= q * scale[:, None]``,
    ``scale = amax_row / 448`` (an all-zero row gets scale 1)."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_activations(
    x: torch.Tensor, static_scale: torch.Tensor | None, scale_ub: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, K)`` -> e4m3 ``(M, K)`` and fp32 ``(M, 1)`` scales: the Triton kernel
    (:func:`~shardserve.model_executor.kernels.fp8.quantize_per_token`) where it runs, else the same in PyTorch."""
    from shardserve.model_executor.kernels import HAS_TRITON, TRITON_INTERPRET

    if HAS_TRITON and (x.is_cuda or TRITON_INTERPRET):
        from shardserve.model_executor.kernels.fp8 import quantize_per_token

        return quantize_per_token(x, static_scale, scale_ub)
    xf = x.float()
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    else:
        amax = xf.abs().amax(dim=1, keepdim=True)
        if scale_ub is not None:
            amax = amax.clamp(max=scale_ub)
        scale = (amax / FP8_MAX).clamp(min=1.0 / (FP8_MAX * 512.0))
    return (xf * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


_SCALED_MM_OK: dict[torch.device, bool] = {}


def scaled_mm_works(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales runs on ``device`` and gives the right numbers (checked
    once per device on a 32 x 32 product; a torch or cuBLASLt without row-wise FP8 logs one warning and the
    layers fall back to dequantized matmuls for batches above the GEMV's)."""
    if device not in _SCALED_MM_OK:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(17, 32, generator=gen).to(device)
        b = torch.randn(48, 32, generator=gen).to(device)
        qa, sa = quantize_weight_per_row(a)
        qb, sb = quantize_weight_per_row(b)
        want = (qa.float() * sa[:, None]) @ (qb.float() * sb[:, None]).T
        try:
            got = scaled_mm_rowwise(qa, qb, sa[:, None].contiguous(), sb).float()
            ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))
            reason = "" if ok else f"max error {float((got - want).abs().max()):.3g}"
        except (RuntimeError, TypeError) as e:
            ok, reason = False, str(e).splitlines()[0]
        if not ok:
            logger.warning(
                "torch._scaled_mm with row-wise FP8 scales is unusable on %s (%s): FP8 layers dequantize their "
                "weight for batches above the GEMV's rows (slow)",
                device,
                reason,
            )
        _SCALED_MM_OK[device] = ok
    return _SCALED_MM_OK[device]
