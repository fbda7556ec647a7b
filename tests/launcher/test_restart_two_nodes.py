"""Two nodes (PP=2, one rank each): the headless node's worker is killed mid-stream.

The head fails the stream at once naming rank 1 on node 1, the headless node reports its dead worker
and follows the head into the next generation, and the server answers as before. When the head is
killed, the headless node exits non-zero and leaves no worker behind. On loopback, and in two network
namespaces joined by a veth pair (root only).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from procs import (
    REPO,
    TINY,
    kill_rank_mid_stream,
    netns_available,
    pid_alive,
    serve,
    stop,
    veth_namespaces,
    wait_healthy,
    wait_pid,
)

from shardserve.distributed.rendezvous import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def node_args(model, master: str, mport: int, hport: int, rank: int, host: str = "127.0.0.1") -> list[str]:
    return [str(model), "-pp", "2", "--nnodes", "2", *TINY, "--rendezvous-timeout", "120", "--master-addr", master,
            "--master-port", str(mport), "--port", str(hport), "--host", host, "--node-rank", str(rank)]  # fmt: skip


def check_recovery(seen: dict) -> None:
    assert seen["error_after"] < 10 and seen["error"]["code"] == "engine_dead"
    assert f"rank 1 (node 1, pid {seen['victim']}) was killed by signal 9" in seen["error"]["message"]
    assert seen["saw_503"] and seen["back_after"] is not None and seen["back_after"] < 60
    assert seen["same_text"]


def check_head_loss(head: subprocess.Popen, node: subprocess.Popen) -> None:
    """Kill the head: the headless node must exit non-zero and no worker may be left on either side."""
    workers = [wait_pid(node.pid, "shardserve-r1"), wait_pid(head.pid, "shardserve-r0")]
    head.kill()
    head.wait(10)
    assert node.wait(timeout=30) != 0
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(p) for p in workers)


def test_headless_worker_killed_then_head_killed_on_loopback(tiny_llama_dir, tmp_path):
    mport, hport = free_port(), free_port()
    head_log, node_log = tmp_path / "head.log", tmp_path / "node.log"
    head = serve(node_args(tiny_llama_dir, "127.0.0.1", mport, hport, 0), head_log)
    node = serve(node_args(tiny_llama_dir, "127.0.0.1", mport, hport, 1), node_log)
    url = f"http://127.0.0.1:{hport}"
    try:
        wait_healthy(url, [head, node])
        check_recovery(kill_rank_mid_stream(url, node.pid))
        assert "generation 1: node 1 started" in node_log.read_text()
        assert "rank 1 (node 1" in head_log.read_text()
        check_head_loss(head, node)
        assert "the head is gone" in node_log.read_text()
    finally:
        stop([head, node])


@pytest.mark.netns
@pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")
def test_headless_worker_killed_in_network_namespaces(tiny_llama_dir, tmp_path):
    procs: list[subprocess.Popen] = []
    with veth_namespaces("sr", "10.79.1") as (ns, addrs, veth):
        try:
            mport, hport = 29631, 8731
            for rank, n in enumerate(ns):
                args = node_args(
                    tiny_llama_dir, addrs[0], mport, hport, rank, host=addrs[0] if rank == 0 else "127.0.0.1"
                )
                log = tmp_path / f"node{rank}.log"
                cmd = ["ip", "netns", "exec", n, sys.executable, "-m", "shardserve", "serve", *args]
                with open(log, "ab") as f:  # `ip netns exec` execs: the Popen pid is the launcher's
                    procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT))
            url = f"http://{addrs[0]}:{hport}"
            client = (f"import json,sys; sys.path.insert(0, {str(REPO / 'tests')!r}); "
                      "from procs import kill_rank_mid_stream; "
                      f"print(json.dumps(kill_rank_mid_stream('{url}', {procs[1].pid})))")  # fmt: skip
            done = subprocess.run(["ip", "netns", "exec", ns[0], sys.executable, "-c", client], cwd=REPO,
                                  capture_output=True, text=True, timeout=400)  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
            check_recovery(json.loads(done.stdout.strip().splitlines()[-1]))
            check_head_loss(procs[0], procs[1])
            assert veth[1] in (tmp_path / "node1.log").read_text()  # node 1 reached the head over the veth
        finally:
            stop(procs)
