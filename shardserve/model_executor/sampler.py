"""Token sampling for a batch of requests, each with its own parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardserve.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One request's row of a sampling batch."""

    params: SamplingParams
    generator: torch.Generator | None
    """Per-request generator when the request has a seed."""
    prompt_token_ids: list[int]
    output_token_ids: list[int]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (CTRL, arXiv:1909.05858), presence and frequency penalties (OpenAI API docs).

    Args:
        logits: ``(num_seqs, vocab_size)`` float32, modified in place.
    """
    for i, row in enumerate(rows):
        p = row.params
        if not p.has_penalties:
            continue
        vocab = logits.shape[-1]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids + row.output_token_ids)), dtype=torch.long)
            seen = seen[seen < vocab].to(logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if row.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(row.output_token_ids, dtype=torch.long), minlength=vocab)[:vocab]
            counts = counts.to(logits.device, logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _filter(probs: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Zero the probabilities that top_k, top_p and min_p exclude. ``probs``: ``(vocab_size,)``."""
    if p.top_k > 0 and p.top_k < probs.numel():
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if p.min_p > 0.0:
        probs = torch.where(probs < p.min_p * probs.max(), torch.zeros_like(probs), probs)
    if p.top_p < 1.0:
        sorted_probs, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, 0) / sorted_probs.sum()
        drop = (cum - sorted_probs / sorted_probs.sum()) >= p.top_p  # keep the first token always
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_probs)
    return probs


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Pick one token per row.

    Greedy rows take the argmax; the others divide by the temperature, filter, and sample with the
    exponential-race trick ``argmax(probs / Exponential(1))`` (gpt-fast), which needs no host sync.

    Args:
        logits: ``(num_seqs, vocab_size)`` float32 after penalties.

    Returns:
        ``(num_seqs,)`` int64 token ids.
    """
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not random_rows:
        return tokens
    # One batched softmax and noise draw for the random rows; per-row work only for filters and seeds.
    idx = torch.tensor(random_rows, device=logits.device)
    temps = torch.tensor([rows[i].params.temperature for i in random_rows], device=logits.device)
    probs = torch.softmax(logits[idx] / temps[:, None], dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0)
    for j, i in enumerate(random_rows):
        p = rows[i].params
        if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
            probs[j] = _filter(probs[j], p)
        if rows[i].generator is not None:
            noise[j].exponential_(1.0, generator=rows[i].generator)
    tokens[idx] = torch.argmax(probs / noise, dim=-1)
    return tokens


def compute_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, num_top: list[int | None]
) -> list[tuple[float, int, list[tuple[int, float]]] | None]:
    """Log-probabilities of the sampled tokens and the top alternatives, from the raw logits.

    Args:
        logits: ``(num_seqs, vocab_size)`` float32, before penalties and temperature (as vLLM v1 reports).
        tokens: ``(num_seqs,)`` sampled ids.
        num_top: per row, None (no logprobs) or how many alternatives to return.

    Returns:
        Per row, None or (logprob of the sampled token, its rank (1 = most likely), [(id, logprob)] best first).
    """
    if all(k is None for k in num_top):
        return [None] * len(num_top)
    logp = torch.log_softmax(logits, dim=-1)
    k_max = max(k or 0 for k in num_top)
    top_vals, top_ids = torch.topk(logp, max(k_max, 1), dim=-1)
    chosen_t = logp.gather(1, tokens[:, None])
    ranks = ((logp > chosen_t).sum(dim=-1) + 1).tolist()
    chosen = chosen_t[:, 0].tolist()
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    result: list[tuple[float, int, list[tuple[int, float]]] | None] = []
    for i, k in enumerate(num_top):
        if k is None:
            result.append(None)
        else:
            result.append((chosen[i], ranks[i], list(zip(top_ids[i][:k], top_vals[i][:k]))))
    return result
