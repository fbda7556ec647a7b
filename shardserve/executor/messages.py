"""Typed control messages between the head (scheduler) and the ranks, and their codec.

Every message is a ``msgspec.Struct`` with a tag, encoded as MessagePack by :data:`encode` and decoded
by :func:`decode_step_message` / :func:`decode_reply` against the closed union of types a side may
receive. Nothing on the control network is unpickled: bytes that are not one of these structs (a
pickle, a truncated frame, a field of the wrong type) raise :class:`MalformedMessageError`.

A step carries full data only for requests a rank has not seen (:class:`NewRequest`, once); for
running requests it carries the scheduled token count, the blocks appended to their tables, and the
rows freed by finished, aborted or preempted requests (vLLM v1's diffs). Requests are addressed by
*row*: the head assigns each running request a row of the persistent batch (``0 .. max_num_seqs - 1``)
and every rank keeps that request's state in that row. Per-request arrays travel as little-endian
``int32``/``float32`` bytes (``numpy.frombuffer`` on arrival), not as lists of Python ints.
"""

from __future__ import annotations

from typing import Union

import msgspec
import numpy as np

from shardserve.sampling_params import SamplingParams

INT32 = np.dtype("<i4")
FLOAT32 = np.dtype("<f4")


class MalformedMessageError(ValueError):
    """Bytes on the control channel that are not a valid message of the expected kind."""


def i32(values) -> bytes:
    """``values`` (a list or array of ints) as little-endian int32 bytes."""
    return np.asarray(values, dtype=INT32).tobytes()


def as_i32(data: bytes) -> np.ndarray:
    """Little-endian int32 bytes as a read-only ``(n,)`` array (no copy).

    Raises:
        MalformedMessageError: the length is not a multiple of 4.
    """
    if len(data) % 4:
        raise MalformedMessageError(f"an int32 array of {len(data)} bytes")
    return np.frombuffer(data, dtype=INT32)


def as_f32(data: bytes) -> np.ndarray:
    """Little-endian float32 bytes as a read-only ``(n,)`` array (no copy)."""
    if len(data) % 4:
        raise MalformedMessageError(f"a float32 array of {len(data)} bytes")
    return np.frombuffer(data, dtype=FLOAT32)


# ------------------------------------------------------------------------------ head -> ranks


class SamplingOptions(msgspec.Struct, frozen=True):
    """What a rank needs of a request's :class:`SamplingParams` to sample its tokens.

    Token lists travel as int32 bytes. The head resolves what needs the tokenizer or the engine's limits:
    ``logprobs`` / ``prompt_logprobs`` of -1 become a count, bad words become token sequences, and
    ``min_tokens_stop_ids`` holds the stop token ids and EOS ids that ``min_tokens`` bans.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    """Top alternatives to report per token; None reports no logprobs."""
    prompt_logprobs: int | None = None
    """Top alternatives to report per prompt token (computed by the last stage during prefill); None: none."""
    logit_bias_ids: bytes = b""
    """int32: token ids with a bias."""
    logit_bias_values: bytes = b""
    """float32: their biases in [-100, 100], parallel to ``logit_bias_ids``."""
    allowed_token_ids: bytes = b""
    """int32: the only tokens that may be sampled; empty allows all."""
    bad_words: list[bytes] = []
    """Each an int32 token sequence whose last token is banned where the others were just generated."""
    min_tokens: int = 0
    """Output tokens before the tokens of ``min_tokens_stop_ids`` may be sampled."""
    min_tokens_stop_ids: bytes = b""
    """int32: tokens banned until ``min_tokens`` outputs exist (stop token ids, and EOS unless ignored)."""

    @classmethod
    def of(
        cls,
        p: SamplingParams,
        *,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        eos_token_ids: tuple[int, ...] = (),
        bad_words: list[list[int]] | None = None,
    ) -> SamplingOptions:
        """The options of ``p``; ``logprobs`` / ``prompt_logprobs`` override counts the engine resolved."""
        bias = p.logit_bias or {}
        stops = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))) if p.min_tokens else []
        return cls(
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            min_p=p.min_p,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logprobs=p.logprobs if logprobs is None else logprobs,
            prompt_logprobs=p.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            logit_bias_ids=i32(list(bias)) if bias else b"",
            logit_bias_values=np.asarray(list(bias.values()), FLOAT32).tobytes() if bias else b"",
            allowed_token_ids=i32(p.allowed_token_ids) if p.allowed_token_ids else b"",
            bad_words=[i32(w) for w in bad_words or () if w],
            min_tokens=p.min_tokens if stops else 0,
            min_tokens_stop_ids=i32(stops) if stops else b"",
        )

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class NewRequest(msgspec.Struct, frozen=True):
    """A request the ranks have not seen (or see again after a preemption), sent once in full."""

    request_id: str
    row: int
    """Row of the persistent batch that holds this request on every rank."""
    prompt_token_ids: bytes
    """int32 ``(num_prompt_tokens,)``."""
    output_token_ids: bytes
    """int32: tokens generated before a preemption (recomputed as part of the prefill); empty when fresh."""
    sampling: SamplingOptions
    block_ids: bytes
    """int32: the request's KV block table so far."""
    num_computed_tokens: int
    """Tokens already in the KV cache (prefix-cache hits)."""


