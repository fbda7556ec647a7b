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


SLURM_WITH_WORLD_SIZE = {
    "SLURM_JOB_ID": "734512",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_TASKS_PER_NODE": "1(x2)",
    "SLURM_JOB_NODELIST": "node[01-02]",
    "WORLD_SIZE": "16",  # exported by the sbatch script for its own tools
    "RANK": "0",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "8",
}
TORCHRUN_2X8 = {"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "j"}  # fmt: skip


def dry_run(args, env):
    from typer.testing import CliRunner

    from shardserve.cli import app

    clean = {k: None for k in (*SLURM_WITH_WORLD_SIZE, *TORCHRUN_2X8, "MASTER_ADDR", "MASTER_PORT")}
    return CliRunner().invoke(app, ["serve", "--dry-run", "--device", "cpu", *args], env={**clean, **env})


def test_slurm_with_world_size_dry_run_gives_two_nodes_and_master_node01():
    result = dry_run(["-tp", "1", "-pp", "2"], SLURM_WITH_WORLD_SIZE)
    assert result.exit_code == 0, result.output
    assert "source:            slurm" in result.output
    assert "nodes:             2 (this node: rank 0" in result.output
    assert "master:            node01:" in result.output and "PROBLEM" not in result.output


def test_dry_run_exits_non_zero_on_a_problem_and_names_where_the_nodes_came_from():
    result = dry_run([], TORCHRUN_2X8)  # no -tp: TP x PP = 1 does not split over torchrun's 2 nodes
    assert result.exit_code == 1 and "PROBLEM:" in result.output
    assert "2 node(s) (from torchrun)" in result.output and "--nnodes" not in result.output
    assert dry_run(["-tp", "3", "-pp", "2"], TORCHRUN_2X8).exit_code == 0
    bad_model = dry_run(["-tp", "2"], {})
    assert bad_model.exit_code == 1 and "PROBLEM: --tensor-parallel-size 2 does not fit" in bad_model.output
    missing = dry_run(["./no-such-model.gguf"], {})
    assert missing.exit_code == 1 and "not found" in missing.output
