"""Architectures of well-known models, so that ``shardserve plan`` works offline.

Each entry copies the architecture fields of the model's Hugging Face ``config.json`` (the URL is in
``source``). Instruct/chat variants share these fields with their base model; only token ids and,
for Qwen2.5, ``max_position_embeddings`` (32768 for Instruct, 131072 for base) differ, which change
the memory plan only through the RoPE cache (under 0.1 GB); so names are matched without the
organisation, a ``Meta-`` prefix and an ``-Instruct``/``-Chat``/``-it`` part
(``meta-llama/Meta-Llama-3.1-70B-Instruct`` is ``Llama-3.1-70B``). ``head_dim`` is omitted where the
original config omits it (``hidden_size / num_attention_heads`` then applies, as in transformers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shardserve.config import ModelArchConfig

_LLAMA3_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
_LLAMA31_COMMON: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": _LLAMA3_ROPE,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
_LLAMA31_70B = {
    **_LLAMA31_COMMON,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
_QWEN25_COMMON: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}


@dataclass(frozen=True)
class KnownModel:
    """One built-in architecture."""

    hub_id: str
    """Canonical Hugging Face repo id."""
    source: str
    """URL of the config.json the numbers come from."""
    hf_config: dict[str, Any]
    """The architecture fields of that config.json."""

    @property
    def short_name(self) -> str:
        """The repo name without the organisation, e.g. ``Llama-3.1-8B``."""
        return self.hub_id.split("/")[-1]

    def arch(self) -> ModelArchConfig:
        """A fresh :class:`ModelArchConfig` for this model."""
        return ModelArchConfig.from_hf_dict(dict(self.hf_config))


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        hub_id="meta-llama/Llama-3.1-8B",
        source="https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json",
        hf_config={
            **_LLAMA31_COMMON,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
        },
    ),
    KnownModel(
        hub_id="meta-llama/Llama-3.1-70B",
        source="https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json",
        hf_config=_LLAMA31_70B,
    ),
    KnownModel(
        hub_id="meta-llama/Llama-3.1-405B",
        source="https://huggingface.co/meta-llama/Llama-3.1-405B/blob/main/config.json",
        hf_config={
            **_LLAMA31_COMMON,
            "hidden_size": 16384,
            "intermediate_size": 53248,
            "num_hidden_layers": 126,
            "num_attention_heads": 128,
            "num_key_value_heads": 8,
        },
    ),
    KnownModel(
        hub_id="deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
        source="https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Llama-70B/blob/main/config.json",
        hf_config=_LLAMA31_70B,
    ),
    KnownModel(
        hub_id="Qwen/Qwen2.5-7B-Instruct",
        source="https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json",
        hf_config={
            **_QWEN25_COMMON,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
        },
    ),
    KnownModel(
        hub_id="Qwen/Qwen2.5-72B-Instruct",
        source="https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/config.json",
        hf_config={
            **_QWEN25_COMMON,
            "hidden_size": 8192,
            "intermediate_size": 29568,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
        },
    ),
    KnownModel(
        hub_id="mistralai/Mistral-7B-v0.3",
        source="https://huggingface.co/mistralai/Mistral-7B-v0.3/blob/main/config.json",
        hf_config={
            "model_type": "mistral",
            "vocab_size": 32768,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        },
    ),
    KnownModel(
        hub_id="HuggingFaceTB/SmolLM2-135M",
        source="https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json",
        hf_config={
            "model_type": "llama",
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "rms_norm_eps": 1e-05,
            "rope_theta": 100000.0,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "torch_dtype": "bfloat16",
        },
    ),
)


_VARIANT_RE = re.compile(r"-(instruct|chat|it|base)(?=-|$)")
_QUANT_RE = re.compile(r"[-._](I?Q\d\w*|F16|F32|BF16|FP8(?:[-_]dynamic)?)(\.gguf)?$", re.IGNORECASE)


def _normalise(name: str) -> str:
    """Case-folded repo name without organisation, ``meta-`` prefix, ``-gguf`` and Instruct/Chat markers."""
    key = name.strip().lower().split("/")[-1].removesuffix(".gguf").removesuffix("-gguf").removeprefix("meta-")
    return _VARIANT_RE.sub("", key)


def split_quant_suffix(name: str) -> tuple[str, str | None]:
    """``Llama-3.1-70B-Instruct-Q4_K_S.gguf`` -> (``Llama-3.1-70B-Instruct``, ``Q4_K_S``); ``...-FP8`` and
    ``...-FP8-dynamic`` -> ``FP8``; no suffix: None."""
    m = _QUANT_RE.search(name.strip())
    if m is None:
        return name, None
    quant = m.group(1).upper()
    return name.strip()[: m.start()], "FP8" if quant.startswith("FP8") else quant


def _index() -> dict[str, KnownModel]:
    index: dict[str, KnownModel] = {}
    for model in KNOWN_MODELS:
        index[model.hub_id.lower()] = model
        index.setdefault(_normalise(model.hub_id), model)
    return index


_INDEX = _index()


def find_known_model(name: str) -> KnownModel | None:
    """The built-in entry for a hub id (``meta-llama/Llama-3.1-8B``) or short name (``llama-3.1-8b``), base or
    Instruct, with or without ``Meta-``.

    Matching is case-insensitive; None when the name is not built in.
    """
    key = name.strip().lower()
    return _INDEX.get(key) or _INDEX.get(_normalise(key))


def known_model_names() -> list[str]:
    """Canonical hub ids of every built-in model."""
    return [m.hub_id for m in KNOWN_MODELS]


# ----------------------------------------------------------------------------- llama.cpp file types

LLAMA_CPP_RECIPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
                     "Q5_K_S", "Q5_K_M", "Q6_K")  # fmt: skip
"""llama.cpp file types whose per-tensor types :func:`llama_cpp_tensor_type` reproduces for Llama models; other
file types (IQ*, TQ*) are read as their main GGML type in every matrix, the LM head in Q6_K."""
_K_QUANT_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
"""llama.cpp's replacement when a row is not whole 256-element super-blocks (``convert_incompatible_tensor``)."""


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the layers the *_M recipes give more bits (first and last eighth, every third
    in between)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def llama_cpp_tensor_type(file_type: str, part: str, layer: int | None, arch: ModelArchConfig) -> str:
    """The GGML type ``llama-quantize`` gives matrix ``part`` of a Llama-family model in file type ``file_type``.

    Follows ``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp`` (no importance matrix, no MoE):
    the file type's main type everywhere, except the LM head (``output``, or the embedding when tied) in Q6_K
    unless the main type is Q8_0; Q4_K_M / Q5_K_M: ``attn_v`` and ``ffn_down`` Q6_K on the layers of
    :func:`use_more_bits`; Q4_K_S: ``attn_v`` Q5_K on the first 4 layers and ``ffn_down`` Q5_K on the first
    eighth; Q3_K_M / Q3_K_L / Q2_K: more bits in ``attn_v``, ``attn_output`` and ``ffn_down`` as listed in
    the code; 70B-class models (80 layers, grouped KV heads): a Q3_K / Q4_K ``attn_v`` becomes Q5_K. A K-quant
    row that is not whole super-blocks of 256 takes the 32-element type llama.cpp falls back to.

    Args:
        file_type: llama.cpp file type (``Q4_K_M``, any case) or a GGML type (``q8_0``).
        part: ``token_embd``, ``output``, ``attn_q``, ``attn_k``, ``attn_v``, ``attn_output``, ``ffn_gate``,
            ``ffn_up`` or ``ffn_down``.
        layer: the decoder layer (None for the embedding and the LM head).

    Raises:
        ValueError: an unknown file type or part.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    key = file_type.strip().upper().removeprefix("MOSTLY_")
    main = re.sub(r"_(S|M|L|XS|XXS)$", "", key) if key not in GGMLQuantizationType.__members__ else key
    if main not in GGMLQuantizationType.__members__:
        raise ValueError(f"unknown llama.cpp file type {file_type!r}")
    n, qtype = arch.num_hidden_layers, main
    head = part == "output" or (part == "token_embd" and arch.tie_word_embeddings)
    if head:
        qtype = "Q8_0" if main == "Q8_0" else "Q6_K"
    elif part == "attn_v":
        gqa = arch.num_attention_heads // arch.num_key_value_heads
        if key == "Q2_K":
            qtype = "Q4_K" if gqa >= 4 else "Q3_K"
        elif key == "Q3_K_M":
            qtype = "Q5_K" if layer < 2 else "Q4_K"
        elif key == "Q3_K_L":
            qtype = "Q5_K"
        elif key in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n):
            qtype = "Q6_K"
        elif key == "Q4_K_S" and layer < 4:
            qtype = "Q5_K"
        if n == 80 and gqa > 1 and qtype in ("Q3_K", "Q4_K"):
            qtype = "Q5_K"  # LLM_TYPE_70B: attn_v is 8x smaller than attn_q, more bits cost little
    elif part == "ffn_down":
        if key == "Q2_K":
            qtype = "Q3_K"
        elif key == "Q3_K_M":
            qtype = "Q5_K" if layer < n // 16 else "Q4_K"
        elif key == "Q3_K_L":
            qtype = "Q5_K"
        elif key in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n):
            qtype = "Q6_K"
        elif key == "Q4_K_S" and layer < n // 8:
            qtype = "Q5_K"
    elif part == "attn_output":
        qtype = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(key, qtype)
    elif part not in ("token_embd", "attn_q", "attn_k", "ffn_gate", "ffn_up"):
        raise ValueError(f"unknown tensor part {part!r}")
    cols = {"attn_output": arch.num_attention_heads * arch.head_dim, "ffn_down": arch.intermediate_size}
    if cols.get(part, arch.hidden_size) % GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]:
        qtype = _K_QUANT_FALLBACK.get(qtype, "F16")
        if cols.get(part, arch.hidden_size) % GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]:
            qtype = "F16"
    return qtype
