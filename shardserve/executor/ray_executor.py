"""Ray backend, part 2: one Ray actor per rank and one relay actor per node, supervised like worker processes.

A generation starts in three moves (:meth:`RayExecutor._launch`):

1. :func:`place_ray_workers` reserves the placement groups (:mod:`shardserve.executor.ray_utils`), creates a
   :class:`RankActor` in each bundle and a :class:`NodeActor` (``num_cpus=0``) pinned to each Ray node that
   holds ranks, and waits until every actor says where it runs;
2. the head opens a :class:`~shardserve.executor.channel.HeadChannel` with no ring of its own and one stream
   per such node, the head's node included (one path for every node), and :meth:`RayWorkers.start_relays`
   has each NodeActor start a :class:`~shardserve.executor.channel.NodeRelay` for its node's stream, which
   returns the ring it feeds;
3. :meth:`RayWorkers.run_ranks` starts the ranks: each actor finds its own node's network settings
   (``network_env``, as an ``mp`` node does), then runs the same ``worker_main(WorkerArgs)`` as a worker
   process, reading its node's ring at its position among the node's ranks (``WorkerArgs.reader_index``).

:class:`RayWorkers` has the interface of :class:`~shardserve.executor.executor.LocalWorkers` (``alive()``,
``failures()``, ``kill()``, ``stop(timeout)``): a rank actor or a relay actor that ends, or whose node dies,
is a failure, and the executor then restarts every rank as a new generation: every actor is killed, the
placement groups are released, and all are made again on the nodes alive then. The head (scheduler and
HTTP) stays in the process that started it; it is not a rank.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from shardserve.config import EngineConfig
from shardserve.executor.channel import HeadChannel, RingSpec, publish_addresses
from shardserve.executor.executor import MultiprocExecutor
from shardserve.executor.rank_info import RankInfo
from shardserve.executor.ray_actors import NodeActor, RankActor, RayPlace
from shardserve.executor.ray_utils import (
    InsufficientResourcesError,
    Reservation,
    cluster_device_type,
    connect,
    rank_bundle,
    reserve,
)
from shardserve.executor.supervisor import EngineDeadError, WorkerFailure
from shardserve.executor.worker import WorkerArgs

logger = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 120.0
"""Seconds for the actors to start and say where they are, and for the relays to start (bounded by
``--rendezvous-timeout`` too)."""
KILL_WAIT_S = 5.0
"""Seconds ``kill()`` waits for Ray to confirm that the actors are gone."""
RELAY_CLOSE_WAIT_S = 2.0
"""Seconds ``kill()`` waits for the relays to unlink their rings (a relay on a dead node never answers)."""


@dataclass
class RayNodeSlot:
    """A Ray node that holds ranks of the generation."""

    node_index: int
    """Index of the node in rank order (the node of rank 0 is 0): the ``node_rank`` of its ranks."""
    node_id: str
    node_ip: str
    ranks: list[int]
    """Global ranks on the node, ascending; a rank's position here is its reader slot in the node's ring."""


@dataclass
class RayWorkerFailure(WorkerFailure):
    """A rank actor (or a relay actor, rank -1) that ended, with Ray's reason."""

    node_ip: str = ""
    reason: str = ""

    def describe(self) -> str:
        what = f"rank {self.rank}" if self.rank >= 0 else f"the control relay of node {self.node_rank}"
        return f"{what} (Ray node {self.node_rank} at {self.node_ip}, pid {self.pid}) {self.reason}"


