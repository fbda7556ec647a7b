"""Continuous batching with chunked prefill, prefix caching and recompute preemption.

One rule covers prefill, chunked prefill, prefix hits and decode (vLLM v1): every step gives each
request ``min(num_tokens - num_computed_tokens, budget)`` tokens under a per-step token budget.
Requests whose step is still in flight (pipeline parallelism keeps several steps going) wait for
its output before they are scheduled again, except under async scheduling: there a decoding request
whose one in-flight step will sample its next token is scheduled again at once with a placeholder input
(``PLACEHOLDER_TOKEN_ID``) that the model runner fills from that step's sample on the device, so that the
host prepares step N+1 while the GPU computes step N (vLLM v1's async scheduling). Plain Python:
unit-tested without torch.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass

from shardserve.config import SchedulerConfig
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.request import Request, RequestStatus
from shardserve.executor.messages import ModelRunnerOutput, NewRequestData, ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    """A request got a token (and maybe finished) in the step just processed."""

    request: Request
    token_id: int
    logprob: tuple[float, int, list[tuple[int, float]]] | None


class Scheduler:
    """Decides, step by step, which requests compute which tokens."""

    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int, async_scheduling: bool = False
    ):
        self.config = config
        self.async_scheduling = async_scheduling
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []
        self._step_ids = itertools.count()
        self.num_preemptions = 0

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: str | int | None = None) -> None:
        """End a request (stop string, abort); frees its blocks at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        req.status = status
        req.stop_reason = stop_reason if stop_reason is not None else req.stop_reason
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.block_manager.free(request_id)
        self._finished_ids.append(request_id)

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
        if not req.in_flight:
            return True
        return (
            self.async_scheduling
            and req.num_in_flight_steps == 1
            and req.num_pending_tokens == 1
            and req.num_computed_tokens == req.num_tokens  # prompt done: the next input is the pending token
            and not req.params.has_penalties  # penalties need the previous token on the host
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
            out.finished_request_ids, self._finished_ids = self._finished_ids, []
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if not self._can_schedule(req):
                i += 1
                continue
            n = min(req.num_tokens + req.num_pending_tokens - req.num_computed_tokens, budget)
            if not self._make_room(req, req.num_computed_tokens + n):
                preempted = True
                if req not in self.running:  # the request itself was preempted
                    continue
                i += 1
                continue
            new_blocks = self.block_manager.allocate(req.request_id, req.num_computed_tokens + n)
            out.scheduled.append(self._scheduled(req, n, new_blocks))
            budget -= n
            i += 1
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
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._finished_ids.append(req.request_id)
        self.waiting.appendleft(req)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not bm.block_ids(req.request_id):
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
            self.running.append(req)
            out.new_requests.append(
                NewRequestData(
                    request_id=req.request_id,
                    prompt_token_ids=req.prompt_token_ids,
                    output_token_ids=list(req.output_token_ids),
                    params=req.params,
                    block_ids=list(bm.block_ids(req.request_id)),
                    num_computed_tokens=req.num_computed_tokens,
                )
            )
            out.scheduled.append(self._scheduled(req, n, []))
            budget -= n

    def _scheduled(self, req: Request, n: int, new_blocks: list[int]) -> ScheduledRequest:
        start = req.num_computed_tokens
        req.num_computed_tokens += n
        req.num_in_flight_steps += 1
        sample = req.num_computed_tokens == req.num_tokens + req.num_pending_tokens
        req.num_pending_tokens += sample
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=req.token_ids_slice(start, start + n),
            start_position=start,
            new_block_ids=new_blocks,
            sample=sample,
        )

    # -- outputs -----------------------------------------------------------------------------
    def update_from_output(self, step: SchedulerOutput, output: ModelRunnerOutput) -> list[TokenEvent]:
        """Append sampled tokens, apply token-level stops; returns what each request got."""
        events = []
        for s in step.scheduled:
            req = self.requests.get(s.request_id)
            if req is None:  # finished or aborted while the step was in flight
                continue
            req.num_in_flight_steps -= 1
            req.num_pending_tokens -= s.sample
            token = output.sampled.get(s.request_id)
            if token is not None:
                req.output_token_ids.append(token)
            # Blocks are full once every token in them is known and computed.
            known = min(req.num_computed_tokens, req.num_tokens)
            if self.block_manager.has_new_full_blocks(req.request_id, known):  # once per block_size tokens
                self.block_manager.register_full_blocks(req.request_id, req.all_token_ids, known)
            if token is None:
                continue
            events.append(TokenEvent(req, token, output.logprobs.get(s.request_id)))
            status = self._check_stop(req, token)
            if status is not None:
                self.finish_request(req.request_id, status)
        return events

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not p.ignore_eos and token in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    eos_token_ids: frozenset[int] = frozenset()
    """End-of-sequence ids; set by the engine from the tokenizer."""
