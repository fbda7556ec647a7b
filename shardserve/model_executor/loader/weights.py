"""Lazy weight sources: a checkpoint tensor that a rank reads only in part.

Every checkpoint format yields ``(hf_name, WeightSource)`` pairs. A layer's ``weight_loader`` calls
``source.load(dim, start, size)`` for its own slice, so a TP rank of a safetensors checkpoint reads only
its shard from disk, and a pipeline stage that skips a name never reads it at all. Pickled checkpoints
(``*.bin``, ``*.pt``) are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

logger = logging.getLogger(__name__)


@runtime_checkable
class WeightSource(Protocol):
    """One checkpoint tensor, read on demand."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Full shape in Hugging Face layout (``(out_features, in_features)`` for linear weights)."""
        ...

    def load(self, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
        """The whole tensor, or ``size`` entries from ``start`` along ``dim`` (to the end when ``size`` is None)."""
        ...


def _slice_bounds(shape: tuple[int, ...], dim: int, start: int, size: int | None) -> tuple[int, int]:
    end = shape[dim] if size is None else start + size
    if not 0 <= start <= end <= shape[dim]:
        raise ValueError(f"slice [{start}, {end}) of dim {dim} is out of range for a tensor of shape {shape}")
    return start, end


class TensorSource:
    """A tensor already in memory (tests, tied weights)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def load(self, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
        if dim is None:
            return self.tensor
        start, end = _slice_bounds(self.shape, dim, start, size)
        return self.tensor.narrow(dim, start, end - start)


class SafetensorsSource:
    """One tensor of an open safetensors file, sliced with ``get_slice`` so only the needed bytes are read."""

    def __init__(self, handle: Any, name: str):
        self.handle = handle
        self.name = name
        self._slice = handle.get_slice(name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._slice.get_shape())

    def load(self, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
        if dim is None:
            return self.handle.get_tensor(self.name)
        start, end = _slice_bounds(self.shape, dim, start, size)
        index = (slice(None),) * dim + (slice(start, end),)
        return self._slice[index]


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face directory: from ``model.safetensors.index.json`` or a glob.

    Raises:
        ValueError: no safetensors file (pickled ``.bin`` checkpoints are not loaded), or the index names
            a missing shard.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    hint = ""
    if pickled:
        hint = f" (found {', '.join(pickled)}: pickled checkpoints are not loaded; convert them to safetensors)"
    raise ValueError(f"no *.safetensors weights in {model_dir}{hint}")


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, WeightSource]]:
    """``(name, source)`` for every tensor of the directory's safetensors files, names as saved.

    Raises:
        ValueError: see :func:`safetensors_files`, or a file that is not valid safetensors.
    """
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError types
            raise ValueError(f"cannot read safetensors file {path}: {e}") from None
        for name in handle.keys():
            yield name, SafetensorsSource(handle, name)


# ---------------------------------------------------------------------------------------------------
# GGUF


_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# Tensor types the loader accepts; gguf.quants.dequantize implements each.
GGUF_SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)


def gguf_to_hf_name(name: str) -> str | None:
    """Hugging Face parameter name of a llama.cpp tensor name, or None when it has none (``rope_freqs``)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    m = _GGUF_LAYER_RE.match(name)
    if m is None or m.group(2) not in _GGUF_LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (``convert_hf_to_gguf.py`` ``LlamaModel.permute``).

    llama.cpp reorders each head's rows from halves ``[x1 | x2]`` to interleaved pairs; this maps rows
    back to Hugging Face's rotate-half order (same as transformers' ``_reverse_permute_weights``).
    ``w`` is ``(n_head * head_dim, ...)``; 1-D biases work too.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFSource:
    """One tensor of a GGUF file, dequantized to fp32 on load, then optionally un-permuted and sliced.

    GGUF stores the dimensions in reverse (ggml ``ne``) order; :attr:`shape` is the Hugging Face order.
    Quantized blocks run along whole rows, so the full tensor is dequantized before slicing.
    """

    def __init__(self, tensor: Any, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.tensor = tensor
        self.transform = transform

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensor.shape.tolist()))

    def load(self, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
        full = self._dequantize()
        if self.transform is not None:
            full = self.transform(full)
        if dim is None:
            return full
        start, end = _slice_bounds(self.shape, dim, start, size)
        return full.narrow(dim, start, end - start)

    def _dequantize(self) -> torch.Tensor:
        from gguf.quants import dequantize

        qtype = self.tensor.tensor_type
        if qtype.name not in GGUF_SUPPORTED_TYPES:
            raise ValueError(
                f"GGUF tensor {self.tensor.name} has type {qtype.name}; "
                f"supported types: {', '.join(GGUF_SUPPORTED_TYPES)}"
            )
        array = np.asarray(dequantize(self.tensor.data, qtype), dtype=np.float32)
        return torch.from_numpy(array.reshape(self.shape).copy())


def iter_gguf(reader: Any, architecture: str, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, WeightSource]]:
    """``(hf_name, source)`` for every GGUF tensor that maps to a Hugging Face parameter.

    For ``general.architecture == "llama"`` the Q and K projections (weights and biases) are
    un-permuted; llama.cpp does not permute qwen2/qwen3.
    """
    for tensor in reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            logger.debug("skipping GGUF tensor %s (no Hugging Face counterpart)", tensor.name)
            continue
        transform = None
        if architecture == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            heads = num_heads if ".attn_q." in tensor.name else num_kv_heads
            transform = lambda w, heads=heads: unpermute_qk(w, heads)  # noqa: E731
        yield hf_name, GGUFSource(tensor, transform)