class RayWorkers:
    """The actors of one generation and the placement groups that hold them (made by :func:`place_ray_workers`).

    Same interface as ``LocalWorkers``: :meth:`alive`, :meth:`failures`, :meth:`kill`, :meth:`stop`.
    """

    def __init__(self, config: EngineConfig, generation: int, reservation: Reservation, actors: list,
                 places: list[RayPlace], node_actors: list, node_places: list[RayPlace]):  # fmt: skip
        self.config, self.generation, self.reservation = config, generation, reservation
        self.actors, self.places = actors, places
        """Rank actors and where they run, by rank."""
        order = list(dict.fromkeys(p.node_id for p in places))
        self.node_index = {node_id: i for i, node_id in enumerate(order)}
        """Ray node id -> node index in rank order."""
        self.nodes = [
            RayNodeSlot(i, node_id, next(p.node_ip for p in places if p.node_id == node_id),
                        [r for r, p in enumerate(places) if p.node_id == node_id])
            for i, node_id in enumerate(order)
        ]  # fmt: skip
        by_node = {p.node_id: (a, p) for a, p in zip(node_actors, node_places)}
        self.node_actors = [by_node[node_id][0] for node_id in order]
        """Relay actors, by node index."""
        self.node_places = [by_node[node_id][1] for node_id in order]
        self._runs: list = []
        """Each rank's ``run`` call, by rank (once :meth:`run_ranks` started them)."""
        self._node_runs: list = []
        """Each relay actor's ``watch`` call, by node index (once :meth:`start_relays` started them)."""
        self._ended: dict[tuple[int, int], RayWorkerFailure] = {}

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    def node_rank(self, rank: int) -> int:
        return self.node_index[self.places[rank].node_id]

    def _timeout(self) -> float:
        return min(ACTOR_START_TIMEOUT_S, self.config.parallel.rendezvous_timeout)

    # -- starting --------------------------------------------------------------------------------
    def start_relays(self, streams: dict[int, str]) -> list[RingSpec]:
        """Start each node's relay on the head's stream for it (``streams``: node index -> address).

        Returns:
            The ring each relay feeds, by node index.

        Raises:
            EngineDeadError: a relay did not start within the actor start timeout.
        """
        import ray

        refs = [actor.start_relay.remote(streams[slot.node_index], len(slot.ranks))
                for actor, slot in zip(self.node_actors, self.nodes)]  # fmt: skip
        try:
            rings = ray.get(refs, timeout=self._timeout())
        except Exception as e:  # GetTimeoutError, RayTaskError, RayActorError
            raise EngineDeadError(f"generation {self.generation}: the control relays did not start: {e}") from e
        self._node_runs = [actor.watch.remote() for actor in self.node_actors]
        return rings

    def run_ranks(self, store_host: str, store_port: int, rings: list[RingSpec], env: dict[str, str] | None = None,
                  entry: Callable[[WorkerArgs], None] | None = None) -> None:  # fmt: skip
        """Start every rank's ``run`` (returns at once): ``entry`` (default ``worker_main``) reading ``rings[node]``.

        Args:
            store_host, store_port: the head's TCPStore, reachable from every Ray node.
            rings: each node's ring, by node index (:meth:`start_relays`).
            env: variables for every rank (on top of what each node finds itself).
        """
        local_ranks, rank_env = _device_layout(self.places)
        for rank, actor in enumerate(self.actors):
            node = self.nodes[self.node_rank(rank)]
            args = WorkerArgs(
                config=self.config,
                rank=rank,
                local_rank=local_ranks[rank],
                store_host=store_host,
                store_port=store_port,
                generation=self.generation,
                device_type=self.config.model.device,
                ring=rings[node.node_index],
                log_level=logging.getLogger().getEffectiveLevel(),
                env={**rank_env[rank], **(env or {})},
                reader_index=node.ranks.index(rank),
            )
            self._runs.append(actor.run.remote(args, entry))

    # -- supervision -----------------------------------------------------------------------------
    def alive(self) -> bool:
        return not self.failures()

    def failures(self) -> list[WorkerFailure]:
        """The actors whose call has ended (cleanly: exit code 0; an exception: 1; a dead actor or node:
        ``None``, with Ray's reason), rank actors first, then relay actors."""
        import ray

        calls = [((0, r), ref) for r, ref in enumerate(self._runs)]
        calls += [((1, n), ref) for n, ref in enumerate(self._node_runs)]
        pending = [(key, ref) for key, ref in calls if key not in self._ended]
        if pending:
            ready, _ = ray.wait([ref for _, ref in pending], num_returns=len(pending), timeout=0)
            done = {r.hex() for r in ready}
            for key, ref in pending:
                if ref.hex() in done:
                    self._ended[key] = self._outcome(key, ref)
        return [self._ended[key] for key in sorted(self._ended)]

    def _outcome(self, key: tuple[int, int], ref) -> RayWorkerFailure:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        is_relay, index = key
        place = self.node_places[index] if is_relay else self.places[index]
        try:
            ray.get(ref, timeout=0)
            code, reason = 0, "exited cleanly"
        except RayTaskError as e:
            code, reason = 1, f"raised {type(e.cause).__name__}: {e.cause}"
        except RayActorError as e:
            code, reason = None, f"died: {_first_line(e)}"
        return RayWorkerFailure(-1 if is_relay else index, self.node_index.get(place.node_id, -1), place.pid, code,
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

        closing = [actor.close.remote() for actor in self.node_actors]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=RELAY_CLOSE_WAIT_S)
        _kill_all(self.actors + self.node_actors)
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


