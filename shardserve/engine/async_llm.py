"""The asyncio front end: the engine steps on one thread, its outputs are turned into text on another.

The engine thread only schedules, drives the ranks and hands each step's token deltas to the output
thread. The output thread detokenizes and applies stop strings (:class:`OutputProcessor`), sends a
stop-string hit back to the engine as an abort, and delivers each step's outputs to the waiting
streams with one event-loop wake-up per step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from shardserve.config import EngineConfig
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.output_processor import OutputProcessor
from shardserve.engine.request import Request
from shardserve.executor.executor import EngineDeadError
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncLLM",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "RequestAbortedError",
    "RequestFailedError",
]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``--max-queue-len``); retry later (HTTP 429)."""


class RequestAbortedError(EngineDeadError):
    """The server ended the request (shutdown past ``--shutdown-timeout``); HTTP 503."""


class RequestFailedError(RuntimeError):
    """A rank could not prepare or sample this one request; the engine and the other requests go on (HTTP 500)."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    """Fraction of KV blocks in use (0..1)."""
    num_total_blocks: int
    num_free_blocks: int
    prompt_tokens_per_s: float = 0.0
    """Computed prompt tokens per second over the last few seconds (see :class:`TokenThroughput`)."""
    generation_tokens_per_s: float = 0.0
    """Generated tokens per second over the same window."""


@dataclass
class _Add:
    request: Request


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortAll:
    reason: str


class AsyncLLM:
    """Thread-safe, asyncio-facing wrapper of :class:`LLMEngine`.

    Construction loads the model (blocking); :meth:`generate` streams outputs.
    """

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        self.config = config
        self.engine = engine or LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        # Like vLLM: the model argument as given (path or hub id); the embedded model by its name.
        self.model_name = config.model.model or self.engine.source.name
        self.max_model_len = self.engine.max_model_len
        self.generation_defaults = dict(self.engine.source.generation_config)
        self.processor = OutputProcessor(self.tokenizer)
        self.throughput = self.engine.throughput
        self._commands: queue.Queue = queue.Queue()
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending_adds = 0
        self._dead: BaseException | None = None
        self.restarting = False
        """True while the ranks are being restarted after a failure (/health answers 503)."""
        self.num_restarts = 0
        self.on_fatal: list[Callable[[BaseException], None]] = []
        """Called (on the engine thread) once the engine has stopped for good."""
        self._stopping = threading.Event()
        self._output_thread = threading.Thread(target=self._run_outputs, name="shardserve-output", daemon=True)
        self._output_thread.start()
        self._thread = threading.Thread(target=self._run, name="shardserve-engine", daemon=True)
        self._thread.start()

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._drain_commands(block=not self.engine.has_unfinished_requests())
                    outs = self.engine.step()
                    if outs:
                        self._outputs.put((time.monotonic(), outs))
                    if not self.engine.has_unfinished_requests():
                        self.engine.check_health()
                except EngineDeadError as e:
                    self._recover(e)
        except BaseException as e:  # the engine is unusable: fail every stream, then stop the server
            logger.exception("engine loop died")
            self._dead = e
            self._outputs.put(("fail_all", EngineDeadError(f"engine stopped: {e}")))
            for callback in self.on_fatal:
                callback(e)

    def _recover(self, error: EngineDeadError) -> None:
        """Fail the requests that had started, restart every rank, keep the waiting requests.

        Raises:
            EngineDeadError: no restart is left (``--max-restarts``).
        """
        max_restarts = self.config.parallel.max_restarts
        while True:
            self.restarting = True  # /health turns 503 before the clients hear of the failure
            started = self.engine.fail_started_requests()
            self._outputs.put(("fail", started, EngineDeadError(f"{error}; the request was interrupted")))
            if self._stopping.is_set():  # shutting down anyway: no restart
                return
            if self.num_restarts >= max_restarts:
                self._dead = error  # before restarting goes False, so /health never reads "ok" in between
                self.restarting = False
                raise EngineDeadError(f"{error}; no restart left (--max-restarts {max_restarts})") from error
            self.num_restarts += 1
            logger.warning("restarting every rank (restart %d of %d); waiting requests are kept",
                           self.num_restarts, max_restarts)  # fmt: skip
            try:
                self.engine.restart()
            except EngineDeadError as e:
                error = e
                continue
            self.restarting = False
            logger.info("ranks restarted; serving again")
            return

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd) -> None:
        if isinstance(cmd, _Add):
            self._pending_adds -= 1
            if cmd.request.request_id in self._sinks:  # not cancelled while it waited
                self.engine.add_request(cmd.request)
        elif isinstance(cmd, _Abort):
            self.engine.abort_request(cmd.request_id)
        elif isinstance(cmd, _AbortAll):
            ids = list(self.engine.scheduler.requests)
            for rid in ids:
                self.engine.abort_request(rid)
            self._outputs.put(("fail", ids, RequestAbortedError(cmd.reason)))

    # -- output thread -------------------------------------------------------------------------
    def _run_outputs(self) -> None:
        while True:
            item = self._outputs.get()
            if item is None:
                return
            try:
                self._handle_output(item)
            except Exception:
                logger.exception("output processing failed")

    def _handle_output(self, item) -> None:
        if item[0] == "fail":
            _, ids, error = item
            self._deliver([(rid, error) for rid in ids])
            return
        if item[0] == "fail_all":
            self._deliver([(rid, item[1]) for rid in list(self._sinks)])
            return
        now, outs = item
        results, stopped = self.processor.process(outs, now)
        for rid in stopped:
            self._commands.put(_Abort(rid))
        self._deliver([(r.request_id, r) for r in results])

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand items to their streams: one ``call_soon_threadsafe`` per event loop for the whole batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for rid, item in items:
            sink = self._sinks.get(rid)
            if sink is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                self._sinks.pop(rid, None)
                self.processor.abort(rid)
            by_loop[sink[0]].append((sink[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the consumer's event loop has closed: nobody is listening any more
                for _q, item in batch:
                    rid = item.request_id if isinstance(item, RequestOutput) else None
                    if rid is not None:
                        self._sinks.pop(rid, None)
                        self._commands.put(_Abort(rid))

    # -- public --------------------------------------------------------------------------------
    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def dead_reason(self) -> str | None:
        """Why the engine stopped for good (the failed rank and its error), None while it runs."""
        return None if self._dead is None else str(self._dead)

    def stats(self) -> EngineStats:
        running, waiting, usage = self.engine.stats()
        bm = self.engine.block_manager
        prompt_rate, generation_rate = self.throughput.rates()
        return EngineStats(running, waiting + self._pending_adds, usage, bm.num_blocks, bm.num_free_blocks,
                           prompt_rate, generation_rate)  # fmt: skip

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs as ``params.output_kind`` asks; ``n`` > 1 runs n sequences and merges them.

        DELTA: each yield holds the completions that changed, by index; the last one has ``finished``.
        FINAL_ONLY: one yield with every completion.

        Raises (before the first output):
            ValueError: the prompt is empty or too long (see :meth:`LLMEngine.make_request`).
            EngineOverloadedError: the waiting queue is full.
            EngineDeadError: the engine has stopped.
        Raises (while streaming):
            RequestFailedError: a rank could not serve this request.
        """
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead}")
        limit = self.config.scheduler.max_queue_len
        if limit is not None and self.engine.scheduler.num_waiting + self._pending_adds >= limit:
            raise EngineOverloadedError(f"{limit} requests are already waiting; retry later")
        children = self.engine.make_requests(request_id, prompt, params)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        text = prompt if isinstance(prompt, str) else None
        for req in children:
            self._sinks[req.request_id] = (loop, q)
            self.processor.add_request(req.request_id, text, req.prompt_token_ids, req.params, req.arrival_time)
            self._pending_adds += 1
            self._commands.put(_Add(req))
        index = {req.request_id: i for i, req in enumerate(children)}
        final_only = params.output_kind is RequestOutputKind.FINAL_ONLY
        finals: dict[int, CompletionOutput] = {}
        prompt_logprobs = None  # computed by the first completion only
        done = 0
        try:
            while done < len(children):
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                completion = replace(item.outputs[0], index=index[item.request_id])
                if completion.finish_reason == "error":
                    raise RequestFailedError(f"request {item.request_id} failed: {completion.error}")
                done += item.finished
                if final_only:
                    finals[completion.index] = completion
                    prompt_logprobs = item.prompt_logprobs or prompt_logprobs
                    if done < len(children):
                        continue
                    outputs = [finals[i] for i in sorted(finals)]
                    item = replace(item, prompt_logprobs=prompt_logprobs)
                else:
                    outputs = [completion]
                yield replace(item, request_id=request_id, outputs=outputs, finished=done == len(children))
        finally:
            if done < len(children):
                for req in children:
                    if self._sinks.pop(req.request_id, None) is not None:
                        self.processor.abort(req.request_id)
                        self._commands.put(_Abort(req.request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request, or every completion of an ``n`` > 1 request (``<id>-0``, ``<id>-1``, ...)."""
        ids = [rid for rid in list(self._sinks) if rid == request_id or rid.startswith(f"{request_id}-")]
        for rid in ids:
            self._commands.put(_Abort(rid))

    def abort_all(self, reason: str) -> None:
        """End every request; their streams raise :class:`RequestAbortedError` with ``reason``."""
        self._commands.put(_AbortAll(reason))

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)
        self._outputs.put(None)
        self._output_thread.join(timeout=5)
        self.engine.shutdown()


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)
