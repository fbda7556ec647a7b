"""The Ray actors of the Ray backend (:mod:`shardserve.executor.ray_executor` places and supervises them).

A module of its own with light imports: Ray imports it in every actor process, and a relay actor needs
neither torch nor the model code (a rank imports them when it runs ``worker_main``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardserve.executor.channel import NodeRelay, RingSpec
    from shardserve.executor.worker import WorkerArgs

logger = logging.getLogger(__name__)

RELAY_CHECK_S = 0.5
"""How often a relay actor looks at its relay's health (seconds)."""


@dataclass
class RayPlace:
    """Where one actor runs, as it reported itself."""

    node_id: str
    node_ip: str
    host: str
    pid: int
    gpu_ids: list[str] = field(default_factory=list)
    """GPUs Ray assigned to the actor (``ray.get_gpu_ids()``); empty on CPUs."""


def _where() -> RayPlace:
    import ray

    ctx = ray.get_runtime_context()
    return RayPlace(ctx.get_node_id(), ray.util.get_node_ip_address(), socket.gethostname(), os.getpid(),
                    [str(g) for g in ray.get_gpu_ids()])  # fmt: skip


class RankActor:
    """One rank of the grid in a Ray actor. Its methods run on the actor's main thread, one at a time."""

    def where(self) -> RayPlace:
        return _where()

    def run(self, args: WorkerArgs, entry: Callable[[WorkerArgs], None] | None = None) -> None:
        """Find this node's network settings (route to the head, RDMA devices), then run the rank until it ends.

        ``entry`` defaults to ``worker_main``; a variable already set on the node (by the user) is kept.
        """
        from shardserve.distributed.netconf import network_env
        from shardserve.executor.worker import worker_main

        net_env, notes = network_env(args.store_host, os.environ)
        for note in notes:
            logger.info("rank %d network: %s", args.rank, note)
        args = replace(args, env={**net_env, **(args.env or {})})
        (entry or worker_main)(args)


class NodeActor:
    """The control relay of one Ray node for one generation: the head's stream for the node -> the node's ring.

    Start it with ``max_concurrency=2``: :meth:`close` must run while :meth:`watch` waits.
    """

    relay: NodeRelay | None = None
    closed: bool = False

    def where(self) -> RayPlace:
        return _where()

    def start_relay(self, address: str, num_readers: int) -> RingSpec:
        """Start a :class:`~shardserve.executor.channel.NodeRelay` (on a thread of this actor) for the stream at
        ``address``; returns the ring it feeds, for the node's ``num_readers`` ranks."""
        from shardserve.executor.channel import NodeRelay

        self.relay = NodeRelay(address, num_readers)
        return self.relay.ring_spec

    def watch(self) -> None:
        """Waits while the relay runs: supervision watches this call as it watches a rank's ``run``. Returns once
        :meth:`close` was called.

        Raises:
            RuntimeError: the relay stopped on an error (its ring or stream failed).
        """
        while self.relay.error is None and not self.closed:
            time.sleep(RELAY_CHECK_S)
        error = self.relay.error
        if error is not None and not self.closed:
            raise RuntimeError(f"the control relay failed: {type(error).__name__}: {error}") from error

    def close(self) -> None:
        """Stop the relay and unlink its ring: ``ray.kill`` takes the process's resource tracker with it, so the
        segment would stay in /dev/shm."""
        self.closed = True
        if self.relay is not None:
            self.relay.close()
