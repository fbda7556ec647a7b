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
_QUANT_RE = re.compile(r"[-._](I?Q\d\w*|F16|F32|BF16)(\.gguf)?$", re.IGNORECASE)


def _normalise(name: str) -> str:
    """Case-folded repo name without organisation, ``meta-`` prefix, ``-gguf`` and Instruct/Chat markers."""
    key = name.strip().lower().split("/")[-1].removesuffix(".gguf").removesuffix("-gguf").removeprefix("meta-")
    return _VARIANT_RE.sub("", key)


def split_quant_suffix(name: str) -> tuple[str, str | None]:
    """``Llama-3.1-70B-Instruct-Q4_K_S.gguf`` -> (``Llama-3.1-70B-Instruct``, ``Q4_K_S``); no suffix: None."""
    m = _QUANT_RE.search(name.strip())
    if m is None:
        return name, None
    return name.strip()[: m.start()], m.group(1).upper()


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
