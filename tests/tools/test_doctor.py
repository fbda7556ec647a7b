"""shardserve doctor: pure checks on synthetic facts, the CLI on this machine, and two nodes (loopback, netns)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from procs import netns_available, veth_namespaces
from typer.testing import CliRunner

from shardserve.cli import app
from shardserve.distributed.launch import LaunchInfo
from shardserve.distributed.rendezvous import free_port
from shardserve.tools.doctor import (
    FAIL,
    PASS,
    WARN,
    ModelFacts,
    NodeFacts,
    Plan,
    gpus_check,
    model_digest,
    model_match_check,
    shm_check,
    versions_match_check,
)

REPO = Path(__file__).resolve().parents[2]
EXPECTED_CHECKS = {"launch", "versions", "GPUs", "/dev/shm", "model", "model layout", "network interface", "RDMA",
                   "ephemeral port range", "master port", "all-reduce"}  # fmt: skip


def _doctor(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["doctor", *args, "--json"], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def _by_name(report: dict, node: int | None = 0) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"] if c["node"] == node}


def _facts(**over) -> NodeFacts:
    base = dict(node_rank=0, hostname="h", python="3.11.7", torch="2.5.0", cuda="12.4", driver="550.54", nccl="2.21.5",
                gpus=[], p2p=[], shm_bytes=16 << 30, model=ModelFacts(path="/m", digest="ab" * 32, size_bytes=1),
                net_env={}, net_notes=[], address="10.0.0.1", route_error="", rdma={},
                port_range=[32768, 60999])  # fmt: skip
    base.update(over)
    return NodeFacts(**base)


# ----------------------------------------------------------------------------- pure checks


def test_model_digest_ignores_mtime_and_sees_content(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(os.urandom(3 << 20))
    digest, size = model_digest(f)
    assert size == 3 << 20
    os.utime(f, (1, 1))
    assert model_digest(f)[0] == digest
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # the last MiB is hashed
    f.write_bytes(bytes(data))
    assert model_digest(f)[0] != digest
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "w.safetensors").write_bytes(b"x" * 10)
    before = model_digest(d)
    (d / "config.json").write_text('{"a": 2}')
    assert model_digest(d)[0] != before[0] and before[1] == 18


def test_versions_and_model_mismatch_fail_with_a_fix():
    same = {0: _facts(), 1: _facts(node_rank=1)}
    assert versions_match_check(same).status == PASS
    torch_differs = {0: _facts(), 1: _facts(node_rank=1, torch="2.4.1")}
    check = versions_match_check(torch_differs)
    assert check.status == FAIL and "node 1 2.4.1" in check.detail and check.fix
    driver_differs = {0: _facts(), 1: _facts(node_rank=1, driver="535.1")}
    assert versions_match_check(driver_differs).status == WARN
    other_model = {0: _facts(), 1: _facts(node_rank=1, model=ModelFacts(path="/m", digest="cd" * 32, size_bytes=1))}
    check = model_match_check(other_model)
    assert check.status == FAIL and "differs" in check.detail and check.fix


def test_gpu_count_and_shm_thresholds():
    launch = LaunchInfo(nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=None, source="single")
    gpu = {"index": 0, "name": "H100", "free_bytes": 80 << 30, "total_bytes": 80 << 30}
    plan = Plan(launch, tp=2, pp=1, device="cuda")
    check = gpus_check(_facts(gpus=[gpu]), plan)
    assert check.status == FAIL and "1 GPU(s)" in check.detail and "2 rank(s)" in check.detail
    assert gpus_check(_facts(gpus=[gpu, {**gpu, "index": 1}]), plan).status == PASS
    small = shm_check(_facts(shm_bytes=64 << 20))
    assert small.status == WARN and "--shm-size" in small.fix
    assert shm_check(_facts(shm_bytes=2 << 30)).status == PASS


# ----------------------------------------------------------------------------- CLI, one node


def test_doctor_on_this_machine():
    code, report = _doctor("-pp", "2")
    assert code == 0, report
    checks = _by_name(report)
    assert set(checks) >= EXPECTED_CHECKS
    assert {c["status"] for c in report["checks"]} <= {PASS, WARN}
    assert all(c["fix"] for c in report["checks"] if c["status"] == WARN)
    versions = checks["versions"]["detail"]
    assert f"torch {torch.__version__}" in versions and f"Python {platform.python_version()}" in versions
    assert report["nodes"]["0"]["torch"] == torch.__version__
    assert checks["all-reduce"]["status"] == PASS and "2 rank(s)" in checks["all-reduce"]["detail"]
    assert checks["model"]["status"] == PASS and len(report["nodes"]["0"]["model"]["digest"]) == 64
    assert checks["model layout"]["status"] == PASS and "9 attention heads" in checks["model layout"]["detail"]


def test_a_layout_the_model_cannot_take_fails_naming_the_sizes_that_work():
    code, report = _doctor("-tp", "2")  # the embedded model has 9 attention heads
    layout = _by_name(report)["model layout"]
    assert code != 0 and layout["status"] == FAIL and layout["fix"]
    assert "9 attention heads" in layout["detail"] and "work: 1, 3" in layout["detail"]


def test_missing_model_fails_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    code, report = _doctor(str(missing))
    assert code != 0 and report["ok"] is False
    model = _by_name(report)["model"]
    assert model["status"] == FAIL and str(missing) in model["detail"] and model["fix"]


def test_unreachable_master_fails_within_the_timeout():
    start = time.monotonic()
    code, report = _doctor("--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                           "--master-port", str(free_port()), "--timeout", "3")  # fmt: skip
    elapsed = time.monotonic() - start
    assert code != 0
    master = _by_name(report, node=1)["master port"]
    assert master["status"] == FAIL and "127.0.0.1" in master["detail"] and "--master-port" in master["fix"]
    assert elapsed < 3 + 10  # 3 s of retries, plus collecting the local facts (hashing the model)


def test_head_alone_names_the_missing_node():
    start = time.monotonic()
    code, report = _doctor("--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1",
                           "--master-port", str(free_port()), "--timeout", "3")  # fmt: skip
    assert code != 0 and time.monotonic() - start < 3 + 15
    joined = _by_name(report, node=None)["all nodes joined"]
    assert joined["status"] == FAIL and "node rank(s) 1" in joined["detail"] and "--node-rank" in joined["fix"]


# ----------------------------------------------------------------------------- two nodes


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _doctor_cmd(node_rank: int, master: str, port: int) -> list[str]:
    return [sys.executable, "-m", "shardserve", "doctor", "--nnodes", "2", "--node-rank", str(node_rank),
            "--master-addr", master, "--master-port", str(port), "--timeout", "60", "--json"]  # fmt: skip


def _run_pair(cmds: list[list[str]]) -> list[tuple[int, dict, str]]:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for c in cmds]
    try:
        outs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, json.loads(out) if out.strip() else {}, err) for p, (out, err) in zip(procs, outs)]


def _assert_two_node_report(head: dict) -> None:
    assert head["ok"] is True and set(head["nodes"]) == {"0", "1"}
    cluster = _by_name(head, node=None)
    for name in ("all nodes joined", "versions match", "model on every node"):
        assert cluster[name]["status"] == PASS, cluster[name]
    for node in (0, 1):
        rows = _by_name(head, node=node)
        assert rows["all-reduce"]["status"] == PASS and "2 rank(s)" in rows["all-reduce"]["detail"]
        assert rows["ephemeral ports reachable"]["status"] == PASS


@pytest.mark.slow
def test_two_nodes_on_loopback():
    port = free_port()
    (rc0, head, err0), (rc1, node, err1) = _run_pair(
        [_doctor_cmd(0, "127.0.0.1", port), _doctor_cmd(1, "127.0.0.1", port)]
    )
    assert rc0 == 0, err0[-2000:]
    assert rc1 == 0, err1[-2000:]
    _assert_two_node_report(head)
    assert node["ok"] is True and node["node_rank"] == 1


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")
def test_two_nodes_in_network_namespaces():
    with veth_namespaces("sd", "10.78.0") as (ns, addrs, veth):
        port = 29641
        cmds = [["ip", "netns", "exec", n, *_doctor_cmd(rank, addrs[0], port)] for rank, n in enumerate(ns)]
        (rc0, head, err0), (rc1, _, err1) = _run_pair(cmds)
    assert rc0 == 0, err0[-2000:]
    assert rc1 == 0, err1[-2000:]
    _assert_two_node_report(head)
    # Each node found the veth toward the head, not loopback.
    assert head["nodes"]["1"]["net_env"]["GLOO_SOCKET_IFNAME"] == veth[1]
    assert head["nodes"]["0"]["net_env"]["GLOO_SOCKET_IFNAME"] == veth[0]
    assert head["nodes"]["1"]["address"] == addrs[1]
