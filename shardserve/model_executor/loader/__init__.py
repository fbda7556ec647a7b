"""Build this rank's model and fill its weights from a GGUF file, safetensors, or random numbers."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import zlib
from collections.abc import Iterable, Iterator

import torch

from shardserve.model_executor.layers.quantization import get_quantization_config
from shardserve.model_executor.layers.quantization.base import ModelWeightBytes, model_weight_bytes
from shardserve.model_executor.loader.resolve import ModelSource, gguf_field, open_gguf
from shardserve.model_executor.loader.weights import WeightSource, iter_gguf, iter_safetensors
from shardserve.model_executor.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

__all__ = [
    "ModelSource",
    "WeightSource",
    "iter_weights",
    "load_model",
    "model_weight_bytes_per_rank",
    "pp_layer_range",
    "pp_partition_by_memory",
]

PROGRESS_LOG_INTERVAL_S = 5.0
"""Seconds between weight-loading progress lines in the log when stderr is not a terminal."""


def pp_layer_range(num_layers: int, pp_size: int, pp_rank: int, partition: list[int] | None = None) -> tuple[int, int]:
    """Decoder layers ``[start, end)`` of pipeline stage ``pp_rank``.

    Without ``partition`` the layers are split evenly and the remainder goes one each to the LAST
    stages, as vLLM's ``get_pp_indices`` does (the first stage also holds the embedding table).

    Raises:
        ValueError: ``pp_rank`` out of range, more stages than layers, or a ``partition`` that does not
            have one non-negative entry per stage summing to ``num_layers``.
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} out of range for {pp_size} stages")
    if partition is not None:
        if len(partition) != pp_size or any(n < 0 for n in partition) or sum(partition) != num_layers:
            raise ValueError(
                f"--pp-layer-partition {partition} must have {pp_size} non-negative entries summing to "
                f"the model's {num_layers} layers"
            )
        start = sum(partition[:pp_rank])
        return start, start + partition[pp_rank]
    if pp_size > num_layers:
        raise ValueError(f"{pp_size} pipeline stages exceed the model's {num_layers} layers")
    base, rem = divmod(num_layers, pp_size)
    sizes = [base + (1 if i >= pp_size - rem else 0) for i in range(pp_size)]
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