class Step(msgspec.Struct, tag="step", frozen=True):
    """One step for every rank. Ranks apply ``freed_rows``, then ``new_requests``, then the diffs, then compute.

    The batch is the scheduled requests in ``rows`` order; request ``i`` computes its next
    ``num_new_tokens[i]`` tokens (a prefill chunk, or the one token of a decode) and samples the token
    after them when ``sample[i]`` is 1.
    """

    step_id: int
    new_requests: list[NewRequest] = []
    freed_rows: bytes = b""
    """int32: rows whose requests finished, were aborted or preempted since the last step."""
    rows: bytes = b""
    """int32 ``(num_scheduled,)``."""
    num_new_tokens: bytes = b""
    """int32 ``(num_scheduled,)``."""
    sample: bytes = b""
    """uint8 ``(num_scheduled,)``: 1 when the step reaches the end of the request's known tokens."""
    block_rows: bytes = b""
    """int32: for each block appended this step, the row whose table grows (in append order)."""
    block_ids: bytes = b""
    """int32: the appended block ids, parallel to ``block_rows``."""
    tokens_until: int = -1
    """PP > 1: before computing, the first stage takes the sampled tokens of every step up to this id."""
    grammar: bool = False
    """Some sampled request has a grammar: the last stage waits for :class:`GrammarBitmask` of this step
    before sampling (the output rank applies it; with PP = 1 the other TP ranks wait for it too, so that
    they read the ring while the head writes it)."""


class GrammarBitmask(msgspec.Struct, tag="grammar_bitmask", frozen=True):
    """The allowed next tokens of a step's grammar rows, sent by the head once it has accepted the
    previous tokens of those requests (the step may already be running; vLLM's ``sample_tokens``).

    Bit ``j % 32`` of word ``j // 32`` of a row is 1 when token ``j`` may be sampled (xgrammar's layout).
    Every step with ``grammar`` set gets exactly one, possibly with no rows.
    """

    step_id: int
    rows: bytes = b""
    """int32 ``(num_rows,)``: indices into the step's sampled rows (batch order) to mask."""
    bitmask: bytes = b""
    """int32 ``(num_rows, ceil(vocab_size / 32))``, row ``i`` for ``rows[i]``."""
    stop_allowed: bytes = b""
    """int32: sampled-row indices whose grammar is complete: ``min_tokens`` does not ban their stop
    tokens (the grammar may allow nothing else)."""


class FlushOutputs(msgspec.Struct, tag="flush", frozen=True):
    """Asks the output rank for the results it still holds (async scheduling).

    With async scheduling the output rank sends step N's result once it has launched step N+1, so that
    copying N's tokens to the host overlaps N+1 on the device. When the head wants N's result and has no
    N+1 to send, it sends this instead.
    """


class ProfileRequest(msgspec.Struct, tag="profile", frozen=True):
    """Asks every rank for its KV-cache capacity in blocks (the head takes the minimum)."""


class InitKVCache(msgspec.Struct, tag="init_kv", frozen=True):
    """Allocates the KV cache with the number of blocks every rank agreed on; each rank answers Ready."""

    num_blocks: int
    max_model_len: int
    """The engine's context length (tokens): the width of the block tables."""


class StatsRequest(msgspec.Struct, tag="stats", frozen=True):
    """Asks every rank for its accumulated per-step host timings (benchmarks)."""


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    """Tells the ranks to leave their loop."""


HeadMessage = Union[Step, GrammarBitmask, FlushOutputs, ProfileRequest, InitKVCache, StatsRequest, Shutdown]


# ------------------------------------------------------------------------------ ranks -> head


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """A rank has connected to the channel (sent before it joins the process group)."""

    rank: int
    pid: int
    host: str


class KVCapacity(msgspec.Struct, tag="kv_capacity", frozen=True):
    """A rank's KV blocks after its profile run, and what its weights take on its device."""

    rank: int
    num_blocks: int
    weight_bytes: int = 0
    """Bytes of the rank's weights on its device (``load_model``'s ``weight_allocated_bytes``), for the log."""


