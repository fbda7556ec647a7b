"""Runs one rank's share of a step: inputs from the scheduler's message, forward, sampling."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from shardserve.config import EngineConfig
from shardserve.distributed.parallel_state import get_pp_group, get_tp_group
from shardserve.executor.messages import PLACEHOLDER_TOKEN_ID, ModelRunnerOutput, SchedulerOutput
from shardserve.model_executor.cuda_graph import DecodeGraphs
from shardserve.model_executor.layers.attention import AttentionMetadata
from shardserve.model_executor.loader import (
    load_model,
    model_weight_bytes_per_rank,
    pp_layer_range,
    pp_partition_by_memory,
)
from shardserve.model_executor.loader.resolve import ModelSource
from shardserve.model_executor.models.llama import IntermediateTensors
from shardserve.model_executor.sampler import SamplingRow, apply_penalties, compute_logprobs, sample
from shardserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class CachedRequestState:
    """What a rank remembers of a running request between steps."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    block_ids: list[int]
    generator: torch.Generator | None


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    """``(num_tokens,)`` int64."""
    positions: torch.Tensor
    """``(num_tokens,)`` int64."""
    meta: AttentionMetadata
    sample_indices: torch.Tensor
    """``(num_sampled,)`` rows of the batch whose hidden state is sampled (each request's last token)."""
    sampled_ids: list[str]
    """Request ids of those rows, in order."""
    placeholders: list[tuple[int, str]]
    """``(row of the batch, request id)`` of inputs that are the previous step's sample (async scheduling)."""


class PendingOutput:
    """A step's sampled tokens on their way to the host: ``result()`` waits for the copy (async scheduling).

    Args:
        runner: the runner whose request states receive the tokens.
        output: the step's output, ``sampled`` filled by ``result()``.
        request_ids: ids of the sampled rows, in order.
        tokens: ``(num_sampled,)`` int64 in pinned host memory, written by a non-blocking copy.
        event: recorded after that copy.
    """

    def __init__(
        self,
        runner: ModelRunner,
        output: ModelRunnerOutput,
        request_ids: list[str],
        tokens: torch.Tensor | None,
        event: torch.cuda.Event | None,
    ):
        self.runner, self.output, self.request_ids, self.tokens, self.event = runner, output, request_ids, tokens, event

    def result(self) -> ModelRunnerOutput:
        if self.tokens is None:
            return self.output
        if self.event is not None:
            self.event.synchronize()
        for rid, tok in zip(self.request_ids, self.tokens.tolist()):
            state = self.runner.requests.get(rid)
            if state is not None:
                state.output_token_ids.append(tok)
            self.output.sampled[rid] = tok
        self.tokens = None
        return self.output


