"""The --dry-run report names the ranks, the master, the network choices and the problems."""

from __future__ import annotations

from shardserve.distributed.dry_run import describe_launch
from shardserve.distributed.launch import discover_launch


def launch_for(env, **flags):
    return discover_launch(env, **{**dict(nnodes=None, node_rank=None, master_addr=None, master_port=None), **flags})


def test_report_lists_this_nodes_ranks_and_settings():
    launch = launch_for({}, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29555)
    report = describe_launch(
        launch,
        tp=4,
        pp=2,
        net_env={"NCCL_SOCKET_IFNAME": "=eth0"},
        net_notes=["route to master 10.0.0.1 leaves through eth0"],
    )
    assert "10.0.0.1:29555" in report
    assert "world size:        8 = TP 4 x PP 2" in report
    assert "ranks per node:    4" in report and "this node's ranks: 4..7" in report
    # Global rank = pp_stage * TP + tp_rank: rank 6 is stage 1, TP rank 2.
    assert "rank 6: pp stage 1, tp rank 2" in report
    assert "NCCL_SOCKET_IFNAME==eth0" in report and "leaves through eth0" in report
    assert "PROBLEM" not in report


def test_report_shows_problems_and_non_leaders_instead_of_raising():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "4",
        "WORLD_SIZE": "8",
        "GROUP_RANK": "0",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    report = describe_launch(launch_for(env), tp=4, pp=1, net_env={}, net_notes=[])
    assert "PROBLEM:" in report and "inside a node" in report
    assert "not the node leader" in report
    assert "torchrun" in report
