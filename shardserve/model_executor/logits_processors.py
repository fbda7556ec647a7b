"""Per-row logit constraints on the device: ``logit_bias``, ``allowed_token_ids``, ``bad_words`` and the
``min_tokens`` ban of stop tokens (vLLM v1's built-in logits processors).

Each feature keeps its rows' data in device tensors written once when a request is added; a step touches
only the rows of the batch that use the feature (found with a numpy mask over the batch's rows, no device
read), in one batched operation per feature, and a batch where no row uses any feature costs one boolean
check. Token lists of different lengths are padded per row to the longest seen so far (the tensors grow
when a longer one arrives).
"""

from __future__ import annotations

import numpy as np
import torch

from shardserve.executor.messages import SamplingOptions, as_f32, as_i32

_NO_TOKEN = -2
"""History padding: matches no token id (bad-word prefixes pad with -1, which matches anything)."""


class _PaddedRows:
    """``(max_rows, width)`` device tensors of per-row token ids (int64) and values, padded on the right."""

    def __init__(self, max_rows: int, device: torch.device, value_dtype: torch.dtype = torch.float32):
        self.max_rows, self.device, self.value_dtype = max_rows, device, value_dtype
        self.ids = torch.zeros((max_rows, 0), dtype=torch.int64, device=device)
        self.values = torch.zeros((max_rows, 0), dtype=value_dtype, device=device)

    def set(self, row: int, ids: np.ndarray, values: np.ndarray, pad_id: int, pad_value: float) -> None:
        """Row ``row`` holds ``ids`` / ``values``; the rest of the row is ``pad_id`` / ``pad_value``."""
        n = len(ids)
        if n > self.ids.shape[1]:
            width = max(n, 2 * self.ids.shape[1])
            grown = torch.zeros((self.max_rows, width), dtype=torch.int64, device=self.device)
            grown_v = torch.zeros((self.max_rows, width), dtype=self.value_dtype, device=self.device)
            grown[:, : self.ids.shape[1]] = self.ids
            grown_v[:, : self.values.shape[1]] = self.values
            self.ids, self.values = grown, grown_v
        width = self.ids.shape[1]
        row_ids = np.full(width, pad_id, np.int64)
        row_values = np.full(width, pad_value, np.float32)
        row_ids[:n], row_values[:n] = ids, values
        self.ids[row] = torch.from_numpy(row_ids).to(self.device)
        self.values[row] = torch.from_numpy(row_values).to(self.device, self.value_dtype)


