"""State of one request (one sequence) inside the engine."""

from __future__ import annotations

import enum
import time
from collections import deque
from typing import Any

from shardserve.executor.messages import SamplingOptions, i32
from shardserve.sampling_params import RequestOutputKind, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()
    """A rank could not prepare or sample it; the client gets an error, the engine goes on."""

    # Read for every request on every step: identity tests and a lookup by the member's int value, not
    # the Enum's Python-level ``__hash__``.
    @property
    def finished(self) -> bool:
        return self is not RequestStatus.WAITING and self is not RequestStatus.RUNNING

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self._value_)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED.value: "stop",
    RequestStatus.FINISHED_LENGTH.value: "length",
    RequestStatus.FINISHED_ABORTED.value: "abort",
    RequestStatus.FINISHED_ERROR.value: "error",
}


class Request:
    """One sequence: its tokens, how many of them are in the KV cache, and its status.

    The one scheduling rule (vLLM v1): ``num_computed_tokens`` catches up with ``num_tokens``;
    a step that brings it level produces the next token.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, max_tokens: int):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        """Output tokens allowed (the request's max_tokens capped by the context length)."""
        self.output_token_ids: list[int] = []
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.num_tokens = self.num_prompt_tokens
        """Prompt + output tokens (kept as a number: the scheduler reads it for every request every step)."""
        self.num_computed_tokens = 0
        """Tokens whose K/V are in the cache (or will be once the in-flight step ends)."""
        self.num_cached_tokens = 0
        """Prompt tokens found in the prefix cache at admission."""
        self.status = RequestStatus.WAITING
        self.row: int | None = None
        """Row of the ranks' persistent batch while running (assigned by the scheduler)."""
        self.num_in_flight_steps = 0
        """Steps computing this request that were sent and whose output is not back yet."""
        self.num_pending_tokens = 0
        """Tokens that in-flight steps will sample for this request (their values are not known yet)."""
        self.last_sample_step = -1
        """Id of the latest step that samples this request (PP: the first stage receives its tokens)."""
        self.num_preemptions = 0
        self.num_full_blocks = 0
        """Full KV blocks the scheduler last saw (it asks the block manager to hash only when this grows)."""
        self.arrival_time = time.monotonic()
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        """Why the request failed (``FINISHED_ERROR``)."""
        self.first_token_time: float | None = None
        """``time.monotonic()`` when the first output token came back to the engine."""
        self.streams = params.output_kind is RequestOutputKind.DELTA or bool(params.stop) or params.logprobs is not None
        """The caller needs every step's tokens (streaming, stop strings, logprobs); otherwise only the end."""
        self._prompt_bytes: bytes | None = None
        self.sampling_options: SamplingOptions | None = None
        """What the ranks get of ``params`` (set by the engine, which resolves counts and bad words)."""
        self.grammar: Any = None
        """The request's :class:`~shardserve.structured_output.GrammarMatcher` once its grammar is compiled."""
        self.waiting_for_grammar = False
        """Its grammar is still compiling: the scheduler leaves it in the queue (vLLM's WAITING_FOR_FSM)."""
        self.grammar_steps: deque[int] = deque()
        """Ids of in-flight steps that sample this grammar request, oldest first."""
        self.prompt_logprobs: list[Any] | None = [None] if params.prompt_logprobs is not None else None
        """Prompt logprobs received so far, one per prompt position (None for the first token)."""
        self.prompt_logprobs_sent = False

    def reset_progress(self) -> None:
        """Back to waiting with nothing in the KV cache (after the cache was lost with a restart)."""
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.row = None
        self.in_flight = False

    @property
    def in_flight(self) -> bool:
        """A step computing this request has been sent and its output is not back yet."""
        return self.num_in_flight_steps > 0

    @in_flight.setter
    def in_flight(self, value: bool) -> None:
        if value:
            raise ValueError("in_flight is set by scheduling a step; only clearing it is allowed")
        self.num_in_flight_steps = 0
        self.num_pending_tokens = 0

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some are still missing (so no prefix-cache hit may skip them)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def prompt_bytes(self) -> bytes:
        """The prompt as int32 bytes (what a new request carries to the ranks), encoded once."""
        if self._prompt_bytes is None:
            self._prompt_bytes = i32(self.prompt_token_ids)
        return self._prompt_bytes

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.num_tokens += 1

    def remove_last_output_token(self, token_id: int) -> None:
        """Take back the newest output token if it is ``token_id`` (its grammar rejected it)."""
        if self.output_token_ids and self.output_token_ids[-1] == token_id:
            self.output_token_ids.pop()
            self.num_tokens -= 1

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output, without building the whole list."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]
