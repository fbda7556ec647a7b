"""Capacity planner: which TP x PP layout fits a model, how many sequences it holds, how fast it decodes.

Pure functions over :class:`ModelArchConfig` (or a GGUF file's tensors) and a hardware description;
no device is touched. The rules, and their sources:

* Weights per rank. Linear layers split over TP (Megatron-LM column/row parallel), K/V projections
  split by KV head and replicated when TP exceeds the KV heads (vLLM ``QKVParallelLinear``), the
  embedding and LM head split over TP by vocabulary rows (``VocabParallelEmbedding``,
  ``ParallelLMHead``) on the first and last stage, norms replicated on every rank. Layers split
  over PP evenly, the remainder going to the stages before the last (vLLM ``get_pp_indices``).
  Approximation: a quantised GGUF tensor is assumed to split in exact proportion to its bytes.
* KV cache bytes per token = ``2 * num_layers * num_kv_heads * head_dim * dtype_bytes``; per rank
  ``num_kv_heads / tp`` (at least one head, replicated when tp > kv heads) and the layers of its stage.
* Sequences that fit = ``(gpu_memory * utilization - weights - activation reserve) // (max_model_len
  * kv_bytes_per_token_per_rank)``, the minimum over stages.
* Batch-1 decode bound: every stage reads its weight shard once per token, one stage after the
  other, at HBM bandwidth: ``sum_s weight_bytes_per_rank(s) / hbm_bandwidth`` seconds per token.
* TP communication: two all-reduces of ``hidden_size * dtype_bytes * batch`` bytes per layer
  (Megatron-LM, Shoeybi et al. 2019, section 3); the time of one is ``size * 2(n-1)/n / busbw``
  with busbw interpolated from a netbench curve (nccl-tests PERFORMANCE.md).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shardserve.config import ModelArchConfig
from shardserve.tools.known_models import find_known_model, known_model_names
from shardserve.tools.netbench import BUSBW_FACTORS, NetbenchReport, interpolate_busbw

logger = logging.getLogger(__name__)

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
"""Bytes per element of unquantised dtypes (int4 as packed pairs)."""

_UNITS = {
    "": 1e9,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
MIN_INTER_NODE_GBPS = 400.0
"""Below this inter-node bandwidth (Gb/s) multi-node serving is flagged (one 400G NIC per GPU is usual)."""
RUNTIME_OVERHEAD_BYTES = 512 * 2**20
"""Non-tensor memory per rank (CUDA context, NCCL buffers, allocator slack) in the activation reserve."""
DEFAULT_MAX_NODES = 16
"""Nodes searched when ``--nodes`` is not given."""


@dataclass(frozen=True)
class GpuSpec:
    """Nominal figures of one GPU model."""

    name: str
    memory_bytes: int
    """Nominal memory (decimal GB as marketed)."""
    hbm_bandwidth: float
    """Peak memory bandwidth (bytes/s)."""


GPUS: dict[str, GpuSpec] = {
    spec.name.lower(): spec
    for spec in (
        GpuSpec("H100", 80 * 10**9, 3.35e12),  # H100 SXM5 80GB datasheet
        GpuSpec("H200", 141 * 10**9, 4.8e12),
        GpuSpec("A100-80", 80 * 10**9, 2.0e12),
        GpuSpec("L40S", 48 * 10**9, 0.864e12),
        GpuSpec("RTX 4090", 24 * 10**9, 1.008e12),
        GpuSpec("RTX 3090 Ti", 24 * 10**9, 1.008e12),
    )
}


def find_gpu(name: str) -> GpuSpec:
    """The table entry for a GPU name; case, spaces, dashes and an ``nvidia`` prefix are ignored.

    Raises:
        ValueError: unknown GPU (the message lists the known ones).
    """

    def key(s: str) -> str:
        return re.sub(r"[\s_\-]", "", s.lower()).removeprefix("nvidia").removeprefix("geforce")

    aliases = {"a100": "a100-80", "a10080gb": "a100-80", "h100sxm": "h100", "4090": "rtx 4090", "3090ti": "rtx 3090 ti"}
    wanted = key(name)
    for k, spec in GPUS.items():
        if key(k) == wanted:
            return spec
    if wanted in aliases:
        return GPUS[aliases[wanted]]
    raise ValueError(
        f"unknown GPU {name!r}; known: {', '.join(s.name for s in GPUS.values())} (or pass --hbm-bandwidth)"
    )


def parse_bytes(text: str | float | int) -> int:
    """``80GB`` -> 80e9, ``24GiB`` -> 24 * 2**30; a bare number is GB (decimal).

    Raises:
        ValueError: unparsable text or a non-positive size.
    """
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read a size from {text!r}; use e.g. 80GB, 24GiB or 512MiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def bytes_per_param(dtype: str) -> float:
    """Bytes per weight for a dtype name (bf16, fp8, ...) or a GGML quant type (q4_k, q8_0, ...).

    GGML types use ``type_size / block_size`` from ``gguf.GGML_QUANT_SIZES`` (Q4_K: 144/256 = 0.5625).

    Raises:
        ValueError: unknown name.
    """
    if dtype.lower() in DTYPE_BYTES:
        return float(DTYPE_BYTES[dtype.lower()])
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[dtype.upper()]]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)} or a GGML type such as q4_k, q6_k, q8_0"
        ) from None
    return type_size / block


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightTensor:
    """One weight and how it is split."""

    name: str
    nbytes: int
    """Bytes of the whole (unsplit) tensor."""
    kind: str
    """embed, lm_head, final_norm, layer or other."""
    split: str
    """tp (divided over TP ranks), kv (divided by KV heads) or replicated."""
    layer: int | None = None
    """Decoder layer index for kind == layer."""


@dataclass
class ModelWeights:
    """A model's architecture and weight tensors, from a config (estimated) or a GGUF file (actual)."""

    name: str
    arch: ModelArchConfig
    tensors: list[WeightTensor]
    source: str
    """``config`` (num_params x dtype bytes) or ``gguf`` (tensor bytes of the file)."""
    weight_dtype: str
    """dtype of the weights, or ``gguf`` (mixed types as stored)."""
    file_bytes: int | None = None
    """Size of the GGUF file (bytes) when read from one."""

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def tied(self) -> bool:
        return not any(t.kind == "lm_head" for t in self.tensors)


