"""Token sampling for a batch of requests, with every request's parameters kept in per-row device tensors.

:class:`SamplingState` holds, per persistent-batch row, the sampling parameters as tensors (written once
when the request is added) and, for rows with penalties, the output-token counts and prompt-token mask
(updated on the device after each sample). :meth:`SamplingState.sample` is one batched pass with no
per-row Python loop and no host synchronisation: the per-row constraints (``logit_bias``,
``allowed_token_ids``, ``bad_words``, ``min_tokens``; :mod:`.logits_processors`), penalties, temperature,
top-k / top-p / min-p on the sorted probabilities, and the exponential-race draw
``argmax(probs / Exponential(1))`` (gpt-fast). Rows with a seed draw their exponentials from a counter-based
hash of ``(seed, position, token)``, so a seeded request gives the same tokens whatever batch it runs
in, on any rank, with or without async scheduling.
"""

from __future__ import annotations

import numpy as np
import torch

from shardserve.executor.messages import SamplingOptions
from shardserve.model_executor.device_copy import to_device
from shardserve.model_executor.logits_processors import LogitsProcessors

_GREEDY_EPS = 1e-5


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_GOLDEN, _POS = _signed(0x9E3779B97F4A7C15), _signed(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform numbers in (0, 1) from SplitMix64 (Steele et al. 2014) of ``(seed, position, token id)``.

    Args:
        seeds: ``(n,)`` int64.
        positions: ``(n,)`` int64, the position of the token being sampled.
        vocab_size: columns.

    Returns:
        ``(n, vocab_size)`` float32; int64 products wrap modulo 2**64 as the generator requires.
    """
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    z = (seeds * _GOLDEN + positions * _POS)[:, None] + ids[None, :] * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


class SamplingState:
    """Per-row sampling parameters and penalty state on ``device``.

    Args:
        max_rows: rows of the persistent batch.
        vocab_size: logits columns.
    """

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.max_rows, self.vocab_size, self.device = max_rows, vocab_size, device
        # Columns: temperature, top_p, min_p, repetition, presence and frequency penalty | top_k, seed.
        self._floats_host = np.zeros((max_rows, 6), np.float32)
        self._ints_host = np.zeros((max_rows, 2), np.int64)
        self._floats = torch.zeros((max_rows, 6), dtype=torch.float32, device=device)
        self._ints = torch.zeros((max_rows, 2), dtype=torch.int64, device=device)
        self._dirty: list[int] = []
        self.temperature, self.top_p, self.min_p = self._floats[:, 0], self._floats[:, 1], self._floats[:, 2]
        self.repetition_penalty, self.presence_penalty = self._floats[:, 3], self._floats[:, 4]
        self.frequency_penalty = self._floats[:, 5]
        self.top_k, self.seed = self._ints[:, 0], self._ints[:, 1]
        # Host mirrors of what decides the step's code path (no device read needed).
        self.greedy = np.ones(max_rows, bool)
        self.filtered = np.zeros(max_rows, bool)
        self.seeded = np.zeros(max_rows, bool)
        self.penalized = np.zeros(max_rows, bool)
        self.num_logprobs = np.full(max_rows, -1, np.int64)
        self.output_counts: torch.Tensor | None = None
        """``(max_rows, vocab_size)`` int32 counts of each row's output tokens (rows with penalties)."""
        self.prompt_mask: torch.Tensor | None = None
        """``(max_rows, vocab_size)`` bool: token ids in each row's prompt (rows with penalties)."""
        self.processors = LogitsProcessors(max_rows, vocab_size, device)

    def add(self, row: int, opts: SamplingOptions, prompt: np.ndarray, output: np.ndarray) -> None:
        """Take a new request's parameters for ``row`` (written to the device by :meth:`flush`)."""
        greedy = opts.temperature < _GREEDY_EPS
        top_k = opts.top_k if 0 < opts.top_k < self.vocab_size else self.vocab_size
        self.greedy[row] = greedy
        self.filtered[row] = not greedy and (top_k < self.vocab_size or opts.top_p < 1.0 or opts.min_p > 0.0)
        self.seeded[row] = not greedy and opts.seed is not None
        self.penalized[row] = opts.has_penalties
        self.num_logprobs[row] = -1 if opts.logprobs is None else _num_top(opts.logprobs, self.vocab_size)
        with np.errstate(over="ignore"):  # a penalty past float32's range saturates to inf (still a penalty)
            self._floats_host[row] = (opts.temperature, opts.top_p, opts.min_p, opts.repetition_penalty,
                                      opts.presence_penalty, opts.frequency_penalty)  # fmt: skip
        self._ints_host[row] = (top_k, _signed((opts.seed or 0) % (1 << 64)))
        self._dirty.append(row)
        if opts.has_penalties:
            self._reset_penalty_row(row, prompt, output)
        self.processors.add(row, opts, prompt, output)

    def modifies_logits(self, rows: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: rows whose logits :meth:`sample` changes in place before drawing (penalties and
        constraints; the raw logits must be kept for their logprobs)."""
        if not self.processors.active:
            return self.penalized[rows]
        return self.penalized[rows] | self.processors.any(rows)

    def flush(self) -> None:
        """Copy the parameters of rows added since the last flush to the device (two transfers)."""
        if not self._dirty:
            return
        rows = np.unique(np.asarray(self._dirty, dtype=np.int64))
        self._dirty = []
        index = to_device(rows, self.device)
        self._floats[index] = to_device(self._floats_host[rows], self.device)
        self._ints[index] = to_device(self._ints_host[rows], self.device)

    def _reset_penalty_row(self, row: int, prompt: np.ndarray, output: np.ndarray) -> None:
        if self.output_counts is None:
            shape = (self.max_rows, self.vocab_size)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        v = self.vocab_size
        prompt_ids = to_device(prompt[(prompt >= 0) & (prompt < v)].astype(np.int64), self.device)
        output_ids = to_device(output[(output >= 0) & (output < v)].astype(np.int64), self.device)
        self.prompt_mask[row].zero_()
        self.prompt_mask[row, prompt_ids] = True
        self.output_counts[row] = torch.bincount(output_ids, minlength=v)[:v].to(torch.int32)

    # -- sampling ---------------------------------------------------------------------------------
    def sample(
        self,
        logits: torch.Tensor,
        rows: np.ndarray,
        rows_device: torch.Tensor,
        positions: torch.Tensor,
        positions_host: np.ndarray | None = None,
        stop_allowed: np.ndarray | None = None,
    ) -> torch.Tensor:
        """One token per row.

        Args:
            logits: ``(n, vocab_size)`` float32, modified in place (a grammar bitmask is applied before).
            rows: ``(n,)`` persistent-batch rows of the logits rows (host).
            rows_device: the same on the device (int64).
            positions: ``(n,)`` int64 positions of the tokens being sampled (for seeded rows).
            positions_host: the same on the host (for ``min_tokens``); None reads ``positions`` back.
            stop_allowed: logits rows whose grammar is complete (``min_tokens`` does not ban their stops).

        Returns:
            ``(n,)`` int64 token ids (on the device; nothing is copied to the host here).
        """
        constrained = self.processors.active and self.processors.any(rows).any()
        if constrained:
            if positions_host is None:
                positions_host = positions.cpu().numpy()
            self.processors.apply(logits, rows, rows_device, positions_host, stop_allowed)
        greedy = self.greedy[rows]
        penalized = self.penalized[rows]
        if penalized.any():
            idx = to_device(np.flatnonzero(penalized), self.device)
            self._apply_penalties(logits, idx, rows_device[to_device(penalized, self.device)])
        argmax = logits.argmax(dim=-1)
        if greedy.all():
            tokens = argmax
        else:
            temps = torch.where(self.temperature[rows_device] < _GREEDY_EPS, 1.0, self.temperature[rows_device])
            probs = torch.softmax(logits / temps[:, None], dim=-1)
            if self.filtered[rows].any():
                probs = self._filter(probs, rows_device)
            noise = torch.empty_like(probs).exponential_(1.0)
            seeded = self.seeded[rows]
            if seeded.any():
                idx = to_device(np.flatnonzero(seeded), self.device)
                noise[idx] = -torch.log(hash_uniform(self.seed[rows_device[idx]], positions[idx], probs.shape[-1]))
            drawn = torch.argmax(probs / noise, dim=-1)
            tokens = drawn if not greedy.any() else torch.where(to_device(greedy, self.device), argmax, drawn)
        if penalized.any():
            self.output_counts.index_put_((rows_device, tokens), torch.ones_like(tokens, dtype=torch.int32),
                                          accumulate=True)  # fmt: skip
        if constrained:
            self.processors.after_sample(rows, rows_device, tokens)
        return tokens

    def _apply_penalties(self, logits: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
        """Repetition (CTRL, arXiv:1909.05858) on prompt and output tokens; presence and frequency (OpenAI API
        docs) on output tokens. ``idx``: logits rows to change; ``rows``: their batch rows."""
        counts = self.output_counts[rows].to(logits.dtype)
        seen = self.prompt_mask[rows] | (counts > 0)
        rep = self.repetition_penalty[rows][:, None]
        lg = logits[idx]
        lg = torch.where(seen, torch.where(lg > 0, lg / rep, lg * rep), lg)
        lg -= self.frequency_penalty[rows][:, None] * counts + self.presence_penalty[rows][:, None] * (counts > 0)
        logits[idx] = lg

    def _filter(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Zero what top-k, min-p and then top-p (over the renormalised rest) exclude; the best token stays."""
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        keep = rank < self.top_k[rows][:, None]
        keep &= sorted_p >= self.min_p[rows][:, None] * sorted_p[:, :1]
        kept = sorted_p * keep
        total = kept.sum(dim=-1, keepdim=True)
        before = (kept.cumsum(dim=-1) - kept) / total
        keep &= before < self.top_p[rows][:, None]
        keep[:, 0] = True
        return torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)


def _num_top(requested: int, vocab_size: int) -> int:
    """Alternatives reported per token: -1 is the whole vocabulary."""
    return vocab_size if requested < 0 else min(requested, vocab_size)


def compute_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the sampled tokens and the best alternatives, from the raw logits, on the device.

    Args:
        logits: ``(n, vocab_size)`` float32, before penalties and temperature (what vLLM v1 reports).
        tokens: ``(n,)`` sampled ids.
        num_top: alternatives per row (the most any of the rows asked for).

    Returns:
        ``(chosen (n,) float32, rank (n,) int32 with 1 = most likely, top logprobs (n, num_top) float32,
        top ids (n, num_top) int32)``.
    """
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, tokens[:, None])
    ranks = (logp > chosen).sum(dim=-1) + 1
    top_vals, top_ids = torch.topk(logp, max(num_top, 1), dim=-1)
    if num_top == 0:
        top_vals, top_ids = top_vals[:, :0], top_ids[:, :0]
    return chosen[:, 0], ranks.to(torch.int32), top_vals, top_ids.to(torch.int32)
