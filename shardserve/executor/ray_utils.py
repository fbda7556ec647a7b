"""Ray backend, part 1: connecting to the cluster and deciding where each rank runs.

``--distributed-executor-backend ray`` runs the T x P ranks as Ray actors on a cluster the user already
started (``ray start --head`` on one node, ``ray start --address HEAD:6379`` on the others). Each rank
takes one bundle of a placement group: ``{"GPU": 1}`` on GPUs, ``{"CPU": 1}`` on a CPU cluster. Every
pipeline stage (one TP group) gets its own placement group of T bundles on one Ray node (STRICT_PACK,
pinned to the node with ``bundle_label_selector`` on Ray's ``ray.io/node-id`` label); the stages are
spread over the nodes: each stage goes to the node holding the fewest stages so far that still has room.

:func:`plan_placement` is a pure function of the cluster's free resources; :func:`reserve` asks Ray for
the groups and waits for them within a bound, and :class:`InsufficientResourcesError` says, in the
manner of ``ray status``, what each node has against what the layout needs. ``ray`` is imported only
inside the functions that need it (it is the optional ``[ray]`` extra).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"
"""Label every Ray node carries with its node id (Ray's default labels); pins a stage's bundles to a node."""
PLACEMENT_POLL_S = 2.0
"""How long one reservation attempt waits before the cluster is read again and the plan redone (seconds)."""


class InsufficientResourcesError(RuntimeError):
    """The Ray cluster cannot hold the layout: too few nodes with room for a TP group."""


def rank_bundle(device_type: str) -> dict[str, float]:
    """Resources of one rank: one GPU on ``cuda``, one CPU on ``cpu``."""
    return {"GPU": 1.0} if device_type == "cuda" else {"CPU": 1.0}


@dataclass
class RayNode:
    """One alive Ray node and its resources (Ray's units: counts of CPUs and GPUs, bytes of memory)."""

    node_id: str
    """Ray's hex node id."""
    ip: str
    """The node's address in the cluster (``NodeManagerAddress``)."""
    total: dict[str, float]
    available: dict[str, float] = field(default_factory=dict)

    def short(self) -> str:
        return f"node {self.node_id[:8]} ({self.ip})"


@dataclass
class StagePlacement:
    """Where one pipeline stage (one TP group) runs."""

    stage: int
    node_id: str
    node_ip: str
    bundles: list[dict[str, float]]
    """One bundle per TP rank, in TP-rank order."""


def plan_placement(
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    nodes: Sequence[RayNode],
    bundle: dict[str, float],
) -> list[StagePlacement]:
    """Place each pipeline stage's TP group of ``tensor_parallel_size`` bundles on one node.

    Stages are spread: stage ``s`` goes to the node with the fewest stages so far among those whose free
    resources still hold a whole TP group (ties: the earlier node in ``nodes``; put the driver's node
    first to give it stage 0). The groups are identical, so this fits whenever
    ``sum over nodes of floor(free / group need) >= pipeline_parallel_size`` does.

    Args:
        tensor_parallel_size, pipeline_parallel_size: T and P.
        nodes: alive nodes with their ``available`` resources.
        bundle: one rank's resources, e.g. ``{"GPU": 1.0}`` (:func:`rank_bundle`).

    Returns:
        ``pipeline_parallel_size`` placements, by stage.

    Raises:
        InsufficientResourcesError: fewer than P TP groups fit; the message lists needed vs available
            per node.
    """
    need = {k: v * tensor_parallel_size for k, v in bundle.items()}
    free = [dict(n.available) for n in nodes]
    stages_on = [0] * len(nodes)
    plan = []
    for stage in range(pipeline_parallel_size):
        fitting = [i for i in range(len(nodes)) if _groups_that_fit(free[i], need) >= 1]
        if not fitting:
            raise InsufficientResourcesError(
                describe_shortage(tensor_parallel_size, pipeline_parallel_size, nodes, bundle, placed=stage)
            )
        i = min(fitting, key=lambda j: (stages_on[j], j))
        for k, v in need.items():
            free[i][k] = free[i].get(k, 0.0) - v
        stages_on[i] += 1
        plan.append(StagePlacement(stage, nodes[i].node_id, nodes[i].ip, [dict(bundle)] * tensor_parallel_size))
    return plan


def _groups_that_fit(free: dict[str, float], need: dict[str, float]) -> int:
    # A tiny epsilon: Ray reports fractional resources as floats (0.9999999 free of 1.0).
    return min(math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in need.items())


def describe_shortage(
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    nodes: Sequence[RayNode],
    bundle: dict[str, float],
    placed: int | None = None,
) -> str:
    """What the layout needs against what each node has, in the manner of ``ray status``.

    Example::

        cannot place TP 2 x PP 2 = 4 ranks on the Ray cluster: each pipeline stage needs 2.0 CPU on one node
        (its TP group of 2 ranks x 1.0 CPU), and only 1 of the 2 stages fit:
          node 6f1c2a3b (10.0.0.1): 1.0/2.0 CPU free -> 0 stages
          node 31eb2bd6 (10.0.0.2): 2.0/2.0 CPU free -> 1 stage
        missing: 2.0 CPU on one node for each of 1 more stage; add nodes, free resources or lower -tp/-pp
    """
    need = {k: v * tensor_parallel_size for k, v in bundle.items()}
    fits = [_groups_that_fit(n.available, need) for n in nodes]
    placed = min(sum(fits), pipeline_parallel_size) if placed is None else placed
    need_text = ", ".join(f"{v:g} {k}" for k, v in need.items())
    per_rank = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    lines = [
        f"cannot place TP {tensor_parallel_size} x PP {pipeline_parallel_size} = "
        f"{tensor_parallel_size * pipeline_parallel_size} ranks on the Ray cluster: each pipeline stage needs "
        f"{need_text} on one node (its TP group of {tensor_parallel_size} ranks x {per_rank}), and only "
        f"{placed} of the {pipeline_parallel_size} stages fit:"
    ]
    for node, n_fit in zip(nodes, fits):
        have = ", ".join(f"{node.available.get(k, 0.0):g}/{node.total.get(k, 0.0):g} {k}" for k in need)
        lines.append(f"  {node.short()}: {have} free -> {n_fit} stage{'' if n_fit == 1 else 's'}")
    if not nodes:
        lines.append("  (no alive Ray node)")
    lines.append(
        f"missing: {need_text} on one node for each of {pipeline_parallel_size - placed} more stage(s); "
        "add nodes, free resources or lower -tp/-pp"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------- the cluster


def connect(address: str = "auto") -> str:
    """Join the running Ray cluster (``RAY_ADDRESS`` when set, else the local node's cluster) as a driver.

    Inside a Ray worker (a Ray Serve replica) the existing connection is used.

    Returns:
        This process's node address in the cluster: the head's store and control traffic use it.

    Raises:
        ValueError: ``ray`` is not installed, or no Ray cluster runs where ``address`` says.
    """
    try:
        import ray
    except ImportError:
        raise ValueError("--distributed-executor-backend ray needs Ray: pip install 'shardserve[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ValueError(
                f"--distributed-executor-backend ray found no running Ray cluster ({e}); start one with "
                "`ray start --head` (and `ray start --address HEAD:6379` on the other nodes), or set RAY_ADDRESS"
            ) from None
    return ray.util.get_node_ip_address()


def cluster_nodes(first_node_id: str | None = None) -> list[RayNode]:
    """The alive nodes with their total and free resources; the node ``first_node_id`` first, then by address."""
    import ray
    from ray._private import state  # free resources per node: not in Ray's public API (vLLM reads it too)

    available = state.available_resources_per_node()
    nodes = [
        RayNode(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"]), dict(available.get(n["NodeID"], {})))
        for n in ray.nodes()
        if n["Alive"]
    ]
    return sorted(nodes, key=lambda n: (n.node_id != first_node_id, n.ip, n.node_id))


@dataclass
class Reservation:
    """The placement groups of one generation, by stage."""

    stages: list[StagePlacement]
    groups: list[Any]
    """``ray.util.placement_group.PlacementGroup`` per stage."""

    def release(self) -> None:
        """Remove every placement group (their actors are killed by Ray)."""
        from ray.util import remove_placement_group

        for pg in self.groups:
            try:
                remove_placement_group(pg)
            except Exception:  # already removed, or the cluster is gone
                logger.debug("remove_placement_group failed", exc_info=True)
        self.groups = []


def reserve(
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    bundle: dict[str, float],
    timeout: float,
    name: str = "shardserve",
) -> Reservation:
    """Plan and reserve one STRICT_PACK placement group per stage, waiting at most ``timeout`` seconds.

    While the cluster lacks room the plan is redone every :data:`PLACEMENT_POLL_S` seconds (resources
    may be freed, nodes may join); a plan whose groups do not become ready within a poll is released and
    redone (a node may have died in between).

    Raises:
        InsufficientResourcesError: no placement within ``timeout``; the message is the last shortage
            seen (``ray status``-style, see :func:`describe_shortage`).
    """
    import ray
    from ray.util.placement_group import placement_group

    deadline = time.monotonic() + timeout
    driver_node = ray.get_runtime_context().get_node_id()
    warned = False
    while True:
        nodes = cluster_nodes(driver_node)
        try:
            stages = plan_placement(tensor_parallel_size, pipeline_parallel_size, nodes, bundle)
        except InsufficientResourcesError as e:
            if time.monotonic() + PLACEMENT_POLL_S > deadline:
                raise InsufficientResourcesError(f"{e}\n(waited {timeout:.0f} s, --rendezvous-timeout)") from None
            if not warned:
                logger.warning("waiting up to %.0f s for the Ray cluster:\n%s", timeout, e)
                warned = True
            time.sleep(PLACEMENT_POLL_S)
            continue
        groups = [
            placement_group(s.bundles, strategy="STRICT_PACK", name=f"{name}-stage{s.stage}",
                            bundle_label_selector=[{NODE_ID_LABEL: s.node_id}] * len(s.bundles))
            for s in stages
        ]  # fmt: skip
        reservation = Reservation(stages, groups)
        wait = max(0.1, min(PLACEMENT_POLL_S, deadline - time.monotonic()))
        ready, _ = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=wait)
        if len(ready) == len(groups):
            for s in stages:
                logger.info("pipeline stage %d: TP group of %d on Ray %s", s.stage, len(s.bundles),
                            next(n.short() for n in nodes if n.node_id == s.node_id))  # fmt: skip
            return reservation
        reservation.release()
        if time.monotonic() >= deadline:
            raise InsufficientResourcesError(
                describe_shortage(tensor_parallel_size, pipeline_parallel_size, cluster_nodes(driver_node), bundle)
                + f"\n(placement groups not ready after {timeout:.0f} s, --rendezvous-timeout)"
            )


def cluster_device_type(device: str) -> str:
    """``cuda`` or ``cpu`` for the ranks: as asked, or for ``auto`` ``cuda`` when any alive node has a GPU."""
    if device != "auto":
        return device
    import ray

    has_gpu = any(n["Alive"] and n["Resources"].get("GPU", 0) > 0 for n in ray.nodes())
    return "cuda" if has_gpu else "cpu"


def describe_ray_launch(
    tensor_parallel_size: int, pipeline_parallel_size: int, device: str, problems: Sequence[str] = ()
) -> str:
    """What ``shardserve serve --distributed-executor-backend ray --dry-run`` prints: the Ray cluster's nodes with
    their free resources, and where each pipeline stage would go; a layout that does not fit, no Ray cluster,
    and each of ``problems`` (configuration, model layout) are ``PROBLEM:`` lines (nothing is reserved)."""
    lines = ["shardserve launch (dry run, Ray backend)"]
    found = _describe_placement(tensor_parallel_size, pipeline_parallel_size, device, lines)
    return "\n".join([*lines, *(f"PROBLEM: {p}" for p in [*found, *problems])])


def _describe_placement(
    tensor_parallel_size: int, pipeline_parallel_size: int, device: str, lines: list[str]
) -> list[str]:
    """Append the cluster and placement lines of :func:`describe_ray_launch`; returns the problems found."""
    try:
        head_ip = connect()
    except ValueError as e:
        return [str(e)]
    import ray

    device_type = cluster_device_type(device)
    bundle = rank_bundle(device_type)
    nodes = cluster_nodes(ray.get_runtime_context().get_node_id())
    world = tensor_parallel_size * pipeline_parallel_size
    per_rank = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    lines += [
        f"  ray cluster:       {len(nodes)} alive node(s); head (scheduler, HTTP) on this node, {head_ip}",
        f"  world size:        {world} = TP {tensor_parallel_size} x PP {pipeline_parallel_size}, one Ray actor per "
        f"rank ({per_rank} each)",
        "  nodes:",
    ]
    lines += [f"    {n.short()}: " + ", ".join(f"{n.available.get(k, 0.0):g}/{n.total.get(k, 0.0):g} {k} free"
                                                for k in bundle) for n in nodes]  # fmt: skip
    try:
        plan = plan_placement(tensor_parallel_size, pipeline_parallel_size, nodes, bundle)
    except InsufficientResourcesError as e:
        return [str(e)]
    lines.append("  placement (STRICT_PACK per stage):")
    by_id = {n.node_id: n for n in nodes}
    for s in plan:
        first = s.stage * tensor_parallel_size
        lines.append(
            f"    pp stage {s.stage}, ranks {first}..{first + tensor_parallel_size - 1}: {by_id[s.node_id].short()}"
        )
    lines.append("  network:           found by each rank on its own node (route to the head, RDMA devices)")
    return []