def place_ray_workers(config: EngineConfig, generation: int) -> RayWorkers:
    """Reserve the placement groups, create a :class:`RankActor` per rank and a :class:`NodeActor` per Ray node
    that holds ranks, and wait until each says where it runs (nothing runs yet: see :class:`RayWorkers`).

    Args:
        config: with ``model.device`` already ``cuda`` or ``cpu`` (:func:`~.ray_utils.cluster_device_type`).
        generation: restart generation (names the placement groups; the ranks' world lives under its prefix).

    Raises:
        InsufficientResourcesError: no placement within ``--rendezvous-timeout``.
        EngineDeadError: the actors did not start (or report their place) in time.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    par = config.parallel
    tp = par.tensor_parallel_size
    bundle = rank_bundle(config.model.device)
    reservation = reserve(tp, par.pipeline_parallel_size, bundle, par.rendezvous_timeout, f"shardserve-gen{generation}")
    rank_cls, node_cls = ray.remote(RankActor), ray.remote(NodeActor)
    resources = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
    actors = [
        rank_cls.options(**resources, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=tp_rank)).remote()
        for pg in reservation.groups
        for tp_rank in range(tp)
    ]  # fmt: skip
    # Relays take no CPU of the ranks' bundles: pinned to each stage's node, outside the placement groups.
    node_actors = [
        node_cls.options(
            num_cpus=0, max_concurrency=2, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        ).remote()
        for node_id in dict.fromkeys(s.node_id for s in reservation.stages)
    ]
    timeout = min(ACTOR_START_TIMEOUT_S, par.rendezvous_timeout)
    try:
        places = ray.get([a.where.remote() for a in actors + node_actors], timeout=timeout)
    except Exception as e:  # GetTimeoutError, or an actor that could not start
        _kill_all(actors + node_actors)
        reservation.release()
        msg = f"generation {generation}: the rank actors did not start within {timeout:.0f} s: {e}"
        raise EngineDeadError(msg) from e
    workers = RayWorkers(config, generation, reservation, actors, places[: len(actors)], node_actors,
                         places[len(actors) :])  # fmt: skip
    logger.info("generation %d: %d rank actors on %d Ray node(s): %s", generation, len(actors), workers.nnodes,
                ", ".join(f"rank {r} -> {p.node_ip} pid {p.pid}" for r, p in enumerate(workers.places)))  # fmt: skip
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


def _kill_all(actors: list) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead, never started, or its node is gone
            logger.debug("ray.kill failed", exc_info=True)


class RayExecutor(MultiprocExecutor):
    """``MultiprocExecutor`` whose ranks are Ray actors, each Ray node's ring fed by a relay actor.

    The head (this process) hosts the TCPStore and the control channel on its Ray node's address; it is not
    in the ranks' world. On a restart every actor is made again and the placement redone, so a generation
    may land on other nodes.
    """

    def __init__(self, config: EngineConfig, store_port: int, generation: int = 0, env: dict[str, str] | None = None):
        node_ip = connect()
        config.model.device = cluster_device_type(config.model.device)  # the ranks' bundles: a GPU or a CPU each
        logger.info("Ray backend: head at %s, ranks on %s", node_ip, "GPUs" if config.model.device == "cuda" else "CPU")
        super().__init__(config, node_ip, store_port, generation=generation, env=env)

    def _launch(self) -> RayWorkers:
        """Place the actors, open a channel with one stream per Ray node that holds ranks (this one included:
        every node's ring is fed by its relay, one path for all), start the relays, then the ranks."""
        try:
            workers = place_ray_workers(self.config, self.generation)
        except InsufficientResourcesError as e:
            if self.generation == 0:
                raise
            raise EngineDeadError(f"generation {self.generation}: {e}") from e
        try:
            self.channel = HeadChannel(self.store_host, 0, list(range(workers.nnodes)))
            publish_addresses(self.store, self.generation, self.channel.addresses)
            rings = workers.start_relays(self.channel.addresses.nodes)
            workers.run_ranks(self.store_host, self.store_port, rings, self.env)
        except BaseException:
            workers.kill()
            raise
        return workers

    def rank_info(self) -> list[RankInfo]:
        infos = super().rank_info()
        workers = self.workers  # a placeholder LocalWorkers while a generation starts
        return [workers.overlay(info) for info in infos] if isinstance(workers, RayWorkers) else infos

    def _node_of(self, rank: int) -> int:
        return self.workers.node_rank(rank) if isinstance(self.workers, RayWorkers) else 0