class ModelRunner:
    """One rank's model, KV cache and per-request state."""

    def __init__(self, config: EngineConfig, source: ModelSource, device: torch.device):
        self.config = config
        self.source = source
        self.arch = source.arch
        self.device = device
        self.dtype = config.model.torch_dtype()
        self.block_size = config.cache.block_size
        self.pp = get_pp_group()
        self.tp = get_tp_group()
        if not config.parallel.disable_custom_all_reduce:
            self.tp.init_custom_all_reduce(config.model.torch_dtype())
        partition = config.parallel.pp_layer_partition
        if partition is None and config.parallel.pp_partition_by_memory and self.pp.world_size > 1:
            partition = self._partition_by_memory()
        self.layer_range = pp_layer_range(
            self.arch.num_hidden_layers, self.pp.world_size, self.pp.rank_in_group, partition
        )
        self.model = load_model(
            source,
            self.dtype,
            device,
            self.layer_range,
            dummy=config.model.load_format == "dummy",
            seed=config.model.seed,
            quantization=config.model.quantization,
        )
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None
        self._last_sampled: torch.Tensor | None = None
        """``(num_sampled,)`` the previous step's sampled ids on the device."""
        self._last_sampled_rows: dict[str, int] = {}

    def _partition_by_memory(self) -> list[int]:
        """Agree on layers per stage from free memory: min over each TP group, then gathered along PP."""
        if self.device.type == "cuda":
            free = float(torch.cuda.mem_get_info(self.device)[0])
        else:  # CPU ranks of one node share its RAM
            free = float(_mem_available_bytes()) / max(1, self.config.parallel.ranks_per_node)
        stages_free = self.pp.all_gather_cpu(self.tp.all_reduce_min_cpu(free))
        weights = model_weight_bytes_per_rank(
            self.source, self.tp.world_size, self.dtype, self.config.model.quantization, self.device
        )  # GGUF: layers differ in bytes
        partition = pp_partition_by_memory(self.arch.num_hidden_layers, stages_free, weights)
        logger.info("pipeline layers by free memory %s GiB: %s", [round(f / 2**30, 1) for f in stages_free], partition)
        return partition

    # -- KV cache ------------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block over this rank's layers."""
        layers = self.model.attention_layers
        if not layers:
            return 0
        a = layers[0]
        per_layer = 2 * self.block_size * a.num_kv_heads * a.head_dim * torch.finfo(self.dtype).bits // 8
        return per_layer * len(layers)

    def available_kv_blocks(self) -> int:
        """Blocks this rank can hold: from the CPU budget, or from free device memory after a profile run."""
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        block_bytes = self.kv_block_bytes()
        if self.device.type != "cuda":
            return max(1, int(cache.cpu_kv_cache_gib * 2**30 // block_bytes))
        free, total = torch.cuda.mem_get_info(self.device)
        peak = self._profile_peak_bytes()
        used_by_others = total - free - torch.cuda.memory_allocated(self.device)
        budget = total * cache.gpu_memory_utilization - used_by_others - peak
        num = int(budget // block_bytes)
        if num < 1:
            raise ValueError(
                f"no room for the KV cache on {self.device}: weights and activations take "
                f"{peak / 2**30:.1f} GiB of {total * cache.gpu_memory_utilization / 2**30:.1f} GiB allowed; "
                "raise --gpu-memory-utilization, shorten --max-num-batched-tokens or add GPUs"
            )
        return num

    def _profile_peak_bytes(self) -> int:
        """Peak memory of a forward over a full token budget (weights included), bytes."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = self.config.scheduler.max_num_batched_tokens
        self._allocate_kv_cache(1)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(n, dtype=torch.long, device=self.device),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(1, math.ceil(n / self.block_size), dtype=torch.int32, device=self.device),
            query_lens_cpu=[n],
            seq_lens_cpu=[n],
            block_size=self.block_size,
        )
        with torch.inference_mode():
            inter = None
            if not self.pp.is_first_rank:
                h = torch.zeros(n, self.arch.hidden_size, dtype=self.dtype, device=self.device)
                inter = IntermediateTensors(h, h.clone())
            out = self.model(ids, torch.arange(n, device=self.device), meta, inter)
            if self.pp.is_last_rank:
                self.model.compute_logits(out[-self.config.scheduler.max_num_seqs :])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.kv_caches = []
        for layer in self.model.attention_layers:
            layer.kv_cache = None
        torch.cuda.empty_cache()
        return peak

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache, then capture the decode CUDA graphs (on CUDA, unless eager)."""
        self._allocate_kv_cache(num_blocks)
        if self.device.type == "cuda" and not self.config.model.enforce_eager:
            limit = self.config.model.max_model_len or self.arch.max_position_embeddings
            self.graphs = DecodeGraphs(
                self.model,
                max_batch_size=min(self.config.scheduler.max_num_seqs, self.config.model.max_cuda_graph_batch_size),
                max_blocks_per_seq=min(math.ceil(limit / self.block_size), num_blocks),
                block_size=self.block_size,
                hidden_size=self.arch.hidden_size,
                dtype=self.dtype,
                device=self.device,
                first_stage=self.pp.is_first_rank,
                last_stage=self.pp.is_last_rank,
            )
            self.graphs.capture()

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``(2, num_blocks, block_size, num_kv_heads, head_dim)`` per layer and bind it."""
        self.num_blocks = num_blocks
        self.kv_caches = []
        for layer in self.model.attention_layers:
            cache = torch.zeros(
                2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim, dtype=self.dtype, device=self.device
            )
            layer.kv_cache = cache
            self.kv_caches.append(cache)

    # -- steps ---------------------------------------------------------------------------------
    def _update_states(self, step: SchedulerOutput) -> None:
        for rid in step.finished_request_ids:
            self.requests.pop(rid, None)
        for new in step.new_requests:
            gen = None
            if new.params.seed is not None and not new.params.greedy:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(new.params.seed)
            self.requests[new.request_id] = CachedRequestState(
                list(new.prompt_token_ids), list(new.output_token_ids), new.params, list(new.block_ids), gen
            )
        for s in step.scheduled:
            self.requests[s.request_id].block_ids.extend(s.new_block_ids)

    def prepare_inputs(self, step: SchedulerOutput) -> StepInputs:
        """Flatten the step's tokens into one batch and say where each goes in the KV cache."""
        bs = self.block_size
        ids, pos, slots, q_lens, seq_lens, tables = [], [], [], [], [], []
        sample_idx, sample_ids, placeholders = [], [], []
        for s in step.scheduled:
            state = self.requests[s.request_id]
            n = len(s.token_ids)
            if s.token_ids[-1] == PLACEHOLDER_TOKEN_ID:
                placeholders.append((len(ids) + n - 1, s.request_id))
            ids.extend(s.token_ids)
            p = range(s.start_position, s.start_position + n)
            pos.extend(p)
            slots.extend(state.block_ids[i // bs] * bs + i % bs for i in p)
            q_lens.append(n)
            seq_lens.append(s.start_position + n)
            tables.append(state.block_ids)
            if s.sample:
                sample_idx.append(len(ids) - 1)
                sample_ids.append(s.request_id)
        width = max(math.ceil(L / bs) for L in seq_lens)
        table_np = np.zeros((len(tables), width), dtype=np.int32)  # numpy: a row copy costs ~1 us, torch ~10
        for i, t in enumerate(tables):
            n_blocks = min(len(t), width)
            table_np[i, :n_blocks] = t[:n_blocks]
        table = torch.from_numpy(table_np)
        qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        qsl[1:] = torch.from_numpy(np.cumsum(np.asarray(q_lens, dtype=np.int32), dtype=np.int32))
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            query_start_loc=qsl.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=table.to(dev, non_blocking=True),
            query_lens_cpu=q_lens,
            seq_lens_cpu=seq_lens,
            block_size=bs,
        )
        input_ids = torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True)
        if placeholders:
            rows = torch.tensor([r for r, _ in placeholders], dtype=torch.long).to(dev, non_blocking=True)
            src = torch.tensor([self._last_sampled_rows[rid] for _, rid in placeholders], dtype=torch.long)
            input_ids[rows] = self._last_sampled[src.to(dev, non_blocking=True)]
        return StepInputs(
            input_ids=input_ids,
            positions=torch.tensor(pos, dtype=torch.long).to(dev, non_blocking=True),
            meta=meta,
            sample_indices=torch.tensor(sample_idx, dtype=torch.long).to(dev, non_blocking=True),
            sampled_ids=sample_ids,
            placeholders=placeholders,
        )

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run this rank's layers for one step.

        Returns the sampled tokens on the output rank (last stage, TP rank 0), None elsewhere.
        """
        pending = self.execute_async(step)
        return pending.result() if isinstance(pending, PendingOutput) else pending

    @torch.inference_mode()
    def execute_async(self, step: SchedulerOutput) -> PendingOutput | ModelRunnerOutput | None:
        """Like :meth:`execute`, but the sampled tokens are still being copied to the host (async scheduling).

        Placeholder inputs (``PLACEHOLDER_TOKEN_ID``) take the previous step's sample on the device. With
        TP the output rank broadcasts its sample to the other TP ranks on the device group for that; with
        PP the first stage has no sample, so async scheduling runs with PP = 1.
        """
        self._update_states(step)
        if step.is_empty:
            return ModelRunnerOutput(step.step_id) if self.is_output_rank else None
        inputs = self.prepare_inputs(step)
        n = inputs.input_ids.shape[0]
        inter = None
        if not self.pp.is_first_rank:
            shape = (n, self.arch.hidden_size)
            inter = IntermediateTensors(
                self.pp.recv(shape, self.dtype, self.pp.prev_rank), self.pp.recv(shape, self.dtype, self.pp.prev_rank)
            )
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            out = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta, inter)
        else:
            out = self.model(inputs.input_ids, inputs.positions, inputs.meta, inter)
        if not self.pp.is_last_rank:
            self.pp.send(out.hidden_states, self.pp.next_rank)
            self.pp.send(out.residual, self.pp.next_rank)
            return None
        if not inputs.sampled_ids:
            return ModelRunnerOutput(step.step_id) if self.is_output_rank else None
        logits = self.model.compute_logits(out[inputs.sample_indices])
        share = self.tp.world_size > 1 and self.config.scheduler.async_scheduling and self.pp.world_size == 1
        if not self.is_output_rank:
            if share:  # the next step's placeholders are this sample
                tokens = torch.empty(len(inputs.sampled_ids), dtype=torch.long, device=self.device)
                self._last_sampled = self.tp.broadcast(tokens, 0)
                self._last_sampled_rows = {rid: i for i, rid in enumerate(inputs.sampled_ids)}
            return None
        pending = self._sample(step.step_id, logits, inputs.sampled_ids)
        if share:
            self.tp.broadcast(self._last_sampled, 0)
        return pending

    @property
    def is_output_rank(self) -> bool:
        """The rank that samples and reports: last pipeline stage, TP rank 0."""
        return self.pp.is_last_rank and self.tp.is_first_rank

    def _sample(self, step_id: int, logits: torch.Tensor, request_ids: list[str]) -> PendingOutput:
        logits = logits.float()
        states = [self.requests[r] for r in request_ids]
        rows = [SamplingRow(s.params, s.generator, s.prompt_token_ids, s.output_token_ids) for s in states]
        raw = logits.clone() if any(s.params.logprobs is not None for s in states) else logits
        tokens = sample(apply_penalties(logits, rows), rows)
        self._last_sampled = tokens
        self._last_sampled_rows = {rid: i for i, rid in enumerate(request_ids)}
        logprobs = compute_logprobs(raw, tokens, [s.params.logprobs for s in states])
        out = ModelRunnerOutput(step_id)
        for rid, lp in zip(request_ids, logprobs):
            if lp is not None:
                out.logprobs[rid] = lp
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return PendingOutput(self, out, request_ids, host, event)
        return PendingOutput(self, out, request_ids, tokens, None)


def _mem_available_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (the kernel's estimate of memory free for new work)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30
