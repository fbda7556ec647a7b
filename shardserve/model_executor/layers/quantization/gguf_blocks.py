"""GGUF block types our kernels read, and the bytes a GGUF tensor occupies per rank.

A GGUF quantized matrix ``(rows, cols)`` is stored row by row; each row is ``cols / block_size`` blocks of
``type_size`` bytes (``ggml-common.h``: ``block_q4_0`` ... ``block_q6_K``; sizes as
``gguf.constants.GGML_QUANT_SIZES``). A tensor-parallel slice must therefore cut a row between blocks:
output rows split freely, input columns only at multiples of ``block_size`` (32, or 256 for K-quant
super-blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class GGUFBlockType:
    """One block format (``ggml_type``)."""

    name: str
    """llama.cpp's name (``Q4_K``)."""
    type_id: int
    """``ggml_type`` / ``gguf.GGMLQuantizationType`` value."""
    block_size: int
    """Elements per block."""
    type_size: int
    """Bytes per block."""
    sub_size: int
    """Elements per sub-block that share one scale in our kernels (16 or 32)."""


FP16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
"""Byte offsets of the fp16 scales (``d``, ``m``/``dmin``) inside one block (``ggml-common.h``)."""

KERNEL_TYPES: dict[int, GGUFBlockType] = {
    t.type_id: t
    for t in (
        GGUFBlockType("Q4_0", 2, 32, 18, 16),
        GGUFBlockType("Q4_1", 3, 32, 20, 16),
        GGUFBlockType("Q5_0", 6, 32, 22, 16),
        GGUFBlockType("Q5_1", 7, 32, 24, 16),
        GGUFBlockType("Q8_0", 8, 32, 34, 32),
        GGUFBlockType("Q2_K", 10, 256, 84, 16),
        GGUFBlockType("Q3_K", 11, 256, 110, 16),
        GGUFBlockType("Q4_K", 12, 256, 144, 32),
        GGUFBlockType("Q5_K", 13, 256, 176, 32),
        GGUFBlockType("Q6_K", 14, 256, 210, 16),
    )
}
"""Block types with Triton kernels (``kernels/gguf_dequant.py``), by ``ggml_type``."""

GEMV_MAX_ROWS = 2
"""Largest number of rows of ``x`` that the layers send to the CUDA-core GEMV (``kernels/gguf_gemv.py``):
it spends two FMAs per weight and row, so from 3 rows the tensor-core kernel is cheaper per weight."""
GEMV_KERNEL_MAX_ROWS = 4
"""Largest number of rows the GEMV kernel itself takes."""
DEQUANT_MIN_ROWS = 256
"""Default number of rows from which a GGUF weight is dequantized to a scratch buffer for cuBLAS."""

FLOAT_TYPES = ("F32", "F16", "BF16")
"""GGUF float types: loaded as plain tensors in the model dtype."""


def block_type(qtype: int | str) -> GGUFBlockType | None:
    """The kernel block type of a ``ggml_type`` (id, name or ``GGMLQuantizationType``), None without a kernel."""
    if isinstance(qtype, str):
        return next((t for t in KERNEL_TYPES.values() if t.name == qtype), None)
    return KERNEL_TYPES.get(int(qtype))


def type_name(qtype: int | str) -> str:
    """llama.cpp's name of a ``ggml_type``."""
    if isinstance(qtype, str):
        return qtype
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(int(qtype)).name


def check_block_split(qtype: int | str, start: int, size: int, what: str = "input features") -> None:
    """Check that columns ``[start, start + size)`` of a GGUF matrix cut no block.

    Raises:
        ValueError: the slice does not fall on block boundaries (names the TP size that would fit).
    """
    t = block_type(qtype)
    if t is None or (start % t.block_size == 0 and size % t.block_size == 0):
        return
    raise ValueError(
        f"a {t.name} tensor is stored in blocks of {t.block_size} elements along its {what}; this rank's "
        f"slice [{start}, {start + size}) would cut a block: choose a --tensor-parallel-size that divides "
        f"{what} into multiples of {t.block_size}"
    )


