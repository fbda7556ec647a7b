"""Continuous batching with chunked prefill, prefix caching and recompute preemption.

One rule covers prefill, chunked prefill, prefix hits and decode (vLLM v1): every step gives each
request ``min(num_tokens - num_computed_tokens, budget)`` tokens under a per-step token budget.
Requests whose step is still in flight (pipeline parallelism keeps several steps going) wait for
its output before they are scheduled again, except under async scheduling: there a decoding request
whose one in-flight step will sample its next token is scheduled again at once; its input is that
sample, which the ranks take on the device (vLLM v1's async scheduling), so that the host prepares
step N+1 while the GPU computes step N. With PP > 1 a step takes at most a 1/PP share of the running
requests, so that the stages work on balanced micro-batches.

Each running request holds a row of the ranks' persistent batch; a step tells the ranks only what is
new (:meth:`SchedulerOutput.to_message`). Plain Python and numpy: unit-tested without torch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec
import numpy as np

from shardserve.config import SchedulerConfig
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.request import Request, RequestStatus
from shardserve.executor.messages import (
    INT32,
    NewRequest,
    RequestFailure,
    SamplingOptions,
    Step,
    StepOutput,
    as_f32,
    as_i32,
    i32,
)

logger = logging.getLogger(__name__)

Logprob = tuple[float, int, list[tuple[int, float]]]
"""(logprob of the sampled token, its rank, [(token id, logprob)] top alternatives, best first)."""


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step (head side)."""

    request: Request
    num_tokens: int
    """Tokens computed this step (a prefill chunk, or the one token of a decode)."""
    start_position: int
    """Position of the first of them (= num_computed_tokens before the step)."""
    sample: bool
    """This step reaches the end of the known tokens: sample the next one."""
    input_pending: bool
    """The last input token is the sample of a step still in flight (async scheduling)."""

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    """One step as the head sees it; :meth:`to_message` is what the ranks get."""

    step_id: int
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    new_requests: list[tuple[Request, int]] = field(default_factory=list)
    """Requests the ranks have not seen, with their computed tokens before this step (prefix-cache hits)."""
    freed_rows: list[int] = field(default_factory=list)
    block_rows: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    tokens_until: int = -1
    grammar: bool = False
    """The step samples a grammar request (see ``Step.grammar``)."""
    num_prompt_tokens: int = 0
    """Prompt tokens the step computes (its prefill chunks), for the throughput figures."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def to_message(self, block_manager: BlockManager) -> Step:
        """The wire message: new requests in full, diffs for the others."""
        new = [
            NewRequest(
                request_id=r.request_id,
                row=r.row,
                prompt_token_ids=r.prompt_bytes,
                output_token_ids=i32(r.output_token_ids) if r.output_token_ids else b"",
                sampling=r.sampling_options or SamplingOptions.of(r.params),
                block_ids=i32(block_manager.block_ids(r.request_id)),
                num_computed_tokens=computed,
            )
            for r, computed in self.new_requests
        ]
        n = len(self.scheduled)
        rows = np.fromiter((s.request.row for s in self.scheduled), INT32, n)
        counts = np.fromiter((s.num_tokens for s in self.scheduled), INT32, n)
        sample = np.fromiter((s.sample for s in self.scheduled), np.uint8, n)
        return Step(
            step_id=self.step_id,
            new_requests=new,
            freed_rows=i32(self.freed_rows) if self.freed_rows else b"",
            rows=rows.tobytes(),
            num_new_tokens=counts.tobytes(),
            sample=sample.tobytes(),
            block_rows=i32(self.block_rows) if self.block_rows else b"",
            block_ids=i32(self.block_ids) if self.block_ids else b"",
            tokens_until=self.tokens_until,
            grammar=self.grammar,
        )


@dataclass(slots=True)
class TokenEvent:
    """A request got a token (and maybe finished) in the step just processed."""

    request: Request
    token_id: int
    logprob: Logprob | None


class Scheduler:
    """Decides, step by step, which requests compute which tokens.

    Args:
        pipeline_parallel_size: stages; with more than one, a step takes a 1/PP share of the running requests.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        async_scheduling: bool = False,
        pipeline_parallel_size: int = 1,
    ):
        self.config = config
        self.async_scheduling = async_scheduling
        self.pipeline_parallel_size = pipeline_parallel_size
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._free_rows = list(range(config.max_num_seqs - 1, -1, -1))
        self._freed_rows: list[int] = []
        self._step_ids = itertools.count()
        self._drain_floor = -1
        """PP: the first stage must take the tokens of steps up to here before a freed row is reused."""
        self.last_collected_step = -1
        self.num_preemptions = 0

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: str | int | None = None) -> None:
        """End a request (stop string, abort, error); frees its blocks and its row at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        req.status = status
        req.stop_reason = stop_reason if stop_reason is not None else req.stop_reason
        if req in self.running:
            self.running.remove(req)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        self.block_manager.free(request_id)
        self._release_row(req)

    def _release_row(self, req: Request) -> None:
        if req.row is None:
            return
        self._freed_rows.append(req.row)
        self._free_rows.append(req.row)
        self._drain_floor = max(self._drain_floor, req.last_sample_step)
        req.row = None

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(self._can_schedule(r) for r in self.running)

    def _can_schedule(self, req: Request) -> bool:
        """Not in flight, or (async) its one in-flight step samples the token this step would decode from."""
        if not req.num_in_flight_steps:
            return True
        return (
            self.async_scheduling
            and req.num_in_flight_steps == 1
            and req.num_pending_tokens == 1
            and req.num_computed_tokens == req.num_tokens  # prompt done: the next input is the pending token
            and req.num_output_tokens + 1 < req.max_tokens  # the pending token does not end it by length
            and req.num_tokens + 1 < self.max_model_len
        )

    # -- scheduling --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Build the next step. Empty (``is_empty``) when nothing can run now."""
        out = SchedulerOutput(step_id=next(self._step_ids))
        budget = self.config.max_num_batched_tokens
        budget, preempted = self._schedule_running(out, budget)
        if not preempted:
            self._schedule_waiting(out, budget)
        if out.scheduled:  # an empty step is not sent; its news waits for the next one
            out.freed_rows, self._freed_rows = self._freed_rows, []
            out.tokens_until = max(self.last_collected_step, self._drain_floor, out.tokens_until)
        return out

    def _running_order(self) -> list[Request]:
        """Requests not in flight first, then those async scheduling lets go again; at most a 1/PP share."""
        idle = [r for r in self.running if not r.num_in_flight_steps]
        ready = idle + [r for r in self.running if r.num_in_flight_steps and self._can_schedule(r)]
        if self.pipeline_parallel_size > 1:
            ready = ready[: max(1, -(-len(self.running) // self.pipeline_parallel_size))]
        return ready

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        preempted = False
        bm = self.block_manager
        bs = bm.block_size
        running = RequestStatus.RUNNING
        for req in self._running_order():
            if budget <= 0:
                break
            if req.status is not running:  # preempted to make room for an earlier one
                continue
            n = min(req.num_tokens + req.num_pending_tokens - req.num_computed_tokens, budget)
            target = req.num_computed_tokens + n
            if -(-target // bs) > bm.num_held_blocks(req.request_id):  # crosses into a new block
                if not self._make_room(req, target):
                    preempted = True
                    continue
                new_blocks = bm.allocate(req.request_id, target)
                out.block_rows += [req.row] * len(new_blocks)
                out.block_ids += new_blocks
            out.scheduled.append(self._scheduled(req, n, out))
            budget -= n
        return budget, preempted

    def _make_room(self, req: Request, num_tokens: int) -> bool:
        """Preempt the newest idle running requests until ``req`` fits; False if it does not."""
        while not self.block_manager.can_allocate(req.request_id, num_tokens):
            victim = next((r for r in reversed(self.running) if not r.in_flight), None)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        logger.info("preempting %s (recompute): KV cache is full", req.request_id)
        self.running.remove(req)
        self.block_manager.free(req.request_id)
        self._release_row(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        compiling: list[Request] = []  # grammars still compiling: they keep their place in the queue
        try:
            self._admit_waiting(out, budget, compiling)
        finally:
            self.waiting.extendleft(reversed(compiling))

    def _admit_waiting(self, out: SchedulerOutput, budget: int, compiling: list[Request]) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.waiting_for_grammar:
                compiling.append(self.waiting.popleft())
                continue
            if not bm.block_ids(req.request_id) and req.needs_prompt_logprobs:
                req.num_computed_tokens = 0  # every prompt position is computed for its logprob
            elif not bm.block_ids(req.request_id):
                cached = bm.match_prefix(req.request_id, req.all_token_ids)
                req.num_computed_tokens = cached
                if req.num_preemptions == 0:
                    req.num_cached_tokens = cached
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not bm.can_allocate(req.request_id, req.num_computed_tokens + n):
                break
            bm.allocate(req.request_id, req.num_computed_tokens + n)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.num_full_blocks = 0  # admitted (again): its blocks are counted from here
            req.row = self._free_rows.pop()
            self.running.append(req)
            out.new_requests.append((req, req.num_computed_tokens))  # its whole block table travels with it
            out.scheduled.append(self._scheduled(req, n, out))
            budget -= n

    def _scheduled(self, req: Request, n: int, out: SchedulerOutput) -> ScheduledRequest:
        """Account ``n`` tokens of ``req`` to step ``out``: its progress, the latest step whose tokens the step
        needs as input (``tokens_until``, from steps still in flight), and whether it samples a grammar."""
        start = req.num_computed_tokens
        if start < req.num_prompt_tokens:
            out.num_prompt_tokens += n
        pending = req.num_pending_tokens > 0
        if pending:
            out.tokens_until = max(out.tokens_until, req.last_sample_step)
        req.num_computed_tokens += n
        req.num_in_flight_steps += 1
        sample = req.num_computed_tokens == req.num_tokens + req.num_pending_tokens
        if sample:
            req.num_pending_tokens += 1
            req.last_sample_step = out.step_id
            if req.grammar is not None:
                out.grammar = True
        return ScheduledRequest(req, n, start, sample, pending)

    # -- outputs -----------------------------------------------------------------------------
    def update_from_output(self, step: SchedulerOutput, output: StepOutput) -> list[TokenEvent]:
        """Append sampled tokens, apply token-level stops; returns what each request got.

        Raises:
            ValueError: the output does not have one token per sampling request of the step.
        """
        self.last_collected_step = max(self.last_collected_step, step.step_id)
        now = time.monotonic()
        tokens = as_i32(output.sampled)
        num_sampling = sum(s.sample for s in step.scheduled)
        if len(tokens) != num_sampling:
            raise ValueError(f"step {step.step_id}: {len(tokens)} tokens for {num_sampling} sampling requests")
        logprobs = _logprobs_by_index(output)
        if output.prompt_logprobs:
            self._record_prompt_logprobs(step, output)
        tokens = tokens.tolist()
        events = []
        j = -1
        requests = self.requests
        bm = self.block_manager
        hashing = bm.enable_prefix_caching
        bs = bm.block_size
        for s in step.scheduled:  # every running request on every step: kept lean
            sample = s.sample
            j += sample
            req = s.request
            if requests.get(req.request_id) is not req:  # finished or aborted while the step was in flight
                continue
            req.num_in_flight_steps -= 1
            if sample:
                req.num_pending_tokens -= 1
                token = tokens[j]
                req.output_token_ids.append(token)
                req.num_tokens += 1
                if req.first_token_time is None:
                    req.first_token_time = now
            # Blocks are full once every token in them is known and computed; at most once per block_size
            # tokens a block is new (the block manager keeps the count, this skips asking it otherwise).
            known = min(req.num_computed_tokens, req.num_tokens)
            if hashing and known // bs > req.num_full_blocks:
                req.num_full_blocks = known // bs
                if bm.has_new_full_blocks(req.request_id, known):
                    bm.register_full_blocks(req.request_id, req.token_slice, known)
            if not sample:
                continue
            lp = logprobs.get(j) if logprobs else None
            if lp is not None and req.params.logprobs is not None:
                lp = (lp[0], lp[1], lp[2][: req.params.logprobs])
            events.append(TokenEvent(req, token, lp))
            status = self._check_stop(req, token)
            if status is not None:
                self.finish_request(req.request_id, status)
        return events

    def _record_prompt_logprobs(self, step: SchedulerOutput, output: StepOutput) -> None:
        """Append the step's prompt logprobs to their requests (positions already held are skipped: a
        prefill recomputed after a preemption computes them again).

        Raises:
            ValueError: an entry names no scheduled request.
        """
        for p in output.prompt_logprobs:
            if not 0 <= p.index < len(step.scheduled):
                raise ValueError(f"step {step.step_id}: prompt logprobs for request {p.index} of {len(step.scheduled)}")
            req = step.scheduled[p.index].request
            if self.requests.get(req.request_id) is not req or not req.needs_prompt_logprobs:
                continue
            held = req.prompt_logprobs
            if p.start > len(held):
                logger.error("request %s: prompt logprobs from %d, %d held", req.request_id, p.start, len(held))
                continue
            chosen, ranks = as_f32(p.chosen_logprobs).tolist(), as_i32(p.chosen_ranks).tolist()
            top_ids = as_i32(p.top_ids).reshape(len(chosen), p.num_top).tolist()
            top_vals = as_f32(p.top_logprobs).reshape(len(chosen), p.num_top).tolist()
            end = min(len(chosen), req.num_prompt_tokens - p.start)
            for i in range(len(held) - p.start, end):
                held.append((chosen[i], ranks[i], list(zip(top_ids[i], top_vals[i]))))
            if not req.needs_prompt_logprobs and req.sampling_options is not None:  # a recompute needs none
                req.sampling_options = msgspec.structs.replace(req.sampling_options, prompt_logprobs=None)

    def fail_requests(self, failures: list[RequestFailure]) -> list[Request]:
        """End the requests a rank could not serve (``FINISHED_ERROR``); returns them."""
        failed = []
        for f in failures:
            req = self.requests.get(f.request_id)
            if req is None or req.row != f.row:  # already ended, or the row was reused since
                continue
            req.error = f.message
            self.finish_request(f.request_id, RequestStatus.FINISHED_ERROR)
            failed.append(req)
        return failed

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.params
        generated = req.num_tokens - req.num_prompt_tokens
        if generated >= p.min_tokens:
            if p.stop_token_ids and token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not p.ignore_eos and token in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if generated >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    eos_token_ids: frozenset[int] = frozenset()
    """End-of-sequence ids; set by the engine from the tokenizer."""


def _logprobs_by_index(output: StepOutput) -> dict[int, Logprob]:
    """The step's logprobs by index into its sampled tokens."""
    if not output.logprob_rows:
        return {}
    rows = as_i32(output.logprob_rows).tolist()
    chosen = as_f32(output.chosen_logprobs).tolist()
    ranks = as_i32(output.chosen_ranks).tolist()
    k = output.num_top
    top_ids = as_i32(output.top_ids).reshape(len(rows), k).tolist()
    top_vals = as_f32(output.top_logprobs).reshape(len(rows), k).tolist()
    return {row: (chosen[i], ranks[i], list(zip(top_ids[i], top_vals[i]))) for i, row in enumerate(rows)}
