"""Capacity planner: which TP x PP layout fits a model, how many sequences it holds, how fast it decodes.

Pure functions over :class:`ModelArchConfig` (or a GGUF file's tensors) and a hardware description;
no device is touched. The rules, and their sources:

* Memory per rank: the bytes ``serve`` allocates, counted by :func:`rank_resident_bytes` (the one
  place that adds up a rank's bytes) over :func:`rank_weight_parts`, the bytes of each layer, the
  embedding, the LM head and the final norm as the quantization schemes count them for the device:
  GGUF tensors at their block sizes where ``serve`` keeps them (CUDA, or ``--quantization gguf``;
  ``gguf_weight_bytes``), dequantized to ``--dtype`` where it dequantizes (the CPU default, types
  without a kernel); FP8 at one byte per weight plus a scale per output row (``Fp8Config.weight_bytes``);
  everything else in ``--dtype``, over :func:`rank_parameters`: linear layers split over TP
  (Megatron-LM column/row parallel), K/V projections split by KV head and replicated when TP exceeds
  the KV heads (``QKVParallelLinear``), the embedding and LM head split over TP by vocabulary rows
  padded to a multiple of TP (``VocabParallelEmbedding``, ``ParallelLMHead``) on the first and last
  stage (a tied LM head is a second copy on the last stage when PP > 1), norms replicated; plus the
  RoPE cos/sin cache. The file's own size is reported apart. Layers split over PP as the loader
  splits them (``pp_layer_range``). A built-in name in a llama.cpp file type (``-Q4_K_S``) is the
  tensor table ``llama-quantize`` writes (:func:`~shardserve.tools.known_models.llama_cpp_tensor_type`).
* KV cache bytes per token = ``2 * num_layers * num_kv_heads * head_dim * element_bytes`` (``--dtype``,
  or 1 with ``--kv-cache-dtype fp8``); per rank ``num_kv_heads / tp`` (at least one head, replicated
  when tp > kv heads) and the layers of its stage.
* Sequences that fit = ``(gpu_memory * utilization - weights - activation reserve) // (max_model_len
  * kv_bytes_per_token_per_rank)``, the minimum over stages; the reserve includes the buffer a long
  prefill dequantizes a GGUF layer weight into. A ``--gpu``'s memory is the total CUDA reports for
  it, which ``serve`` multiplies by ``--gpu-memory-utilization``.
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
from typing import Any

import torch

from shardserve.config import DTYPES, ModelArchConfig, check_parallel_layout, tensor_parallel_sizes
from shardserve.tools.netbench import BUSBW_FACTORS, NetbenchReport, interpolate_busbw
from shardserve.tools.plan_weights import (
    COMPUTE_DTYPES,
    DTYPE_BYTES,
    ModelWeights,
    held_scheme,
    rank_resident_bytes,
    rank_weight_parts,
    rope_cache_bytes,
    weights_held,
)

logger = logging.getLogger(__name__)

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
    """Figures of one GPU model."""

    name: str
    memory_bytes: int
    """Total memory as CUDA reports it (``torch.cuda.mem_get_info``; "GPU 0 has a total capacity of ..." in
    torch's out-of-memory message): what ``serve --gpu-memory-utilization`` takes its fraction of. A little
    under the marketed size, which counts GiB (a "24 GB" card has 24564 MiB in nvidia-smi, 23.64 GiB in CUDA)."""
    hbm_bandwidth: float
    """Peak memory bandwidth (bytes/s, datasheet)."""
    compute_capability: tuple[int, int]
    """CUDA compute capability (FP8 weights and KV cache need 8.9)."""


GPUS: dict[str, GpuSpec] = {
    spec.name.lower(): spec
    for spec in (
        GpuSpec("H100", int(79.11 * 2**30), 3.35e12, (9, 0)),  # H100 SXM5 80GB
        GpuSpec("H200", int(139.80 * 2**30), 4.8e12, (9, 0)),
        GpuSpec("A100-80", int(79.15 * 2**30), 2.0e12, (8, 0)),
        GpuSpec("L40S", int(44.39 * 2**30), 0.864e12, (8, 9)),
        GpuSpec("RTX 4090", int(23.64 * 2**30), 1.008e12, (8, 9)),
        GpuSpec("RTX 3090 Ti", int(23.64 * 2**30), 1.008e12, (8, 6)),  # 24564 MiB in nvidia-smi, as the 4090
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


# ----------------------------------------------------------------------------- layouts


def stage_layer_ranges(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Decoder layers ``[start, end)`` of each stage, as the loader splits them (``pp_layer_range``).

    Raises:
        ValueError: more stages than layers.
    """
    from shardserve.model_executor.loader import pp_layer_range

    return [pp_layer_range(num_layers, pp, stage) for stage in range(pp)]


def split_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per stage (see :func:`stage_layer_ranges`).

    Raises:
        ValueError: more stages than layers.
    """
    return [end - start for start, end in stage_layer_ranges(num_layers, pp)]


def kv_heads_per_rank(arch: ModelArchConfig, tp: int) -> int:
    """KV heads one TP rank holds: ``num_kv_heads / tp``, or 1 (replicated) when tp >= kv heads."""
    return 1 if tp >= arch.num_key_value_heads else arch.num_key_value_heads // tp


def kv_bytes_per_token(arch: ModelArchConfig, dtype_bytes: float, num_layers: int | None = None, tp: int = 1) -> int:
    """KV cache bytes one token takes: ``2 * num_layers * kv_heads_per_rank * head_dim * dtype_bytes``.

    With ``tp = 1`` and all layers this is the whole model's figure (Llama-3.1-8B, bf16: 131072 B).
    """
    layers = arch.num_hidden_layers if num_layers is None else num_layers
    return int(2 * layers * kv_heads_per_rank(arch, tp) * arch.head_dim * dtype_bytes)


def stage_weight_bytes(
    weights: ModelWeights,
    tp: int,
    pp: int,
    compute_dtype: str = "bf16",
    quantization: str | None = None,
    device: str = "cuda",
) -> list[int]:
    """Bytes of model state held by one rank of each pipeline stage (list of length ``pp``), by
    :func:`rank_resident_bytes`.

    Raises:
        ValueError: ``pp`` exceeds the layer count, or as :func:`rank_weight_parts`.
    """
    ranges = stage_layer_ranges(weights.arch.num_hidden_layers, pp)
    return [rank_resident_bytes(weights, tp, r, compute_dtype, quantization, device) for r in ranges]


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
    """Compute dtype of ``serve`` (``--dtype``): activations, unquantized weights and (by default) the KV cache."""
    quantization: str | None = None
    """``serve --quantization``: None (the checkpoint's own: GGUF blocks on CUDA, FP8 checkpoints in FP8),
    ``gguf`` (keep GGUF blocks on the CPU too) or ``fp8`` (quantize a bf16 checkpoint at load)."""
    kv_cache_dtype: str = "auto"
    """``serve --kv-cache-dtype``: auto (the compute dtype) or fp8 / fp8_e4m3 (one byte per element)."""
    device: str = "cuda"
    """The device ``serve`` runs on: ``cuda``, or ``cpu`` (GGUF and FP8 weights dequantized at load)."""
    compute_capability: tuple[int, int] | None = None
    """The GPU's CUDA compute capability, when known (``--gpu``): FP8 needs 8.9."""
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
        if self.dtype.lower() not in COMPUTE_DTYPES:
            raise ValueError(f"--dtype must be one of serve's {sorted(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}")
        if self.kv_dtype != DTYPES[self.dtype.lower()]:  # reading it checks --kv-cache-dtype
            self.check_fp8(f"--kv-cache-dtype {self.kv_cache_dtype}")
        if self.quantization == "fp8":
            self.check_fp8("--quantization fp8")

    @property
    def dtype_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype.lower()]

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's element type, as ``CacheConfig.cache_torch_dtype`` gives it.

        Raises:
            ValueError: an unknown ``kv_cache_dtype``.
        """
        from shardserve.config import CacheConfig

        return CacheConfig(kv_cache_dtype=self.kv_cache_dtype).cache_torch_dtype(DTYPES[self.dtype.lower()])

    @property
    def kv_dtype_bytes(self) -> int:
        """Bytes per KV cache element (1 with fp8)."""
        return torch.empty((), dtype=self.kv_dtype).element_size()

    def check_fp8(self, what: str) -> None:
        """Refuse an FP8 option on a GPU below compute capability 8.9, as ``serve`` does.

        Raises:
            ValueError: ``compute_capability`` is known and too old.
        """
        from shardserve.config import FP8_MIN_CAPABILITY

        cap = self.compute_capability
        if self.device == "cuda" and cap is not None and tuple(cap) < FP8_MIN_CAPABILITY:
            raise ValueError(
                f"{what} needs a GPU with FP8 support (compute capability >= 8.9); this GPU has {cap[0]}.{cap[1]}, "
                "so serve refuses it"
            )


def activation_reserve(arch: ModelArchConfig, inputs: PlanInputs, tp: int, scratch: int = 0) -> int:
    """Estimated peak per-rank memory outside weights and KV cache (bytes).

    ``max_num_batched_tokens * (4 * hidden + 3 * intermediate / tp) * dtype_bytes`` (residual, normed
    input, attention output, MLP gate/up/activation live at once) plus fp32 logits of
    ``max_num_seqs`` rows, plus ``scratch`` (:func:`dequant_scratch_bytes`), plus RUNTIME_OVERHEAD_BYTES.
    vLLM measures this with a profile run (as ``serve`` does on CUDA); this is the offline stand-in.
    ``inputs.activation_reserve_bytes`` overrides it.
    """
    if inputs.activation_reserve_bytes is not None:
        return inputs.activation_reserve_bytes
    acts = inputs.max_num_batched_tokens * (4 * arch.hidden_size + 3 * arch.intermediate_size / tp) * inputs.dtype_bytes
    logits = inputs.max_num_seqs * arch.vocab_size * 4
    return int(acts + logits + scratch + RUNTIME_OVERHEAD_BYTES)


def dequant_scratch_bytes(weights: ModelWeights, inputs: PlanInputs, tp: int) -> int:
    """The transient buffer a step dequantizes one GGUF layer weight into (``ModelWeightBytes.scratch``): on
    CUDA when a forward has at least ``DEQUANT_MIN_ROWS`` tokens (``gguf_linear``), on the CPU at every step;
    0 when the weights are not GGUF blocks.

    Raises:
        ValueError: as :func:`rank_weight_parts`.
    """
    from shardserve.model_executor.layers.quantization.gguf_blocks import DEQUANT_MIN_ROWS

    if inputs.device == "cuda" and inputs.max_num_batched_tokens < DEQUANT_MIN_ROWS:
        return 0
    return rank_weight_parts(weights, tp, inputs.dtype, inputs.quantization, inputs.device).scratch


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
    stage_bytes = stage_weight_bytes(weights, tp, pp, inputs.dtype, inputs.quantization, inputs.device)
    parts = split_layers(arch.num_hidden_layers, pp)
    reserve = activation_reserve(arch, inputs, tp, dequant_scratch_bytes(weights, inputs, tp))
    budget = inputs.gpu_memory_bytes * inputs.gpu_memory_utilization - reserve
    kv_rooms = [int(budget - b) for b in stage_bytes]
    kv_tokens = [kv_bytes_per_token(arch, inputs.kv_dtype_bytes, n, tp) for n in parts]
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
    if inputs.hbm_bandwidth:  # every weight byte is read once per token; the RoPE cache only at the positions
        read = sum(stage_bytes) - pp * rope_cache_bytes(arch)
        plan.decode_s_per_token_weights = read / inputs.hbm_bandwidth
    _add_comm_times(plan, arch, inputs)
    return plan


def valid_tp_sizes(weights: ModelWeights, inputs: PlanInputs) -> list[int]:
    """TP sizes ``serve`` accepts for the model (:func:`shardserve.config.tensor_parallel_sizes`) up to
    ``inputs.gpus_per_node``, less those that would cut a GGUF block the weights are kept in."""
    sizes = []
    for tp in tensor_parallel_sizes(weights.arch):
        if tp > inputs.gpus_per_node:
            continue
        try:
            rank_weight_parts(weights, tp, inputs.dtype, inputs.quantization, inputs.device)
        except ValueError as e:
            logger.debug("TP=%d left out: %s", tp, e)
            continue
        sizes.append(tp)
    return sizes


def enumerate_layouts(weights: ModelWeights, inputs: PlanInputs) -> list[LayoutPlan]:
    """Every (TP, PP) with a valid TP, at most the available nodes and no TP group split between
    nodes, evaluated (fitting or not)."""
    max_gpus = (inputs.nodes or DEFAULT_MAX_NODES) * inputs.gpus_per_node
    layouts = []
    for tp in valid_tp_sizes(weights, inputs):
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
    """Storage of the checkpoint (``gguf``: the file's own tensor types)."""
    dtype: str
    """Compute dtype (``--dtype``)."""
    weights_held: str
    """How ``serve`` holds the weights on the device (blocks, FP8, dequantized, ``--dtype``), in words."""
    quantization: str | None
    """The scheme the weights are held in: ``gguf``, ``fp8`` or None (plain ``--dtype``)."""
    kv_cache_dtype: str
    """The KV cache's element type (``bfloat16``, ``float8_e4m3fn``, ...)."""
    device: str
    weight_bytes: int
    """Parameter bytes ``serve`` holds over all ranks of one copy (TP = PP = 1)."""
    stored_bytes: int
    """Bytes of the checkpoint's tensors as stored."""
    num_params: int
    kv_bytes_per_token: int
    """Whole model, one token (bytes)."""
    file_bytes: int | None
    layouts: list[LayoutPlan]
    nodes_given: int | None
    """``--nodes``, None when the planner searched."""
    recommended: LayoutPlan | None
    """Fewest GPUs that hold one max_model_len sequence (see :func:`recommend`)."""
    recommended_full_batch: LayoutPlan | None
    """Fewest GPUs that hold max_num_seqs such sequences."""
    chosen: LayoutPlan | None
    """The user's --tp/--pp layout, when given."""
    inter_node_gbps: float | None
    warnings: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Some layout holds the model, and the chosen one (``--tp/--pp``) does if one was given."""
        return self.recommended is not None and (self.chosen is None or self.chosen.fits)

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
    held = rank_weight_parts(weights, 1, inputs.dtype, inputs.quantization, inputs.device)  # checks --quantization
    scheme = held_scheme(weights, inputs.quantization, inputs.device)
    if scheme == "fp8":
        inputs.check_fp8(f"the FP8 weights of {weights.name}")
    layouts = enumerate_layouts(weights, inputs)
    chosen = None
    if inputs.tp is not None or inputs.pp is not None:
        tp, pp = inputs.tp or 1, inputs.pp or 1
        check_parallel_layout(arch, tp, pp, model=weights.name)
        chosen = evaluate_layout(weights, inputs, tp, pp)
    report = PlanReport(
        model=weights.name,
        source=weights.source,
        weight_dtype=weights.weight_dtype,
        dtype=inputs.dtype,
        weights_held=weights_held(weights, inputs.dtype, inputs.quantization, inputs.device),
        quantization=scheme,
        kv_cache_dtype=str(inputs.kv_dtype).removeprefix("torch."),
        device=inputs.device,
        weight_bytes=held.total,
        stored_bytes=weights.stored_bytes,
        num_params=arch.num_params(),
        kv_bytes_per_token=kv_bytes_per_token(arch, inputs.kv_dtype_bytes),
        file_bytes=weights.file_bytes,
        layouts=layouts,
        nodes_given=inputs.nodes,
        recommended=recommend(layouts),
        recommended_full_batch=recommend(layouts, full_batch=True),
        chosen=chosen,
        inter_node_gbps=inter_node_gbps(inputs),
    )
    _explain(report, inputs, weights)
    return report


def _explain(report: PlanReport, inputs: PlanInputs, weights: ModelWeights) -> None:
    usable = inputs.gpu_memory_bytes * inputs.gpu_memory_utilization
    r = report.reasoning
    stored = "the GGUF file's tensors" if report.source == "gguf" else f"{report.num_params / 1e9:.2f}e9 params"
    r.append(
        f"weights {_gb(report.weight_bytes)} as serve holds them on {report.device}: {report.weights_held}; the "
        f"checkpoint stores {_gb(report.stored_bytes)} ({stored} as {_stored_types(weights)}); KV cache "
        f"{report.kv_bytes_per_token} B/token ({report.kv_cache_dtype}); usable per GPU {_gb(usable)} "
        f"({inputs.gpu_memory_utilization:.0%} of {_gb(inputs.gpu_memory_bytes)})"
    )
    _warn_unloadable(report, weights)
    r.append(f"one node holds {_gb(usable * inputs.gpus_per_node)} over {inputs.gpus_per_node} GPU(s)")
    rec = report.recommended
    if rec is None:
        most = (inputs.nodes or DEFAULT_MAX_NODES) * inputs.gpus_per_node
        report.warnings.append(
            f"model does not fit: no layout on up to {most} GPUs of {_gb(inputs.gpu_memory_bytes)} holds the "
            f"{_gb(report.weight_bytes)} of weights plus one {inputs.max_model_len}-token sequence; "
            + ("give more --nodes, " if inputs.nodes else "add nodes, ")
            + "use bigger GPUs or a lower --max-model-len"
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
            f"KV cache {_gb(rec.kv_cache_bytes_per_rank)} = {rec.max_concurrent_seqs} sequence(s) of "
            f"{inputs.max_model_len} tokens"
        )
        full = report.recommended_full_batch
        if full is None:
            report.warnings.append(
                f"no layout holds --max-num-seqs {inputs.max_num_seqs} sequences of {inputs.max_model_len} tokens; "
                f"the recommended one holds {rec.max_concurrent_seqs}"
            )
        elif full is not rec:
            r.append(
                f"it holds {rec.max_concurrent_seqs} < --max-num-seqs {inputs.max_num_seqs} sequences; TP={full.tp} "
                f"PP={full.pp} ({full.num_gpus} GPUs, {full.num_nodes} node(s)) holds {full.max_concurrent_seqs}"
            )
        if inputs.nodes and inputs.nodes > 1 and rec.num_nodes == 1:
            _explain_replicas(report, inputs)
        if rec.decode_s_per_token is not None:
            r.append(
                f"batch-1 decode bound ~{1 / rec.decode_s_per_token:.1f} tokens/s "
                f"({rec.decode_s_per_token * 1e3:.2f} ms/token)"
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


def _stored_types(weights: ModelWeights) -> str:
    counts: dict[str, int] = {}
    for t in weights.tensors:
        counts[t.stored_type] = counts.get(t.stored_type, 0) + t.numel
    return ", ".join(name for name, _ in sorted(counts.items(), key=lambda kv: -kv[1]))


def _warn_unloadable(report: PlanReport, weights: ModelWeights) -> None:
    from shardserve.tools.plan_weights import unloadable_gguf_types

    unloadable = unloadable_gguf_types(weights)
    if unloadable:
        report.warnings.append(
            f"serve cannot load {', '.join(unloadable)} tensors (no kernel, and gguf cannot dequantize them)"
        )


def _explain_replicas(report: PlanReport, inputs: PlanInputs) -> None:
    """One node holds the model but several were given: data-parallel replicas, not a model split over nodes."""
    nodes = inputs.nodes or 1
    single = [p for p in report.layouts if p.num_nodes == 1 and p.fits]
    best = min(single, key=lambda p: (-p.max_concurrent_seqs, recommendation_key(p)))
    per_replica = math.ceil(inputs.max_num_seqs / nodes)
    meets = best.max_concurrent_seqs >= per_replica
    report.reasoning.append(
        f"one node already holds the model, and {nodes} nodes were given: run {nodes} data-parallel replicas "
        f"(one `shardserve serve` per node, behind a load balancer) instead of splitting one copy over the "
        f"nodes; TP={best.tp} PP={best.pp} per node holds {best.max_concurrent_seqs} sequence(s) of "
        f"{inputs.max_model_len} tokens per replica, {nodes * best.max_concurrent_seqs} in all: "
        + (
            f"meets --max-num-seqs {inputs.max_num_seqs} with --max-num-seqs {per_replica} on each"
            if meets
            else f"short of --max-num-seqs {inputs.max_num_seqs} ({per_replica} per replica)"
        )
    )
    full = report.recommended_full_batch
    if not meets and full is not None and full.num_nodes > 1:
        report.reasoning.append(
            f"one server over {full.num_nodes} nodes, TP={full.tp} PP={full.pp}, holds {full.max_concurrent_seqs} "
            f">= --max-num-seqs {inputs.max_num_seqs}"
        )


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
