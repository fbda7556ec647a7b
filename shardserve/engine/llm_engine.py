"""The synchronous engine core: requests in, one step at a time, per-request token deltas out.

Text (detokenization, stop strings, logprob formatting) is not done here: the engine emits
:class:`~shardserve.engine.output_processor.EngineCoreOutput` s, and an
:class:`~shardserve.engine.output_processor.OutputProcessor` on the caller's side turns them into
request outputs, so that the step loop does no work per character.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from pathlib import Path

from shardserve.config import EngineConfig
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.grammar import GrammarCoordinator
from shardserve.engine.heap import freeze_startup_heap, unfreeze_heap
from shardserve.engine.output_processor import EngineCoreOutput
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler, SchedulerOutput, TokenEvent
from shardserve.engine.throughput import TokenThroughput
from shardserve.executor.executor import Executor
from shardserve.executor.messages import SamplingOptions, Step
from shardserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 8192


def tokenizer_source(tokenizer: str) -> tuple[Path, str]:
    """``(path, format)`` of ``--tokenizer``: a ``.gguf`` file, a directory with ``tokenizer.json`` (or exactly
    one ``.gguf``), or a hub id read from the local Hugging Face cache.

    Raises:
        ValueError: none of these (the message names the value).
    """
    from shardserve.model_executor.loader.resolve import hub_snapshot, is_hub_id

    path = Path(tokenizer).expanduser()
    if not path.exists() and is_hub_id(tokenizer):
        try:
            path = hub_snapshot(tokenizer)
        except ValueError as exc:
            raise ValueError(f"--tokenizer: {exc}") from None
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path, "gguf"
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return path, "hf"
    if path.is_dir() and len(list(path.glob("*.gguf"))) == 1:
        return path, "gguf"
    raise ValueError(f"--tokenizer {tokenizer!r}: not a .gguf file, a directory with tokenizer.json, or a hub id")


class LLMEngine:
    """Owns the tokenizer, scheduler, KV block pool and executor.

    Not thread-safe: one thread calls :meth:`add_request`, :meth:`abort_request` and :meth:`step`
    (the async front end runs it on its own thread).
    """

    def __init__(self, config: EngineConfig, executor_factory=None):
        from shardserve.executor.factory import make_executor
        from shardserve.model_executor.loader.resolve import resolve_model
        from shardserve.transformers_utils.tokenizer import load_tokenizer

        self.config = config
        self.source = resolve_model(config.model.model, config.model.hf_overrides)
        tokenizer, tokenizer_format = self.source.path, self.source.format
        if config.model.tokenizer:  # --tokenizer
            tokenizer, tokenizer_format = tokenizer_source(config.model.tokenizer)
        self.tokenizer = load_tokenizer(tokenizer, tokenizer_format, self.source.generation_config)
        self.executor: Executor = (executor_factory or make_executor)(config, self.source)
        self.max_model_len = 0
        self.throughput = TokenThroughput()
        self.grammar = GrammarCoordinator(self.tokenizer, self.source.arch.vocab_size,
                                          self.executor.send_grammar_bitmask)  # fmt: skip
        try:
            self._init_kv_cache()
        except BaseException:
            self.executor.shutdown()  # the ranks must not outlive a failed start
            raise
        self._in_flight: deque[SchedulerOutput] = deque()
        self._held: deque[tuple[SchedulerOutput, Step]] = deque()
        """Scheduled steps not sent yet: they wait for a grammar bitmask (see :meth:`GrammarCoordinator.blocks`)."""
        freeze_startup_heap()

    def _init_kv_cache(self) -> None:
        """Size the KV cache on every rank and start a fresh block pool and scheduler."""
        num_blocks = self.executor.determine_num_blocks()
        bs = self.config.cache.block_size
        self.max_model_len = self.max_model_len or self._max_model_len(num_blocks * bs)
        self.executor.init_kv_cache(num_blocks, self.max_model_len)
        kv_dtype = str(self.config.cache.cache_torch_dtype(self.config.model.torch_dtype())).removeprefix("torch.")
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens of %s; weights %s per rank; "
            "max concurrency at %d tokens per request: %.1fx",
            num_blocks, bs, num_blocks * bs, kv_dtype, _format_bytes(self.executor.weight_bytes_per_rank),
            self.max_model_len, num_blocks * bs / self.max_model_len,
        )  # fmt: skip
        self.block_manager = BlockManager(num_blocks, bs, self.config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.config.scheduler,
            self.block_manager,
            self.max_model_len,
            async_scheduling=self.executor.async_scheduling,
            pipeline_parallel_size=self.config.parallel.pipeline_parallel_size,
        )
        self.scheduler.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self.grammar.scheduler = self.scheduler

    def _max_model_len(self, kv_capacity_tokens: int) -> int:
        arch = self.source.arch
        wanted = self.config.model.max_model_len or min(arch.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if wanted > kv_capacity_tokens:
            logger.warning("max_model_len %d exceeds the KV cache (%d tokens); capping it", wanted, kv_capacity_tokens)
            return kv_capacity_tokens
        return wanted

    # -- requests ------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Request:
        """Tokenize and validate. Thread-safe (touches no engine state).

        Raises:
            ValueError: empty prompt, token ids out of the vocabulary (in the prompt, ``logit_bias``,
                ``allowed_token_ids`` or ``stop_token_ids``), more logprobs than ``--max-logprobs``, or
                prompt plus max_tokens longer than the context (the message gives both counts).
        """
        params = self._resolve_params(params)
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            vocab = self.source.arch.vocab_size
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if not token_ids:
            raise ValueError("the prompt is empty")
        n, limit = len(token_ids), self.max_model_len
        if n >= limit:
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {n} tokens; "
                "shorten the prompt."
            )
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} in the completion). "
                "Reduce the prompt or max_tokens."
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        request = Request(request_id, token_ids, params, max_tokens)
        request.sampling_options = SamplingOptions.of(
            params, eos_token_ids=tuple(self.tokenizer.eos_token_ids), bad_words=self._bad_words_ids(params.bad_words)
        )
        return request

    def _resolve_params(self, params: SamplingParams) -> SamplingParams:
        """Check token ids against the vocabulary and turn ``-1`` logprob counts into numbers."""
        vocab = self.source.arch.vocab_size
        outside = params.token_ids_outside(vocab)
        if outside is not None:
            raise ValueError(f"{outside[0]}: token id {outside[1]} is outside the vocabulary [0, {vocab})")
        logprobs = self._num_logprobs("logprobs", params.logprobs, vocab)
        prompt_logprobs = self._num_logprobs("prompt_logprobs", params.prompt_logprobs, vocab)
        if (logprobs, prompt_logprobs) != (params.logprobs, params.prompt_logprobs):
            params = dataclasses.replace(params, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        return params

    def _num_logprobs(self, name: str, requested: int | None, vocab: int) -> int | None:
        """Alternatives per token for ``requested`` (-1: the whole vocabulary), capped by ``--max-logprobs``.

        Raises:
            ValueError: more than ``--max-logprobs`` asked for explicitly.
        """
        if requested is None:
            return None
        cap = self.config.model.max_logprobs
        most = vocab if cap < 0 else min(cap, vocab)
        if requested < 0:
            return most
        if cap >= 0 and requested > cap:
            raise ValueError(f"{name} {requested} is more than the server allows (--max-logprobs {cap})")
        return min(requested, vocab)

    def _bad_words_ids(self, words: list[str] | None) -> list[list[int]]:
        """Token sequences of each bad word, with and without a leading space (as vLLM tokenizes them)."""
        sequences: list[list[int]] = []
        for word in words or ():
            for prefix in ("", " "):
                ids = self.tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    def make_requests(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[Request]:
        """One request per completion: ``n`` > 1 becomes ``<id>-0 .. <id>-(n-1)``, seeds ``seed + i``; only
        the first computes the prompt logprobs (they are the same for all)."""
        if params.n == 1:
            return [self.make_request(request_id, prompt, params)]
        return [
            self.make_request(
                f"{request_id}-{i}",
                prompt,
                dataclasses.replace(
                    params,
                    n=1,
                    seed=None if params.seed is None else params.seed + i,
                    prompt_logprobs=params.prompt_logprobs if i == 0 else None,
                ),
            )
            for i in range(params.n)
        ]

    def add_request(self, request: Request) -> None:
        if request.request_id in self.scheduler.requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        self.grammar.admit(request)
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks at once."""
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.requests) or bool(self._in_flight)

    # -- failures ------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Raise ``EngineDeadError`` if a rank is known to be dead (called while idle)."""
        self.executor.check_health()

    def fail_started_requests(self) -> list[str]:
        """Forget the requests that had started computing (their KV cache died with the ranks).

        Returns their ids; requests that were still waiting with nothing computed are kept.
        """
        started = [
            rid
            for rid, r in self.scheduler.requests.items()
            if r.status is not RequestStatus.WAITING or r.num_output_tokens or r.in_flight
        ]
        for rid in started:
            self.abort_request(rid)
        return started

    def restart(self) -> None:
        """Restart every rank (a new generation), size the KV cache again and requeue the waiting requests.

        Call :meth:`fail_started_requests` first. Raises ``EngineDeadError`` if the new generation fails too.
        """
        waiting = list(self.scheduler.waiting)
        self._in_flight.clear()
        self._held.clear()
        self.grammar.reset()
        unfreeze_heap()  # what the old generation leaves behind must be collectable
        self.executor.restart()
        self._init_kv_cache()
        freeze_startup_heap()
        for req in waiting:
            req.reset_progress()
            self.scheduler.add_request(req)

    # -- steps ---------------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """Submit steps until ``max_in_flight`` are going, then finish the oldest; returns its token deltas."""
        scheduler = self.scheduler
        outputs = [EngineCoreOutput(r.request_id, [], finish_reason="error", error=r.error)
                   for r in self.grammar.poll()]  # fmt: skip
        while len(self._in_flight) < self.executor.max_in_flight and scheduler.has_work():
            sched = scheduler.schedule()
            if sched.is_empty:
                break
            self._submit(sched)
        if not self._in_flight:
            if self.grammar.num_compiling:  # only grammars to wait for: do not spin
                self.grammar.wait_for_compiles(0.05)
            return outputs
        sched = self._in_flight.popleft()
        if self._held and self._held[0][0] is sched:
            raise RuntimeError(f"step {sched.step_id} is collected before it was sent")
        result = self.executor.collect()
        failed = scheduler.fail_requests(list(result.failures) + self.executor.take_failures())
        events = scheduler.update_from_output(sched, result)
        rejected = self.grammar.on_collect(sched, events) if sched.grammar else set()
        self._release_held()
        self.throughput.add(sched.num_prompt_tokens, len(events))
        # Per step only where the caller needs it (streams); otherwise the whole output once at the end.
        outputs += [self._output(e, e.request.request_id in rejected) for e in events
                    if e.request.streams or e.request.status.finished]  # fmt: skip
        for req in failed:
            logger.error("request %s failed on a rank: %s", req.request_id, req.error)
            outputs.append(EngineCoreOutput(req.request_id, [], finish_reason="error", error=req.error))
        return outputs

    def _submit(self, sched: SchedulerOutput) -> None:
        """Send a scheduled step, or hold it (and every later one) while it must wait for a bitmask."""
        step = sched.to_message(self.block_manager)
        self._in_flight.append(sched)
        if self._held or self.grammar.blocks(step):
            self._held.append((sched, step))
            return
        self.executor.submit(step)
        self.grammar.on_submit(sched, step)

    def _release_held(self) -> None:
        while self._held and not self.grammar.blocks(self._held[0][1]):
            sched, step = self._held.popleft()
            self.executor.submit(step)
            self.grammar.on_submit(sched, step)

    @staticmethod
    def _output(e: TokenEvent, rejected: bool) -> EngineCoreOutput:
        """A streaming request's new token (none when its grammar rejected it), or a request's whole output
        when it finishes without streaming; prompt logprobs ride on the first output."""
        req = e.request
        prompt_logprobs = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent and not req.needs_prompt_logprobs:
            req.prompt_logprobs_sent = True  # with the first token, as vLLM delivers them
            prompt_logprobs = req.prompt_logprobs
        if req.streams:
            tokens = [] if rejected else [e.token_id]
            logprobs = [e.logprob] if e.logprob is not None and not rejected else None
        else:  # a rejected token was already taken out of output_token_ids
            tokens, logprobs = req.output_token_ids, None
        return EngineCoreOutput(
            req.request_id, tokens, logprobs, req.status.finish_reason, req.stop_reason, req.num_cached_tokens,
            first_token_time=req.first_token_time, prompt_logprobs=prompt_logprobs,
        )  # fmt: skip

    def stats(self) -> tuple[int, int, float]:
        """(running, waiting, KV usage 0..1)."""
        return self.scheduler.num_running, self.scheduler.num_waiting, self.block_manager.usage

    def shutdown(self) -> None:
        self.grammar.shutdown()
        self.executor.shutdown()
        unfreeze_heap()


def _format_bytes(per_rank: tuple[int, ...]) -> str:
    """``20.31 GB`` when every rank holds the same, else each rank's, in decimal GB (MB below 0.1 GB) as
    ``shardserve plan`` prints them."""
    if not per_rank:
        return "unknown"
    unit, scale = ("GB", 1e9) if max(per_rank) >= 1e8 else ("MB", 1e6)
    if len(set(per_rank)) == 1:
        return f"{per_rank[0] / scale:.2f} {unit}"
    return ", ".join(f"{b / scale:.2f}" for b in per_rank) + f" {unit}"
