"""Runs one rank's share of a step: apply the step's diff to the persistent batch, forward, sample.

Every rank applies the same steps in the same order, so its :class:`InputBatch` holds the same rows as
every other rank's. Who needs the sampled tokens gets them on the device, never through the head:

- the output rank (last stage, TP rank 0) samples and writes its rows' ``last_token``;
- with PP = 1 it broadcasts the tokens to the other TP ranks (they embed the next step's inputs);
- with PP > 1 it sends them on the token group to the first stage's TP rank 0, which broadcasts them to
  its TP group; the first stage receives the tokens of every sampled step, in order, up to the step id
  the head names in ``Step.tokens_until`` (steps whose outputs the head has, plus any step whose
  sample a scheduled request is waiting for), so it never waits on the host and never falls behind.

A request that fails on this rank while being added (its sampling state, say) is kept in the batch with
greedy defaults so that every collective still sees the same shapes, and is reported to the head, which
fails it alone (:class:`~shardserve.executor.messages.RequestFailure`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from shardserve.config import EngineConfig
from shardserve.distributed.parallel_state import get_pp_group, get_token_group, get_tp_group
from shardserve.executor.messages import (
    FLOAT32,
    INT32,
    GrammarBitmask,
    MalformedMessageError,
    RequestFailure,
    SamplingOptions,
    Step,
    StepOutput,
    as_i32,
)
from shardserve.model_executor.cuda_graph import DecodeGraphs
from shardserve.model_executor.input_batch import InputBatch, StepInputs
from shardserve.model_executor.layers.attention import AttentionMetadata
from shardserve.model_executor.loader import (
    load_model,
    model_weight_bytes_per_rank,
    pp_layer_range,
    pp_partition_by_memory,
)
from shardserve.model_executor.loader.resolve import ModelSource
from shardserve.model_executor.models.llama import IntermediateTensors
from shardserve.model_executor.prompt_logprobs import (
    PendingPromptLogprobs,
    PromptLogprobRows,
    compute_prompt_logprobs,
)
from shardserve.model_executor.sampler import SamplingState, compute_logprobs

logger = logging.getLogger(__name__)


@dataclass
class StepTimes:
    """Host seconds of this rank's steps, by phase (see :class:`~shardserve.executor.messages.WorkerStats`)."""

    num_steps: int = 0
    prepare_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0


class PendingOutput:
    """A step's sampled tokens (and logprobs) on their way to the host; :meth:`result` waits for the copy.

    Args:
        step_id: the step.
        host: pinned (CUDA) or plain host tensors filled by non-blocking copies: tokens ``(n,)`` int32, and
            with logprobs the chosen logprobs, ranks, top logprobs and top ids.
        logprob_rows: indices into the sampled rows that asked for logprobs.
        event: recorded after the copies (None on the CPU).
        failures: requests that failed on this rank in this step.
    """

    def __init__(self, step_id: int, host: list[torch.Tensor], logprob_rows: np.ndarray, num_top: int,
                 event: torch.cuda.Event | None, failures: list[RequestFailure]):  # fmt: skip
        self.step_id, self.host, self.logprob_rows, self.num_top = step_id, host, logprob_rows, num_top
        self.event, self.failures = event, failures
        self.prompt: PendingPromptLogprobs | None = None
        """The step's prompt logprobs, when a request asked for them."""

    def result(self) -> StepOutput:
        if self.event is not None:
            self.event.synchronize()
        tokens = self.host[0].numpy().astype(INT32, copy=False).tobytes()
        prompt = self.prompt.result() if self.prompt is not None else []
        if len(self.host) == 1:
            return StepOutput(self.step_id, sampled=tokens, failures=self.failures, prompt_logprobs=prompt)
        chosen, ranks, top_vals, top_ids = (t.numpy() for t in self.host[1:])
        return StepOutput(
            self.step_id,
            sampled=tokens,
            logprob_rows=self.logprob_rows.astype(INT32).tobytes(),
            chosen_logprobs=chosen.astype(FLOAT32, copy=False).tobytes(),
            chosen_ranks=ranks.astype(INT32, copy=False).tobytes(),
            num_top=self.num_top,
            top_ids=top_ids.astype(INT32, copy=False).tobytes(),
            top_logprobs=top_vals.astype(FLOAT32, copy=False).tobytes(),
            failures=self.failures,
            prompt_logprobs=prompt,
        )


