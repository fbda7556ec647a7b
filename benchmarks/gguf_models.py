"""GGUF files of real Llama shapes with random blocks in the tensor types of llama.cpp's quantization recipes.

``write_llama_gguf(path, hf_config, "Q4_K_M")`` writes a file that shardserve serves like a downloaded one:
llama.* metadata, a byte-level BPE tokenizer (every byte is a token, so any text encodes; the other ids are
words ``t<id>``), F32 norms and every matrix in the type the recipe gives it. The types follow
``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp``:

- Q8_0: every matrix Q8_0 (the output too).
- Q4_K_M: Q4_K, except ``output`` Q6_K, and ``attn_v``/``ffn_down`` Q6_K on the layers of ``use_more_bits``
  (the first and last eighth and every third layer between); on 80-layer (70B) models the other
  ``attn_v`` are Q5_K.
- Q4_K_S: Q4_K, except ``output`` Q6_K, ``attn_v`` Q5_K on the first 4 layers (all of them on 70B),
  ``ffn_down`` Q5_K on the first eighth of the layers.

Blocks are random bytes with small finite fp16 scales (``random_blocks``); to write 40 GB quickly each type
draws one pool of random blocks and every tensor is a window of it (the kernels' speed does not depend on
the values).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

RECIPES = ("Q4_K_M", "Q4_K_S", "Q8_0")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the layers that get more bits in the *_M recipes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(recipe: str, part: str, layer: int | None, n_layers: int) -> str:
    """The GGUF type of matrix ``part`` (``attn_q`` ... ``ffn_down``, ``token_embd``, ``output``) of ``layer``.

    Raises:
        ValueError: an unknown recipe.
    """
    if recipe == "Q8_0":
        return "Q8_0"
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    is_70b = n_layers == 80  # llama.cpp's LLM_TYPE_70B for Llama
    if part == "output":
        return "Q6_K"
    if part == "attn_v":
        if recipe == "Q4_K_M" and use_more_bits(layer, n_layers):
            return "Q6_K"
        if recipe == "Q4_K_S" and layer < 4:
            return "Q5_K"
        return "Q5_K" if is_70b else "Q4_K"
    if part == "ffn_down":
        if recipe == "Q4_K_M" and use_more_bits(layer, n_layers):
            return "Q6_K"
        if recipe == "Q4_K_S" and layer < n_layers // 8:
            return "Q5_K"
    return "Q4_K"


class _BlockPool:
    """Random blocks per type, drawn once; tensors are windows of the pool at random offsets."""

    def __init__(self, seed: int, scale: tuple[float, float], pool_bytes: int = 64 << 20):
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self.pool_bytes = pool_bytes
        self.pools: dict[str, np.ndarray] = {}

    def take(self, qtype: str, rows: int, cols: int) -> np.ndarray:
        from shardserve.model_executor.layers.quantization.gguf_blocks import block_type, random_blocks

        t = block_type(qtype)
        if qtype not in self.pools:
            nblk = max(1, self.pool_bytes // t.type_size)
            self.pools[qtype] = random_blocks(self.rng, nblk, t.block_size, qtype, self.scale).reshape(-1)
        pool = self.pools[qtype]
        need = rows * (cols // t.block_size) * t.type_size
        start = int(self.rng.integers(0, pool.size // t.type_size)) * t.type_size
        reps = -(-(start + need) // pool.size)
        flat = np.concatenate([pool] * reps)[start : start + need] if reps > 1 else pool[start : start + need]
        return flat.reshape(rows, -1)


def _tokenizer_meta(vocab_size: int) -> dict[str, Any]:
    from shardserve.transformers_utils.tokenizer import bytes_to_unicode

    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + ["ab"] + [f"t{i}" for i in range(len(byte_tokens) + 1, vocab_size)]  # "ab": the merge
    return {
        "tokens": tokens[:vocab_size],
        "bos": vocab_size - 2,
        "eos": vocab_size - 1,
    }


def write_llama_gguf(
    path: str | Path,
    hf_config: dict[str, Any],
    recipe: str,
    seed: int = 0,
    scale: tuple[float, float] = (2e-4, 2e-3),
    log=print,
) -> dict[str, Any]:
    """Write a random Llama of ``hf_config`` (config.json fields) as a GGUF file of ``recipe``'s types.

    Returns:
        ``{"path", "file_bytes", "seconds", "bytes_by_type": {type: bytes of its matrices}}``.
    """
    import gguf

    from shardserve.model_executor.layers.quantization.gguf_blocks import block_type

    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, inter = int(hf_config["hidden_size"]), int(hf_config["intermediate_size"])
    n_layers, heads = int(hf_config["num_hidden_layers"]), int(hf_config["num_attention_heads"])
    kv = int(hf_config.get("num_key_value_heads") or heads)
    head_dim = int(hf_config.get("head_dim") or h // heads)
    vocab = int(hf_config["vocab_size"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.context_length", min(int(hf_config.get("max_position_embeddings", 8192)), 8192))
    w.add_uint32("llama.embedding_length", h)
    w.add_uint32("llama.block_count", n_layers)
    w.add_uint32("llama.feed_forward_length", inter)
    w.add_uint32("llama.attention.head_count", heads)
    w.add_uint32("llama.attention.head_count_kv", kv)
    w.add_uint32("llama.attention.key_length", head_dim)
    w.add_uint32("llama.attention.value_length", head_dim)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", float(hf_config.get("rms_norm_eps", 1e-5)))
    w.add_float32("llama.rope.freq_base", float(hf_config.get("rope_theta", 10000.0)))
    w.add_uint32("llama.vocab_size", vocab)
    tok = _tokenizer_meta(vocab)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", tok["tokens"])
    w.add_array("tokenizer.ggml.merges", ["a b"])
    w.add_uint32("tokenizer.ggml.bos_token_id", tok["bos"])
    w.add_uint32("tokenizer.ggml.eos_token_id", tok["eos"])

    shapes = {
        "attn_q": (heads * head_dim, h),
        "attn_k": (kv * head_dim, h),
        "attn_v": (kv * head_dim, h),
        "attn_output": (h, heads * head_dim),
        "ffn_gate": (inter, h),
        "ffn_up": (inter, h),
        "ffn_down": (h, inter),
    }
    plan: list[tuple[str, str | None, tuple[int, int]]] = [
        ("token_embd.weight", tensor_type(recipe, "token_embd", None, n_layers), (vocab, h))
    ]
    for i in range(n_layers):
        plan.append((f"blk.{i}.attn_norm.weight", None, (h,)))
        for part, shape in shapes.items():
            plan.append((f"blk.{i}.{part}.weight", tensor_type(recipe, part, i, n_layers), shape))
        plan.append((f"blk.{i}.ffn_norm.weight", None, (h,)))
    plan.append(("output_norm.weight", None, (h,)))
    if not hf_config.get("tie_word_embeddings", False):
        plan.append(("output.weight", tensor_type(recipe, "output", None, n_layers), (vocab, h)))

    by_type: dict[str, int] = {}
    for name, qtype, shape in plan:
        if qtype is None:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
            by_type["F32"] = by_type.get("F32", 0) + 4 * shape[0]
            continue
        t = block_type(qtype)
        rows, cols = shape
        nbytes = rows * cols // t.block_size * t.type_size
        w.add_tensor_info(name, (rows, nbytes // rows), np.dtype(np.uint8), nbytes, gguf.GGMLQuantizationType[qtype])
        by_type[qtype] = by_type.get(qtype, 0) + nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    pool = _BlockPool(seed, scale)
    norm = np.ones(h, dtype=np.float32)
    written = 0
    for n, (_, qtype, shape) in enumerate(plan):
        data = norm if qtype is None else pool.take(qtype, *shape)
        w.write_tensor_data(data)
        written += data.nbytes
        if n % 100 == 0 and n:
            log(f"  writing {path.name}: {written / 1e9:.1f} GB")
    w.close()
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "seconds": time.perf_counter() - t0,
        "bytes_by_type": by_type,
    }
