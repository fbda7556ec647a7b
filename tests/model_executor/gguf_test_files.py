"""Writing small GGUF files for tests: named tensors of any type, and a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from shardserve.model_executor.layers.quantization.gguf_blocks import block_type, random_blocks

T = gguf.GGMLQuantizationType


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]], arch: str = "llama", meta=None) -> Path:
    """``tensors``: name -> (data, type name); block types take ``(rows, bytes)`` uint8, floats their values."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=T[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def blocks(rng: np.random.Generator, rows: int, cols: int, qtype: str) -> np.ndarray:
    """Random blocks (small scales, so activations stay moderate through a model). Types without a kernel
    (``NO_KERNEL_SCALE``) get random bytes with a small fp16 scale at their scale's offset."""
    if supported(qtype):
        return random_blocks(rng, rows, cols, qtype, scale=(2e-4, 2e-3))
    block, nbytes = gguf.GGML_QUANT_SIZES[T[qtype]]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    d = rng.uniform(2e-4, 2e-3, size=(rows, cols // block)).astype(np.float16)
    off = NO_KERNEL_SCALE[qtype]
    raw[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


NO_KERNEL_SCALE = {"IQ4_NL": 0, "TQ2_0": 64}
"""Byte offset of the fp16 scale in a block of types without a kernel (``ggml-common.h``)."""


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """``convert_hf_to_gguf.py`` ``LlamaModel.permute`` on rows (works on rows of blocks as on values)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TINY = dict(hidden=256, inter=512, layers=2, heads=4, kv_heads=2, vocab=100)
"""A Llama small enough for the interpreter whose rows are whole K-quant super-blocks."""

TINY_TYPES = [
    # layer 0: Q4_K_M's mix (q/k Q4_K, v Q6_K: a QKV of two groups; down Q6_K)
    {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K", "ffn_gate": "Q4_K",
     "ffn_up": "Q4_K", "ffn_down": "Q6_K"},
    # layer 1: the 32-element block types and the other K-quants
    {"attn_q": "Q5_0", "attn_k": "Q5_1", "attn_v": "Q4_1", "attn_output": "Q2_K", "ffn_gate": "Q8_0",
     "ffn_up": "Q8_0", "ffn_down": "Q3_K"},
]  # fmt: skip


def tiny_llama_gguf(
    path: Path, seed: int = 0, embed: str = "Q4_0", output: str = "Q6_K", types: list[dict] | None = None
) -> Path:
    """A random 2-layer Llama in GGUF with every block type our kernels read (``types``: ``TINY_TYPES``)."""
    rng = np.random.default_rng(seed)
    h, i, heads, kv = TINY["hidden"], TINY["inter"], TINY["heads"], TINY["kv_heads"]
    head_dim = h // heads
    shapes = {
        "attn_q": (heads * head_dim, h),
        "attn_k": (kv * head_dim, h),
        "attn_v": (kv * head_dim, h),
        "attn_output": (h, heads * head_dim),
        "ffn_gate": (i, h),
        "ffn_up": (i, h),
        "ffn_down": (h, i),
    }
    tensors: dict[str, tuple[np.ndarray, str]] = {"token_embd.weight": (blocks(rng, TINY["vocab"], h, embed), embed)}
    for layer, layer_types in enumerate(types or TINY_TYPES):
        for part, (rows, cols) in shapes.items():
            data = blocks(rng, rows, cols, layer_types[part])
            if part in ("attn_q", "attn_k"):  # as llama.cpp stores them: rows permuted for its rotary layout
                data = llamacpp_permute(data, heads if part == "attn_q" else kv)
            tensors[f"blk.{layer}.{part}.weight"] = (data, layer_types[part])
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{layer}.{norm}.weight"] = ((1 + 0.1 * rng.standard_normal(h)).astype(np.float32), "F32")
    tensors["output_norm.weight"] = (np.ones(h, dtype=np.float32), "F32")
    if output is not None:
        tensors["output.weight"] = (blocks(rng, TINY["vocab"], h, output), output)
    meta = {
        "llama.embedding_length": h,
        "llama.feed_forward_length": i,
        "llama.block_count": len(types or TINY_TYPES),
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "llama.context_length": 128,
        "llama.vocab_size": TINY["vocab"],
    }
    return write_gguf(path, tensors, "llama", meta)


def supported(qtype: str) -> bool:
    return block_type(qtype) is not None