@dataclass
class AwaitingBitmask:
    """A step whose logits wait for the head's :class:`GrammarBitmask` before sampling (see
    :meth:`ModelRunner.sample_with_bitmask`)."""

    step_id: int
    logits: torch.Tensor
    inputs: StepInputs
    failures: list[RequestFailure]
    positions: np.ndarray
    """Host positions of the tokens being sampled."""
    prompt: PendingPromptLogprobs | None


class ModelRunner:
    """One rank's model, KV cache, persistent batch and sampling state."""

    def __init__(self, config: EngineConfig, source: ModelSource, device: torch.device, rank: int = 0):
        self.config = config
        self.source = source
        self.arch = source.arch
        self.device = device
        self.rank = rank
        self.dtype = config.model.torch_dtype()
        self.block_size = config.cache.block_size
        self.max_rows = config.scheduler.max_num_seqs
        self.pp = get_pp_group()
        self.tp = get_tp_group()
        self.token_group = get_token_group()
        self.receives_tokens = self.pp.world_size > 1 and self.pp.is_first_rank
        """First-stage ranks with PP > 1 take each step's sampled tokens from the output rank (see module doc)."""
        self.cpu_threads = (
            CpuThreads(self.arch.hidden_size, config.parallel.ranks_per_node) if device.type == "cpu" else None
        )
        if not config.parallel.disable_custom_all_reduce:
            self.tp.init_custom_all_reduce(config.model.torch_dtype())
        partition = config.parallel.pp_layer_partition
        if partition is None and config.parallel.pp_partition_by_memory and self.pp.world_size > 1:
            partition = self._partition_by_memory()
        self.layer_range = pp_layer_range(
            self.arch.num_hidden_layers, self.pp.world_size, self.pp.rank_in_group, partition
        )
        if config.fault_injection is not None:
            config.fault_injection.check("load", rank)
        self.model = load_model(
            source,
            self.dtype,
            device,
            self.layer_range,
            dummy=config.model.load_format == "dummy",
            seed=config.model.seed,
            quantization=config.model.quantization,
        )
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None
        self.batch: InputBatch | None = None
        self.sampling = SamplingState(self.max_rows, self.arch.vocab_size, device) if self.is_output_rank else None
        self.prompt_logprobs = PromptLogprobRows(self.max_rows, self.arch.vocab_size) if self.pp.is_last_rank else None
        """Last stage: which rows want prompt logprobs (every TP rank plans the same LM-head calls)."""
        self.awaiting: AwaitingBitmask | None = None
        """A grammar step that has run its forward and waits for its bitmask."""
        self._token_steps: deque[tuple[int, torch.Tensor]] = deque()
        """First stage with PP > 1: (step id, sampled rows) of steps whose tokens are still to be received."""
        self._in_transit: deque = deque()
        """Point-to-point sends still in flight, with the tensors they read (kept alive until done)."""
        # Pinned host buffers for the sampled tokens, reused round-robin: more slots than steps in flight.
        self._pinned = []
        if device.type == "cuda" and self.is_output_rank:
            slots = config.parallel.pipeline_parallel_size + 3
            self._pinned = [(torch.empty(self.max_rows, dtype=torch.int32, pin_memory=True), torch.cuda.Event())
                            for _ in range(slots)]  # fmt: skip
        self._next_pinned = 0
        self.times = StepTimes()
        self.fault = config.fault_injection
        self.failures: list[RequestFailure] = []
        """Requests that failed on this rank in the last step (the output rank sends them with its output)."""

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

    @property
    def is_output_rank(self) -> bool:
        """The rank that samples and reports: last pipeline stage, TP rank 0."""
        return self.pp.is_last_rank and self.tp.is_first_rank

    # -- KV cache ------------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block over this rank's layers."""
        layers = self.model.attention_layers
        if not layers:
            return 0
        a = layers[0]
        bits = torch.finfo(self.config.cache.cache_torch_dtype(self.dtype)).bits  # 8 with --kv-cache-dtype fp8
        per_layer = 2 * self.block_size * a.num_kv_heads * a.head_dim * bits // 8
        return per_layer * len(layers)

    def available_kv_blocks(self) -> int:
        """Blocks this rank can hold: from the CPU budget, or from free device memory after a profile run.

        Raises:
            ValueError: no room for a single block on the GPU (the message says what to change).
        """
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        block_bytes = self.kv_block_bytes()
        if self.device.type != "cuda":
            return max(1, int(cache.cpu_kv_cache_gib * 2**30 // max(block_bytes, 1)))
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
            query_lens_cpu=np.array([n]),
            seq_lens_cpu=np.array([n]),
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

    def init_kv_cache(self, num_blocks: int, max_model_len: int) -> None:
        """Allocate the KV cache and the persistent batch, then capture the decode CUDA graphs (CUDA, not eager).

        Args:
            num_blocks: KV blocks every rank agreed on.
            max_model_len: the engine's context length (tokens), which sizes the block tables.
        """
        self._allocate_kv_cache(num_blocks)
        max_blocks = min(math.ceil(max_model_len / self.block_size), num_blocks)
        self.batch = InputBatch(self.max_rows, max_blocks, self.block_size, num_blocks, self.device)
        if self.device.type == "cuda" and not self.config.model.enforce_eager:
            self.graphs = DecodeGraphs(
                self.model,
                max_batch_size=min(self.config.scheduler.max_num_seqs, self.config.model.max_cuda_graph_batch_size),
                max_blocks_per_seq=max_blocks,
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
        dtype = self.config.cache.cache_torch_dtype(self.dtype)
        if dtype != self.dtype:
            from shardserve.config import check_fp8_device

            check_fp8_device(self.device, f"--kv-cache-dtype {self.config.cache.kv_cache_dtype}")
        for layer in self.model.attention_layers:
            cache = torch.zeros(
                2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim, dtype=dtype, device=self.device
            )
            layer.kv_cache = cache
            self.kv_caches.append(cache)

    # -- steps ---------------------------------------------------------------------------------
    def _apply_diff(self, step: Step) -> tuple[np.ndarray, np.ndarray, list[RequestFailure]]:
        """Freed rows, new rows, appended blocks; returns the new block-table entries and the failures."""
        batch = self.batch
        if step.freed_rows:
            batch.free(as_i32(step.freed_rows))
        failures: list[RequestFailure] = []
        add_rows, add_ids = [], []
        for new in step.new_requests:
            prompt, output = batch.add(new)
            if self.prompt_logprobs is not None:
                self.prompt_logprobs.add(new.row, new.sampling.prompt_logprobs, len(prompt))
            add_rows.append(np.full(len(new.block_ids) // 4, new.row, np.int64))
            add_ids.append(as_i32(new.block_ids))
            try:
                self._add_request(new.row, new.request_id, new.sampling, prompt, output)
            except Exception as e:
                logger.exception("rank %d: cannot add request %s", self.rank, new.request_id)
                failures.append(RequestFailure(new.request_id, new.row, f"{type(e).__name__}: {e}"))
                if self.sampling is not None:  # keep the row's shapes: greedy, no penalties
                    self.sampling.add(new.row, SamplingOptions(temperature=0.0), prompt, output)
        block_rows = np.concatenate([*add_rows, as_i32(step.block_rows).astype(np.int64)])
        block_ids = np.concatenate([*add_ids, as_i32(step.block_ids)]).astype(np.int32)
        rows, cols = batch.append_blocks(block_rows, block_ids)
        return rows, cols, failures

    def _add_request(self, row: int, request_id: str, opts: SamplingOptions, prompt: np.ndarray,
                     output: np.ndarray) -> None:  # fmt: skip
        if self.fault is not None:
            self.fault.check("add_request", self.rank, prompt)
        if self.sampling is not None:
            self.sampling.add(row, opts, prompt, output)

    @torch.inference_mode()
    def execute(self, step: Step) -> PendingOutput | None:
        """Run this rank's layers for one step.

        Returns, on the output rank, the sampled tokens on their way to the host (call ``result()``);
        None elsewhere.

        Raises:
            MalformedMessageError: the step does not fit this rank's batch (a head bug or a forged message).
        """
        t0 = time.perf_counter()
        if self.cpu_threads is not None:
            self.cpu_threads.adjust(int(as_i32(step.num_new_tokens).sum()))
        if self.fault is not None:
            for new in step.new_requests:
                self.fault.check("step", self.rank, as_i32(new.prompt_token_ids))
        block_rows, block_cols, failures = self._apply_diff(step)
        self.failures = failures
        if self.receives_tokens:
            self._receive_tokens(step.tokens_until)
        inputs = self.batch.prepare(step, block_rows, block_cols)
        if self.receives_tokens and len(inputs.sample_rows):
            self._token_steps.append((step.step_id, inputs.sample_rows_device))
        if self.sampling is not None:
            self.sampling.flush()
        t1 = time.perf_counter()
        out = self._forward(inputs)
        t2 = time.perf_counter()
        self.times.num_steps += 1
        self.times.prepare_s += t1 - t0
        self.times.forward_s += t2 - t1
        if not self.pp.is_last_rank:
            self._send_intermediate(out)
            return None
        prompt = self._prompt_logprobs(step, inputs, out)
        if not len(inputs.sample_rows):
            if not self.is_output_rank:
                return None
            empty = [torch.zeros(0, dtype=torch.int32)]
            pending = PendingOutput(step.step_id, empty, np.zeros(0, np.int64), 0, None, failures)
            pending.prompt = prompt
            return pending
        logits = self.model.compute_logits(out[inputs.sample_indices])
        positions = self._sample_positions(inputs)
        if step.grammar and (self.is_output_rank or self.pp.world_size == 1):
            self.awaiting = AwaitingBitmask(step.step_id, logits, inputs, failures, positions, prompt)
            return self.awaiting
        return self._finish(step.step_id, logits, inputs, failures, positions, prompt)

    def _finish(self, step_id: int, logits: torch.Tensor, inputs: StepInputs, failures: list[RequestFailure],
                positions: np.ndarray | None, prompt: PendingPromptLogprobs | None,
                stop_allowed: np.ndarray | None = None) -> PendingOutput | None:  # fmt: skip
        """Last stage after the LM head: sample (output rank) or take the output rank's tokens (TP ranks)."""
        if not self.is_output_rank:
            if self.pp.world_size == 1:  # the TP ranks embed the next step: take the output rank's tokens
                tokens = self.tp.broadcast(torch.empty(len(inputs.sample_rows), dtype=torch.long, device=self.device))
                self.batch.last_token[inputs.sample_rows_device] = tokens
            return None
        start = time.perf_counter()
        pending = self._sample(step_id, logits, inputs, failures, positions, stop_allowed)
        pending.prompt = prompt
        self.times.sample_s += time.perf_counter() - start
        return pending

    def _sample_positions(self, inputs: StepInputs) -> np.ndarray | None:
        """Output rank, when some row has a constraint (min_tokens): host positions of the sampled tokens."""
        if self.sampling is None or not self.sampling.processors.active:
            return None
        return self.batch.num_tokens[inputs.sample_rows] - 1

    def _prompt_logprobs(self, step: Step, inputs: StepInputs, out: torch.Tensor) -> PendingPromptLogprobs | None:
        """Last stage: the prompt logprobs of the step's prefill chunks that asked for them."""
        if self.prompt_logprobs is None or not self.prompt_logprobs.used:
            return None
        meta = inputs.meta
        rows = as_i32(step.rows).astype(np.int64)
        plan = self.prompt_logprobs.plan(rows, meta.query_lens_cpu, meta.seq_lens_cpu, self.batch.host_tokens)
        if plan is None:
            return None
        return compute_prompt_logprobs(self.model, out, plan, self.is_output_rank)

    @torch.inference_mode()
    def sample_with_bitmask(self, msg: GrammarBitmask) -> PendingOutput | None:
        """Finish the step :meth:`execute` left waiting: apply the grammar bitmask to its logits (output
        rank, before penalties, ``logit_bias`` and temperature), then sample; other ranks take the tokens.

        Raises:
            MalformedMessageError: no step waits for this bitmask, or its rows or shape do not fit.
        """
        waiting = self.awaiting
        if waiting is None or waiting.step_id != msg.step_id:
            held = None if waiting is None else waiting.step_id
            raise MalformedMessageError(f"a grammar bitmask for step {msg.step_id}, but step {held} waits for one")
        self.awaiting = None
        stop_allowed = None
        if self.is_output_rank:
            stop_allowed = self._apply_bitmask(waiting.logits, msg)
        return self._finish(waiting.step_id, waiting.logits, waiting.inputs, waiting.failures, waiting.positions,
                            waiting.prompt, stop_allowed)  # fmt: skip

    def _apply_bitmask(self, logits: torch.Tensor, msg: GrammarBitmask) -> np.ndarray:
        """Mask ``logits`` ``(n, vocab_size)`` in place; returns the rows whose stop tokens min_tokens keeps."""
        rows = as_i32(msg.rows)
        n = logits.shape[0]
        stop_allowed = as_i32(msg.stop_allowed)
        if len(rows) and (rows.min() < 0 or rows.max() >= n) or len(stop_allowed) and stop_allowed.max() >= n:
            raise MalformedMessageError(f"step {msg.step_id}: grammar rows outside the {n} sampled rows")
        if not len(rows):
            return stop_allowed
        words = len(msg.bitmask) // 4 // len(rows)
        if words == 0 or words * 4 * len(rows) != len(msg.bitmask):
            raise MalformedMessageError(f"step {msg.step_id}: {len(msg.bitmask)} bitmask bytes for {len(rows)} rows")
        from shardserve.structured_output.manager import apply_bitmask

        # The row indices and the rows' masks go to the device in one copy from one host buffer, pinned on
        # CUDA so that the copy is asynchronous: nothing here waits for the device. (A pageable or blocking
        # copy waits for this step's forward to finish, so the host would launch the sample and the next
        # step's forward only then, and the device would sit idle for that host work on every step.)
        k = len(rows)
        host = torch.empty(k * (words + 1), dtype=torch.int32, pin_memory=logits.is_cuda)
        staged = host.numpy()
        staged[:k] = rows
        staged[k:] = as_i32(msg.bitmask)
        device = host if host.device == logits.device else host.to(logits.device, non_blocking=True)
        index, mask = device[:k], device[k:].view(k, words)
        if k == n and np.array_equal(rows, np.arange(n)):  # every sampled row, in order: no scatter
            apply_bitmask(logits, mask, None)
            return stop_allowed
        full = torch.full((n, words), -1, dtype=torch.int32, device=logits.device)
        full.index_copy_(0, index.long(), mask)
        apply_bitmask(logits, full, index)
        return stop_allowed

    def _forward(self, inputs: StepInputs) -> torch.Tensor | IntermediateTensors:
        n = inputs.input_ids.shape[0]
        inter = None
        if not self.pp.is_first_rank:
            shape = (n, self.arch.hidden_size)
            hidden = torch.empty(shape, dtype=self.dtype, device=self.device)
            residual = torch.empty(shape, dtype=self.dtype, device=self.device)
            works = [self.pp.irecv(hidden, self.pp.prev_rank), self.pp.irecv(residual, self.pp.prev_rank)]
            for work in works:
                work.wait()
            inter = IntermediateTensors(hidden, residual)
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta, inter)
        return self.model(inputs.input_ids, inputs.positions, inputs.meta, inter)

    def _send_intermediate(self, out: IntermediateTensors) -> None:
        """Hand the stage's output to the next stage without waiting for the transfer."""
        self._reap_sends()
        for t in (out.hidden_states, out.residual):
            t = t.contiguous()
            self._in_transit.append((self.pp.isend(t, self.pp.next_rank), t))

    def _reap_sends(self) -> None:
        while self._in_transit and (self._in_transit[0][0] is None or self._in_transit[0][0].is_completed()):
            self._in_transit.popleft()

    def _receive_tokens(self, until: int) -> None:
        """First stage, PP > 1: take the sampled tokens of the steps up to ``until`` into ``last_token``."""
        while self._token_steps and self._token_steps[0][0] <= until:
            _, rows = self._token_steps.popleft()
            tokens = torch.empty(rows.shape[0], dtype=torch.long, device=self.device)
            if self.tp.is_first_rank:
                self.token_group.irecv(tokens, self.token_group.ranks[1]).wait()
            self.batch.last_token[rows] = self.tp.broadcast(tokens, 0)

    def _sample(self, step_id: int, logits: torch.Tensor, inputs: StepInputs, failures: list[RequestFailure],
                positions: np.ndarray | None = None,
                stop_allowed: np.ndarray | None = None) -> PendingOutput:  # fmt: skip
        rows = inputs.sample_rows
        num_top = self.sampling.num_logprobs[rows]
        wants_logprobs = num_top >= 0
        raw = logits.clone() if wants_logprobs.any() and self.sampling.modifies_logits(rows).any() else logits
        tokens = self.sampling.sample(logits, rows, inputs.sample_rows_device, inputs.sample_positions,
                                      positions, stop_allowed)  # fmt: skip
        if self.pp.world_size == 1:
            self.batch.last_token[inputs.sample_rows_device] = tokens
            if self.tp.world_size > 1:
                self.tp.broadcast(tokens, 0)
        else:
            self._reap_sends()
            self._in_transit.append((self.token_group.isend(tokens, self.token_group.ranks[0]), tokens))
        device_out = [tokens.to(torch.int32)]
        lp_rows = np.flatnonzero(wants_logprobs)
        k = int(num_top.max()) if len(lp_rows) else 0
        if len(lp_rows):
            idx = torch.from_numpy(lp_rows).to(self.device)
            device_out += list(compute_logprobs(raw[idx], tokens[idx], k))
        if tokens.is_cuda:
            buffer, event = self._pinned[self._next_pinned]
            self._next_pinned = (self._next_pinned + 1) % len(self._pinned)
            host = [buffer[: len(rows)]]
            host += [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in device_out[1:]]  # logprobs: rare
            for h, d in zip(host, device_out):
                h.copy_(d, non_blocking=True)
            event.record()
            return PendingOutput(step_id, host, lp_rows, k, event, failures)
        return PendingOutput(step_id, device_out, lp_rows, k, None, failures)


SMALL_STEP = 16384
"""A CPU step with fewer tokens x hidden size than this runs on one intra-op thread (see :class:`CpuThreads`)."""


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _runnable_elsewhere() -> int | None:
    """Threads of other processes that are running or ready to run now (/proc/loadavg), None if unknown."""
    try:
        with open("/proc/loadavg") as f:
            total = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/stat") as f:
                own += f.read().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, total - own)


class CpuThreads:
    """Intra-op threads of a CPU rank, following how busy the machine is.

    A rank gets its share of the node's cores, less the cores other processes are using right now (read
    from the kernel's run queue once a second), and at least one. OpenMP threads that find no free core
    wait at every operator's barrier for a descheduled sibling, which made a loaded 2-core machine ~10x
    slower with two threads than with one. A small step (tokens x hidden size below ``SMALL_STEP``, e.g. a
    batch-1 decode) runs one thread: its operators are too small to split (the hidden-64 model of
    ``benchmarks/bench_host_overhead.py`` on 16 cores: 1.9 ms per batch-1 step on one thread against 3.2 ms
    on sixteen; at 256 running requests one thread was 1.3x slower than sixteen).
    """

    CHECK_S = 1.0

    def __init__(self, hidden_size: int, ranks_per_node: int):
        self.hidden_size = hidden_size
        self.share = max(1, _available_cores() // max(1, ranks_per_node))
        self.free = self.share
        self.threads = self.share
        self._next_check = 0.0
        torch.set_num_threads(self.threads)

    def adjust(self, num_tokens: int) -> None:
        """Set the thread count for a step of ``num_tokens`` (the load is re-read at most once per ``CHECK_S``)."""
        if self.share > 1 and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + self.CHECK_S
            busy = _runnable_elsewhere()
            self.free = self.share if busy is None else max(1, min(self.share, _available_cores() - busy))
        threads = 1 if num_tokens * self.hidden_size < SMALL_STEP else self.free
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads


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
