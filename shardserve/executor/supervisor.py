"""Supervision of the worker processes: bounded waits, failure reports and restart generations.

The head never blocks on a gloo call without a bound: each call runs on an :class:`IOThread` and
the head waits for it in short slices, checking between slices that every rank is still alive
(its own processes through ``LocalWorkers``, the other nodes' through the reports their launchers
leave in the launch's TCPStore). A timed-out gloo ``wait`` closes the connection it waited on, so a
slice cannot be a gloo timeout.

A restart bumps :data:`GENERATION_KEY` in the store. Headless nodes watch that key: they kill their
workers and start the new generation, whose process group lives under its own store prefix
(``shardserve/gen{generation}``, see ``worker.join_world``).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)

GENERATION_KEY = "shardserve/generation"
"""Store key holding the current restart generation (decimal text), set by the head."""
POLL_S = 0.2
"""Slice of a bounded wait: how often liveness is checked while a gloo call is pending (seconds)."""


class EngineDeadError(RuntimeError):
    """A worker died or stopped answering; in-flight requests cannot finish."""


def failure_key(generation: int, node_rank: int) -> str:
    """Store key where node ``node_rank`` reports its failed workers of ``generation``."""
    return f"shardserve/failed/gen{generation}/node{node_rank}"


@dataclass
class WorkerFailure:
    """A worker process that exited while the launch was running."""

    rank: int
    """Global rank on the TP x PP grid."""
    node_rank: int
    pid: int | None
    exitcode: int | None
    """Exit status as multiprocessing gives it: negative for a signal, None if unknown."""

    def describe(self) -> str:
        code = self.exitcode
        if code is None:
            how = "stopped answering"
        elif code < 0:
            how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"rank {self.rank} (node {self.node_rank}, pid {self.pid}) {how}"


def root_causes(failures: list[WorkerFailure]) -> list[WorkerFailure]:
    """Failures ordered most-likely-first: a rank killed by a signal explains the peers that errored after it."""
    return sorted(failures, key=lambda f: (f.exitcode is None, f.exitcode is not None and f.exitcode >= 0, f.rank))


def report_failures(store: dist.Store, generation: int, node_rank: int, failures: list[WorkerFailure]) -> None:
    """Tell the head (through the store) which workers of this node died."""
    store.set(failure_key(generation, node_rank), json.dumps([asdict(f) for f in failures]))


def read_failure_reports(store: dist.Store, generation: int, nnodes: int) -> list[WorkerFailure]:
    """Failures that the headless nodes reported for ``generation``."""
    failures = []
    for node in range(1, nnodes):
        key = failure_key(generation, node)
        if store.check([key]):
            failures += [WorkerFailure(**d) for d in json.loads(store.get(key))]
    return failures


def read_generation(store: dist.Store) -> int:
    """The head's current restart generation (waits for the key up to the store's timeout).

    Raises:
        RuntimeError: the store is unreachable (the head is gone) or the key never appeared.
    """
    return int(store.get(GENERATION_KEY))


class IOThread:
    """Runs blocking calls one at a time on a daemon thread so that the caller can wait with a bound.

    A call still blocked when the launch is torn down is abandoned with its thread (daemon, so it does
    not hold up the exit); the next generation gets a new IOThread.
    """

    def __init__(self, name: str):
        self._calls: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                    future.set_exception(e)

    def call(
        self,
        fn: Callable[[], Any],
        timeout: float | None,
        check: Callable[[], None],
        on_timeout: Callable[[], BaseException],
    ) -> Any:
        """Run ``fn`` on the thread and wait for its result.

        Every :data:`POLL_S` seconds ``check()`` runs (it raises to give up, e.g. on a dead worker).

        Raises:
            whatever ``fn`` or ``check`` raises; ``on_timeout()`` after ``timeout`` seconds (None: no bound).
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, future))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return future.result(timeout=POLL_S)
            except concurrent.futures.TimeoutError:
                pass
            check()
            if deadline is not None and time.monotonic() > deadline:
                raise on_timeout()

    def stop(self, timeout: float) -> bool:
        """Let the thread finish its current call and exit; False if it is still blocked after ``timeout`` s."""
        self._calls.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()
