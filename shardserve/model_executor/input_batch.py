"""The persistent batch of one rank: every running request's state, kept between steps (vLLM v1's InputBatch).

Each running request owns a row (assigned by the head, see :mod:`shardserve.executor.messages`). Per row
the rank keeps, on the host, the token ids it was given (prompt, plus outputs recomputed after a
preemption), how many tokens are in the KV cache, how many tokens the request has, and its block-table
row; on the device, the block-table row and the request's last token. A step applies its diff (freed
rows, new rows, appended blocks, scheduled token counts) and builds the step's inputs with vectorised
numpy over the scheduled rows, copied to the device in two non-blocking transfers from pinned memory (on a
CPU, tensors over the same arrays, and a block table shared with its host copy); nothing is rebuilt from
Python lists, and the host never waits for the device.

Tokens sampled after a request was added exist on the device only (``last_token``): a decode's input is
its row's last token, written on the device by the sampler (output rank) or by the token broadcast
(the other ranks that embed). So a sampled token never has to come back through the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shardserve.executor.messages import MalformedMessageError, NewRequest, Step, as_i32
from shardserve.model_executor.device_copy import to_device
from shardserve.model_executor.layers.attention import AttentionMetadata


@dataclass
class StepInputs:
    """One step's tensors on the device, and what the host keeps of them."""

    input_ids: torch.Tensor
    """``(num_tokens,)`` int64."""
    positions: torch.Tensor
    """``(num_tokens,)`` int64."""
    meta: AttentionMetadata
    sample_indices: torch.Tensor
    """``(num_sampled,)`` int64: rows of the flat batch whose hidden state is sampled (each request's last token)."""
    sample_rows: np.ndarray
    """``(num_sampled,)`` int32: persistent-batch rows of the sampling requests, in batch order."""
    sample_rows_device: torch.Tensor
    """The same on the device, int64."""
    sample_positions: torch.Tensor
    """``(num_sampled,)`` int64: position of each token being sampled (= context length after the step)."""


