"""Supervision of the worker processes: bounded waits, failure reports and restart generations.

The head never waits on a rank without a bound: every wait on the control channel is cut into short
slices, and between slices the head checks that every rank is still alive (its own processes through
``LocalWorkers``, the other nodes' through the reports their launchers leave in the launch's TCPStore).

A restart bumps :data:`GENERATION_KEY` in the store. Headless nodes watch that key: they kill their
workers and start the new generation, whose process group lives under its own store prefix
(``shardserve/gen{generation}``, see ``worker.join_world``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import torch.distributed as dist

logger = logging.getLogger(__name__)

GENERATION_KEY = "shardserve/generation"
"""Store key holding the current restart generation (decimal text), set by the head."""


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
