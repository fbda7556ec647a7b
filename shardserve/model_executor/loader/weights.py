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
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from shardserve.model_executor.layers.quantization.gguf_blocks import check_block_split

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
        except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError types)
            raise ValueError(f"cannot read safetensors file {path}: {e}") from None
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
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
    """One tensor of a memory-mapped GGUF file, read in this rank's slice only.

    GGUF stores the dimensions in reverse (ggml ``ne``) order; :attr:`shape` is the Hugging Face order
    ``(rows, cols)``. Quantized rows are runs of blocks (``gguf_blocks``), so a slice of rows reads just those
    rows and a slice of columns reads the blocks it covers (it must start and end on a block boundary).
    :meth:`load_blocks` returns the raw block bytes (kept quantized), :meth:`load` the values dequantized
    with ``gguf.quants.dequantize``. With ``qk_heads`` the rows are un-permuted from llama.cpp's rotary
    layout (:func:`unpermute_qk`): a permutation of whole rows within each head, so it applies to raw
    block rows unchanged and commutes with a head-aligned row slice.
    """

    def __init__(self, tensor: Any, qk_heads: int | None = None):
        self.tensor = tensor
        self.qk_heads = qk_heads

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensor.shape.tolist()))

    @property
    def tensor_type(self) -> Any:
        """The ``gguf.GGMLQuantizationType`` of the stored blocks."""
        return self.tensor.tensor_type

    def load_blocks(self, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
        """Raw GGUF blocks of the slice (``dim``, ``start``, ``size`` in elements, as :meth:`load`).

        Returns:
            ``(rows, cols / block_size * type_size)`` uint8 on the CPU.

        Raises:
            ValueError: the slice is out of range, cuts a block, or the tensor is not a 2-D block type.
        """
        if len(self.shape) != 2 or self.tensor.data.dtype != np.uint8:
            raise ValueError(f"GGUF tensor {self.tensor.name} ({self.tensor_type.name}) is not a matrix of blocks")
        return _readonly_tensor(np.ascontiguousarray(self._raw(dim, start, size, strict=True)))

    def load(self, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
        """The slice dequantized to fp32 (the whole tensor when ``dim`` is None).

        Raises:
            ValueError: the slice is out of range, or ``gguf`` cannot dequantize the tensor's type.
        """
        from gguf.quants import dequantize

        raw, narrow = self._raw(dim, start, size), None
        if raw is None:  # a column slice inside blocks: dequantize whole rows, then cut
            raw, narrow = self._raw(None, 0, None), _slice_bounds(self.shape, dim, start, size)
        try:
            values = np.asarray(dequantize(raw, self.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise ValueError(
                f"GGUF tensor {self.tensor.name} has type {self.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        rows = raw.shape[0] if len(self.shape) == 2 else -1
        out = torch.from_numpy(values.reshape(rows, -1) if len(self.shape) == 2 else values.copy())
        if narrow is not None:
            out = out.narrow(1, narrow[0], narrow[1] - narrow[0])
        return out.contiguous()

    def _raw(self, dim: int | None, start: int, size: int | None, strict: bool = False) -> np.ndarray | None:
        """The stored rows/bytes of the slice, un-permuted; for a column slice that cuts a block, a
        ``ValueError`` with ``strict``, else None."""
        data = self.tensor.data
        if dim is None:
            return self._unpermute(np.asarray(data), self.qk_heads)
        start, end = _slice_bounds(self.shape, dim, start, size)
        if dim == 0:
            heads = self.qk_heads
            if heads is not None:
                head_dim = self.shape[0] // heads
                if start % head_dim or end % head_dim:  # not whole heads: permute everything, then cut
                    return self._unpermute(np.asarray(data), heads)[start:end]
                heads = (end - start) // head_dim
            return self._unpermute(np.asarray(data[start:end]), heads)
        if dim != 1 or len(self.shape) != 2:
            raise ValueError(f"cannot slice GGUF tensor {self.tensor.name} of shape {self.shape} along dim {dim}")
        if data.dtype != np.uint8:  # float types: elements are stored as they are
            return self._unpermute(np.asarray(data[:, start:end]), self.qk_heads)
        from gguf import GGML_QUANT_SIZES

        block, nbytes = GGML_QUANT_SIZES[self.tensor_type]
        if start % block or end % block:
            if strict:
                check_block_split(self.tensor_type, start, end - start)
                raise ValueError(f"columns [{start}, {end}) cut the {block}-element blocks of {self.tensor.name}")
            return None
        cols = data[:, start // block * nbytes : end // block * nbytes]
        return self._unpermute(np.asarray(cols), self.qk_heads)

    @staticmethod
    def _unpermute(rows: np.ndarray, heads: int | None) -> np.ndarray:
        if heads is None:
            return rows
        return unpermute_qk(_readonly_tensor(np.ascontiguousarray(rows)), heads).numpy()


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` of a view of the read-only memory map, without a copy; callers only read it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


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
        heads = None
        if architecture == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            heads = num_heads if ".attn_q." in tensor.name else num_kv_heads
        yield hf_name, GGUFSource(tensor, heads)