class InputBatch:
    """Rows ``0 .. max_rows - 1`` of running requests on one rank.

    Args:
        max_rows: rows (the scheduler's ``max_num_seqs``).
        max_blocks_per_row: width of the block table (``ceil(max_model_len / block_size)``).
        block_size: tokens per KV block.
        num_kv_blocks: KV blocks of this rank (block ids are checked against it).
        device: where the model runs.
    """

    def __init__(self, max_rows: int, max_blocks_per_row: int, block_size: int, num_kv_blocks: int,
                 device: torch.device):  # fmt: skip
        self.max_rows, self.max_blocks, self.block_size = max_rows, max_blocks_per_row, block_size
        self.num_kv_blocks = num_kv_blocks
        self.device = device
        self.request_ids: list[str | None] = [None] * max_rows
        self.host_tokens: list[np.ndarray] = [np.zeros(0, np.int32)] * max_rows
        """Per row: the token ids this rank was given (prompt, then outputs known at admission)."""
        self.num_host_tokens = np.zeros(max_rows, np.int64)
        self.num_computed = np.zeros(max_rows, np.int64)
        """Tokens in the KV cache once the steps sent so far have run."""
        self.num_tokens = np.zeros(max_rows, np.int64)
        """Tokens of the request (prompt + outputs), counting tokens that in-flight steps sample."""
        self.num_blocks = np.zeros(max_rows, np.int64)
        self.block_table = np.zeros((max_rows, max_blocks_per_row), np.int32)
        self._on_host = device.type == "cpu"
        """The model runs on the host: the step's arrays become tensors sharing their memory, no copies."""
        self.block_table_device = (
            torch.from_numpy(self.block_table)  # the same memory: appended blocks need no device write
            if self._on_host
            else torch.zeros((max_rows, max_blocks_per_row), dtype=torch.int32, device=device)
        )
        self.last_token = torch.zeros(max_rows, dtype=torch.int64, device=device)
        """The newest token of each row: the input of its next decode."""
        self._new_last: list[tuple[int, int]] = []
        """(row, last host token) of rows added since the last prepare, written to ``last_token`` with it."""

    # -- the step's diff ----------------------------------------------------------------------------
    def _check_row(self, row: int) -> int:
        if not 0 <= row < self.max_rows:
            raise MalformedMessageError(f"row {row} outside the batch of {self.max_rows} rows")
        return row

    def free(self, rows: np.ndarray) -> None:
        for row in rows.tolist():
            self.request_ids[self._check_row(row)] = None
            self.num_blocks[row] = 0

    def add(self, new: NewRequest) -> tuple[np.ndarray, np.ndarray]:
        """Take a new request's row; returns its (prompt, output) token ids.

        Raises:
            MalformedMessageError: the row is out of range, already taken, or the request is empty.
        """
        row = self._check_row(new.row)
        if self.request_ids[row] is not None:
            raise MalformedMessageError(f"row {row} of {new.request_id} still holds {self.request_ids[row]}")
        prompt, output = as_i32(new.prompt_token_ids), as_i32(new.output_token_ids)
        tokens = np.concatenate([prompt, output]) if len(output) else prompt
        if not len(tokens):
            raise MalformedMessageError(f"request {new.request_id} has no tokens")
        self.request_ids[row] = new.request_id
        self.host_tokens[row] = tokens
        self.num_host_tokens[row] = self.num_tokens[row] = len(tokens)
        self.num_computed[row] = new.num_computed_tokens
        self.num_blocks[row] = 0
        self._new_last.append((row, int(tokens[-1])))
        return prompt, output

    def append_blocks(self, rows: np.ndarray, block_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grow the host block tables; returns ``(rows, columns)`` of the new entries for the device copy.

        Raises:
            MalformedMessageError: a table would exceed its width or a block id is out of range.
        """
        if len(rows) != len(block_ids):
            raise MalformedMessageError(f"{len(rows)} block rows for {len(block_ids)} block ids")
        if len(block_ids) and (block_ids.min() < 0 or block_ids.max() >= self.num_kv_blocks):
            raise MalformedMessageError(f"block id outside [0, {self.num_kv_blocks})")
        cols = np.empty(len(rows), np.int64)
        for i, row in enumerate(rows.tolist()):  # a few per step: one new block per request per block_size tokens
            col = self.num_blocks[self._check_row(row)]
            if col >= self.max_blocks:
                raise MalformedMessageError(f"row {row} would hold more than {self.max_blocks} blocks")
            cols[i] = col
            self.num_blocks[row] = col + 1
        self.block_table[rows, cols] = block_ids
        return rows, cols

    # -- inputs -----------------------------------------------------------------------------------
    def prepare(self, step: Step, new_block_rows: np.ndarray, new_block_cols: np.ndarray) -> StepInputs:
        """The step's inputs on the device; advances ``num_computed`` and ``num_tokens``.

        One int64 and one int32 buffer carry everything to the device in two copies: token ids known on
        the host, positions, KV slots, the rows whose input is their device-side last token, the sampled
        rows; query start offsets, context lengths and the new block-table entries.

        Raises:
            MalformedMessageError: inconsistent arrays, or a step that reads past a request's tokens.
        """
        rows = as_i32(step.rows).astype(np.int64)
        q = as_i32(step.num_new_tokens).astype(np.int64)
        sample = np.frombuffer(step.sample, dtype=np.uint8).astype(bool)
        n = len(rows)
        if n == 0 or len(q) != n or len(sample) != n or (q < 1).any():
            raise MalformedMessageError(f"step {step.step_id}: {n} rows, {len(q)} token counts, {len(sample)} flags")
        if rows.max() >= self.max_rows or rows.min() < 0:
            raise MalformedMessageError(f"step {step.step_id}: row outside the batch")
        start = self.num_computed[rows]
        seq_lens = start + q
        if (seq_lens > self.num_tokens[rows]).any():
            raise MalformedMessageError(f"step {step.step_id} computes past the end of a request")
        bs = self.block_size
        if (seq_lens > self.num_blocks[rows] * bs).any():
            raise MalformedMessageError(f"step {step.step_id}: a request's KV blocks do not cover its tokens")
        total = int(q.sum())
        qsl = np.zeros(n + 1, np.int64)
        np.cumsum(q, out=qsl[1:])
        token_row = np.repeat(rows, q)
        positions = np.arange(total, dtype=np.int64) - np.repeat(qsl[:-1] - start, q)
        slots = self.block_table[token_row, positions // bs].astype(np.int64) * bs + positions % bs
        # Inputs known on the host (prefill chunks); a request's last token may exist on the device only.
        ids = np.zeros(total, np.int64)
        from_host = np.flatnonzero(start < self.num_host_tokens[rows])
        if len(from_host) == 0:  # a decode-only step: every input is a row's last token
            device_tokens, device_rows = np.arange(total, dtype=np.int64), token_row
        else:
            for i in from_host.tolist():
                row, a, b = int(rows[i]), int(qsl[i]), int(qsl[i + 1])
                s0 = int(start[i])
                known = min(b - a, int(self.num_host_tokens[row]) - s0)
                ids[a : a + known] = self.host_tokens[row][s0 : s0 + known]
            device_tokens = np.flatnonzero(positions >= self.num_host_tokens[token_row])
            device_rows = token_row[device_tokens]
        if (positions[device_tokens] != self.num_tokens[device_rows] - 1).any():
            raise MalformedMessageError(f"step {step.step_id} reads a token that only the device has, out of order")
        sample_idx = qsl[1:][sample] - 1
        sample_rows = rows[sample]
        self.num_computed[rows] = seq_lens
        self.num_tokens[sample_rows] += 1
        width = int(-(-int(seq_lens.max()) // bs))

        new_last = np.asarray(self._new_last, dtype=np.int64).reshape(-1, 2)
        self._new_last = []
        pieces = [ids, positions, slots, sample_idx, sample_rows, seq_lens[sample], device_tokens, device_rows, rows,
                  new_last[:, 0], new_last[:, 1]]  # fmt: skip
        ints = [qsl.astype(np.int32), seq_lens.astype(np.int32)]
        if self._on_host:  # tensors over the arrays themselves (the block table is shared already)
            parts = [torch.from_numpy(p) for p in pieces]
            qsl_d, seq_lens_d = (torch.from_numpy(p) for p in ints)
        else:
            block_vals = self.block_table[new_block_rows, new_block_cols].astype(np.int64)
            pieces += [new_block_rows, new_block_cols, block_vals]
            longs_d = to_device(np.concatenate(pieces), self.device)
            ints_d = to_device(np.concatenate(ints), self.device)
            parts = torch.split(longs_d, [len(p) for p in pieces])
            qsl_d, seq_lens_d = ints_d[: n + 1], ints_d[n + 1 :]
            if len(new_block_rows):
                self.block_table_device[parts[11], parts[12]] = parts[13].to(torch.int32)
        ids_d, pos_d, slots_d, sidx_d, srows_d, spos_d, dtok_d, drows_d, rows_d = parts[:9]
        if len(new_last):
            self.last_token[parts[9]] = parts[10]
        if len(device_tokens) == total:
            ids_d = self.last_token[drows_d]
        elif len(device_tokens):
            ids_d[dtok_d] = self.last_token[drows_d]
        meta = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=qsl_d,
            seq_lens=seq_lens_d,
            block_tables=self.block_table_device.index_select(0, rows_d)[:, :width],
            query_lens_cpu=q,
            seq_lens_cpu=seq_lens,
            block_size=bs,
        )
        return StepInputs(ids_d, pos_d, meta, sidx_d, sample_rows.astype(np.int32), srows_d, spos_d)
