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
