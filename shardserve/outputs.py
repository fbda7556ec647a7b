"""What the engine hands back to its callers (offline API and HTTP server).

A request's outputs come as its :class:`~shardserve.sampling_params.RequestOutputKind` asks (vLLM's
names): ``DELTA`` streams carry only what is new in each output (``delta_*``; the cumulative ``text``,
``token_ids`` and ``logprobs`` stay empty), so their cost per token does not grow with the request's
length; ``FINAL_ONLY`` delivers one output at the end with everything filled in.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """Log-probability of one token at one position."""

    logprob: float
    """Natural log of the token's probability under the model's distribution: after the grammar mask (a token
    the grammar forbids has ``-inf``), before penalties, ``logit_bias``, the other constraints and temperature
    (vLLM's ``raw_logprobs``)."""
    rank: int
    """1 for the most likely token."""
    decoded_token: str
    """The token's text."""


@dataclass(slots=True)
class CompletionOutput:
    """One completion (one of ``n``) of a request, as of the latest step."""

    index: int
    """Which of the ``n`` completions this is."""
    text: str = ""
    """All text generated (stop strings removed); FINAL_ONLY outputs only."""
    token_ids: list[int] = field(default_factory=list)
    """All tokens generated; FINAL_ONLY outputs only."""
    delta_text: str = ""
    """Text added since the previous output of this completion."""
    delta_token_ids: list[int] = field(default_factory=list)
    """Tokens added since the previous output of this completion."""
    logprobs: list[dict[int, Logprob]] | None = None
    """Per generated token: the sampled token and the top alternatives, when requested (FINAL_ONLY outputs)."""
    delta_logprobs: list[dict[int, Logprob]] | None = None
    """The ``logprobs`` entries of ``delta_token_ids``."""
    finish_reason: str | None = None
    """None while running; ``stop``, ``length`` or ``abort`` when done."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the completion, if any."""
    num_output_tokens: int = 0
    """Tokens generated so far (every output kind)."""
    error: str | None = None
    """Why the completion failed (``finish_reason == "error"``): a rank could not prepare or sample it."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps of one request, ``time.monotonic()`` seconds."""

    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """A step's news about one request.

    ``outputs`` holds the completions that changed in this step (all ``n`` on the final output).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """vLLM's ``prompt_logprobs``: per prompt token, None for the first, else its logprob given the tokens
    before it and the top alternatives (token id -> :class:`Logprob`, the prompt token included with its
    rank). DELTA streams carry it once, on the first output with a token; FINAL_ONLY on the final output."""
