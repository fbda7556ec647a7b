"""What ``serve`` holds of a model's weights, per rank: the checkpoint's tensors (from a config, a llama.cpp file
type or a GGUF file's header) and their bytes on the device as the quantization schemes count them.

Used by :mod:`shardserve.tools.plan`; see its docstring for how the bytes become a layout. Sources:
``LlamaForCausalLM`` for which parameters a rank creates and how TP splits them (Megatron-LM column/row
parallel, ``QKVParallelLinear``, ``VocabParallelEmbedding``); ``gguf_weight_bytes`` and ``Fp8Config.weight_bytes``
for the bytes of quantized tensors; llama.cpp's ``llama_tensor_get_type`` for the types of its file types.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardserve.config import DTYPES, ModelArchConfig, check_parallel_layout
from shardserve.model_executor.layers.quantization.base import ModelWeightBytes
from shardserve.tools.known_models import (
    find_known_model,
    known_model_names,
    llama_cpp_tensor_type,
    split_quant_suffix,
)

DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "fp32": 4,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "bfloat16": 2,
    "bf16": 2,
    "fp8": 1,
    "float8": 1,
    "int8": 1,
    "int4": 0.5,
}
"""Bytes per element of unquantised dtypes (int4 as packed pairs); storage types of checkpoints."""
COMPUTE_DTYPES = tuple(DTYPES)
"""dtypes ``serve --dtype`` computes in: activations, unquantized weights, the KV cache unless fp8."""
ROPE_CACHE_BYTES_PER_ELEMENT = 4
"""``RotaryEmbedding`` keeps its cos/sin caches in fp32."""


def ggml_type_of(name: str) -> str | None:
    """The GGML tensor type behind a GGML type or llama.cpp file-type name, any case (``q4_k_m`` -> ``Q4_K``).

    A file type such as Q4_K_M mixes types; its main one (Q4_K) is returned. None for other names.
    """
    from gguf import GGMLQuantizationType, LlamaFileType

    key = name.strip().upper().removeprefix("MOSTLY_")
    if key in GGMLQuantizationType.__members__:
        return key
    if f"MOSTLY_{key}" in LlamaFileType.__members__:
        base = re.sub(r"_(S|M|L|XS|XXS)$", "", key)
        return base if base in GGMLQuantizationType.__members__ else None
    return None


def bytes_per_param(dtype: str) -> float:
    """Bytes per weight as stored, for a dtype name (bf16, fp8, ...), a GGML type (q4_k, q8_0) or a
    llama.cpp file type (Q4_K_S, Q4_K_M, Q5_K_M, Q6_K, Q8_0; any case, read as its main GGML type).

    GGML types use ``type_size / block_size`` from ``gguf.GGML_QUANT_SIZES`` (Q4_K: 144/256 = 0.5625).

    Raises:
        ValueError: unknown name.
    """
    if dtype.lower() in DTYPE_BYTES:
        return float(DTYPE_BYTES[dtype.lower()])
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    ggml = ggml_type_of(dtype)
    if ggml is None:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}, a GGML type such as q4_k or q8_0, "
            "or a llama.cpp file type such as Q4_K_M"
        )
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml]]
    return type_size / block


# ----------------------------------------------------------------------------- weights

FP8_NAMES = ("fp8", "float8")
"""``--weight-dtype`` names of an FP8 checkpoint."""
BUILTIN_FP8_QUANTIZATION: dict[str, Any] = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        }
    },
}
"""The ``quantization_config`` a built-in name stored in fp8 is read with: llm-compressor's FP8-dynamic layout (every
decoder linear layer in e4m3 with one scale per output row, the LM head in bf16), as the Llama-3.1 ``-FP8-dynamic``
checkpoints. For another layout plan the checkpoint's own directory (its config.json is read)."""
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class WeightTensor:
    """One checkpoint tensor as stored."""

    name: str
    """Hugging Face name (config models) or llama.cpp name (GGUF files and llama.cpp file types)."""
    numel: int
    stored_type: str
    """Storage dtype or GGML type (``bf16``, ``fp8``, ``Q4_K``, ...)."""
    nbytes: int
    """Bytes in the checkpoint."""
    shape: tuple[int, ...] = ()
    """Logical shape, Hugging Face order (``(out_features, in_features)``; GGUF's ``ne`` reversed)."""


