"""Plain-text launch report for ``shardserve serve --dry-run``: what this node would do, and why."""

from __future__ import annotations

from collections.abc import Sequence

from shardserve.distributed.launch import LaunchInfo, check_topology


def describe_launch(
    launch: LaunchInfo,
    tp: int,
    pp: int,
    net_env: dict[str, str],
    net_notes: list[str],
    problems: Sequence[str] = (),
) -> str:
    """Report of the launch as this node sees it.

    Lists world size, ranks per node, this node's global ranks with their (PP stage, TP rank),
    the master, the network variables to be set and every note from discovery. A topology that
    cannot work (e.g. a TP group spanning two nodes) is reported as a ``PROBLEM:`` line rather
    than raised, so the dry run shows everything at once (``serve --dry-run`` then exits 1).

    Args:
        launch: from :func:`shardserve.distributed.launch.discover_launch`.
        tp, pp: tensor and pipeline parallel sizes.
        net_env, net_notes: from :func:`shardserve.distributed.netconf.network_env`.
        problems: other problems found (configuration, model layout), listed as ``PROBLEM:`` lines too.
    """
    world = tp * pp
    lines = [
        "shardserve launch (dry run)",
        f"  source:            {launch.source}",
        f"  nodes:             {launch.nnodes} (this node: rank {launch.node_rank}"
        f"{', head, serves HTTP' if launch.node_rank == 0 else ''})",
        f"  world size:        {world} = TP {tp} x PP {pp}",
        f"  master:            {launch.master_addr}:{launch.master_port if launch.master_port else '<free port>'}",
    ]
    if not launch.is_node_leader:
        lines.append(f"  role:              local rank {launch.local_rank}: not the node leader, would exit")
    topo_problems, topo_notes = launch_problems(launch, tp, pp)
    if not topo_problems:
        rpn = world // launch.nnodes
        ranks = launch.global_ranks(world)
        lines.append(f"  ranks per node:    {rpn}")
        lines.append(f"  this node's ranks: {ranks.start}..{ranks.stop - 1}")
        lines.extend(f"    rank {r}: pp stage {r // tp}, tp rank {r % tp}" for r in ranks)
    lines.append("  network:")
    lines.extend(f"    {k}={v}" for k, v in sorted(net_env.items()))
    if not net_env:
        lines.append("    (nothing to set)")
    lines.extend(f"    - {note}" for note in net_notes)
    notes = launch.notes + topo_notes
    if notes:
        lines.append("  notes:")
        lines.extend(f"    - {note}" for note in notes)
    lines.extend(f"PROBLEM: {p}" for p in [*topo_problems, *problems])
    return "\n".join(lines)


def launch_problems(launch: LaunchInfo, tp: int, pp: int) -> tuple[list[str], list[str]]:
    """(problems, notes) of :func:`check_topology`: the error as a problem instead of raised."""
    try:
        return [], check_topology(launch, tp, pp)
    except ValueError as exc:
        return [str(exc)], []
