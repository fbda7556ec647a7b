"""Vocabulary-parallel token embedding and LM head.

The vocabulary is padded to a multiple of the TP size and split into equal contiguous ranges; rank ``r``
holds rows ``[r * V_p / tp, (r + 1) * V_p / tp)`` of the padded table (padding rows are zero).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.distributed.parallel_state import get_tp_group
from shardserve.model_executor.layers.linear import copy_checked, linear, load_slice, source_shape


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows are split over the TP ranks.

    ``forward`` looks up the ids this rank owns, zeroes the others and sums the partial embeddings
    with an all-reduce (Megatron-LM's ``VocabParallelEmbedding``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp = get_tp_group()
        self.tp_rank = self.tp.rank_in_group
        self.tp_size = self.tp.world_size
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = -(-num_embeddings // self.tp_size) * self.tp_size
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Copy this rank's rows of the full ``(vocab_size, embedding_dim)`` table; zero the padding.

        Raises:
            ValueError: the checkpoint's table is not ``(vocab_size, embedding_dim)``.
        """
        shape = source_shape(loaded_weight)
        if shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"embedding table has shape {shape}, expected {(self.num_embeddings, self.embedding_dim)}")
        n = max(0, min(self.vocab_end, self.num_embeddings) - self.vocab_start)
        param.data.zero_()
        if n:
            copy_checked(param.data[:n], load_slice(loaded_weight, 0, self.vocab_start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(num_tokens,)`` int64 -> ``(num_tokens, embedding_dim)``."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight)
        out = out * in_range.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary, split by vocabulary rows like the embedding.

    Each rank computes logits for its rows; :meth:`compute_logits` all-gathers them over TP and trims
    the padding, so every rank ends with the full ``(num_seqs, vocab_size)``.
    """

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(num_seqs, hidden)`` -> ``(num_seqs, vocab_size)`` fp32 logits."""
        logits = linear(hidden, self.weight)
        logits = self.tp.all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings].float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is not an embedding lookup; call compute_logits")