class LogitsProcessors:
    """``logit_bias``, ``allowed_token_ids``, ``bad_words`` and ``min_tokens`` for the rows of one rank.

    Args:
        max_rows: rows of the persistent batch.
        vocab_size: logits columns.
    """

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.max_rows, self.vocab_size, self.device = max_rows, vocab_size, device
        self.biased = np.zeros(max_rows, bool)
        self.restricted = np.zeros(max_rows, bool)
        self.with_bad_words = np.zeros(max_rows, bool)
        self.min_until = np.zeros(max_rows, np.int64)
        """Position before which the row's stop tokens are banned (prompt length + ``min_tokens``); 0: none."""
        self._bias = _PaddedRows(max_rows, device)
        self._stops = _PaddedRows(max_rows, device)
        self._allowed: torch.Tensor | None = None
        """``(max_rows, vocab_size)`` bool, allocated when a row first restricts its tokens (vLLM's mask)."""
        # Bad words: per row up to B words; the prefix (the word without its last token) right-aligned in
        # L columns with -1 padding, the banned last token, and the row's last L tokens.
        self._bw_prefix = torch.full((max_rows, 0, 0), -1, dtype=torch.int64, device=device)
        self._bw_last = torch.zeros((max_rows, 0), dtype=torch.int64, device=device)
        self._bw_on = torch.zeros((max_rows, 0), dtype=torch.bool, device=device)
        self._history = torch.full((max_rows, 0), _NO_TOKEN, dtype=torch.int64, device=device)
        self.num_rows = 0
        """Rows whose last request set a constraint (freed rows count until reused): 0 skips every check."""

    @property
    def active(self) -> bool:
        return self.num_rows > 0

    def any(self, rows: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: which of ``rows`` have a constraint that may change their logits."""
        return self.biased[rows] | self.restricted[rows] | self.with_bad_words[rows] | (self.min_until[rows] > 0)

    # -- rows -------------------------------------------------------------------------------------
    def add(self, row: int, opts: SamplingOptions, prompt: np.ndarray, output: np.ndarray) -> None:
        """Take a new request's constraints for ``row`` (clears what the row's previous request set).

        Raises:
            ValueError: a token id outside the vocabulary.
        """
        v = self.vocab_size
        self.num_rows -= bool(self.any(np.asarray([row]))[0])
        self.biased[row] = self.restricted[row] = self.with_bad_words[row] = False
        self.min_until[row] = 0
        if opts.logit_bias_ids:
            ids, values = as_i32(opts.logit_bias_ids), as_f32(opts.logit_bias_values)
            _check_ids(ids, v, "logit_bias")
            if len(values) != len(ids):
                raise ValueError(f"{len(ids)} logit_bias ids for {len(values)} values")
            self._bias.set(row, ids, values, 0, 0.0)
            self.biased[row] = True
        if opts.allowed_token_ids:
            ids = as_i32(opts.allowed_token_ids)
            _check_ids(ids, v, "allowed_token_ids")
            if self._allowed is None:
                self._allowed = torch.zeros((self.max_rows, v), dtype=torch.bool, device=self.device)
            mask = np.zeros(v, bool)
            mask[ids] = True
            self._allowed[row] = torch.from_numpy(mask).to(self.device)
            self.restricted[row] = True
        stops = as_i32(opts.min_tokens_stop_ids)
        if opts.min_tokens > 0 and len(stops):
            stops = stops[stops < v]  # an EOS id past the logits cannot be sampled anyway
            if len(stops):
                self._stops.set(row, stops, np.zeros(len(stops)), int(stops[0]), 0.0)
                self.min_until[row] = len(prompt) + opts.min_tokens
        words = [as_i32(w) for w in opts.bad_words]
        if words:
            for w in words:
                _check_ids(w, v, "bad_words")
            self._set_bad_words(row, words, np.concatenate([prompt, output]))
            self.with_bad_words[row] = True
        self.num_rows += bool(self.any(np.asarray([row]))[0])

    def _set_bad_words(self, row: int, words: list[np.ndarray], tokens: np.ndarray) -> None:
        num, longest = len(words), max(len(w) - 1 for w in words)
        _, b, length = self._bw_prefix.shape
        if num > b or longest > length:
            self._grow_bad_words(max(num, b), max(longest, length))
            _, b, length = self._bw_prefix.shape
        prefix = np.full((b, length), -1, np.int64)
        last = np.zeros(b, np.int64)
        on = np.zeros(b, bool)
        for i, w in enumerate(words):
            if len(w) > 1:
                prefix[i, length - (len(w) - 1) :] = w[:-1]
            last[i], on[i] = w[-1], True
        history = np.full(length, _NO_TOKEN, np.int64)
        tail = tokens[-length:] if length else tokens[:0]
        history[length - len(tail) :] = tail
        self._bw_prefix[row] = torch.from_numpy(prefix).to(self.device)
        self._bw_last[row] = torch.from_numpy(last).to(self.device)
        self._bw_on[row] = torch.from_numpy(on).to(self.device)
        self._history[row] = torch.from_numpy(history).to(self.device)

    def _grow_bad_words(self, num: int, length: int) -> None:
        rows, b, old = self._bw_prefix.shape
        prefix = torch.full((rows, num, length), -1, dtype=torch.int64, device=self.device)
        prefix[:, :b, length - old :] = self._bw_prefix
        last = torch.zeros((rows, num), dtype=torch.int64, device=self.device)
        last[:, :b] = self._bw_last
        on = torch.zeros((rows, num), dtype=torch.bool, device=self.device)
        on[:, :b] = self._bw_on
        # Rows added before kept only their last `old` tokens: the columns in front stay unknown (no match).
        history = torch.full((rows, length), _NO_TOKEN, dtype=torch.int64, device=self.device)
        history[:, length - old :] = self._history
        self._bw_prefix, self._bw_last, self._bw_on, self._history = prefix, last, on, history

    # -- steps ------------------------------------------------------------------------------------
    def apply(
        self,
        logits: torch.Tensor,
        rows: np.ndarray,
        rows_device: torch.Tensor,
        positions: np.ndarray,
        stop_allowed: np.ndarray | None = None,
    ) -> None:
        """Apply every row's constraints to ``logits`` in place.

        Args:
            logits: ``(n, vocab_size)`` float32.
            rows: ``(n,)`` persistent-batch rows (host).
            rows_device: the same on the device, int64.
            positions: ``(n,)`` host positions of the tokens being sampled (prompt length + outputs so far).
            stop_allowed: logits rows whose grammar is complete: ``min_tokens`` leaves their stop tokens.
        """
        neg_inf = float("-inf")
        restricted = self.restricted[rows]
        if restricted.any():
            idx = _on_device(restricted, self.device)
            allowed = self._allowed[rows_device[idx]]
            logits[idx] = logits[idx].masked_fill(~allowed, neg_inf)
        with_bad_words = self.with_bad_words[rows]
        if with_bad_words.any():
            idx = _on_device(with_bad_words, self.device)
            r = rows_device[idx]
            prefix = self._bw_prefix[r]
            match = ((prefix == self._history[r][:, None, :]) | (prefix == -1)).all(dim=-1) & self._bw_on[r]
            add = torch.zeros(match.shape, dtype=logits.dtype, device=logits.device).masked_fill_(match, neg_inf)
            logits.index_put_((idx[:, None].expand_as(match), self._bw_last[r]), add, accumulate=True)
        banned = positions < self.min_until[rows]
        if stop_allowed is not None and len(stop_allowed):
            banned[stop_allowed] = False
        if banned.any():
            idx = _on_device(banned, self.device)
            ids = self._stops.ids[rows_device[idx]]
            logits[idx[:, None].expand_as(ids), ids] = neg_inf
        biased = self.biased[rows]
        if biased.any():
            idx = _on_device(biased, self.device)
            r = rows_device[idx]
            ids, values = self._bias.ids[r], self._bias.values[r].to(logits.dtype)
            logits.index_put_((idx[:, None].expand_as(ids), ids), values, accumulate=True)

    def after_sample(self, rows: np.ndarray, rows_device: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append the sampled tokens to the token history of rows with multi-token bad words."""
        if self._history.shape[1] == 0:
            return
        with_bad_words = self.with_bad_words[rows]
        if with_bad_words.any():
            idx = _on_device(with_bad_words, self.device)
            r = rows_device[idx]
            self._history[r] = torch.cat([self._history[r][:, 1:], tokens[idx, None].to(torch.int64)], dim=1)


def _on_device(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    """Indices of the true entries of a host mask, as int64 on ``device``."""
    return torch.from_numpy(np.flatnonzero(mask)).to(device, non_blocking=True)


def _check_ids(ids: np.ndarray, vocab_size: int, name: str) -> None:
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name}: token id outside the vocabulary [0, {vocab_size})")
