"""Structured outputs on the head: grammars compiled off the engine thread, one matcher per sequence, and
each step's token bitmask sent to the ranks once the tokens before it are accepted.

The flow follows vLLM v1's split of ``execute_model`` / ``sample_tokens``: a step whose batch samples a
grammar request is sent with ``Step.grammar`` set; the output rank runs its forward, sends the results it
still holds, and waits for :class:`~shardserve.executor.messages.GrammarBitmask` of that step. The head
sends it as soon as every grammar request of the step has had the tokens of its earlier steps accepted by
its matcher: at once when the step is submitted without async scheduling, or once the previous step is
collected with it (while the step's forward runs on the device). The fill runs on the engine thread with
xgrammar's C++ threads (``StructuredOutputManager.fill_packed``): the engine waits for it at once, so a hop
to a Python thread would only add its wake-up. Requests without a grammar never reach this module: no
message, no wait.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler, SchedulerOutput, TokenEvent
from shardserve.executor.messages import GrammarBitmask, Step, i32

logger = logging.getLogger(__name__)


@dataclass
class _GrammarStep:
    """A submitted step that samples grammar requests and whose bitmask is not sent yet."""

    step_id: int
    num_sampled: int
    entries: list[tuple[int, Request]]
    """(index among the step's sampled rows, request) of each grammar request."""


class GrammarCoordinator:
    """Compiles the grammars of new requests, advances their matchers and sends each step's bitmask.

    Args:
        tokenizer: the serving tokenizer (the manager is built from it on the compile thread, on first use).
        vocab_size: the model's logits width.
        send: delivers a bitmask to the ranks (``Executor.send_grammar_bitmask``).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, send: Callable[[GrammarBitmask], None]):
        self._tokenizer, self._vocab_size, self._send = tokenizer, vocab_size, send
        self.manager: Any = None
        """The :class:`~shardserve.structured_output.StructuredOutputManager`, once a grammar was compiled."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardserve-grammar-compile")
        self._compiling: list[tuple[Request, Future]] = []
        self._steps: deque[_GrammarStep] = deque()
        self.scheduler: Scheduler | None = None
        """The current scheduler (replaced on restart): a request not in it has ended."""

    # -- admission -------------------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        """Start compiling ``req``'s grammar; it stays in the waiting queue until :meth:`poll` sees it done."""
        spec = req.params.structured_outputs
        if spec is None:
            return
        req.waiting_for_grammar = True
        self._compiling.append((req, self._pool.submit(self._compile, spec)))

    def _compile(self, spec: Any) -> Any:
        """On the compile thread: build the manager on first use (0.1-0.5 s), then compile (cached)."""
        if self.manager is None:
            from shardserve.structured_output import StructuredOutputManager

            self.manager = StructuredOutputManager(self._tokenizer, vocab_size=self._vocab_size)
        return self.manager.compile(spec)

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def poll(self) -> list[Request]:
        """Give each request whose grammar is compiled its matcher; returns those whose compile failed
        (ended with ``FINISHED_ERROR``)."""
        if not self._compiling:
            return []
        failed, still = [], []
        for req, future in self._compiling:
            if not future.done():
                still.append((req, future))
                continue
            if not self._live(req):
                continue
            error = future.exception()
            if error is not None:
                where = req.params.structured_outputs.param or "the request"
                req.error = f"cannot compile the grammar of {where}: {error}"
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ERROR)
                failed.append(req)
                continue
            from shardserve.structured_output import GrammarMatcher

            req.grammar = GrammarMatcher(future.result(), req.params.reasoning_end_ids)
            req.waiting_for_grammar = False
        self._compiling = still
        return failed

    def wait_for_compiles(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds for one compile to finish (the engine has nothing else to do)."""
        futures = [f for _, f in self._compiling]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    # -- steps -----------------------------------------------------------------------------------
    def blocks(self, step: Step) -> bool:
        """Whether ``step`` must wait to be sent: with PP its first stage waits for the tokens of steps up
        to ``tokens_until``, and if one of them still waits for its bitmask the stage would hold up the
        ring while the head writes that bitmask. (Sending it after the bitmask costs nothing: the ranks
        run steps in order.)"""
        return bool(self._steps) and self._steps[0].step_id <= step.tokens_until

    def on_submit(self, sched: SchedulerOutput, step: Step) -> None:
        """Register a submitted step with ``grammar`` set and send its bitmask if it is ready."""
        if not step.grammar:
            return
        sampled = [s.request for s in sched.scheduled if s.sample]
        entries = [(j, r) for j, r in enumerate(sampled) if r.grammar is not None]
        for _, req in entries:
            req.grammar_steps.append(step.step_id)
        self._steps.append(_GrammarStep(step.step_id, len(sampled), entries))
        self.dispatch()

    def on_collect(self, sched: SchedulerOutput, events: list[TokenEvent]) -> set[str]:
        """Advance the matchers by the step's tokens and send the bitmasks that became ready.

        A token the grammar rejects (only possible when the constraints left no allowed token) or one
        that terminates the grammar ends the request as ``stop``.

        Returns:
            Ids of the requests whose token was rejected (it is taken back out of their output).
        """
        for s in sched.scheduled:
            req = s.request
            if s.sample and req.grammar is not None and req.grammar_steps and req.grammar_steps[0] == sched.step_id:
                req.grammar_steps.popleft()
        rejected = set()
        for e in events:  # also the tokens that just ended their request (EOS, length): they must match too
            req = e.request
            if req.grammar is None:
                continue
            if not req.grammar.accept_token(e.token_id):
                logger.warning("request %s: token %d is not allowed by its grammar; ending it",
                               req.request_id, e.token_id)  # fmt: skip
                req.remove_last_output_token(e.token_id)
                rejected.add(req.request_id)
                if not req.status.finished:
                    self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            elif req.grammar.is_terminated() and not req.status.finished:
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
        self.dispatch()
        return rejected

    def _live(self, req: Request) -> bool:
        return self.scheduler is not None and self.scheduler.requests.get(req.request_id) is req

    def _ready(self, gs: _GrammarStep) -> bool:
        return all(not self._live(r) or not r.grammar_steps or r.grammar_steps[0] == gs.step_id for _, r in gs.entries)

    def dispatch(self) -> None:
        """Send the bitmask of every pending step, in order, whose grammar requests are up to date."""
        while self._steps and self._ready(self._steps[0]):
            gs = self._steps.popleft()
            matchers: list[Any] = [None] * gs.num_sampled
            stop_allowed = []
            for j, req in gs.entries:
                if not self._live(req):
                    continue
                matchers[j] = req.grammar
                if req.num_output_tokens < req.params.min_tokens and req.grammar.is_completed():
                    stop_allowed.append(j)
            # On this thread: the bitmask is needed at once, and xgrammar fills the rows on its C++ threads.
            rows, bitmask = self.manager.fill_packed(matchers) if self.manager is not None else ([], b"")
            self._send(GrammarBitmask(gs.step_id, i32(rows) if rows else b"", bitmask,
                                      i32(stop_allowed) if stop_allowed else b""))  # fmt: skip

    def reset(self) -> None:
        """Forget the steps in flight (the ranks were restarted)."""
        self._steps.clear()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.manager is not None:
            self.manager.shutdown()
