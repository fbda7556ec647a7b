"""The in-process executor runs a grammar step's sample when its bitmask comes, and keeps the steps submitted
meanwhile until then, as a rank's loop does."""

from __future__ import annotations

from collections import deque

import pytest

from shardserve.executor import messages as m
from shardserve.executor.executor import UniProcExecutor


class FakeRunner:
    """Records what runs when; a step with ``grammar`` waits for its bitmask."""

    def __init__(self):
        self.awaiting = None
        self.log: list[str] = []

    def execute(self, step: m.Step):
        self.log.append(f"execute {step.step_id}")
        result = Done(step.step_id)
        if step.grammar:
            self.awaiting = result
        return result

    def sample_with_bitmask(self, bitmask: m.GrammarBitmask):
        assert self.awaiting is not None and self.awaiting.step_id == bitmask.step_id
        self.log.append(f"sample {bitmask.step_id}")
        done, self.awaiting = self.awaiting, None
        return Done(done.step_id)


class Done:
    def __init__(self, step_id: int):
        self.step_id = step_id

    def result(self) -> m.StepOutput:
        return m.StepOutput(self.step_id)


def executor() -> UniProcExecutor:
    ex = UniProcExecutor.__new__(UniProcExecutor)  # no model: only the step bookkeeping is under test
    ex.runner = FakeRunner()
    ex._pending, ex._queued = deque(), deque()
    return ex


def test_steps_submitted_while_a_bitmask_is_awaited_run_after_the_sample_in_order():
    ex = executor()
    ex.submit(m.Step(0, grammar=True))
    ex.submit(m.Step(1))
    ex.submit(m.Step(2, grammar=True))
    assert ex.runner.log == ["execute 0"]
    with pytest.raises(RuntimeError, match="before its grammar bitmask"):
        ex.collect()
    ex.send_grammar_bitmask(m.GrammarBitmask(0))
    assert ex.runner.log == ["execute 0", "sample 0", "execute 1", "execute 2"]
    assert [ex.collect().step_id for _ in range(2)] == [0, 1]
    ex.send_grammar_bitmask(m.GrammarBitmask(2))
    assert ex.collect().step_id == 2 and ex.runner.log[-1] == "sample 2"


@pytest.mark.parametrize("rows", [[0, 2], [1], [0, 1, 2]])
def test_the_runner_masks_exactly_the_rows_of_the_bitmask(rows):
    """The output rank's staging of a bitmask message (one host buffer, one copy, a scatter unless the
    message covers every sampled row in order) masks what masking each row by hand does."""
    import numpy as np
    import torch

    from shardserve.model_executor.model_runner import ModelRunner

    n, vocab = 3, 70  # 3 words a row, the last one partly past the vocabulary
    words = (vocab + 31) // 32
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (len(rows), words * 32), generator=gen, dtype=torch.int64)
    packed = (bits.view(len(rows), words, 32) << torch.arange(32)).sum(-1).to(torch.int64)
    packed = ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)  # the same bits as int32 words
    logits = torch.randn(n, vocab, generator=gen)
    expected = logits.clone()
    for i, r in enumerate(rows):
        expected[r, ~bits[i, :vocab].bool()] = float("-inf")
    msg = m.GrammarBitmask(5, m.i32(rows), packed.numpy().tobytes(), m.i32([1]))
    stop_allowed = ModelRunner._apply_bitmask(None, logits, msg)  # uses nothing of the runner's state
    assert torch.equal(logits, expected)
    assert np.array_equal(stop_allowed, [1])
