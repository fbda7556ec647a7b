"""Turns the engine's per-request token deltas into :class:`RequestOutput` s, off the engine loop.

The engine loop emits :class:`EngineCoreOutput` s (new token ids and logprobs of each request that got
any, and how it finished); this processor detokenizes them, applies stop strings and formats logprobs,
as vLLM v1's output processor does in the API process. It runs on the caller's thread for the offline
``LLM`` and on its own thread for ``AsyncLLM``; a stop-string hit is returned as an abort for the engine.

Cost per token is independent of the request's length: DELTA outputs carry only the new text and tokens,
and FINAL_ONLY requests without stop strings are detokenized once, when they finish.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from shardserve.engine.scheduler import Logprob as LogprobTuple
from shardserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from shardserve.sampling_params import RequestOutputKind, SamplingParams
from shardserve.transformers_utils.detokenizer import IncrementalDetokenizer, StopStringChecker, decode_completion
from shardserve.transformers_utils.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step gave one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[LogprobTuple] | None = None
    finish_reason: str | None = None
    """None while running; ``stop``, ``length``, ``abort`` or ``error``."""
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    first_token_time: float | None = None
    """When the engine got the request's first token (``time.monotonic()``)."""
    prompt_logprobs: list[LogprobTuple | None] | None = None
    """Per prompt position (None for the first), once, with the request's first token."""


@dataclass
class _RequestState:
    params: SamplingParams
    prompt: str | None
    prompt_token_ids: list[int]
    metrics: RequestMetrics
    detokenizer: IncrementalDetokenizer | None
    """None for FINAL_ONLY requests without stop strings: they are decoded once at the end."""
    stops: StopStringChecker
    token_ids: list[int] = field(default_factory=list)
    text_chunks: list[str] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class OutputProcessor:
    """Per-request text state; :meth:`process` turns a step's engine outputs into request outputs.

    Thread use: :meth:`add_request` and :meth:`abort` may run on other threads than :meth:`process`
    (dict updates are atomic), as long as a request is added before the engine sees it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float) -> None:  # fmt: skip
        incremental = params.output_kind is RequestOutputKind.DELTA or bool(params.stop)
        detok = (
            IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
            if incremental
            else None
        )
        self._states[request_id] = _RequestState(
            params=params,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            metrics=RequestMetrics(arrival_time=arrival_time),
            detokenizer=detok,
            stops=StopStringChecker(params.stop),
            logprobs=[] if params.logprobs is not None else None,
        )

    def abort(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._states

    def process(self, outputs: list[EngineCoreOutput], now: float) -> tuple[list[RequestOutput], list[str]]:
        """Outputs for the callers, and the requests that a stop string ended (abort them in the engine)."""
        results, stopped = [], []
        for out in outputs:
            state = self._states.get(out.request_id)
            if state is None:  # aborted, or ended by a stop string while later steps were in flight
                continue
            result, hit = self._process_one(out, state, now)
            if hit:
                stopped.append(out.request_id)
            if result is not None:
                results.append(result)
        return results, stopped

    def _process_one(
        self, out: EngineCoreOutput, state: _RequestState, now: float
    ) -> tuple[RequestOutput | None, bool]:
        m = state.metrics
        new_ids = out.new_token_ids
        if new_ids:
            if m.first_token_time is None:
                m.first_token_time = out.first_token_time or now
            m.last_token_time = now
            state.token_ids += new_ids
        entries = None
        if state.logprobs is not None and out.new_logprobs:
            entries = [self._logprob_entry(t, lp) for t, lp in zip(new_ids, out.new_logprobs)]
            state.logprobs += entries
        finish_reason = out.finish_reason
        stop_reason = out.stop_reason
        delta = ""
        hit = False
        detok = state.detokenizer
        if detok is not None:
            delta = detok.add(new_ids) if new_ids else ""
            stops = state.stops
            if stops.stops:
                delta, stop = stops.process(delta)
                if stop is not None:
                    finish_reason, stop_reason, hit = "stop", stop, True
                elif finish_reason is not None:
                    delta += stops.flush()
        finished = finish_reason is not None
        prompt_logprobs = None
        if out.prompt_logprobs is not None:
            prompt_logprobs = [
                None if lp is None else self._logprob_entry(t, lp)
                for t, lp in zip(state.prompt_token_ids, out.prompt_logprobs)
            ]
            state.prompt_logprobs = prompt_logprobs
        final_only = state.params.output_kind is RequestOutputKind.FINAL_ONLY
        if final_only:
            if detok is not None:
                state.text_chunks.append(delta)
            if not finished:
                return None, hit
        if finished:
            m.finished_time = now
            self._states.pop(out.request_id, None)
        # Positional (the fields' order): half the cost of keywords, paid for every token of every request.
        completion = CompletionOutput(0, "", [], delta, new_ids, None, entries, finish_reason, stop_reason,
                                      len(state.token_ids), out.error)  # fmt: skip
        if final_only:
            if detok is not None:
                completion.text = "".join(state.text_chunks)
            else:
                completion.text = decode_completion(self.tokenizer, state.prompt_token_ids, state.token_ids,
                                                    state.params.skip_special_tokens)  # fmt: skip
            completion.token_ids = state.token_ids
            completion.logprobs = state.logprobs
            prompt_logprobs = state.prompt_logprobs
        return RequestOutput(out.request_id, state.prompt, state.prompt_token_ids, [completion], finished,
                             out.num_cached_tokens, m, prompt_logprobs), hit  # fmt: skip

    def _logprob_entry(self, token_id: int, lp: LogprobTuple) -> dict[int, Logprob]:
        chosen, rank, top = lp
        piece = self.tokenizer.id_to_piece_text
        entry = {token_id: Logprob(chosen, rank, piece(token_id))}
        for r, (tid, val) in enumerate(top, start=1):
            entry.setdefault(tid, Logprob(val, r, piece(tid)))
        return entry
