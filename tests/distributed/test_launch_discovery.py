"""discover_launch on environments as each scheduler writes them (torch elastic, Slurm, Open MPI,
training-operator, RunAI, LeaderWorkerSet)."""

from __future__ import annotations

import pytest

from shardserve.distributed.launch import (
    DEFAULT_MASTER_PORT,
    LaunchInfo,
    check_topology,
    discover_launch,
    expand_hostlist,
    first_host,
)

NO_FLAGS = dict(nnodes=None, node_rank=None, master_addr=None, master_port=None)
K8S = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_PORT": "tcp://10.96.0.1:443", "HOSTNAME": "pod-x"}


def discover(env: dict[str, str], **flags) -> LaunchInfo:
    return discover_launch(env, **{**NO_FLAGS, **flags})


def torchrun_env(rank: int, local_rank: int, nnodes: int, nproc: int, agent_store: bool = False) -> dict[str, str]:
    """What torch.distributed.elastic's LocalElasticAgent puts in each worker's environment."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "GROUP_RANK": str(rank // nproc),
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "LOCAL_WORLD_SIZE": str(nproc),
        "WORLD_SIZE": str(nnodes * nproc),
        "GROUP_WORLD_SIZE": str(nnodes),
        "ROLE_WORLD_SIZE": str(nnodes * nproc),
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "job42",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_USE_AGENT_STORE": str(agent_store),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }


# --------------------------------------------------------------------------- torchrun


def test_torchrun_single_node():
    leader = discover(torchrun_env(rank=0, local_rank=0, nnodes=1, nproc=4))
    other = discover(torchrun_env(rank=3, local_rank=3, nnodes=1, nproc=4))
    assert (leader.source, leader.nnodes, leader.node_rank) == ("torchrun", 1, 0)
    assert leader.is_node_leader and not other.is_node_leader
    assert leader.procs_per_node_hint == 4


def test_torchrun_multi_node_counts_processes_not_nodes():
    # 2 nodes x 8 GPUs: WORLD_SIZE=16 counts processes; global rank 9 is local rank 1 of node 1.
    info = discover(torchrun_env(rank=9, local_rank=1, nnodes=2, nproc=8))
    assert (info.nnodes, info.node_rank, info.master_addr) == (2, 1, "10.0.0.1")
    assert not info.is_node_leader and info.local_rank == 1
    leader = discover(torchrun_env(rank=8, local_rank=0, nnodes=2, nproc=8))
    assert leader.is_node_leader and leader.node_rank == 1
    assert leader.master_port == 29400


def test_torchrun_node_rank_from_rank_without_group_rank():
    env = torchrun_env(rank=13, local_rank=1, nnodes=4, nproc=4)
    del env["GROUP_RANK"]
    assert discover(env).node_rank == 3


def test_torchrun_agent_store_port_is_avoided_consistently():
    # The elastic agent's TCPStore keeps MASTER_PORT busy; every node must pick the same other port.
    ports = {discover(torchrun_env(r, r % 2, 2, 2, agent_store=True)).master_port for r in range(4)}
    assert len(ports) == 1 and ports.pop() != 29400


def test_torchrun_inside_kubeflow_pod_wins_over_pod_variables():
    # torchrun started by a RunAI/Kubeflow pod: its children inherit the pod-level WORLD_SIZE/RANK
    # meaning, but torchrun overwrote them with process counts, and LOCAL_* are present.
    env = {**K8S, "RUNAI_JOB_NAME": "x", "PET_NNODES": "2", "PET_NODE_RANK": "1", **torchrun_env(6, 2, 2, 4)}
    info = discover(env)
    assert (info.source, info.nnodes, info.node_rank, info.is_node_leader) == ("torchrun", 2, 1, False)


def test_torchrun_uneven_world_raises():
    env = torchrun_env(rank=0, local_rank=0, nnodes=1, nproc=4)
    env["WORLD_SIZE"] = "6"
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        discover(env)


# --------------------------------------------------------------------------- Slurm


def slurm_env(nodeid: int, localid: int = 0, nnodes: int = 2, tasks_per_node: int = 1) -> dict[str, str]:
    ntasks = nnodes * tasks_per_node
    return {
        "SLURM_JOB_ID": "734512",
        "SLURM_JOBID": "734512",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(nodeid * tasks_per_node + localid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_NNODES": str(nnodes),
        "SLURM_JOB_NUM_NODES": str(nnodes),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NPROCS": str(ntasks),
        "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x{nnodes})",
        "SLURM_JOB_NODELIST": "gpu[01-04,07]",
        "SLURM_NODELIST": "gpu[01-04,07]",
        "SLURM_STEP_NODELIST": "gpu[01-02]",
        "SLURMD_NODENAME": f"gpu0{nodeid + 1}",
    }


def test_slurm_bracketed_nodelist_gives_first_host_as_master():
    info = discover(slurm_env(nodeid=1))
    assert (info.source, info.nnodes, info.node_rank, info.master_addr) == ("slurm", 2, 1, "gpu01")
    assert info.is_node_leader and info.procs_per_node_hint is None


def test_slurm_job_nodelist_when_no_step_nodelist():
    env = slurm_env(nodeid=0)
    del env["SLURM_STEP_NODELIST"]
    env["SLURM_JOB_NODELIST"] = "node-b[7,3],node-a1"
    assert discover(env).master_addr == "node-b7"


def test_slurm_port_is_the_same_on_every_node_and_master_addr_env_wins():
    a, b = discover(slurm_env(0)), discover(slurm_env(1))
    assert a.master_port == b.master_port and a.master_port is not None
    env = {**slurm_env(1), "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "6000"}
    info = discover(env)
    assert (info.master_addr, info.master_port) == ("10.9.9.9", 6000)


def test_slurm_several_tasks_per_node():
    info = discover(slurm_env(nodeid=1, localid=3, tasks_per_node=4))
    assert (info.nnodes, info.node_rank, info.procs_per_node_hint) == (2, 1, 4)
    assert not info.is_node_leader


def test_slurm_batch_script_without_step_is_flagged():
    env = slurm_env(0)
    del env["SLURM_STEP_ID"]
    assert any("srun" in note for note in discover(env).notes)


@pytest.mark.parametrize("local_world_size", [None, "8", "16"])
def test_slurm_wins_over_generic_world_size_and_rank(local_world_size):
    # sbatch scripts often export WORLD_SIZE/RANK (and LOCAL_*) by hand; Slurm's own variables win.
    env = {**slurm_env(nodeid=0), "SLURM_STEP_NODELIST": "node[01-02]", "WORLD_SIZE": "16", "RANK": "0",
           "LOCAL_RANK": "0"}  # fmt: skip
    if local_world_size is not None:
        env["LOCAL_WORLD_SIZE"] = local_world_size
    info = discover(env)
    assert (info.source, info.nnodes, info.node_rank, info.master_addr) == ("slurm", 2, 0, "node01")


def test_generic_local_variables_without_a_scheduler_read_as_torchrun():
    env = {"RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16", "MASTER_ADDR": "10.0.0.1"}
    info = discover(env)
    assert (info.source, info.nnodes, info.node_rank, info.is_node_leader) == ("env", 2, 1, False)


def test_slurm_nodeid_out_of_range_raises():
    env = slurm_env(nodeid=0)
    env["SLURM_NODEID"] = "2"
    with pytest.raises(ValueError, match="node rank 2 is out of range for 2"):
        discover(env)


@pytest.mark.parametrize(
    "hostlist, expected",
    [
        # Examples as `scontrol show hostnames` expands them.
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("tux[8-10]", ["tux8", "tux9", "tux10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
        ("single", ["single"]),
    ],
)
def test_expand_hostlist(hostlist, expected):
    assert list(expand_hostlist(hostlist)) == expected
    assert first_host(hostlist) == expected[0]


@pytest.mark.parametrize("bad", ["gpu[01-04", "gpu[a-b]", "gpu]01["])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        list(expand_hostlist(bad))


# --------------------------------------------------------------------------- Open MPI


def ompi_env(rank: int, size: int, local_size: int) -> dict[str, str]:
    return {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % local_size),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
        "OMPI_COMM_WORLD_NODE_RANK": str(rank // local_size),
        "OMPI_UNIVERSE_SIZE": str(size),
        "PMIX_RANK": str(rank),
    }


def test_openmpi_one_per_gpu_with_master_env():
    info = discover({**ompi_env(rank=5, size=8, local_size=4), "MASTER_ADDR": "10.0.0.5"})
    assert (info.source, info.nnodes, info.node_rank, info.master_addr) == ("openmpi", 2, 1, "10.0.0.5")
    assert not info.is_node_leader and info.procs_per_node_hint == 4


def test_openmpi_one_per_node_needs_a_master():
    env = ompi_env(rank=1, size=3, local_size=1)
    with pytest.raises(ValueError, match="--master-addr"):
        discover(env)
    info = discover(env, master_addr="head.cluster")
    assert (info.nnodes, info.node_rank, info.master_addr, info.is_node_leader) == (3, 1, "head.cluster", True)
    assert info.master_port == DEFAULT_MASTER_PORT


# --------------------------------------------------------------------------- Kubernetes


def test_kubeflow_pytorchjob_world_size_counts_pods():
    # training-operator < 1.7: WORLD_SIZE = replicas (pods), RANK = pod index (worker i -> i + 1).
    env = {
        **K8S,
        "PYTHONUNBUFFERED": "0",
        "MASTER_ADDR": "llm-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "3",
        "RANK": "2",
    }
    info = discover(env)
    assert (info.source, info.nnodes, info.node_rank) == ("kubeflow", 3, 2)
    assert (info.master_addr, info.master_port, info.is_node_leader) == ("llm-master-0", 23456, True)


def test_kubeflow_new_operator_uses_pet_variables():
    # training-operator >= 1.7 with nprocPerNode=4: WORLD_SIZE = pods x nproc, RANK = pod index.
    env = {
        **K8S,
        "MASTER_ADDR": "llm-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "8",
        "RANK": "1",
        "PET_NPROC_PER_NODE": "4",
        "PET_NODE_RANK": "1",
        "PET_NNODES": "2",
    }
    info = discover(env)
    assert (info.source, info.nnodes, info.node_rank) == ("kubeflow", 2, 1)


def test_kubeflow_elastic_range_needs_fixed_nnodes():
    env = {**K8S, "MASTER_ADDR": "m", "PET_NNODES": "1:4", "PET_NODE_RANK": "0", "WORLD_SIZE": "4", "RANK": "0"}
    with pytest.raises(ValueError, match="elastic"):
        discover(env)
    info = discover(env, nnodes=2, node_rank=0, master_addr="m")
    assert info.nnodes == 2 and any("ignored" in n for n in info.notes)


def test_runai_submit_dist_world_size_4_rank_2_means_pod_2_of_4():
    # RCP guide: "WORLD_SIZE: Number of pods ... RANK: Rank of the pod".
    env = {
        **K8S,
        "RUNAI_JOB_NAME": "my_first_distributed_app",
        "JOB_UUID": "4f1c",
        "MASTER_ADDR": "my-first-distributed-app-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "4",
        "RANK": "2",
    }
    info = discover(env)
    assert (info.source, info.nnodes, info.node_rank) == ("runai", 4, 2)
    assert info.master_addr == "my-first-distributed-app-master-0"
    assert info.procs_per_node_hint is None and info.is_node_leader
    assert any("pods" in note for note in info.notes)


def test_lws_leader_and_worker():
    base = {**K8S, "LWS_LEADER_ADDRESS": "llm-0.llm.default", "LWS_GROUP_SIZE": "4"}
    worker = discover({**base, "LWS_WORKER_INDEX": "3"})
    leader = discover({**base, "LWS_WORKER_INDEX": "0"})
    assert (worker.source, worker.nnodes, worker.node_rank, worker.master_addr) == ("lws", 4, 3, "llm-0.llm.default")
    assert leader.node_rank == 0
    assert worker.master_port == leader.master_port is not None


# --------------------------------------------------------------------------- flags and fallbacks


def test_flags_override_environment():
    info = discover(slurm_env(nodeid=1), nnodes=4, node_rank=2, master_addr="10.1.1.1", master_port=1234)
    assert (info.source, info.nnodes, info.node_rank, info.master_addr, info.master_port) == (
        "flags",
        4,
        2,
        "10.1.1.1",
        1234,
    )
    assert any("--nnodes 4 overrides 2" in note for note in info.notes)


def test_flags_only():
    info = discover({}, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=None)
    assert (info.source, info.nnodes, info.node_rank, info.master_port) == ("flags", 2, 1, DEFAULT_MASTER_PORT)


def test_single_node_default():
    info = discover({"HOME": "/root", "PATH": "/usr/bin"})
    assert (info.source, info.nnodes, info.node_rank, info.master_addr) == ("single", 1, 0, "127.0.0.1")
    assert info.is_node_leader and info.master_port is None


def test_bare_world_size_without_markers_is_not_guessed():
    info = discover({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "10.0.0.1"})
    assert info.nnodes == 1 and any("--nnodes" in note for note in info.notes)


@pytest.mark.parametrize(
    "flags, match",
    [
        (dict(nnodes=2, node_rank=2, master_addr="h"), "out of range"),
        (dict(nnodes=2, master_addr="h"), "--node-rank"),
        (dict(nnodes=2, node_rank=1), "--master-addr"),
        (dict(nnodes=1, node_rank=0, master_port=70000), "TCP port"),
    ],
)
def test_contradictions_raise(flags, match):
    with pytest.raises(ValueError, match=match):
        discover({}, **flags)


def test_global_ranks_and_topology_checks():
    info = discover({}, nnodes=2, node_rank=1, master_addr="h")
    assert list(info.global_ranks(8)) == [4, 5, 6, 7]
    check_topology(info, 4, 2)  # TP 4 stays in one node
    with pytest.raises(ValueError, match="inside a node"):
        check_topology(info, 4, 1)  # 2 ranks per node cannot hold a TP group of 4
    with pytest.raises(ValueError, match="does not split over --nnodes 2"):
        check_topology(info, 3, 1)
    per_gpu = discover(torchrun_env(rank=0, local_rank=0, nnodes=2, nproc=8))
    assert check_topology(per_gpu, 4, 2)  # 8 processes started per node, 4 used -> a note