def pp_partition_by_memory(
    num_layers: int, free_bytes: list[float], weights: ModelWeightBytes | None = None
) -> list[int]:
    """Layers per stage in proportion to each stage's free memory (llama.cpp RPC's ``--tensor-split`` idea).

    Without ``weights`` every layer counts the same. With ``weights`` (bytes one rank holds per layer,
    e.g. GGUF layers whose types vary, see :func:`model_weight_bytes_per_rank`) the stages split the
    bytes, the embedding counting on the first stage and the LM head and final norm on the last: stage
    ``i`` ends at the layer boundary nearest to ``total * sum(free[:i + 1]) / sum(free)``. Every stage gets
    at least one layer; the sizes sum to ``num_layers``.

    Args:
        num_layers: decoder layers of the model.
        free_bytes: per stage, the smallest free device memory among its TP ranks (bytes).
        weights: per-part weight bytes of one rank (``len(weights.layers) == num_layers``).

    Raises:
        ValueError: more stages than layers, no stage with free memory, or ``weights`` of another model.
    """
    stages = len(free_bytes)
    if stages > num_layers:
        raise ValueError(f"{stages} pipeline stages exceed the model's {num_layers} layers")
    total = sum(max(f, 0.0) for f in free_bytes)
    if total <= 0:
        raise ValueError(f"no pipeline stage reports free memory: {free_bytes}")
    if weights is not None:
        return _partition_bytes(num_layers, [max(f, 0.0) / total for f in free_bytes], weights)
    spare = num_layers - stages  # one layer each first, the rest by share
    shares = [spare * max(f, 0.0) / total for f in free_bytes]
    sizes = [1 + int(s) for s in shares]
    order = sorted(range(stages), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in order[: num_layers - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _partition_bytes(num_layers: int, shares: list[float], weights: ModelWeightBytes) -> list[int]:
    if len(weights.layers) != num_layers:
        raise ValueError(f"weight bytes for {len(weights.layers)} layers, the model has {num_layers}")
    prefix = [weights.embed]
    for b in weights.layers:
        prefix.append(prefix[-1] + b)
    total = prefix[-1] + weights.lm_head + weights.final_norm
    stages, bounds, start, cum_share = len(shares), [], 0, 0.0
    for i in range(stages - 1):
        cum_share += shares[i]
        target = total * cum_share
        lo, hi = start + 1, num_layers - (stages - 1 - i)  # leave one layer for each later stage
        end = min(range(lo, hi + 1), key=lambda e: abs(prefix[e] - target))
        bounds.append(end)
        start = end
    edges = [0, *bounds, num_layers]
    return [edges[i + 1] - edges[i] for i in range(stages)]


def model_weight_bytes_per_rank(
    source: ModelSource, tp_size: int, dtype: torch.dtype, quantization: str | None, device: torch.device
) -> ModelWeightBytes | None:
    """Per-part weight bytes one TP rank will hold, for sources whose layers differ in size (GGUF); None
    when every layer holds the same (safetensors checkpoints)."""
    if source.format != "gguf":
        return None
    from shardserve.model_executor.layers.quantization.gguf import gguf_weight_bytes

    keep = quantization == "gguf" or (quantization is None and device.type == "cuda")
    return gguf_weight_bytes(open_gguf(source.path), source.arch.num_key_value_heads, tp_size, dtype, keep)


def iter_weights(source: ModelSource) -> Iterator[tuple[str, WeightSource]]:
    """``(hf_name, lazy source)`` for every tensor of the checkpoint.

    Raises:
        ValueError: unreadable files (see :func:`iter_safetensors`, :func:`open_gguf`).
    """
    if source.format == "gguf":
        reader = open_gguf(source.path)
        arch = gguf_field(reader, "general.architecture")
        yield from iter_gguf(reader, arch, source.arch.num_attention_heads, source.arch.num_key_value_heads)
    elif source.format == "hf":
        yield from iter_safetensors(source.path)
    else:
        raise ValueError(f"unknown model format {source.format!r}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    layer_range: tuple[int, int],
    dummy: bool = False,
    seed: int = 0,
    quantization: str | None = None,
) -> LlamaForCausalLM:
    """Build this rank's :class:`LlamaForCausalLM` for ``layer_range`` on ``device`` and load its weights.

    The model records ``weight_bytes`` (its tensors' bytes) and ``weight_allocated_bytes`` (on CUDA, the
    growth of ``torch.cuda.memory_allocated`` over the load). Parameters are created directly on ``device``
    in ``dtype`` (or in the storage of the quantization
    scheme, see :func:`~shardserve.model_executor.layers.quantization.get_quantization_config`); each TP
    rank reads only its shard. With ``dummy`` the weights are random (see :func:`init_dummy_weights`) and no
    weight file is read.

    Raises:
        ValueError: unreadable checkpoint, shapes that do not fit, parameters left unloaded, or a
            ``quantization`` that does not fit the checkpoint or the device.
    """
    device = torch.device(device)
    if device.type == "cpu" and dtype == torch.bfloat16 and not _cpu_has_bf16():
        logger.warning("this CPU has no AVX512-BF16 or AMX: bfloat16 halves memory, but its matmuls are emulated")
    if dummy and quantization == "gguf":
        raise ValueError("--load-format dummy cannot fill GGUF blocks; load the GGUF file (--load-format auto)")
    quant_config = None if dummy and quantization is None else get_quantization_config(quantization, source, device)
    if quant_config is not None:
        quant_config.packed_modules_mapping = dict(LlamaForCausalLM.packed_modules_mapping)
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(source.arch, layer_range, quant_config)
    with torch.no_grad():
        if dummy:
            init_dummy_weights(model, seed)
            model.process_weights_after_loading()
        else:
            model.load_weights(_with_progress(_owned(model, iter_weights(source)), source.name))
    model.weight_bytes = model_weight_bytes(model)  # type: ignore[assignment]
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device) - allocated
    else:
        allocated = model.weight_bytes
    model.weight_allocated_bytes = allocated  # type: ignore[assignment]
    logger.info(
        "loaded %s layers [%d, %d) on %s (%s, %s%s): weights hold %.2f GiB (%.2f GiB allocated)",
        source.name,
        *layer_range,
        device,
        dtype,
        "dummy weights" if dummy else source.format,
        f", {quant_config.name}" if quant_config is not None else "",
        model.weight_bytes / 2**30,
        allocated / 2**30,
    )
    return model.eval()


def _cpu_has_bf16() -> bool:
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or cpu._is_amx_tile_supported())


def _owned(model: LlamaForCausalLM, weights: Iterable[tuple[str, WeightSource]]) -> list[tuple[str, WeightSource]]:
    # Listing the names is cheap (sources are lazy); it gives the progress bar its total.
    return [(name, src) for name, src in weights if model.weight_targets(name)]


def _with_progress(weights: list[tuple[str, WeightSource]], name: str) -> Iterator[tuple[str, WeightSource]]:
    """Yield ``weights``, showing progress at INFO: a rich bar when stderr is a terminal, otherwise a log line
    at the start and every ``PROGRESS_LOG_INTERVAL_S`` seconds (server logs, files, pipes)."""
    if not logger.isEnabledFor(logging.INFO):
        yield from weights
        return
    if not sys.stderr.isatty():
        total, start = len(weights), time.monotonic()
        last = start
        logger.info("loading %s: %d tensors", name, total)
        for done, item in enumerate(weights, 1):
            yield item
            now = time.monotonic()
            if now - last >= PROGRESS_LOG_INTERVAL_S and done < total:
                logger.info("loading %s: %d/%d tensors (%.0f%%) after %.0f s", name, done, total,
                            100 * done / total, now - start)  # fmt: skip
                last = now
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(name, total=len(weights))
        for item in weights:
            yield item
            progress.advance(task)


def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights: normal(0, 0.02) for matrices and biases, 1 for norm weights.

    Each parameter draws from its own generator seeded with ``seed`` and a hash of its name, so the
    values do not depend on which other parameters this stage holds.
    """
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        values = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        values.normal_(0.0, 0.02, generator=gen)
        param.data.copy_(values)