@dataclass
class ModelWeights:
    """A model's architecture and its checkpoint tensors, from a config (estimated) or a GGUF file (actual)."""

    name: str
    arch: ModelArchConfig
    tensors: list[WeightTensor]
    source: str
    """``config`` (estimated from the architecture and a storage type) or ``gguf`` (the file's tensor table)."""
    weight_dtype: str
    """Storage of the checkpoint: a dtype, ``fp8``, a llama.cpp file type, or ``gguf`` (the file's own types)."""
    file_bytes: int | None = None
    """Size of the GGUF file (bytes) when read from one."""
    format: str = "hf"
    """How ``serve`` reads it: ``gguf`` (GGUF tensors, names as llama.cpp's) or ``hf`` (safetensors)."""
    quantization_config: dict[str, Any] | None = None
    """config.json's ``quantization_config`` (FP8 checkpoints), or :data:`BUILTIN_FP8_QUANTIZATION`."""
    _parts: dict[tuple, ModelWeightBytes] = field(default_factory=dict, repr=False, compare=False)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the checkpoint's tensors."""
        return sum(t.nbytes for t in self.tensors)

    def stored_types(self) -> set[str]:
        return {t.stored_type for t in self.tensors}


def hf_tensor_shapes(arch: ModelArchConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor of a Hugging Face checkpoint of ``arch``; the elements add up to
    ``arch.num_params()``."""
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    shapes = [("model.embed_tokens.weight", (arch.vocab_size, h))]
    for n in range(arch.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]  # fmt: skip
        if arch.attention_bias:
            shapes += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                       (p + "self_attn.v_proj.bias", (kv,))]  # fmt: skip
        if arch.qk_norm:
            shapes += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
    shapes.append(("model.norm.weight", (h,)))
    if not arch.tie_word_embeddings:
        shapes.append(("lm_head.weight", (arch.vocab_size, h)))
    return shapes


def arch_tensors(arch: ModelArchConfig, weight_dtype: str = "bf16") -> list[WeightTensor]:
    """The checkpoint tensors of a config, named as in Hugging Face checkpoints, stored in ``weight_dtype``.

    ``fp8``: the decoder's linear weights in e4m3 with a ``weight_scale`` of ``(out_features, 1)`` fp32 each,
    the rest in ``arch.torch_dtype`` (bf16 by default), as :data:`BUILTIN_FP8_QUANTIZATION` lays them out.
    Other names store every tensor in that type (a GGML type: its ``type_size / block_size``).
    """
    if weight_dtype.lower() not in FP8_NAMES:
        bpp = bytes_per_param(weight_dtype)
        stored = weight_dtype.lower() if weight_dtype.lower() in DTYPE_BYTES else weight_dtype.upper()
        shapes = hf_tensor_shapes(arch)
        return [WeightTensor(n, math.prod(s), stored, math.ceil(math.prod(s) * bpp), s) for n, s in shapes]
    rest = (arch.torch_dtype or "bf16").lower()
    out = []
    for name, shape in hf_tensor_shapes(arch):
        if _LAYER_RE.match(name) and name.endswith("proj.weight"):
            out += [WeightTensor(name, math.prod(shape), "fp8", math.prod(shape), shape),
                    WeightTensor(name.removesuffix("weight") + "weight_scale", shape[0], "fp32", 4 * shape[0],
                                 (shape[0], 1))]  # fmt: skip
        else:
            out.append(WeightTensor(name, math.prod(shape), rest, int(math.prod(shape) * bytes_per_param(rest)), shape))
    return out


def llama_cpp_tensors(arch: ModelArchConfig, file_type: str) -> list[WeightTensor]:
    """The tensors of a GGUF file of ``arch`` that ``llama-quantize`` writes in ``file_type``, named as llama.cpp
    names them: each matrix in the type of :func:`~shardserve.tools.known_models.llama_cpp_tensor_type`, norms F32.

    Raises:
        ValueError: an unknown file type.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    d = arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    h, i = arch.hidden_size, arch.intermediate_size
    parts = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
             "ffn_gate": (i, h), "ffn_up": (i, h), "ffn_down": (h, i)}  # fmt: skip
    matrices = [("token_embd.weight", "token_embd", None, (arch.vocab_size, h))]
    norms = [("output_norm.weight", (h,))]
    for n in range(arch.num_hidden_layers):
        matrices += [(f"blk.{n}.{part}.weight", part, n, shape) for part, shape in parts.items()]
        norms += [(f"blk.{n}.attn_norm.weight", (h,)), (f"blk.{n}.ffn_norm.weight", (h,))]
        if arch.attention_bias:
            norms += [(f"blk.{n}.attn_q.bias", (q,)), (f"blk.{n}.attn_k.bias", (kv,)), (f"blk.{n}.attn_v.bias", (kv,))]
    if not arch.tie_word_embeddings:
        matrices.append(("output.weight", "output", None, (arch.vocab_size, h)))
    out = [WeightTensor(name, shape[0], "F32", 4 * shape[0], shape) for name, shape in norms]
    for name, part, layer, shape in matrices:
        qtype = llama_cpp_tensor_type(file_type, part, layer, arch)
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
        out.append(WeightTensor(name, math.prod(shape), qtype, math.prod(shape) // block * size, shape))
    return out


def weights_from_arch(
    name: str, arch: ModelArchConfig, weight_dtype: str = "bf16", quantization_config: dict[str, Any] | None = None
) -> ModelWeights:
    """Estimated checkpoint of a config stored in ``weight_dtype``: a dtype (safetensors), ``fp8`` (an FP8
    checkpoint, :data:`BUILTIN_FP8_QUANTIZATION` unless ``quantization_config`` is given), or a GGML type or
    llama.cpp file type (the GGUF file :func:`llama_cpp_tensors` describes).

    Raises:
        ValueError: an unknown storage name.
    """
    if weight_dtype.lower() not in DTYPE_BYTES and ggml_type_of(weight_dtype) is not None:
        tensors = llama_cpp_tensors(arch, weight_dtype)
        return ModelWeights(name, arch, tensors, "config", weight_dtype.upper(), format="gguf")
    if weight_dtype.lower() in FP8_NAMES:
        quantization_config = quantization_config or BUILTIN_FP8_QUANTIZATION
    return ModelWeights(name, arch, arch_tensors(arch, weight_dtype), "config", weight_dtype,
                        quantization_config=quantization_config)  # fmt: skip


def weights_from_gguf(path: str | Path) -> ModelWeights:
    """Actual checkpoint of a GGUF file: each tensor's type, shape and stored bytes from the file's header; the
    architecture from its metadata (:func:`shardserve.model_executor.loader.resolve.resolve_model`).

    Raises:
        ValueError: unreadable file, unsupported architecture or incomplete metadata.
    """
    from shardserve.model_executor.loader.resolve import read_gguf_header, resolve_model

    path = Path(path)
    source = resolve_model(str(path))
    tensors = [
        WeightTensor(t.name, t.n_elements, t.type_name, t.n_bytes, tuple(reversed(t.shape)))
        for t in read_gguf_header(path).tensors.values()
    ]
    return ModelWeights(source.name, source.arch, tensors, "gguf", "gguf", path.stat().st_size, format="gguf")


def load_model_weights(model: str, weight_dtype: str | None = None) -> ModelWeights:
    """Resolve ``model`` offline: a .gguf file or HF directory, a built-in name (:mod:`known_models`: base or
    Instruct, with or without ``Meta-``, optionally with a llama.cpp quant suffix such as ``-Q4_K_S`` or
    ``-FP8``), or a hub id in the local HF cache (files and hub ids through ``resolve_model``).

    ``weight_dtype`` is the checkpoint's storage for config-based models (default: a name's quant suffix, else
    what config.json says: its FP8 ``quantization_config``, else ``torch_dtype``, else bf16); a GGUF's own
    tensor types are used as stored.

    Raises:
        ValueError: nothing matches (the message lists the built-in names), or an unreadable config.json.
    """
    from shardserve.model_executor.layers.quantization.fp8 import CHECKPOINT_METHODS, checkpoint_quantization_config
    from shardserve.model_executor.loader.resolve import resolve_model

    if not Path(model).expanduser().exists():
        base, quant = split_quant_suffix(model)
        known = find_known_model(base)
        if known is not None:
            return weights_from_arch(known.short_name, known.arch(), weight_dtype or quant or "bf16")
    try:
        source = resolve_model(model)
    except ValueError as e:
        raise ValueError(
            f"cannot resolve model {model!r}: {e}; built-in names: {', '.join(known_model_names())}"
        ) from e
    if source.format == "gguf":
        return weights_from_gguf(source.path)
    quant = checkpoint_quantization_config(source)
    stored = "fp8" if quant and quant.get("quant_method") in CHECKPOINT_METHODS else source.arch.torch_dtype
    return weights_from_arch(source.name, source.arch, weight_dtype or stored or "bf16", quant)


# ----------------------------------------------------------------------------- bytes held per rank


@dataclass(frozen=True)
class RankTensor:
    """One parameter ``LlamaForCausalLM`` creates on a rank, as the checkpoint tensor it is loaded from."""

    name: str
    """Hugging Face checkpoint name (the fused q/k/v and gate/up parameters are listed by their parts)."""
    shape: tuple[int, ...]
    """The whole checkpoint tensor's shape, ``(out_features, in_features)`` for matrices."""
    split_dim: int | None
    """0: rows split (column parallel, vocabulary), 1: columns split (row parallel), None: replicated."""
    tp: int
    """Ranks the tensor is split over: the TP size, or ``min(tp, num_kv_heads)`` for K/V (one head each)."""

    @property
    def numel(self) -> int:
        """Elements on one rank (the split dimension rounded up, as the vocabulary is padded)."""
        dims = list(self.shape)
        if self.split_dim is not None:
            dims[self.split_dim] = -(-dims[self.split_dim] // self.tp)
        return math.prod(dims)


def rank_parameters(arch: ModelArchConfig, tp: int, layer_range: tuple[int, int]) -> list[RankTensor]:
    """The parameters ``LlamaForCausalLM`` creates on a rank holding decoder layers ``layer_range`` (the same on
    every TP rank of a stage): linear layers split over TP (Megatron-LM column/row parallel), K/V by KV head and
    replicated when TP exceeds the KV heads (``QKVParallelLinear``), the embedding and LM head by vocabulary
    rows padded to a multiple of TP (``VocabParallelEmbedding``, ``ParallelLMHead``), norms replicated; a tied
    LM head is listed only on a last stage that does not hold the embedding.

    Raises:
        ValueError: ``tp`` does not split the model (:func:`shardserve.config.check_parallel_layout`).
    """
    check_parallel_layout(arch, tp, 1)
    kv_tp = min(tp, arch.num_key_value_heads)
    start, end = layer_range
    out = []
    for name, shape in hf_tensor_shapes(arch):
        m = _LAYER_RE.match(name)
        if m is not None and not start <= int(m.group(1)) < end:
            continue
        if name == "model.embed_tokens.weight" and start != 0:
            continue
        if name in ("model.norm.weight", "lm_head.weight") and end != arch.num_hidden_layers:
            continue
        split, ranks = None, tp
        if any(p in name for p in (".q_proj.", ".gate_proj.", ".up_proj.", "embed_tokens", "lm_head")):
            split = 0
        elif ".k_proj." in name or ".v_proj." in name:
            split, ranks = 0, kv_tp
        elif ".o_proj." in name or ".down_proj." in name:
            split = 1
        out.append(RankTensor(name, shape, split, ranks))
    if arch.tie_word_embeddings and end == arch.num_hidden_layers and start != 0:  # the last stage's own copy
        out.append(RankTensor("lm_head.weight", (arch.vocab_size, arch.hidden_size), 0, tp))
    return out


def keeps_gguf_blocks(quantization: str | None, device: str) -> bool:
    """Whether ``serve`` keeps a GGUF file's blocks (CUDA by default, or ``--quantization gguf``) rather than
    dequantizing at load (the CPU default), as ``get_quantization_config`` decides."""
    return quantization == "gguf" or (quantization is None and device == "cuda")


def fp8_config(weights: ModelWeights, quantization: str | None) -> Any:
    """The :class:`~shardserve.model_executor.layers.quantization.fp8.Fp8Config` ``serve`` loads ``weights`` with
    (an FP8 checkpoint's own scheme, or ``--quantization fp8`` of a plain one), or None; after ``fp8_config_for``.

    Raises:
        ValueError: ``--quantization`` that does not fit the checkpoint (fp8 on a GGUF file or on a checkpoint
            quantized otherwise, gguf on a safetensors checkpoint), or an unknown name.
    """
    from shardserve.model_executor.layers.quantization import QUANTIZATION_METHODS
    from shardserve.model_executor.layers.quantization.fp8 import CHECKPOINT_METHODS, Fp8Config

    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {quantization!r}")
    if weights.format == "gguf":
        if quantization == "fp8":
            raise ValueError(f"--quantization fp8 quantizes a safetensors checkpoint at load; {weights.name} is GGUF")
        return None
    if quantization == "gguf":
        raise ValueError(f"--quantization gguf needs a GGUF file; {weights.name} is a safetensors checkpoint")
    method = (weights.quantization_config or {}).get("quant_method")
    if method in CHECKPOINT_METHODS:
        return Fp8Config.from_hf_config(weights.quantization_config)
    if quantization == "fp8":
        if method is not None:
            raise ValueError(f"--quantization fp8 needs unquantized weights; {weights.name} is quantized ({method})")
        return Fp8Config()
    return None


def rank_weight_parts(
    weights: ModelWeights, tp: int, compute_dtype: str = "bf16", quantization: str | None = None, device: str = "cuda"
) -> ModelWeightBytes:
    """Bytes one TP rank holds of each part of the model (every layer, embedding, LM head, final norm) as ``serve``
    holds them on ``device``, from the quantization schemes' own accounting:

    * GGUF: :func:`~shardserve.model_executor.layers.quantization.gguf.gguf_weight_bytes` over the file's (or the
      llama.cpp file type's) tensor table: blocks as stored where :func:`keeps_gguf_blocks`, types without a
      kernel and float tensors in ``compute_dtype``; everything in ``compute_dtype`` where serve dequantizes at
      load. ``.scratch`` is the largest layer weight a long prefill dequantizes.
    * FP8 (:func:`fp8_config`): ``Fp8Config.weight_bytes`` (one byte per weight plus a 4-byte scale per output
      row it holds); on a CPU the weights are dequantized to ``compute_dtype`` after loading, scales kept.
    * otherwise every parameter in ``compute_dtype``.

    Args:
        weights: the checkpoint.
        tp: tensor parallel size.
        compute_dtype: ``serve --dtype`` (bf16, fp16, fp32).
        quantization: ``serve --quantization`` (None, ``gguf``, ``fp8``).
        device: ``cuda`` or ``cpu``.

    Raises:
        ValueError: ``tp`` does not split the model or cuts a GGUF block, an unknown compute dtype, or a
            ``quantization`` that does not fit the checkpoint.
    """
    if compute_dtype.lower() not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    key = (tp, compute_dtype.lower(), quantization, device)
    if key not in weights._parts:
        weights._parts[key] = _count_parts(weights, tp, DTYPES[compute_dtype.lower()], quantization, device)
    return weights._parts[key]


def _count_parts(weights: ModelWeights, tp: int, dtype: Any, quantization: str | None, device: str) -> ModelWeightBytes:
    from shardserve.model_executor.layers.quantization.base import unquantized_bytes
    from shardserve.model_executor.layers.quantization.gguf import gguf_weight_bytes

    arch = weights.arch
    config = fp8_config(weights, quantization)
    check_parallel_layout(arch, tp, 1)
    if weights.format == "gguf":
        keep = keeps_gguf_blocks(quantization, device)
        return gguf_weight_bytes(_gguf_table(weights), arch.num_key_value_heads, tp, dtype, keep)
    layers, embed, head, norm = [0] * arch.num_hidden_layers, 0, 0, 0
    for t in rank_parameters(arch, tp, (0, arch.num_hidden_layers)):
        nbytes = unquantized_bytes(t.shape, dtype, t.tp, t.split_dim)
        if config is not None:
            held = config.weight_bytes(t.name, t.shape, dtype, t.tp, t.split_dim)
            if device == "cpu" and config.cpu_dequantize and held != nbytes:  # an FP8 weight, dequantized on CPU
                held += nbytes - unquantized_bytes(t.shape, torch.float8_e4m3fn, t.tp, t.split_dim)
            nbytes = held
        m = _LAYER_RE.match(t.name)
        if m is not None:
            layers[int(m.group(1))] += nbytes
        elif t.name == "model.embed_tokens.weight":
            embed = nbytes
        elif t.name == "lm_head.weight":
            head = nbytes
        else:
            norm += nbytes
    tied = arch.tie_word_embeddings
    return ModelWeightBytes(layers, embed, embed if tied else head, norm, tied=tied)


def _gguf_table(weights: ModelWeights) -> Any:
    """The tensor table as ``gguf.GGUFReader`` presents it (``name``, ``shape`` in ggml order, ``tensor_type``),
    for :func:`~shardserve.model_executor.layers.quantization.gguf.gguf_weight_bytes` (which also counts a fused
    layer with a part of a type without a kernel as dequantized whole, as the loader holds it)."""
    from types import SimpleNamespace

    import numpy as np
    from gguf import GGMLQuantizationType

    return SimpleNamespace(
        tensors=[
            SimpleNamespace(name=t.name, shape=np.array(t.shape[::-1]), tensor_type=GGMLQuantizationType[t.stored_type])
            for t in weights.tensors
        ]
    )


def rank_resident_bytes(
    weights: ModelWeights,
    tp: int,
    layer_range: tuple[int, int],
    compute_dtype: str,
    quantization: str | None = None,
    device: str = "cuda",
) -> int:
    """Bytes of model state one rank holds: its stage's parts (:func:`rank_weight_parts`) plus the RoPE cos/sin
    caches.

    THE weight accounting of the planner, kept to this one function: the decoder layers ``layer_range``, the
    embedding on the first stage, the final norm and LM head on the last (a tied head is the embedding itself
    on a single stage, a copy of its size on a last stage without it), as ``LlamaForCausalLM`` creates them.
    Arguments as :func:`rank_weight_parts`.

    Raises:
        ValueError: as :func:`rank_weight_parts`.
    """
    parts = rank_weight_parts(weights, tp, compute_dtype, quantization, device)
    start, end = layer_range
    total = sum(parts.layers[start:end]) + (parts.embed if start == 0 else 0)
    if end == weights.arch.num_hidden_layers:
        total += parts.final_norm + (0 if parts.tied and start == 0 else parts.lm_head)
    return total + rope_cache_bytes(weights.arch)


def rope_cache_bytes(arch: ModelArchConfig) -> int:
    """The ``RotaryEmbedding`` cos and sin caches of one rank: ``2 * max_position_embeddings * head_dim`` fp32."""
    return 2 * arch.max_position_embeddings * arch.head_dim * ROPE_CACHE_BYTES_PER_ELEMENT


def held_scheme(weights: ModelWeights, quantization: str | None = None, device: str = "cuda") -> str | None:
    """``gguf`` (blocks kept), ``fp8`` (FP8 on the device) or None (plain ``--dtype``): how ``serve`` loads
    ``weights`` with ``--quantization quantization`` on ``device``.

    Raises:
        ValueError: as :func:`fp8_config`.
    """
    if weights.format == "gguf":
        return "gguf" if keeps_gguf_blocks(quantization, device) else None
    config = fp8_config(weights, quantization)
    return "fp8" if config is not None and not (device == "cpu" and config.cpu_dequantize) else None


def weights_held(weights: ModelWeights, dtype: str, quantization: str | None = None, device: str = "cuda") -> str:
    """How ``serve`` holds ``weights`` on ``device``, in words (for the plan's reasoning).

    Raises:
        ValueError: as :func:`fp8_config`.
    """
    from shardserve.model_executor.layers.quantization.gguf_blocks import FLOAT_TYPES, block_type

    if weights.format == "gguf":
        if not keeps_gguf_blocks(quantization, device):
            return f"every GGUF tensor dequantized to {dtype} at load (the CPU default; --quantization gguf keeps them)"
        matrices = [t for t in weights.tensors if len(t.shape) == 2 and t.stored_type not in FLOAT_TYPES]
        kept = sorted({t.stored_type for t in matrices if block_type(t.stored_type) is not None})
        other = sorted({t.stored_type for t in matrices if block_type(t.stored_type) is None})
        text = f"GGUF blocks as stored ({', '.join(kept) or 'none'}), norms and float tensors in {dtype}"
        return text + (
            f"; {', '.join(other)} (no kernel) dequantized to {dtype} at load, with the parts fused with them"
            if other
            else ""
        )
    if fp8_config(weights, quantization) is None:
        return f"every parameter in {dtype}"
    if held_scheme(weights, quantization, device) is None:
        return f"FP8 weights dequantized to {dtype} at load on the CPU (their scales kept)"
    return (
        "FP8 e4m3 linear layers at one byte per weight plus a 4-byte scale per output row; embedding, norms, "
        f"LM head and ignored layers in {dtype}"
    )


def _can_dequantize(type_name: str) -> bool:
    """Whether ``gguf.quants.dequantize`` reads a GGML type (the loader dequantizes what no kernel reads)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[type_name]
    block, size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def unloadable_gguf_types(weights: ModelWeights) -> list[str]:
    """GGUF tensor types of ``weights`` that no kernel reads and ``gguf`` cannot dequantize (``serve`` refuses them)."""
    if weights.format != "gguf":
        return []
    from shardserve.model_executor.layers.quantization.gguf_blocks import FLOAT_TYPES, block_type

    types = {t for t in weights.stored_types() if t not in FLOAT_TYPES and block_type(t) is None}
    return sorted(t for t in types if not _can_dequantize(t))
