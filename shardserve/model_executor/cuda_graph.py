"""CUDA graphs for decode steps: one graph per captured batch size, replayed on static buffers.

A decode step at small batch is a few hundred short kernels; launching them from Python costs more than
they run. Capturing the forward once per batch size and replaying it (as vLLM and gpt-fast do) leaves
one launch per step. A batch of ``b`` decode tokens runs the graph of the smallest captured size
``>= b``; the padding rows get slot -1 (no KV write) and context length 0 (zero attention output).
"""

from __future__ import annotations

import logging
import time

import torch

from shardserve.model_executor.layers.attention import AttentionMetadata
from shardserve.model_executor.models.llama import IntermediateTensors

logger = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to ``max_batch_size`` (vLLM's spacing)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class DecodeGraphs:
    """Captured decode forwards of one rank's model.

    Args:
        model: this rank's model (``forward(input_ids, positions, meta, intermediate)``).
        max_batch_size: largest decode batch captured (requests).
        max_blocks_per_seq: width of the static block table (``ceil(max_model_len / block_size)``).
        block_size: tokens per KV block.
        hidden_size: model width, for the pipeline buffers.
        dtype, device: of the activations.
        first_stage, last_stage: this rank's place in the pipeline.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_batch_size: int,
        max_blocks_per_seq: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        first_stage: bool,
        last_stage: bool,
    ):
        self.model = model
        self.block_size = block_size
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        self.first_stage, self.last_stage = first_stage, last_stage
        b = self.max_batch_size
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(b, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(b, hidden_size, dtype=dtype, device=device)
        self.residual = torch.zeros(b, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor | IntermediateTensors] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[1] * bs,
            block_size=self.block_size,
        )

    def _forward(self, bs: int):
        inter = None if self.first_stage else IntermediateTensors(self.hidden[:bs], self.residual[:bs])
        ids = self.input_ids[:bs] if self.first_stage else None
        return self.model(ids, self.positions[:bs], self._meta(bs), inter)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            self._forward(bs)  # warm-up: Triton autotune/compile, NCCL communicators
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._forward(bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured CUDA graphs for %d decode batch sizes (1..%d) in %.1f s",
            len(self.sizes),
            self.max_batch_size,
            time.perf_counter() - start,
        )

    def can_run(self, meta: AttentionMetadata) -> bool:
        """Decode-only steps that fit the largest captured batch."""
        return bool(self.graphs) and meta.num_seqs <= self.max_batch_size and meta.max_query_len == 1

    def run(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        intermediate: IntermediateTensors | None,
    ) -> torch.Tensor | IntermediateTensors:
        """Copy the step into the static buffers, replay, and return views of the first ``b`` output rows."""
        b = meta.num_seqs
        bs = next(s for s in self.sizes if s >= b)
        if input_ids is not None:
            self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[b:bs].fill_(-1)
        self.seq_lens[:b].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[b:bs].zero_()
        width = meta.block_tables.shape[1]
        self.block_tables[:b, :width].copy_(meta.block_tables, non_blocking=True)
        if intermediate is not None:
            self.hidden[:b].copy_(intermediate.hidden_states, non_blocking=True)
            self.residual[:b].copy_(intermediate.residual, non_blocking=True)
        self.graphs[bs].replay()
        out = self.outputs[bs]
        if isinstance(out, IntermediateTensors):
            return IntermediateTensors(out.hidden_states[:b], out.residual[:b])
        return out[:b]
