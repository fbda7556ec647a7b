"""Vocabulary-parallel token embedding and LM head.

The vocabulary is padded to a multiple of the TP size and split into equal contiguous ranges; rank ``r``
holds rows ``[r * V_p / tp, (r + 1) * V_p / tp)`` of the padded table (padding rows are zero). The table's
storage is its quant method's (:mod:`.quantization`): plain, or GGUF blocks looked up and dequantized per row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_tp_group
from shardserve.model_executor.layers.linear import create_weights, get_quant_method, source_shape
from shardserve.model_executor.layers.quantization.base import QuantizationConfig, WeightShard


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows are split over the TP ranks.

    ``forward`` looks up the ids this rank owns, zeroes the others and sums the partial embeddings
    with an all-reduce (Megatron-LM's ``VocabParallelEmbedding``). ``quant_config`` picks the storage
    (``prefix`` is the Hugging Face name, ``model.embed_tokens`` or ``lm_head``).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
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
        self.prefix = prefix
        self.quant_method = get_quant_method(self, quant_config, prefix)
        create_weights(
            self,
            embedding_dim,
            [self.num_embeddings_per_partition],
            embedding_dim,
            self.num_embeddings_padded,
            self.weight_loader,
        )

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Load this rank's rows of the full ``(vocab_size, embedding_dim)`` table; zero the padding.

        Raises:
            ValueError: the checkpoint's table is not ``(vocab_size, embedding_dim)``.
        """
        shape = source_shape(loaded_weight)
        if shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"embedding table has shape {shape}, expected {(self.num_embeddings, self.embedding_dim)}")
        n = max(0, min(self.vocab_end, self.num_embeddings) - self.vocab_start)
        param.data.zero_()  # zero bytes are zero rows in every storage (GGUF blocks with scale 0 too)
        if n:
            shard = WeightShard(dim=0, start=self.vocab_start, size=n)
            self.quant_method.load_weight(self, param, loaded_weight, shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(num_tokens,)`` int64 -> ``(num_tokens, embedding_dim)``."""
        if self.tp_size == 1:
            return self.quant_method.embedding(self, input_ids)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = self.quant_method.embedding(self, local_ids)
        out = out * in_range.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary, split by vocabulary rows like the embedding.

    Each rank computes logits for its rows; :meth:`compute_logits` all-gathers them over TP and trims
    the padding, so every rank ends with the full ``(num_seqs, vocab_size)``.
    """

    def tie_weights(self, embed: VocabParallelEmbedding) -> None:
        """Share ``embed``'s table (parameters and quant method, so the same storage serves both)."""
        self.quant_method = embed.quant_method
        for name, param in list(self._parameters.items()):
            if param is not None:
                delattr(self, name)
        for name, param in embed.named_parameters(recurse=False):
            setattr(self, name, param)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(num_seqs, hidden)`` -> ``(num_seqs, vocab_size)`` fp32 logits."""
        logits = self.quant_method.apply(self, hidden)
        logits = self.tp.all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings].float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is not an embedding lookup; call compute_logits")
