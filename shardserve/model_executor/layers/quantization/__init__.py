"""Quantized weights: a :class:`~.base.QuantizationConfig` per checkpoint, a :class:`~.base.LinearMethod`
per layer. ``QUANTIZATION_METHODS`` lists the ``--quantization`` names; modules are imported on use so
that importing the config layer stays light.
"""

from __future__ import annotations

from typing import Any

import torch

from shardserve.model_executor.layers.quantization.base import (
    LinearMethod,
    QuantizationConfig,
    UnquantizedLinearMethod,
    WeightShard,
)

QUANTIZATION_METHODS = ("gguf", "fp8")
"""Accepted ``--quantization`` values. ``gguf``: keep a GGUF file's blocks as stored (the default for GGUF
files on CUDA; on CPU it keeps memory small at the cost of dequantizing each layer per step). ``fp8``:
quantize a bf16/fp16/fp32 safetensors checkpoint to e4m3 at load (FP8 checkpoints are read as FP8 without
it; see :mod:`.fp8`)."""

__all__ = [
    "QUANTIZATION_METHODS",
    "LinearMethod",
    "QuantizationConfig",
    "UnquantizedLinearMethod",
    "WeightShard",
    "get_quantization_config",
]


def get_quantization_config(quantization: str | None, source: Any, device: torch.device) -> QuantizationConfig | None:
    """The quantization config for loading ``source`` (a ``ModelSource``) on ``device``, or None for plain weights.

    Args:
        quantization: the ``--quantization`` value; None uses the checkpoint's own scheme.
        source: the located model (``format``, ``path``, ``arch``).
        device: where the weights will live.

    Raises:
        ValueError: an unknown name, or a scheme that does not fit the checkpoint or the device.
    """
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {quantization!r}")
    config: QuantizationConfig | None = None
    if source.format == "gguf" and (quantization == "gguf" or (quantization is None and device.type == "cuda")):
        from shardserve.model_executor.layers.quantization.gguf import GGUFConfig
        from shardserve.model_executor.loader.resolve import open_gguf

        config = GGUFConfig.from_reader(open_gguf(source.path))
    elif quantization == "gguf":
        raise ValueError(f"--quantization gguf needs a GGUF file; {source.path} is a {source.format} checkpoint")
    else:  # FP8 checkpoints, or --quantization fp8 of a plain one
        from shardserve.model_executor.layers.quantization.fp8 import fp8_config_for

        config = fp8_config_for(quantization, source)
    if config is not None:
        config.verify_device(device)
    return config
