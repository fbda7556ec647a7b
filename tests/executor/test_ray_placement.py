"""The Ray backend's placement planner (pure): every TP group on one node, stages spread, shortages named."""

from __future__ import annotations

import pytest

from shardserve.executor.ray_utils import (
    InsufficientResourcesError,
    RayNode,
    describe_shortage,
    plan_placement,
    rank_bundle,
)

GPU = rank_bundle("cuda")
CPU = rank_bundle("cpu")


def node(i: int, free: float, total: float | None = None, kind: str = "GPU") -> RayNode:
    return RayNode(f"{i:02d}" + "ab" * 27, f"10.0.0.{i}", {kind: total if total is not None else free}, {kind: free})


def test_lambda_guide_layout_tp8_pp4_puts_one_stage_on_each_8_gpu_node():
    nodes = [node(i, 8) for i in range(1, 5)]
    plan = plan_placement(8, 4, nodes, GPU)
    assert [s.node_ip for s in plan] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    assert all(s.bundles == [{"GPU": 1.0}] * 8 for s in plan)
    assert [s.stage for s in plan] == [0, 1, 2, 3]


def test_stages_spread_even_when_the_first_node_could_hold_them_all():
    nodes = [node(1, 16), node(2, 8), node(3, 8)]
    assert [s.node_ip for s in plan_placement(4, 3, nodes, GPU)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_stages_share_a_node_when_that_is_the_only_room():
    nodes = [node(1, 16), node(2, 2)]
    plan = plan_placement(8, 2, nodes, GPU)
    assert [s.node_ip for s in plan] == ["10.0.0.1", "10.0.0.1"]


def test_more_stages_than_nodes_are_spread_evenly():
    nodes = [node(1, 8), node(2, 8)]
    assert [s.node_ip for s in plan_placement(2, 4, nodes, GPU)] == ["10.0.0.1", "10.0.0.2"] * 2


def test_a_tp_group_is_never_split_across_nodes():
    """8 GPUs free in all, but no node has the 4 a TP group needs."""
    nodes = [node(i, 2) for i in range(1, 5)]
    with pytest.raises(InsufficientResourcesError) as err:
        plan_placement(4, 1, nodes, GPU)
    msg = str(err.value)
    assert "cannot place TP 4 x PP 1 = 4 ranks" in msg
    assert "each pipeline stage needs 4 GPU on one node" in msg and "only 0 of the 1 stages fit" in msg
    for i in range(1, 5):
        assert f"node {i:02d}ababab (10.0.0.{i}): 2/2 GPU free -> 0 stages" in msg
    assert "missing: 4 GPU on one node for each of 1 more stage(s)" in msg


def test_the_message_counts_what_fits_and_what_is_used_elsewhere():
    nodes = [node(1, 8), node(2, 3, total=8)]  # 5 GPUs of node 2 held by something else
    with pytest.raises(InsufficientResourcesError) as err:
        plan_placement(8, 2, nodes, GPU)
    msg = str(err.value)
    assert "only 1 of the 2 stages fit" in msg
    assert "(10.0.0.1): 8/8 GPU free -> 1 stage\n" in msg and "(10.0.0.2): 3/8 GPU free -> 0 stages" in msg


def test_a_cpu_cluster_uses_cpu_bundles_and_ignores_gpus():
    nodes = [node(1, 2, kind="CPU"), node(2, 1, kind="CPU")]
    plan = plan_placement(1, 2, nodes, CPU)
    assert [(s.node_ip, s.bundles) for s in plan] == [("10.0.0.1", [{"CPU": 1.0}]), ("10.0.0.2", [{"CPU": 1.0}])]
    with pytest.raises(InsufficientResourcesError, match="0/0 GPU free"):
        plan_placement(1, 1, nodes, GPU)


def test_fractional_free_resources_as_ray_reports_them_still_fit():
    nodes = [RayNode("a" * 56, "10.0.0.1", {"GPU": 2.0}, {"GPU": 1.9999999999})]
    assert len(plan_placement(2, 1, nodes, GPU)) == 1


def test_no_alive_node_is_said_so():
    assert "(no alive Ray node)" in describe_shortage(1, 1, [], GPU)
