"""Prompt logprobs (vLLM's ``prompt_logprobs``): the log-probability of each prompt token given the tokens
before it, computed on the last pipeline stage from the hidden states of the prefill chunks.

In a chunk that computes positions ``[start, end)`` of a prompt of ``P`` tokens, the hidden state at
position ``p`` predicts token ``p + 1``, so the chunk gives prompt tokens ``start + 1 .. min(end, P - 1)``;
the first prompt token has no logprob, and the hidden state of the last prompt token predicts the first
output token (sampled as usual). Every last-stage TP rank computes the same logits (the LM head gathers
over TP); the output rank takes the log-softmax, the ranks and the top alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shardserve.executor.messages import FLOAT32, INT32, PromptLogprobs

CHUNK_TOKENS = 256
"""Prompt positions whose logits are materialized at once (``CHUNK_TOKENS x vocab_size`` float32)."""


@dataclass
class PromptLogprobsPlan:
    """The prompt positions one step computes logprobs for."""

    items: list[tuple[int, int, int]]
    """(index in the step's scheduled rows, first prompt position, count) per request."""
    num_top: list[int]
    """Alternatives per request."""
    hidden_index: np.ndarray
    """``(total,)`` int64: flat token index of the hidden state that predicts each position."""
    targets: np.ndarray
    """``(total,)`` int64: the prompt token at each position."""


class PromptLogprobRows:
    """Per persistent-batch row: prompt length and alternatives asked for (-1: no prompt logprobs).

    Kept on every last-stage rank, so that all of them plan the same LM-head collectives.
    """

    def __init__(self, max_rows: int, vocab_size: int):
        self.vocab_size = vocab_size
        self.num_top = np.full(max_rows, -1, np.int64)
        self.num_prompt = np.zeros(max_rows, np.int64)
        self.used = False
        """Some request asked for prompt logprobs (until then :meth:`plan` returns at once)."""

    def add(self, row: int, num_top: int | None, num_prompt: int) -> None:
        """Take a new request's ``prompt_logprobs`` (None: none; -1: the whole vocabulary)."""
        if num_top is None:
            self.num_top[row] = -1
            return
        self.num_top[row] = self.vocab_size if num_top < 0 else min(num_top, self.vocab_size)
        self.num_prompt[row] = num_prompt
        self.used = True

    def plan(self, rows: np.ndarray, num_new: np.ndarray, seq_lens: np.ndarray,
             host_tokens: list[np.ndarray]) -> PromptLogprobsPlan | None:  # fmt: skip
        """What the step computes, or None.

        Args:
            rows: ``(n,)`` scheduled rows; ``num_new``: tokens each computes; ``seq_lens``: its context
                length after the step; ``host_tokens``: each row's known token ids (prompt first).
        """
        if not self.used:
            return None
        wanted = np.flatnonzero(self.num_top[rows] >= 0)
        if not len(wanted):
            return None
        offsets = np.concatenate([[0], np.cumsum(num_new)])
        items, num_top, hidden, targets = [], [], [], []
        for i in wanted.tolist():  # only the requests that asked
            row = int(rows[i])
            start = int(seq_lens[i] - num_new[i])
            first, last = start + 1, min(int(seq_lens[i]), int(self.num_prompt[row]) - 1)
            count = last - first + 1
            if count <= 0:
                continue
            items.append((i, first, count))
            num_top.append(int(self.num_top[row]))
            hidden.append(np.arange(offsets[i], offsets[i] + count, dtype=np.int64))
            targets.append(host_tokens[row][first : first + count].astype(np.int64))
        if not items:
            return None
        return PromptLogprobsPlan(items, num_top, np.concatenate(hidden), np.concatenate(targets))


class PendingPromptLogprobs:
    """A step's prompt logprobs on their way to the host; :meth:`result` waits for the copy."""

    def __init__(self, plan: PromptLogprobsPlan, tensors: list[torch.Tensor]):
        self.plan = plan
        self.event = None
        if tensors[0].is_cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, d in zip(host, tensors):
                h.copy_(d, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            tensors = host
        self.tensors = tensors

    def result(self) -> list[PromptLogprobs]:
        if self.event is not None:
            self.event.synchronize()
        chosen, ranks, top_vals, top_ids = (t.numpy() for t in self.tensors)
        out, at = [], 0
        for (index, first, count), k in zip(self.plan.items, self.plan.num_top):
            part = slice(at, at + count)
            at += count
            out.append(
                PromptLogprobs(
                    index=index,
                    start=first,
                    chosen_logprobs=chosen[part].astype(FLOAT32).tobytes(),
                    chosen_ranks=ranks[part].astype(INT32).tobytes(),
                    num_top=k,
                    top_ids=np.ascontiguousarray(top_ids[part, :k]).astype(INT32).tobytes(),
                    top_logprobs=np.ascontiguousarray(top_vals[part, :k]).astype(FLOAT32).tobytes(),
                )
            )
        return out


def compute_prompt_logprobs(
    model, hidden: torch.Tensor, plan: PromptLogprobsPlan, is_output_rank: bool
) -> PendingPromptLogprobs | None:
    """Run the LM head over the planned positions (every last-stage rank: it is a TP collective) and, on
    the output rank, take the logprobs of the prompt tokens and their alternatives.

    Args:
        hidden: ``(num_tokens, hidden_size)`` final hidden states of the step.

    Returns:
        The pending result on the output rank, None elsewhere.
    """
    device = hidden.device
    index = torch.from_numpy(plan.hidden_index).to(device)
    targets = torch.from_numpy(plan.targets).to(device)
    k = max(1, max(plan.num_top))
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for at in range(0, len(index), CHUNK_TOKENS):
        logits = model.compute_logits(hidden[index[at : at + CHUNK_TOKENS]])
        if not is_output_rank:
            continue
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(1, targets[at : at + CHUNK_TOKENS, None])
        parts[0].append(chosen[:, 0])
        parts[1].append(((logp > chosen).sum(dim=-1) + 1).to(torch.int32))
        vals, ids = torch.topk(logp, k, dim=-1)
        parts[2].append(vals)
        parts[3].append(ids.to(torch.int32))
    if not is_output_rank:
        return None
    return PendingPromptLogprobs(plan, [torch.cat(p) for p in parts])
