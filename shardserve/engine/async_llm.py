"""The asyncio front end: the engine steps on its own thread; each request streams from a queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from shardserve.config import EngineConfig
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.request import Request
from shardserve.engine.throughput import TokenThroughput
from shardserve.executor.executor import EngineDeadError
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "EngineOverloadedError", "EngineStats", "RequestAbortedError"]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``--max-queue-len``); retry later (HTTP 429)."""


class RequestAbortedError(EngineDeadError):
    """The server ended the request (shutdown past ``--shutdown-timeout``); HTTP 503."""


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
    prompt: str | None
    sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue]


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
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending_adds = 0
        self.throughput = TokenThroughput()
        self._dead: BaseException | None = None
        self.restarting = False
        """True while the ranks are being restarted after a failure (/health answers 503)."""
        self.num_restarts = 0
        self.on_fatal: list[Callable[[BaseException], None]] = []
        """Called (on the engine thread) once the engine has stopped for good."""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardserve-engine", daemon=True)
        self._thread.start()

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._drain_commands(block=not self.engine.has_unfinished_requests())
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
                    if not self.engine.has_unfinished_requests():
                        self.engine.check_health()
                except EngineDeadError as e:
                    self._recover(e)
        except BaseException as e:  # the engine is unusable: fail every stream, then stop the server
            logger.exception("engine loop died")
            self._dead = e
            for rid in list(self._sinks):
                self._deliver(rid, EngineDeadError(f"engine stopped: {e}"))
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
            for rid in self.engine.fail_started_requests():
                self._deliver(rid, EngineDeadError(f"{error}; the request was interrupted"))
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
            self._sinks[cmd.request.request_id] = cmd.sink
            self.engine.add_request(cmd.request, cmd.prompt)
        elif isinstance(cmd, _Abort):
            if self._sinks.pop(cmd.request_id, None) is not None:
                self.engine.abort_request(cmd.request_id)
        elif isinstance(cmd, _AbortAll):
            for rid in list(self._sinks):
                self.engine.abort_request(rid)
                self._deliver(rid, RequestAbortedError(cmd.reason))

    def _deliver(self, request_id: str, item) -> None:
        if not isinstance(item, BaseException):
            self.throughput.observe(item)
        sink = self._sinks.get(request_id)
        if sink is None:
            return
        if isinstance(item, BaseException) or item.finished:
            self._sinks.pop(request_id, None)
        loop, q = sink
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the consumer's event loop has closed: nobody is listening any more
            self._sinks.pop(request_id, None)
            self._commands.put(_Abort(request_id))

    # -- public --------------------------------------------------------------------------------
    @property
    def errored(self) -> bool:
        return self._dead is not None

    def stats(self) -> EngineStats:
        running, waiting, usage = self.engine.stats()
        bm = self.engine.block_manager
        prompt_rate, generation_rate = self.throughput.rates()
        return EngineStats(running, waiting + self._pending_adds, usage, bm.num_blocks, bm.num_free_blocks,
                           prompt_rate, generation_rate)  # fmt: skip

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; ``n`` > 1 runs n sequences and merges them.

        Raises (before the first output):
            ValueError: the prompt is empty or too long (see :meth:`LLMEngine.make_request`).
            EngineOverloadedError: the waiting queue is full.
            EngineDeadError: the engine has stopped.
        """
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead}")
        limit = self.config.scheduler.max_queue_len
        if limit is not None and self.engine.scheduler.num_waiting + self._pending_adds >= limit:
            raise EngineOverloadedError(f"{limit} requests are already waiting; retry later")
        children = self.engine.make_requests(request_id, prompt, params)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        for req in children:
            self._pending_adds += 1
            self._commands.put(_Add(req, prompt if isinstance(prompt, str) else None, (loop, q)))
        latest: dict[int, CompletionOutput] = {}
        index = {req.request_id: i for i, req in enumerate(children)}
        done = 0
        try:
            while done < len(children):
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                changed = [replace(o, index=index[item.request_id]) for o in item.outputs]
                for o in changed:
                    latest[o.index] = o
                done += item.finished
                finished = done == len(children)
                yield replace(
                    item,
                    request_id=request_id,
                    outputs=[latest[i] for i in sorted(latest)] if finished else changed,
                    finished=finished,
                )
        finally:
            if done < len(children):
                for req in children:
                    self._commands.put(_Abort(req.request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def abort_all(self, reason: str) -> None:
        """End every request; their streams raise :class:`RequestAbortedError` with ``reason``."""
        self._commands.put(_AbortAll(reason))

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()
