"""Helpers for model tests: KV caches and attention metadata for one sequence, a TP worker.

Kept free of ``transformers`` imports so spawned worker processes start quickly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shardserve.model_executor.layers.attention import AttentionMetadata


class SingleSequence:
    """Runs one sequence through a model step by step over a paged KV cache.

    Blocks ``0..num_blocks-1`` are the sequence's block table in order, so a token's slot is its position.
    """

    def __init__(self, model, num_blocks: int = 8, block_size: int = 4, dtype: torch.dtype = torch.float32):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.seq_len = 0
        for attn in model.attention_layers:
            attn.kv_cache = torch.zeros(2, num_blocks, block_size, attn.num_kv_heads, attn.head_dim, dtype=dtype)

    def meta(self, num_new: int) -> AttentionMetadata:
        start, end = self.seq_len, self.seq_len + num_new
        if end > self.num_blocks * self.block_size:
            raise ValueError("sequence longer than the test KV cache")
        return AttentionMetadata(
            slot_mapping=torch.arange(start, end, dtype=torch.int64),
            query_start_loc=torch.tensor([0, num_new], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            block_tables=torch.arange(self.num_blocks, dtype=torch.int32)[None],
            query_lens_cpu=[num_new],
            seq_lens_cpu=[end],
            block_size=self.block_size,
        )

    @torch.no_grad()
    def step(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` (prefill or one decode token); returns fp32 logits ``(len(ids), vocab)``."""
        meta = self.meta(len(ids))
        positions = torch.arange(self.seq_len, self.seq_len + len(ids), dtype=torch.int64)
        hidden = self.model(torch.tensor(ids, dtype=torch.int64), positions, meta)
        self.seq_len += len(ids)
        return self.model.compute_logits(hidden)


def prefill_then_decode(model, ids: list[int], num_prefill: int) -> torch.Tensor:
    """Logits ``(len(ids), vocab)``: ``ids[:num_prefill]`` as one prefill, then one token per step."""
    seq = SingleSequence(model)
    parts = [seq.step(ids[:num_prefill])]
    parts += [seq.step([t]) for t in ids[num_prefill:]]
    return torch.cat(parts)


def tp_worker(rank: int, world_size: int, port: int, cases: list[tuple[str, str]], bad_dir: str) -> None:
    """Spawned TP rank: load each ``(model_dir, expected_logits_file)`` case at TP=world_size, compare logits.

    Also checks that a model whose head count TP does not divide raises ``ValueError``.
    """
    from shardserve.distributed import parallel_state as ps
    from shardserve.model_executor.loader import load_model
    from shardserve.model_executor.loader.resolve import resolve_model

    torch.set_num_threads(1)
    ps.init_distributed_environment(world_size, rank, f"tcp://127.0.0.1:{port}", "gloo", 60.0)
    ps.initialize_model_parallel(world_size, 1, rank, torch.device("cpu"), backend="gloo")
    try:
        for model_dir, expected_file in cases:
            source = resolve_model(model_dir)
            model = load_model(source, torch.float32, torch.device("cpu"), (0, source.arch.num_hidden_layers))
            data = torch.load(expected_file, weights_only=True)
            logits = prefill_then_decode(model, data["ids"].tolist(), int(data["num_prefill"]))
            torch.testing.assert_close(logits, data["logits"], atol=1e-4, rtol=1e-4)
        source = resolve_model(bad_dir)
        try:
            load_model(source, torch.float32, torch.device("cpu"), (0, source.arch.num_hidden_layers))
        except ValueError as e:
            assert "not divisible by the tensor parallel size" in str(e), e
        else:
            raise AssertionError("3 attention heads over TP=2 should raise ValueError")
    finally:
        ps.destroy_model_parallel()


def save_expected(path: Path, ids: list[int], num_prefill: int, logits: torch.Tensor) -> str:
    torch.save({"ids": torch.tensor(ids), "num_prefill": num_prefill, "logits": logits}, path)
    return str(path)
