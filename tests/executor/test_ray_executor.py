"""``--distributed-executor-backend ray`` on a real two-node Ray cluster (``tests/ray_cluster.py``).

The cluster: a head and a second node with 2 CPUs each, in two network namespaces joined by veth (or on
loopback without namespaces), one for the whole module. Drivers (``shardserve serve``, ``tests/ray_driver.py``)
run in the head's namespace; ranks are CPU bundles of one CPU each.

The server tests share one server (``--max-restarts 1``, one start for all of them) and run in file order:
it answers like ``mp``, restarts every rank once when one dies, and ends non-zero when a rank dies again.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import PROMPT, TINY
from ray_cluster import ray_cluster

pytestmark = pytest.mark.slow

DRIVER = str(Path(__file__).resolve().parents[1] / "ray_driver.py")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ray_cluster(tmp_path_factory.mktemp("ray-cluster"), cpus=(2, 2)) as c:
        yield c


def serve_argv(*extra: str, model: str | None = None) -> list[str]:
    """``shardserve serve [MODEL] --distributed-executor-backend ray`` (default: the embedded model)."""
    models = [model] if model else []
    return [sys.executable, "-m", "shardserve", "serve", *models, "--distributed-executor-backend", "ray", *TINY,
            *extra]  # fmt: skip


def test_rank_actors_land_one_tp_group_per_node_read_their_nodes_relay_and_deaths_are_reported(cluster):
    """TP 2 x PP 2 actors running a stand-in rank entry (no model) on the real channel path."""
    out = cluster.run_json([sys.executable, DRIVER, "workers"], timeout=300)
    places, heads_node, second_node = out["places"], cluster.node_ips[0], cluster.node_ips[1]
    # Stage 0's TP group on the driver's (head) node, stage 1's spread to the other, each on one node.
    assert [p["node_ip"] for p in places] == [heads_node, heads_node, second_node, second_node]
    assert places[0]["node_id"] == places[1]["node_id"] != places[2]["node_id"] == places[3]["node_id"]
    assert len({p["pid"] for p in places}) == 4
    assert out["groups"] == ["CREATED", "CREATED"] and out["bundles"] == [2, 2] and out["healthy"]
    # One relay actor per node that holds ranks (the head's node too), each feeding a ring of its own for the
    # node's two ranks; every rank got the head's message from its node's ring, at its position on the node.
    assert [p["node_id"] for p in out["node_places"]] == [places[0]["node_id"], places[2]["node_id"]]
    assert [r["num_readers"] for r in out["rings"]] == [2, 2] and len({r["name"] for r in out["rings"]}) == 2
    assert out["hello_pids"] == {str(r): p["pid"] for r, p in enumerate(places)}
    assert out["reader_slots"] == {"0": 0, "1": 1, "2": 0, "3": 1}
    # The SIGKILLed actor of rank 2 is a failure naming its rank, node and Ray's reason, within a second or so.
    assert out["rank_failures"] == [2]
    rank2, relay = out["failures"]
    assert rank2["rank"] == 2 and rank2["node_rank"] == 1 and rank2["exitcode"] is None
    assert f"at {second_node}" in rank2["text"] and "died" in rank2["text"]
    assert out["noticed_after"] < 5
    # A dead relay actor is a failure too (rank -1), naming its node.
    assert relay["rank"] == -1 and relay["node_rank"] == 1 and relay["exitcode"] is None
    assert relay["text"].startswith(f"the control relay of node 1 (Ray node 1 at {second_node}"), relay["text"]
    assert "died" in relay["text"]
    assert out["relay_noticed_after"] < 5
    # kill() unlinked the ring of the node whose actors were alive (ray.kill alone would leave it in /dev/shm),
    # removed the placement groups and gave their CPUs back.
    assert out["ring_before_kill"] and not out["ring_after_kill"]
    assert out["removed"] == ["REMOVED", "REMOVED"]
    assert out["free_after"] == out["free_before"]


def test_a_layout_larger_than_the_cluster_fails_in_bounded_time_naming_what_is_missing(cluster, tmp_path):
    """TP 3 needs 3 free CPUs on one node; each node has 2."""
    log = tmp_path / "serve.log"
    start = time.monotonic()
    proc = cluster.popen(serve_argv("-tp", "3", "--rendezvous-timeout", "3"), log)
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - start
    text = log.read_text()
    assert code != 0, text[-3000:]
    assert elapsed < 90, f"took {elapsed:.0f} s"
    assert "cannot place TP 3 x PP 1" in text and "needs 3 CPU on one node" in text, text[-3000:]
    assert "0 of the 1 stages fit" in text, text[-3000:]
    # ray status-style: every node with its free vs total CPUs.
    for ip in cluster.node_ips:
        assert re.search(rf"node \w+ \({re.escape(ip)}\): 2/2 CPU free -> 0 stages", text), text[-3000:]


def test_dry_run_prints_where_each_stage_would_go_or_what_is_missing(cluster, tiny_llama_dir):
    def dry_run(*flags: str, model: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(cluster.command(serve_argv(*flags, "--dry-run", model=model)), env=cluster.env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    # A model whose 8 heads split over TP 2 (the embedded model's 9 do not: that would be a PROBLEM of its own).
    fits = dry_run("-tp", "2", "-pp", "2", model=str(tiny_llama_dir))
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "world size:        4 = TP 2 x PP 2" in fits.stdout and "PROBLEM" not in fits.stdout, fits.stdout
    for stage, ip in enumerate(cluster.node_ips):
        ranks = f"{2 * stage}\\.\\.{2 * stage + 1}"
        assert re.search(rf"pp stage {stage}, ranks {ranks}: node \w+ \({re.escape(ip)}\)", fits.stdout), fits.stdout
    short = dry_run("-tp", "3")
    assert "PROBLEM: cannot place TP 3 x PP 1" in short.stdout, short.stdout
    assert short.returncode != 0, "a dry run that prints a PROBLEM must exit non-zero"


@pytest.fixture(scope="module")
def mp_reference():
    """Greedy chat answer and completion of the embedded model with the mp backend (PP 2 worker processes)."""
    from shardserve import LLM, SamplingParams

    llm = LLM(pipeline_parallel_size=2, dtype="float32", device="cpu", num_kv_blocks=64,
              max_model_len=256)  # fmt: skip
    try:
        chat = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
        completion = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    finally:
        llm.shutdown()
    return {"answer": chat, "completion": completion[0].outputs[0].text}


@pytest.fixture(scope="module")
def ray_server(cluster, tmp_path_factory):
    """``shardserve serve --distributed-executor-backend ray -pp 2 --max-restarts 1`` (the embedded model: 9 heads,
    so no TP 2)."""
    log = tmp_path_factory.mktemp("ray-serve") / "serve.log"
    port = 8123
    proc = cluster.popen(serve_argv("-pp", "2", "--port", str(port), "--rendezvous-timeout", "60",
                                    "--max-restarts", "1"), log)  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_serve_pp2_with_one_rank_per_ray_node_answers_like_mp(cluster, ray_server, mp_reference):
    url, proc, log = ray_server
    out = cluster.run_json([sys.executable, DRIVER, "chat", url], timeout=420)
    assert "Paris" in out["answer"], out["answer"]
    assert out["answer"] == mp_reference["answer"]
    assert out["completion"] == mp_reference["completion"]
    status = out["status"]
    assert status["layout"]["nnodes"] == 2  # the Ray nodes the ranks landed on
    ranks = sorted(status["ranks"], key=lambda r: r["rank"])
    # Stage 0 on the head's node, stage 1 spread to the other node.
    assert [(r["rank"], r["pp_rank"], r["node_rank"], r["node_ip"]) for r in ranks] == [
        (0, 0, 0, cluster.node_ips[0]), (1, 1, 1, cluster.node_ips[1]),
    ]  # fmt: skip
    assert len({r["node_id"] for r in ranks}) == 2 and all(len(r["node_id"]) == 56 for r in ranks)
    # `shardserve status` shows each Ray node with its address.
    shown = subprocess.run(cluster.command([sys.executable, "-m", "shardserve", "status", "--url", url]),
                           env=cluster.env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    for r in ranks:
        assert f"Ray node {r['node_id'][:8]} at {r['node_ip']}" in shown.stdout, shown.stdout


def test_killed_rank_actor_restarts_the_whole_group(cluster, ray_server):
    url, proc, log = ray_server
    out = cluster.run_json([sys.executable, DRIVER, "kill", url, "1"], timeout=420)
    assert out["error_after"] < 10, out
    assert out["error"]["code"] == "engine_dead" and "rank 1" in out["error"]["message"], out["error"]
    assert out["saw_503"] and out["back_after"] is not None and out["back_after"] < 60, out
    assert out["same_text"]
    # Every rank is new (a new generation), not only the one that died; still one per Ray node.
    after = {r["rank"]: r for r in out["ranks_after"]}
    before = {r["rank"]: r for r in out["ranks_before"]}
    assert set(after) == set(before) == {0, 1}
    assert all(after[r]["pid"] != before[r]["pid"] for r in before), "every rank must be new, not only rank 1"
    assert "generation 1" in log.read_text()
    assert [after[r]["node_ip"] for r in (0, 1)] == cluster.node_ips
    assert proc.poll() is None


def test_with_no_restart_left_a_killed_actor_ends_the_server_non_zero(cluster, ray_server):
    """The one restart of ``--max-restarts 1`` was used by the test above (run alone, the first kill here uses
    it): rank 0's actor (on the head's node) dying now ends the server."""
    url, proc, log = ray_server
    code = None
    for _ in range(2):
        out = cluster.run_json([sys.executable, DRIVER, "kill-only", url, "0"], timeout=420)
        try:
            code = proc.wait(timeout=60)
            break
        except subprocess.TimeoutExpired:
            continue  # restarted: that was the one restart
    text = log.read_text()
    assert code is not None and code != 0, text[-3000:]
    assert "no restart left (--max-restarts 1)" in text, text[-3000:]
    assert f"rank 0 (Ray node 0 at {out['victim']['node_ip']}" in text, text[-3000:]
