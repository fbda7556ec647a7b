"""Typed messages between the scheduler (head) and the workers.

Full data only for requests a worker has not seen; running requests send diffs (vLLM v1).
These are pickled over the gloo control group between ranks of one launch: the trust boundary
is the cluster network, which must be private to the launch (see README, "Security").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.sampling_params import SamplingParams

PLACEHOLDER_TOKEN_ID = -1
"""Input id of a token that an in-flight step is sampling; the model runner fills it in on the device."""


@dataclass
class NewRequestData:
    """A request the workers have not seen (or see again after preemption)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Tokens generated before a preemption (for penalties); empty for a fresh request."""
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    """Tokens already in the cache (prefix-cache hits)."""


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request_id: str
    token_ids: list[int]
    """Tokens to compute this step (a prefill chunk, or the one token of a decode)."""
    start_position: int
    """Position of ``token_ids[0]`` (= num_computed_tokens before the step)."""
    new_block_ids: list[int]
    """Blocks appended to the request's table this step."""
    sample: bool
    """This step reaches the end of the known tokens: sample the next one."""


@dataclass
class SchedulerOutput:
    """One step for every rank: which requests, which tokens, which blocks."""

    step_id: int
    new_requests: list[NewRequestData] = field(default_factory=list)
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    """Requests the workers must forget (finished, aborted or preempted)."""

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    """What the last pipeline stage sends back for one step."""

    step_id: int
    sampled: dict[str, int] = field(default_factory=dict)
    """Next token per request that sampled this step."""
    logprobs: dict[str, tuple[float, int, list[tuple[int, float]]]] = field(default_factory=dict)
    """Per request: (logprob of the sampled token, its rank, [(token id, logprob)] top alternatives, best first)."""


@dataclass
class FlushOutputs:
    """Asks the output rank for the result it still holds (async scheduling).

    With async scheduling the output rank sends step N's result once it has launched step N+1, so that
    the copy of N's tokens to the host overlaps N+1 on the device. When the head wants N's result and
    has no N+1 to send, it sends this instead.
    """


@dataclass
class Shutdown:
    """Tells the workers to leave their loop."""


@dataclass
class ProfileRequest:
    """Asks every rank for its KV-cache capacity in blocks (the head takes the minimum)."""


@dataclass
class InitKVCache:
    """Allocates the KV cache with the number of blocks every rank agreed on."""

    num_blocks: int