class Ready(msgspec.Struct, tag="ready", frozen=True):
    """The rank allocated its KV cache (and captured its CUDA graphs)."""

    rank: int


class RequestFailure(msgspec.Struct, frozen=True):
    """One request that a rank could not prepare or sample; the head fails it alone."""

    request_id: str
    row: int
    message: str


class PromptLogprobs(msgspec.Struct, frozen=True):
    """Logprobs of a run of one request's prompt tokens, computed during a prefill chunk.

    Entry ``i`` is prompt token ``start + i`` given the tokens before it (vLLM's ``prompt_logprobs``; the
    first prompt token has none, so ``start >= 1``).
    """

    index: int
    """The request's index in the step's scheduled rows (batch order)."""
    start: int
    """Prompt position of the first entry."""
    chosen_logprobs: bytes
    """float32 ``(n,)``: natural log-probability of each prompt token."""
    chosen_ranks: bytes
    """int32 ``(n,)``: its rank, 1 for the most likely."""
    num_top: int = 0
    top_ids: bytes = b""
    """int32 ``(n, num_top)``, best first."""
    top_logprobs: bytes = b""
    """float32 ``(n, num_top)``."""


class StepOutput(msgspec.Struct, tag="output", frozen=True):
    """What the output rank (last stage, TP rank 0) sends back for one step.

    ``sampled`` holds one token per request with ``sample == 1``, in batch order. Logprobs, when any
    such request asked for them, are given for the sampled rows listed in ``logprob_rows`` (indices
    into ``sampled``): the sampled token's logprob and rank, and the ``num_top`` best alternatives of
    each (rows asked for fewer take a prefix).
    """

    step_id: int
    sampled: bytes = b""
    """int32 ``(num_sampled,)``."""
    logprob_rows: bytes = b""
    """int32 ``(num_with_logprobs,)``."""
    chosen_logprobs: bytes = b""
    """float32 ``(num_with_logprobs,)``: natural log-probability of the sampled token."""
    chosen_ranks: bytes = b""
    """int32 ``(num_with_logprobs,)``: 1 for the most likely token."""
    num_top: int = 0
    top_ids: bytes = b""
    """int32 ``(num_with_logprobs, num_top)``, best first."""
    top_logprobs: bytes = b""
    """float32 ``(num_with_logprobs, num_top)``."""
    failures: list[RequestFailure] = []
    prompt_logprobs: list[PromptLogprobs] = []
    """Prompt logprobs of the requests that asked for them, for the prompt positions this step computed."""


class RequestFailed(msgspec.Struct, tag="request_failed", frozen=True):
    """Sent by a rank other than the output rank when some requests of a step failed there."""

    rank: int
    step_id: int
    failures: list[RequestFailure]


class WorkerError(msgspec.Struct, tag="worker_error", frozen=True):
    """A rank hit an error it cannot recover from; it exits after sending this."""

    rank: int
    message: str
    """The exception as ``Type: text``, with the innermost frames of its traceback."""


class WorkerStats(msgspec.Struct, tag="worker_stats", frozen=True):
    """A rank's host timings since it started, in seconds (for ``benchmarks/bench_host_overhead.py``)."""

    rank: int
    num_steps: int
    recv_s: float
    """Waiting for and decoding control messages."""
    prepare_s: float
    """Applying the step's diff and building the inputs."""
    forward_s: float
    """Launching (CPU: running) the model, collectives included."""
    collective_s: float
    """Inside the model's collectives (TP all-reduce/all-gather, PP send/recv, token broadcast)."""
    sample_s: float
    """Sampling and reading the tokens back (output rank)."""
    send_s: float
    """Encoding and sending replies."""


RankMessage = Union[Hello, KVCapacity, Ready, StepOutput, RequestFailed, WorkerError, WorkerStats]


# ------------------------------------------------------------------------------------ codec

_encoder = msgspec.msgpack.Encoder()
_head_decoder = msgspec.msgpack.Decoder(HeadMessage)
_rank_decoder = msgspec.msgpack.Decoder(RankMessage)


def encode(message: HeadMessage | RankMessage) -> bytes:
    """MessagePack bytes of a control message."""
    return _encoder.encode(message)


def decode_step_message(data: bytes | memoryview) -> HeadMessage:
    """A message from the head.

    Raises:
        MalformedMessageError: ``data`` is not a valid head message (a pickle, say).
    """
    try:
        return _head_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise MalformedMessageError(f"malformed control message from the head: {e}") from None


def decode_reply(data: bytes | memoryview) -> RankMessage:
    """A message from a rank.

    Raises:
        MalformedMessageError: ``data`` is not a valid rank message.
    """
    try:
        return _rank_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise MalformedMessageError(f"malformed control message from a rank: {e}") from None