def gguf_tensor_bytes(
    qtype: int | str,
    shape: tuple[int, ...],
    tp_size: int = 1,
    split_dim: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Bytes one rank holds of a GGUF tensor of logical (Hugging Face order) ``shape`` and type ``qtype``.

    Block types with a kernel stay as blocks: ``rows * cols / block_size * type_size``. Float types,
    1-D tensors and block types without a kernel (IQ*, TQ*: dequantized at load) take
    ``numel * dtype bytes``. ``split_dim`` 0 splits rows over ``tp_size`` ranks (rounded up, as the
    vocabulary is padded), 1 splits columns (which must fall on block boundaries), None replicates.
    For a KV projection with more TP ranks than KV heads, pass ``tp_size=num_kv_heads``: each rank
    then holds one whole head.

    Raises:
        ValueError: a column split that would cut a block, or a ``split_dim`` the shape does not have.
    """
    dims = [int(d) for d in shape]
    if split_dim is not None:
        if not 0 <= split_dim < len(dims):
            raise ValueError(f"split_dim {split_dim} out of range for shape {tuple(dims)}")
        if split_dim == len(dims) - 1 and len(dims) > 1 and dims[-1] % tp_size == 0:
            check_block_split(qtype, 0, dims[-1] // tp_size)
        dims[split_dim] = -(-dims[split_dim] // tp_size)
    t = block_type(qtype)
    if t is None or len(dims) < 2:
        return math.prod(dims) * torch.empty((), dtype=dtype).element_size()
    if dims[-1] % t.block_size:
        raise ValueError(f"{t.name} rows of {dims[-1]} elements are not whole blocks of {t.block_size}")
    return math.prod(dims[:-1]) * (dims[-1] // t.block_size) * t.type_size


MIN_UNIT = {12: 1, 14: 2, 8: 2}
"""Blocks per thread of the int8 decode GEMV at least, by ``ggml_type``: Q6_K and Q8_0 blocks are read in
pairs, which are 4-byte aligned (Q6_K in fours, 8-byte aligned, where the row's blocks divide by 4)."""


def row_layout(qtype: int, blocks_per_row: int, packed: bool = True) -> tuple[int, int]:
    """``(PER, V)``: how a row of blocks of ``qtype`` sits in device memory.

    The int8 decode GEMV (``kernels/gguf_dp4a.py``) gives each thread a unit of ``PER`` consecutive blocks
    and reads it in words of ``V`` bytes, so in file order the 32 threads of a warp each read a different
    cache line per load instruction (the unit's bytes are contiguous, the units of a warp's threads are not).
    In the packed layout a row of ``U = blocks_per_row / PER`` units of ``C = PER * type_size / V`` chunks
    is stored chunk-major: byte ``o`` of unit ``u`` is at ``(o // V) * U * V + u * V + o % V``, so a warp
    reading chunk ``c`` of consecutive units reads consecutive bytes (as Marlin repacks GPTQ weights for
    its loads; here the bytes of a unit stay as they are, only their order in the row changes). Rows stay
    ``blocks_per_row * type_size`` bytes, row-major.

    Packed types: Q4_K (units of one block, 16-byte chunks: 9 per block), Q6_K (four blocks in 8-byte chunks
    where the row's blocks divide by 4, else pairs in 4-byte chunks), Q8_0 (pairs, 4-byte chunks: its
    34-byte blocks are only 2-byte aligned). ``(PER, PER * type_size)`` (one chunk per unit) is file order:
    every other type, an odd row of Q6_K/Q8_0 blocks, or ``packed=False``.

    Raises:
        ValueError: ``qtype`` has no kernel.
    """
    t = block_type(qtype)
    if t is None:
        raise ValueError(f"no GGUF kernel for ggml_type {qtype}")
    per = 4 if qtype == 14 and blocks_per_row % 4 == 0 else MIN_UNIT.get(qtype, 1)
    chunk = {12: 16, 14: 8 if per == 4 else 4, 8: 4}.get(qtype)
    if not packed or chunk is None or blocks_per_row % per:
        return per, per * t.type_size
    return per, chunk


def _chunks(raw: torch.Tensor, qtype: int) -> tuple[int, int, int, int]:
    t = block_type(qtype)
    if t is None or raw.dim() != 2 or raw.shape[1] % t.type_size:
        raise ValueError(f"expected (rows, blocks * {t.type_size if t else '?'}) bytes, got {tuple(raw.shape)}")
    per, v = row_layout(qtype, raw.shape[1] // t.type_size)
    return raw.shape[0], raw.shape[1] // (per * t.type_size), per * t.type_size // v, v


def pack_rows(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """Rows of blocks in file order -> the packed layout of :func:`row_layout` (a new tensor; the input
    itself where that layout is file order).

    Args:
        raw: ``(rows, blocks * type_size)`` uint8 (any device).

    Raises:
        ValueError: a shape that is not whole blocks.
    """
    n, units, chunks, v = _chunks(raw, qtype)
    if chunks == 1:
        return raw
    return raw.reshape(n, units, chunks, v).transpose(1, 2).reshape(n, -1)


def unpack_rows(packed: torch.Tensor, qtype: int) -> torch.Tensor:
    """The inverse of :func:`pack_rows`: packed rows back in file order (for the CPU formulas and tests)."""
    n, units, chunks, v = _chunks(packed, qtype)
    if chunks == 1:
        return packed
    return packed.reshape(n, chunks, units, v).transpose(1, 2).reshape(n, -1)


def dequantize_blocks(raw: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize GGUF rows of blocks on the CPU with the ``gguf`` package's formulas.

    Calls the type's ``gguf.quants.<TYPE>.dequantize_blocks`` once over every block of the tensor
    (``gguf.quants.dequantize`` splits the work into groups of 16 rows, whose Python overhead dominates
    when a layer is dequantized at every step).

    Args:
        raw: ``(rows, cols / block_size * type_size)`` uint8 on the CPU.
        qtype: the ``ggml_type`` (a block type with a kernel).

    Returns:
        ``(rows, cols)`` in ``dtype``.
    """
    import gguf.quants

    t = block_type(qtype)
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw.numpy()).reshape(-1, t.type_size)
    values = getattr(gguf.quants, t.name).dequantize_blocks(blocks)
    return torch.from_numpy(values.reshape(rows, -1)).to(dtype)


def random_blocks(
    rng: np.random.Generator, rows: int, cols: int, qtype: str, scale: tuple[float, float] = (1e-3, 2e-2)
) -> np.ndarray:
    """Random GGUF blocks of type ``qtype`` for a ``(rows, cols)`` matrix: random bytes whose fp16 scales get
    a positive exponent drawn so that each scale lies in ``[2**floor(log2 lo), 2**floor(log2 hi))`` (the
    kernels read any bit pattern the same way; finite small scales keep the values finite and the matmuls
    well scaled). One draw of random bytes, then one in-place bit operation per scale: about 1 GB/s,
    fast enough for a 40 GB file.

    Returns:
        ``(rows, cols / block_size * type_size)`` uint8.

    Raises:
        ValueError: no block layout for ``qtype``, or a scale range outside fp16's normal numbers.
    """
    t = block_type(qtype)
    if t is None:
        raise ValueError(f"no block layout for {qtype}")
    e_lo = math.floor(math.log2(scale[0]))
    e_hi = max(e_lo, math.floor(math.log2(scale[1])) - 1)
    if e_lo < -14 or e_hi > 15:
        raise ValueError(f"scale range {scale} is outside fp16's normal numbers")
    nblk = cols // t.block_size
    raw = rng.integers(0, 256, size=(rows, nblk, t.type_size), dtype=np.uint8)
    for off in FP16_FIELDS[t.name]:
        high = raw[:, :, off + 1]  # little-endian fp16: sign, 5 exponent bits, top 2 mantissa bits
        exponent = (e_lo + 15) + (high >> 2) % (e_hi - e_lo + 1)
        raw[:, :, off + 1] = (high & 0x03) | (exponent.astype(np.uint8) << 2)
    return raw.reshape(rows, nblk * t.type_size)
