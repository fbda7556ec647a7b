"""Node rendezvous on 127.0.0.1: success, bounded timeouts that name who is missing, bad launches."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from shardserve.distributed.rendezvous import (
    RendezvousError,
    RendezvousTimeout,
    free_port,
    node_info,
    node_rendezvous,
)

HOST = "127.0.0.1"


def run_nodes(
    port: int,
    nnodes: int,
    ranks: list[int],
    timeout_s: float,
    start_gap_s: float = 0.0,
    nnodes_of: dict[int, int] | None = None,
) -> dict[int, object]:
    """Run node_rendezvous for each rank in a thread; returns rank -> table or exception."""
    results: dict[int, object] = {}

    def node(rank: int) -> None:
        try:
            n = (nnodes_of or {}).get(rank, nnodes)
            results[rank] = node_rendezvous(HOST, port, n, rank, timeout_s, node_info(rank, [rank], tag=f"n{rank}"))
        except Exception as exc:
            results[rank] = exc

    threads = [threading.Thread(target=node, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
        time.sleep(start_gap_s)
    for t in threads:
        t.join(timeout_s + 10)
        assert not t.is_alive(), "rendezvous did not return within its deadline"
    return results


def test_two_nodes_complete_and_share_the_table():
    # The worker starts before the head: it must retry connecting until the head is up.
    results = run_nodes(free_port(), 2, [1, 0], timeout_s=20, start_gap_s=0.5)
    assert not any(isinstance(r, Exception) for r in results.values()), results
    assert results[0] == results[1]
    table = results[0]
    assert sorted(table) == [0, 1]
    assert table[1]["tag"] == "n1" and table[1]["ranks"] == [1] and table[0]["node_rank"] == 0


def test_three_nodes_in_any_order():
    results = run_nodes(free_port(), 3, [2, 0, 1], timeout_s=20, start_gap_s=0.2)
    assert all(sorted(r) == [0, 1, 2] for r in results.values()), results


def test_head_alone_times_out_naming_the_missing_rank():
    start = time.monotonic()
    with pytest.raises(RendezvousTimeout) as info:
        node_rendezvous(HOST, free_port(), 2, 0, 2.0, node_info(0, [0]))
    elapsed = time.monotonic() - start
    assert 1.9 <= elapsed < 3.5
    assert "node rank(s) 1 of 2 did not join within 2 s" in str(info.value)


def test_worker_without_head_times_out_naming_the_head():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RendezvousTimeout) as info:
        node_rendezvous(HOST, port, 2, 1, 1.5, {})
    assert time.monotonic() - start < 3.0
    assert f"{HOST}:{port}" in str(info.value)


def test_worker_learns_why_the_head_gave_up():
    # 3 nodes expected, rank 2 never comes: rank 1 must fail too, not hang.
    results = run_nodes(free_port(), 3, [0, 1], timeout_s=2.0, start_gap_s=0.2)
    assert isinstance(results[0], RendezvousTimeout) and "node rank(s) 2 of 3" in str(results[0])
    assert isinstance(results[1], RendezvousError)


def test_duplicate_node_rank_is_reported():
    # Three nodes expected; two are started with --node-rank 1 (and none with 2).
    port = free_port()
    results: dict[str, object] = {}

    def node(name: str, rank: int) -> None:
        try:
            results[name] = node_rendezvous(HOST, port, 3, rank, 3.0, {"hostname": name})
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=node, args=args) for args in (("head", 0), ("a", 1), ("b", 1))]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(15)
    assert isinstance(results["b"], RendezvousError) and "already taken by a" in str(results["b"])
    assert isinstance(results["head"], RendezvousTimeout) and "node rank(s) 2 of 3" in str(results["head"])


def test_mismatched_node_counts_are_reported():
    results = run_nodes(free_port(), 2, [0, 1], timeout_s=5.0, start_gap_s=0.2, nnodes_of={1: 3})
    assert isinstance(results[0], RendezvousError) and "--nnodes 2" in str(results[0])
    assert isinstance(results[1], RendezvousError)


def test_single_node_needs_no_store():
    assert node_rendezvous(HOST, 1, 1, 0, 1.0, {"a": 1}) == {0: {"a": 1, "node_rank": 0, "nnodes": 1}}


def test_bad_arguments():
    with pytest.raises(ValueError):
        node_rendezvous(HOST, free_port(), 2, 2, 1.0, {})
    with pytest.raises(ValueError):
        node_rendezvous(HOST, free_port(), 2, 0, 0, {})


@pytest.mark.slow
def test_two_processes_complete():
    port = free_port()
    code = (
        "import json,sys;from shardserve.distributed.rendezvous import node_rendezvous as r;"
        f"print(json.dumps(r('{HOST}',{port},2,1,30.0,{{'who':'proc'}})))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        table = node_rendezvous(HOST, port, 2, 0, 30.0, {"who": "head"})
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert table[1]["who"] == "proc"
    assert {int(k): v for k, v in json.loads(out).items()} == table
