"""The asyncio front end: the engine steps on its own thread; each request streams from a queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from shardserve.config import EngineConfig
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.request import Request
from shardserve.executor.executor import EngineDeadError
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "EngineOverloadedError", "EngineStats"]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``--max-queue-len``); retry later (HTTP 429)."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    """Fraction of KV blocks in use (0..1)."""
    num_total_blocks: int
    num_free_blocks: int


@dataclass
class _Add:
    request: Request
    prompt: str | None
    sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue]


@dataclass
class _Abort:
    request_id: str


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
        self._dead: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardserve-engine", daemon=True)
        self._thread.start()

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # the engine is unusable: fail every stream, let /health report it
            logger.exception("engine loop died")
            self._dead = e
            for rid in list(self._sinks):
                self._deliver(rid, EngineDeadError(f"engine stopped: {e}"))

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

    def _deliver(self, request_id: str, item) -> None:
        sink = self._sinks.get(request_id)
        if sink is None:
            return
        if isinstance(item, BaseException) or item.finished:
            self._sinks.pop(request_id, None)
        loop, q = sink
        loop.call_soon_threadsafe(q.put_nowait, item)

    # -- public --------------------------------------------------------------------------------
    @property
    def errored(self) -> bool:
        return self._dead is not None

    def stats(self) -> EngineStats:
        running, waiting, usage = self.engine.stats()
        bm = self.engine.block_manager
        return EngineStats(running, waiting + self._pending_adds, usage, bm.num_blocks, bm.num_free_blocks)

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

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()