def arch_tensors(arch: ModelArchConfig, weight_dtype: str = "bf16") -> list[WeightTensor]:
    """The weights of a config, named as in Hugging Face checkpoints; ``nbytes = numel * bytes_per_param``.

    Their element counts add up to ``arch.num_params()``.
    """
    bpp = bytes_per_param(weight_dtype)
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d

    def t(name: str, numel: int, kind: str, split: str, layer: int | None = None) -> WeightTensor:
        return WeightTensor(name, math.ceil(numel * bpp), kind, split, layer)

    out = [t("model.embed_tokens.weight", arch.vocab_size * h, "embed", "tp")]
    for n in range(arch.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes = [
            ("input_layernorm.weight", h, "replicated"),
            ("self_attn.q_proj.weight", q * h, "tp"),
            ("self_attn.k_proj.weight", kv * h, "kv"),
            ("self_attn.v_proj.weight", kv * h, "kv"),
            ("self_attn.o_proj.weight", h * q, "tp"),
            ("post_attention_layernorm.weight", h, "replicated"),
            ("mlp.gate_proj.weight", i * h, "tp"),
            ("mlp.up_proj.weight", i * h, "tp"),
            ("mlp.down_proj.weight", h * i, "tp"),
        ]
        if arch.attention_bias:
            shapes += [
                ("self_attn.q_proj.bias", q, "tp"),
                ("self_attn.k_proj.bias", kv, "kv"),
                ("self_attn.v_proj.bias", kv, "kv"),
            ]
        if arch.qk_norm:
            shapes += [("self_attn.q_norm.weight", d, "replicated"), ("self_attn.k_norm.weight", d, "replicated")]
        out += [t(p + name, numel, "layer", split, n) for name, numel, split in shapes]
    out.append(t("model.norm.weight", h, "final_norm", "replicated"))
    if not arch.tie_word_embeddings:
        out.append(t("lm_head.weight", arch.vocab_size * h, "lm_head", "tp"))
    return out


def weights_from_arch(name: str, arch: ModelArchConfig, weight_dtype: str = "bf16") -> ModelWeights:
    """Estimated weights of a config stored in ``weight_dtype``."""
    return ModelWeights(name, arch, arch_tensors(arch, weight_dtype), "config", weight_dtype)


_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def _classify_gguf_tensor(name: str) -> tuple[str, str, int | None]:
    """(kind, split, layer) of a GGUF tensor name (llama.cpp naming)."""
    if name == "token_embd.weight":
        return "embed", "tp", None
    if name == "output.weight":
        return "lm_head", "tp", None
    if name == "output_norm.weight":
        return "final_norm", "replicated", None
    m = _GGUF_BLOCK.fullmatch(name)
    if not m:
        return "other", "replicated", None
    part = m.group(2)
    if "norm" in part:
        split = "replicated"
    elif part.startswith(("attn_k.", "attn_v.")):
        split = "kv"
    else:
        split = "tp"
    return "layer", split, int(m.group(1))


def weights_from_gguf(path: str | Path) -> ModelWeights:
    """Actual weights of a GGUF file: each tensor's stored bytes (``GGUFReader`` ``n_bytes``); the
    architecture from its metadata (:func:`shardserve.model_executor.loader.resolve.resolve_model`).

    Raises:
        ValueError: unreadable file, unsupported architecture or incomplete metadata.
    """
    from shardserve.model_executor.loader.resolve import open_gguf, resolve_model

    path = Path(path)
    source = resolve_model(str(path))
    tensors = []
    for t in open_gguf(path).tensors:
        kind, split, layer = _classify_gguf_tensor(t.name)
        tensors.append(WeightTensor(t.name, int(t.n_bytes), kind, split, layer))
    return ModelWeights(source.name, source.arch, tensors, "gguf", "gguf", path.stat().st_size)


def load_model_weights(model: str, weight_dtype: str = "bf16") -> ModelWeights:
    """Resolve ``model`` offline: a .gguf file or HF directory, a built-in name (:mod:`known_models`),
    or a hub id in the local HF cache (files and hub ids through ``resolve_model``).

    ``weight_dtype`` applies to config-based models; a GGUF's own tensor types are used as stored.

    Raises:
        ValueError: nothing matches (the message lists the built-in names).
    """
    from shardserve.model_executor.loader.resolve import resolve_model

    if not Path(model).expanduser().exists():
        known = find_known_model(model)
        if known is not None:
            return weights_from_arch(known.short_name, known.arch(), weight_dtype)
    try:
        source = resolve_model(model)
    except ValueError as e:
        raise ValueError(
            f"cannot resolve model {model!r}: {e}; built-in names: {', '.join(known_model_names())}"
        ) from e
    if source.format == "gguf":
        return weights_from_gguf(source.path)
    return weights_from_arch(source.name, source.arch, weight_dtype)


# ----------------------------------------------------------------------------- layouts


def split_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per stage: even, with the remainder on the stages before the last (vLLM ``get_pp_indices``).

    Raises:
        ValueError: more stages than layers.
    """
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pipeline parallel size {pp} must be in 1..{num_layers} (the layer count)")
    parts = [num_layers // pp] * pp
    for k in range(num_layers % pp):  # remainder < pp, so pp >= 2 here
        parts[-2 - k] += 1
    return parts


def kv_heads_per_rank(arch: ModelArchConfig, tp: int) -> int:
    """KV heads one TP rank holds: ``num_kv_heads / tp``, at least 1 (replicated when tp > kv heads)."""
    return max(1, arch.num_key_value_heads // tp)


def kv_bytes_per_token(arch: ModelArchConfig, dtype_bytes: float, num_layers: int | None = None, tp: int = 1) -> int:
    """KV cache bytes one token takes: ``2 * num_layers * kv_heads_per_rank * head_dim * dtype_bytes``.

    With ``tp = 1`` and all layers this is the whole model's figure (Llama-3.1-8B, bf16: 131072 B).
    """
    layers = arch.num_hidden_layers if num_layers is None else num_layers
    return int(2 * layers * kv_heads_per_rank(arch, tp) * arch.head_dim * dtype_bytes)


def stage_weight_bytes(weights: ModelWeights, tp: int, pp: int) -> list[int]:
    """Weight bytes held by one rank of each pipeline stage (list of length ``pp``).

    Raises:
        ValueError: ``pp`` exceeds the layer count.
    """
    arch = weights.arch
    parts = split_layers(arch.num_hidden_layers, pp)
    stage_of_layer = [s for s, n in enumerate(parts) for _ in range(n)]
    kv_share = kv_heads_per_rank(arch, tp) / arch.num_key_value_heads
    out = [0.0] * pp
    for t in weights.tensors:
        per_rank = t.nbytes / tp if t.split == "tp" else t.nbytes * kv_share if t.split == "kv" else t.nbytes
        if t.kind == "layer":
            out[stage_of_layer[t.layer]] += per_rank
        elif t.kind == "embed":
            out[0] += per_rank
            if weights.tied and pp > 1:
                out[-1] += per_rank  # the last stage needs the tied matrix as its LM head
        elif t.kind in ("lm_head", "final_norm"):
            out[-1] += per_rank
        else:
            out = [b + per_rank for b in out]
    return [math.ceil(b) for b in out]


@dataclass
class PlanInputs:
    """Hardware and workload the plan is for."""

    gpu_memory_bytes: int
    """Memory of one GPU (bytes)."""
    gpus_per_node: int
    nodes: int | None = None
    """Nodes available; None searches up to DEFAULT_MAX_NODES."""
    max_model_len: int = 8192
    """Tokens (prompt + output) each sequence must be able to reach."""
    max_num_seqs: int = 64
    """Concurrent sequences wanted at max_model_len."""
    dtype: str = "bf16"
    """Activation and KV cache dtype."""
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 2048
    """Tokens per forward (prefill chunk), for the activation estimate."""
    activation_reserve_bytes: int | None = None
    """Per-rank reserve for activations and runtime; None estimates it."""
    hbm_bandwidth: float | None = None
    """GPU memory bandwidth (bytes/s) for the decode bound; None skips it."""
    inter_node_gbps: float | None = None
    """Inter-node bandwidth per node (Gb/s); None takes it from netbench when given."""
    netbench: NetbenchReport | None = None
    tp: int | None = None
    """Evaluate this TP size as the user's chosen layout (with pp)."""
    pp: int | None = None

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or (self.nodes is not None and self.nodes < 1):
            raise ValueError("--gpus-per-node and --nodes must be positive")
        if self.max_model_len < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("--max-model-len, --max-num-seqs and --max-num-batched-tokens must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype.lower() not in DTYPE_BYTES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def dtype_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype.lower()]


def activation_reserve(arch: ModelArchConfig, inputs: PlanInputs, tp: int) -> int:
    """Estimated peak per-rank memory outside weights and KV cache (bytes).

    ``max_num_batched_tokens * (4 * hidden + 3 * intermediate / tp) * dtype_bytes`` (residual, normed
    input, attention output, MLP gate/up/activation live at once) plus fp32 logits of
    ``max_num_seqs`` rows, plus RUNTIME_OVERHEAD_BYTES. vLLM measures this with a profile run; this is
    the offline stand-in. ``inputs.activation_reserve_bytes`` overrides it.
    """
    if inputs.activation_reserve_bytes is not None:
        return inputs.activation_reserve_bytes
    acts = inputs.max_num_batched_tokens * (4 * arch.hidden_size + 3 * arch.intermediate_size / tp) * inputs.dtype_bytes
    logits = inputs.max_num_seqs * arch.vocab_size * 4
    return int(acts + logits + RUNTIME_OVERHEAD_BYTES)


@dataclass
class LayoutPlan:
    """One TP x PP layout evaluated against the hardware."""

    tp: int
    pp: int
    num_gpus: int
    num_nodes: int
    ranks_per_node: int
    tp_crosses_nodes: bool
    """Some TP group spans two nodes (its all-reduces then go over the network)."""
    stage_layers: list[int]
    stage_weight_bytes: list[int]
    """Weight bytes of one rank in each stage."""
    max_weight_bytes_per_rank: int
    activation_reserve_bytes: int
    kv_bytes_per_token_per_rank: int
    """Largest over stages (bytes/token)."""
    kv_cache_bytes_per_rank: int
    """Smallest memory left for KV cache over stages (bytes; negative when weights do not fit)."""
    max_concurrent_seqs: int
    """Sequences of max_model_len tokens whose KV cache fits (0 when none)."""
    fits: bool
    """At least one sequence of max_model_len fits."""
    meets_max_num_seqs: bool
    decode_s_per_token_weights: float | None = None
    """Batch-1 lower bound from HBM bandwidth (seconds/token)."""
    allreduce_s_per_token: float | None = None
    """TP all-reduce time per token at batch 1 from netbench (seconds)."""
    p2p_s_per_token: float | None = None
    """PP stage-to-stage send time per token at batch 1 (seconds)."""

    @property
    def decode_s_per_token(self) -> float | None:
        """Weights bound plus the communication terms that are known (seconds/token)."""
        if self.decode_s_per_token_weights is None:
            return None
        return self.decode_s_per_token_weights + (self.allreduce_s_per_token or 0.0) + (self.p2p_s_per_token or 0.0)


def _nodes_for(world: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, ranks per node) for ``world`` ranks placed in equal consecutive blocks."""
    nodes = math.ceil(world / gpus_per_node)
    while world % nodes:
        nodes += 1
    return nodes, world // nodes


def evaluate_layout(weights: ModelWeights, inputs: PlanInputs, tp: int, pp: int) -> LayoutPlan:
    """Memory, capacity and speed of one layout.

    Raises:
        ValueError: ``pp`` exceeds the layer count.
    """
    arch = weights.arch
    world = tp * pp
    nodes, per_node = _nodes_for(world, inputs.gpus_per_node)
    stage_bytes = stage_weight_bytes(weights, tp, pp)
    parts = split_layers(arch.num_hidden_layers, pp)
    reserve = activation_reserve(arch, inputs, tp)
    budget = inputs.gpu_memory_bytes * inputs.gpu_memory_utilization - reserve
    kv_rooms = [int(budget - b) for b in stage_bytes]
    kv_tokens = [kv_bytes_per_token(arch, inputs.dtype_bytes, n, tp) for n in parts]
    seqs = min(max(0, room) // (inputs.max_model_len * per_tok) for room, per_tok in zip(kv_rooms, kv_tokens))
    plan = LayoutPlan(
        tp=tp,
        pp=pp,
        num_gpus=world,
        num_nodes=nodes,
        ranks_per_node=per_node,
        tp_crosses_nodes=per_node % tp != 0,
        stage_layers=parts,
        stage_weight_bytes=stage_bytes,
        max_weight_bytes_per_rank=max(stage_bytes),
        activation_reserve_bytes=reserve,
        kv_bytes_per_token_per_rank=max(kv_tokens),
        kv_cache_bytes_per_rank=min(kv_rooms),
        max_concurrent_seqs=int(seqs),
        fits=seqs >= 1,
        meets_max_num_seqs=seqs >= inputs.max_num_seqs,
    )
    if inputs.hbm_bandwidth:
        plan.decode_s_per_token_weights = sum(stage_bytes) / inputs.hbm_bandwidth
    _add_comm_times(plan, arch, inputs)
    return plan


def valid_tp_sizes(arch: ModelArchConfig, gpus_per_node: int) -> list[int]:
    """Powers of two that divide the query heads, are <= gpus_per_node, and divide or are divided by the KV heads."""
    out, tp = [], 1
    while tp <= gpus_per_node:
        kv = arch.num_key_value_heads
        if arch.num_attention_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0):
            out.append(tp)
        tp *= 2
    return out


def enumerate_layouts(weights: ModelWeights, inputs: PlanInputs) -> list[LayoutPlan]:
    """Every (TP, PP) with a valid TP, at most the available nodes and no TP group split between
    nodes, evaluated (fitting or not)."""
    max_gpus = (inputs.nodes or DEFAULT_MAX_NODES) * inputs.gpus_per_node
    layouts = []
    for tp in valid_tp_sizes(weights.arch, inputs.gpus_per_node):
        for pp in range(1, min(weights.arch.num_hidden_layers, max_gpus // tp) + 1):
            nodes, per_node = _nodes_for(tp * pp, inputs.gpus_per_node)
            if nodes <= max_gpus // inputs.gpus_per_node and per_node % tp == 0:
                layouts.append(evaluate_layout(weights, inputs, tp, pp))
    return layouts


def is_node_aligned(plan: LayoutPlan) -> bool:
    """TP inside a node, PP across nodes: one pipeline stage per node (PP = 1 on a single node)."""
    return plan.num_nodes == plan.pp and plan.ranks_per_node == plan.tp


def recommendation_key(plan: LayoutPlan) -> tuple[int, ...]:
    """Sort key: node-aligned layouts first, then fewest nodes; inside one node the fewest GPUs
    (larger TP on ties); across nodes the largest TP (a whole node per TP group, as in seed 001)."""
    aligned = 0 if is_node_aligned(plan) else 1
    if plan.num_nodes == 1:
        return (aligned, 1, plan.num_gpus, -plan.tp)
    return (aligned, plan.num_nodes, -plan.tp, plan.num_gpus)


def recommend(layouts: list[LayoutPlan], full_batch: bool = False) -> LayoutPlan | None:
    """The first layout by :func:`recommendation_key` that holds one sequence of max_model_len
    (``full_batch``: max_num_seqs of them) with no TP group split between nodes; None when there is none.

    Node-aligned layouts (TP = the GPUs used per node, PP = nodes) win whenever one fits; PP inside a
    node is only proposed when TP alone cannot spread the model (e.g. heads not divisible).
    """
    ok = [p for p in layouts if not p.tp_crosses_nodes and (p.meets_max_num_seqs if full_batch else p.fits)]
    return min(ok, key=recommendation_key) if ok else None


# ----------------------------------------------------------------------------- communication


def _curve(report: NetbenchReport, op: str, groups: tuple[str, ...]) -> list[Any]:
    for g in groups:
        rows = report.curve(op, g)
        if rows:
            return rows
    return []


def collective_seconds(op: str, size_bytes: float, n: int, busbw_gb_s: float) -> float:
    """Time of one collective of ``size_bytes`` over ``n`` ranks at bus bandwidth ``busbw_gb_s`` (GB/s):
    ``size * factor(n) / busbw`` (nccl-tests PERFORMANCE.md, inverted)."""
    return size_bytes * BUSBW_FACTORS[op](n) / (busbw_gb_s * 1e9)


def allreduce_s_per_token(arch: ModelArchConfig, tp: int, dtype_bytes: float, batch: int, rows: list[Any]) -> float:
    """TP all-reduce seconds per decode step: ``2 * num_layers`` all-reduces of
    ``hidden_size * dtype_bytes * batch`` bytes, busbw interpolated from netbench ``rows``."""
    if tp == 1:
        return 0.0
    size = arch.hidden_size * dtype_bytes * batch
    return 2 * arch.num_hidden_layers * collective_seconds("all_reduce", size, tp, interpolate_busbw(rows, size))


def inter_node_gbps(inputs: PlanInputs) -> float | None:
    """Inter-node bandwidth (Gb/s): ``--inter-node-gbps``, else the best inter-node sendrecv (or
    all_reduce) busbw of the netbench run times 8; None when unknown."""
    if inputs.inter_node_gbps is not None:
        return inputs.inter_node_gbps
    if inputs.netbench is None:
        return None
    rows = _curve(inputs.netbench, "sendrecv", ("inter-node",)) or _curve(
        inputs.netbench, "all_reduce", ("inter-node",)
    )
    return max(r.busbw_gb_s for r in rows) * 8 if rows else None


def _add_comm_times(plan: LayoutPlan, arch: ModelArchConfig, inputs: PlanInputs) -> None:
    report = inputs.netbench
    size = arch.hidden_size * inputs.dtype_bytes
    if report is not None and plan.tp > 1:
        groups = ("inter-node", "world", "intra-node") if plan.tp_crosses_nodes else ("intra-node", "world")
        rows = _curve(report, "all_reduce", groups)
        if rows:
            plan.allreduce_s_per_token = allreduce_s_per_token(arch, plan.tp, inputs.dtype_bytes, 1, rows)
    if plan.pp == 1:
        return
    crossings = sum(
        (s * plan.tp) // plan.ranks_per_node != ((s + 1) * plan.tp) // plan.ranks_per_node for s in range(plan.pp - 1)
    )
    total = 0.0
    for count, groups in ((crossings, ("inter-node",)), (plan.pp - 1 - crossings, ("intra-node",))):
        if count == 0:
            continue
        rows = _curve(report, "sendrecv", groups) if report is not None else []
        if rows:
            total += count * size / (interpolate_busbw(rows, size) * 1e9)
        elif groups == ("inter-node",) and inputs.inter_node_gbps:
            total += count * size / (inputs.inter_node_gbps / 8 * 1e9)
        else:
            return
    plan.p2p_s_per_token = total


# ----------------------------------------------------------------------------- the plan


@dataclass
class PlanReport:
    """What ``shardserve plan`` prints: every layout, the recommendation, warnings and reasoning."""

    model: str
    source: str
    weight_dtype: str
    weight_bytes: int
    num_params: int
    kv_bytes_per_token: int
    """Whole model, one token (bytes)."""
    file_bytes: int | None
    layouts: list[LayoutPlan]
    recommended: LayoutPlan | None
    """Fewest GPUs that hold one max_model_len sequence (see :func:`recommend`)."""
    recommended_full_batch: LayoutPlan | None
    """Fewest GPUs that hold max_num_seqs such sequences."""
    chosen: LayoutPlan | None
    """The user's --tp/--pp layout, when given."""
    inter_node_gbps: float | None
    warnings: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("recommended", "recommended_full_batch", "chosen"):
            plan = getattr(self, key)
            if plan is not None:
                d[key]["decode_s_per_token"] = plan.decode_s_per_token
        return d


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def make_plan(weights: ModelWeights, inputs: PlanInputs) -> PlanReport:
    """Evaluate all layouts, pick one, and explain; see the module docstring for the rules.

    Raises:
        ValueError: a --tp/--pp layout that is invalid for the model.
    """
    arch = weights.arch
    layouts = enumerate_layouts(weights, inputs)
    chosen = None
    if inputs.tp is not None or inputs.pp is not None:
        tp, pp = inputs.tp or 1, inputs.pp or 1
        if arch.num_attention_heads % tp:
            raise ValueError(f"--tp {tp} does not divide the {arch.num_attention_heads} attention heads")
        chosen = evaluate_layout(weights, inputs, tp, pp)
    report = PlanReport(
        model=weights.name,
        source=weights.source,
        weight_dtype=weights.weight_dtype,
        weight_bytes=weights.total_bytes,
        num_params=arch.num_params(),
        kv_bytes_per_token=kv_bytes_per_token(arch, inputs.dtype_bytes),
        file_bytes=weights.file_bytes,
        layouts=layouts,
        recommended=recommend(layouts),
        recommended_full_batch=recommend(layouts, full_batch=True),
        chosen=chosen,
        inter_node_gbps=inter_node_gbps(inputs),
    )
    _explain(report, inputs)
    return report


def _explain(report: PlanReport, inputs: PlanInputs) -> None:
    usable = inputs.gpu_memory_bytes * inputs.gpu_memory_utilization
    r = report.reasoning
    r.append(
        f"weights {_gb(report.weight_bytes)} ({report.source}: "
        + (
            "tensor bytes of the GGUF file"
            if report.source == "gguf"
            else f"{report.num_params / 1e9:.2f}e9 params x {report.weight_dtype}"
        )
        + f"); KV cache {report.kv_bytes_per_token} B/token ({inputs.dtype}); "
        f"usable per GPU {_gb(usable)} ({inputs.gpu_memory_utilization:.0%} of {_gb(inputs.gpu_memory_bytes)})"
    )
    r.append(f"one node holds {_gb(usable * inputs.gpus_per_node)} over {inputs.gpus_per_node} GPU(s)")
    rec = report.recommended
    if rec is None:
        most = (inputs.nodes or DEFAULT_MAX_NODES) * inputs.gpus_per_node
        report.warnings.append(
            f"model does not fit: no layout on up to {most} GPUs of {_gb(inputs.gpu_memory_bytes)} holds the "
            f"{_gb(report.weight_bytes)} of weights plus one {inputs.max_model_len}-token sequence; "
            "add nodes, use bigger GPUs, a lower --max-model-len, or a quantised model"
        )
    else:
        if rec.num_nodes > 1:
            r.append(
                f"does not fit in one node: TP={rec.tp} inside each node, PP={rec.pp} across {rec.num_nodes} nodes "
                "(TP all-reduces every layer and needs NVLink; PP only sends activations between stages)"
            )
        else:
            r.append(f"fits in one node: the fewest GPUs that fit is {rec.num_gpus} (TP={rec.tp}, PP={rec.pp})")
        if not is_node_aligned(rec):
            r.append("no layout with TP inside each node and one PP stage per node fits; using PP inside nodes too")
        r.append(
            f"per rank: weights {_gb(rec.max_weight_bytes_per_rank)}, reserve {_gb(rec.activation_reserve_bytes)}, "
            f"KV cache {_gb(rec.kv_cache_bytes_per_rank)} = {rec.max_concurrent_seqs} sequence(s) of {inputs.max_model_len} tokens"
        )
        full = report.recommended_full_batch
        if full is None:
            report.warnings.append(
                f"no layout holds --max-num-seqs {inputs.max_num_seqs} sequences of {inputs.max_model_len} tokens; "
                f"the recommended one holds {rec.max_concurrent_seqs}"
            )
        elif full is not rec:
            r.append(
                f"it holds {rec.max_concurrent_seqs} < --max-num-seqs {inputs.max_num_seqs} sequences; "
                f"TP={full.tp} PP={full.pp} ({full.num_gpus} GPUs, {full.num_nodes} node(s)) holds {full.max_concurrent_seqs}"
            )
        if rec.decode_s_per_token is not None:
            r.append(
                f"batch-1 decode bound ~{1 / rec.decode_s_per_token:.1f} tokens/s ({rec.decode_s_per_token * 1e3:.2f} ms/token)"
            )
        _warn_network(report, inputs, rec)
    if report.chosen is not None:
        c = report.chosen
        if c.tp_crosses_nodes or c.tp > inputs.gpus_per_node:
            report.warnings.append(
                f"TP={c.tp} crosses nodes ({inputs.gpus_per_node} GPUs per node): every layer's all-reduce goes over "
                "the inter-node network; keep TP <= GPUs per node and use PP across nodes"
            )
        if not c.fits:
            report.warnings.append(
                f"the chosen layout TP={c.tp} PP={c.pp} does not fit one {inputs.max_model_len}-token sequence"
            )
        if c.num_nodes > 1 and (rec is None or rec.num_nodes == 1):
            _warn_network(report, inputs, c)


def _warn_network(report: PlanReport, inputs: PlanInputs, plan: LayoutPlan) -> None:
    if plan.num_nodes == 1:
        return
    gbps = report.inter_node_gbps
    if gbps is None:
        report.reasoning.append(
            "inter-node bandwidth unknown: run `shardserve netbench` on the nodes and pass --netbench-json"
        )
    elif gbps < MIN_INTER_NODE_GBPS:
        report.warnings.append(
            f"inter-node bandwidth {gbps:.0f} Gb/s is below {MIN_INTER_NODE_GBPS:.0f} Gb/s: pipeline stages will "
            "wait on the network; expect low throughput (InfiniBand/RoCE at >= 400 Gb/s per node is typical)"
        )
