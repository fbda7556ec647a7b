"""Ray backend, part 2: one Ray actor per rank, supervised like a worker process.

:class:`RayWorkers` is the Ray counterpart of :class:`~shardserve.executor.executor.LocalWorkers` (same
``alive()``, ``failures()``, ``kill()``, ``stop(timeout)``): :func:`start_ray_workers` reserves the placement
groups (:mod:`shardserve.executor.ray_utils`), starts a :class:`RankActor` in each bundle, and each actor
finds its own node's network settings (``network_env``, as an ``mp`` node does) and then runs the same
``worker_main(WorkerArgs)`` as a worker process. Optionally one small actor per node (``num_cpus=0``) runs a
per-node service for the generation (``node_service``; the per-node relay of the control channel).

A rank actor that dies, or whose node dies, shows in ``failures()``; the executor then restarts every rank
as a new generation: all actors are killed, the placement groups released, and both made again, on the
nodes that are alive then. :class:`RayExecutor` is ``MultiprocExecutor`` with these workers in place of
local processes; the head (scheduler and HTTP) stays in the process that started it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from shardserve.config import EngineConfig
from shardserve.executor.executor import MultiprocExecutor
from shardserve.executor.rank_info import RankInfo
from shardserve.executor.ray_utils import (
    InsufficientResourcesError,
    Reservation,
    cluster_device_type,
    connect,
    rank_bundle,
    reserve,
)
from shardserve.executor.supervisor import EngineDeadError, WorkerFailure
from shardserve.executor.worker import WorkerArgs, worker_main

logger = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 120.0
"""Seconds for the rank actors to start and say where they are (bounded by ``--rendezvous-timeout`` too)."""
KILL_WAIT_S = 5.0
"""Seconds ``kill()`` waits for Ray to confirm that the actors are gone."""


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

        net_env, notes = network_env(args.store_host, os.environ)
        for note in notes:
            logger.info("rank %d network: %s", args.rank, note)
        args = replace(args, env={**net_env, **(args.env or {})})
        (entry or worker_main)(args)


class NodeActor:
    """A per-node service of one generation (e.g. the control channel's relay), on a node that holds ranks."""

    def where(self) -> RayPlace:
        return _where()

    def run(self, service: Callable[..., None], *args: Any) -> None:
        service(*args)


@dataclass
class RayNodeSlot:
    """What a per-node service is told: its node, and the ranks that node holds."""

    node_index: int
    """Index of the node in rank order (the node of rank 0 is 0): the ``node_rank`` of its ranks."""
    node_id: str
    node_ip: str
    ranks: list[int]
    generation: int


@dataclass
class RayWorkerFailure(WorkerFailure):
    """A rank actor (or a node service) that ended, with Ray's reason."""

    node_ip: str = ""
    reason: str = ""

    def describe(self) -> str:
        what = f"rank {self.rank}" if self.rank >= 0 else f"the node service of node {self.node_rank}"
        return f"{what} (Ray node {self.node_rank} at {self.node_ip}, pid {self.pid}) {self.reason}"


class RayWorkers:
    """The rank actors of one generation, in rank order, and the placement groups that hold them.

    Same interface as ``LocalWorkers``: :meth:`alive`, :meth:`failures`, :meth:`kill`, :meth:`stop`.
    """

    def __init__(self, reservation: Reservation, actors: list, places: list[RayPlace], runs: list):
        self.reservation = reservation
        self.actors, self.places, self._runs = actors, places, runs
        self.node_actors: list = []
        """Per-node service actors (see :func:`start_ray_workers`), by node index."""
        self.node_places: list[RayPlace] = []
        self._node_runs: list = []
        order = list(dict.fromkeys(p.node_id for p in places))
        self.node_index = {node_id: i for i, node_id in enumerate(order)}
        """Ray node id -> node index in rank order."""
        self._ended: dict[int, RayWorkerFailure] = {}

    @property
    def nnodes(self) -> int:
        return len(self.node_index)

    def node_rank(self, rank: int) -> int:
        return self.node_index[self.places[rank].node_id]

    def alive(self) -> bool:
        return not self.failures()

    def failures(self) -> list[WorkerFailure]:
        """The actors whose ``run`` has ended (cleanly: exit code 0; an exception: 1; a dead actor or node:
        ``None``, with Ray's reason), rank actors first."""
        import ray

        pending = [(i, ref) for i, ref in enumerate(self._runs + self._node_runs) if i not in self._ended]
        if pending:
            ready, _ = ray.wait([ref for _, ref in pending], num_returns=len(pending), timeout=0)
            done = {r.hex() for r in ready}
            for i, ref in pending:
                if ref.hex() in done:
                    self._ended[i] = self._outcome(i, ref)
        return [self._ended[i] for i in sorted(self._ended)]

    def _outcome(self, index: int, ref) -> RayWorkerFailure:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        n = len(self._runs)
        place = self.places[index] if index < n else self.node_places[index - n]
        rank = index if index < n else -1
        try:
            ray.get(ref, timeout=0)
            code, reason = 0, "exited cleanly"
        except RayTaskError as e:
            code, reason = 1, f"raised {type(e.cause).__name__}: {e.cause}"
        except RayActorError as e:
            code, reason = None, f"died: {_first_line(e)}"
        return RayWorkerFailure(rank, self.node_index.get(place.node_id, -1), place.pid, code,
                                node_ip=place.node_ip, reason=reason)  # fmt: skip

    def stop(self, timeout: float = 10.0) -> None:
        """Wait up to ``timeout`` s for every rank to return (after a ``Shutdown``), then kill what is left."""
        import ray

        if self._runs:
            ray.wait(self._runs, num_returns=len(self._runs), timeout=timeout)
        self.kill()

    def kill(self) -> None:
        """Kill every actor of the generation and release its placement groups (idempotent)."""
        import ray

        for actor in self.actors + self.node_actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead, or its node is gone
                logger.debug("ray.kill failed", exc_info=True)
        refs = self._runs + self._node_runs
        if refs:  # bounded: a node that is gone may never confirm
            ray.wait(refs, num_returns=len(refs), timeout=KILL_WAIT_S)
        self.reservation.release()

    def overlay(self, info: RankInfo) -> RankInfo:
        """``info`` as the worker reported it, with its Ray node (index, id, address) filled in."""
        if not 0 <= info.rank < len(self.places):
            return info
        place = self.places[info.rank]
        return replace(info, node_rank=self.node_rank(info.rank), node_id=place.node_id, node_ip=place.node_ip)


def _first_line(error: BaseException) -> str:
    """Ray's reason for a dead actor in one line, e.g. ``its worker process has died (SYSTEM_ERROR)``."""
    text = str(error)
    because = re.search(r"dead because (.*?)\.(?:\s|$)", text)
    kind = re.search(r"Worker exit type: (\w+)", text)
    if because is None:
        return text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return because.group(1) + (f" ({kind.group(1)})" if kind else "")


def start_ray_workers(
    config: EngineConfig,
    store_host: str,
    store_port: int,
    generation: int,
    env: dict[str, str] | None = None,
    *,
    entry: Callable[[WorkerArgs], None] | None = None,
    node_service: Callable[[RayNodeSlot], None] | None = None,
) -> RayWorkers:
    """Reserve the placement groups and start one :class:`RankActor` per rank of ``config``.

    Args:
        config: with ``model.device`` already ``cuda`` or ``cpu`` (:func:`~.ray_utils.cluster_device_type`).
        store_host, store_port: the head's TCPStore, reachable from every Ray node.
        generation: restart generation (the worker's process group lives under its own store prefix).
        env: variables for every rank (on top of what each node finds itself).
        entry: what each actor runs (default ``worker_main``).
        node_service: run once per node that holds ranks, in a ``num_cpus=0`` actor, for the generation.

    Raises:
        InsufficientResourcesError: no placement within ``--rendezvous-timeout``.
        EngineDeadError: the actors did not start (or report their place) in time.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    par = config.parallel
    tp, device_type = par.tensor_parallel_size, config.model.device
    bundle = rank_bundle(device_type)
    reservation = reserve(tp, par.pipeline_parallel_size, bundle, par.rendezvous_timeout, f"shardserve-gen{generation}")
    actor_cls = ray.remote(RankActor)
    actors = []
    for stage, pg in zip(reservation.stages, reservation.groups):
        for tp_rank in range(tp):
            strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=tp_rank)
            resources = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
            actors.append(actor_cls.options(**resources, scheduling_strategy=strategy).remote())
        logger.debug("stage %d: %d actors on %s", stage.stage, tp, stage.node_ip)
    timeout = min(ACTOR_START_TIMEOUT_S, par.rendezvous_timeout)
    try:
        places = ray.get([a.where.remote() for a in actors], timeout=timeout)
    except Exception as e:  # GetTimeoutError, or an actor that could not start
        _kill_all(actors)
        reservation.release()
        msg = f"generation {generation}: the rank actors did not start within {timeout:.0f} s: {e}"
        raise EngineDeadError(msg) from e
    local_ranks, rank_env = _device_layout(places)
    runs = []
    for rank, actor in enumerate(actors):
        args = WorkerArgs(
            config=config,
            rank=rank,
            local_rank=local_ranks[rank],
            store_host=store_host,
            store_port=store_port,
            generation=generation,
            device_type=device_type,
            log_level=logging.getLogger().getEffectiveLevel(),
            env={**rank_env[rank], **(env or {})},
        )
        runs.append(actor.run.remote(args, entry))
    workers = RayWorkers(reservation, actors, places, runs)
    if node_service is not None:
        _start_node_services(workers, node_service, generation, NodeAffinitySchedulingStrategy, timeout)
    logger.info("generation %d: %d rank actors on %d Ray node(s): %s", generation, len(actors), workers.nnodes,
                ", ".join(f"rank {r} -> {p.node_ip} pid {p.pid}" for r, p in enumerate(places)))  # fmt: skip
    return workers


def _device_layout(places: list[RayPlace]) -> tuple[list[int], list[dict[str, str]]]:
    """Per rank: its device index, and ``CUDA_VISIBLE_DEVICES`` listing every GPU of its node's ranks.

    Ray shows each GPU actor only its own GPU; peer-to-peer paths between a node's ranks (NCCL's NVLink
    transport, the one-shot all-reduce) need them all visible, so each actor sees its node's GPUs and picks
    its own by index (as vLLM's Ray executor does). On CPUs: index 0, nothing set.
    """
    by_node: dict[str, list[str]] = {}
    for p in places:
        by_node.setdefault(p.node_id, []).extend(p.gpu_ids)
    local, env = [], []
    for p in places:
        gpus = sorted(set(by_node[p.node_id]), key=lambda g: (len(g), g))
        if p.gpu_ids:
            local.append(gpus.index(p.gpu_ids[0]))
            env.append({"CUDA_VISIBLE_DEVICES": ",".join(gpus)})
        else:
            local.append(0)
            env.append({})
    return local, env


def _start_node_services(workers: RayWorkers, service, generation: int, affinity, timeout: float) -> None:
    """One ``num_cpus=0`` :class:`NodeActor` pinned to each node that holds ranks, running ``service(slot)``."""
    import ray

    node_cls = ray.remote(NodeActor)
    slots = []
    for node_id, index in workers.node_index.items():
        ranks = [r for r, p in enumerate(workers.places) if p.node_id == node_id]
        slots.append(RayNodeSlot(index, node_id, workers.places[ranks[0]].node_ip, ranks, generation))
        actor = node_cls.options(num_cpus=0, scheduling_strategy=affinity(node_id=node_id, soft=False)).remote()
        workers.node_actors.append(actor)
    workers.node_places = ray.get([a.where.remote() for a in workers.node_actors], timeout=timeout)
    workers._node_runs = [a.run.remote(service, slot) for a, slot in zip(workers.node_actors, slots)]


def _kill_all(actors: list) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # never started
            logger.debug("ray.kill failed", exc_info=True)


class RayExecutor(MultiprocExecutor):
    """``MultiprocExecutor`` whose ranks are Ray actors placed by :func:`start_ray_workers`.

    The head (this process) hosts the TCPStore on its Ray node's address and joins the control world as
    with ``mp``. On a restart the placement is made again, so a generation may land on other nodes.
    """

    def __init__(self, config: EngineConfig, store_port: int, generation: int = 0, env: dict[str, str] | None = None):
        node_ip = connect()
        config.model.device = cluster_device_type(config.model.device)  # the head's groups follow the ranks
        _set_head_network(node_ip)
        logger.info("Ray backend: head at %s, ranks on %s", node_ip, "GPUs" if config.model.device == "cuda" else "CPU")
        super().__init__(config, node_ip, store_port, generation=generation, env=env)

    def _spawn_workers(self) -> RayWorkers:
        try:
            return start_ray_workers(self.config, self.store_host, self.store_port, self.generation, self.env)
        except InsufficientResourcesError as e:
            if self.generation == 0:
                raise
            raise EngineDeadError(f"generation {self.generation}: {e}") from e

    def rank_info(self) -> list[RankInfo]:
        return [self.workers.overlay(info) for info in super().rank_info()]

    def _node_of(self, rank: int) -> int:
        return self.workers.node_rank(rank)


def _set_head_network(node_ip: str) -> None:
    """GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME for the head itself: the interface of its Ray node address
    (variables already set are kept; ``shardserve serve`` has set them for that address already)."""
    from shardserve.distributed.netconf import network_env

    net_env, notes = network_env(node_ip, os.environ)
    for note in notes:
        logger.debug("head network: %s", note)
    os.environ.update(net_env)
