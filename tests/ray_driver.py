"""Driver scripts for the Ray backend tests: run inside the Ray head's network namespace, print one JSON line.

``python ray_driver.py workers``: place :class:`RayWorkers` for TP 2 x PP 2, feed one relay per node from a head
channel, run stand-in ranks (no model) that answer over it, kill rank 2's actor and node 1's relay, watch
``failures()``, then ``kill()``.
``python ray_driver.py reserve TP PP TIMEOUT``: ask for a placement and report how it ended.
``python ray_driver.py chat URL``, ``... kill URL RANK``, ``... kill-only URL RANK``: client side of a running
``shardserve serve``; ``... failover URL RANK``: the same against Ray Serve, until a new replica answers.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/, for procs


def _stand_in_rank(args) -> None:
    """A rank without a model: it joins the channel as ``worker_main`` does, answers the head's first message
    with its reader slot (as ``KVCapacity.num_blocks``), then waits to be killed."""
    import socket

    from shardserve.executor import messages as m
    from shardserve.executor.channel import WorkerChannel, read_addresses
    from shardserve.executor.worker import open_store

    store = open_store(args.store_host, args.store_port, False, 30)
    channel = WorkerChannel(args.ring, args.reader_index, read_addresses(store, args.generation).replies)
    channel.send(m.Hello(args.rank, os.getpid(), socket.gethostname()))
    if isinstance(channel.recv(timeout=30), m.ProfileRequest):
        channel.send(m.KVCapacity(args.rank, args.reader_index))
    while True:
        time.sleep(1)


def _gather(channel, kind, n: int) -> dict:
    got = {}
    deadline = time.monotonic() + 60
    while len(got) < n and time.monotonic() < deadline:
        msg = channel.recv(timeout=max(0.1, deadline - time.monotonic()), check=lambda: None)
        if isinstance(msg, kind):
            got[msg.rank] = msg
    return got


def _wait_failures(workers, n: int, timeout: float = 20) -> tuple[list, float]:
    start = time.monotonic()
    failures = workers.failures()
    while time.monotonic() - start < timeout and len(failures) < n:
        time.sleep(0.1)
        failures = workers.failures()
    return failures, time.monotonic() - start


def workers() -> dict:
    """TP 2 x PP 2 stand-in ranks on the real path: placement, one relay per node fed by the head's channel,
    each rank reading its node's ring; then rank 2's actor and node 1's relay actor are SIGKILLed."""
    import ray

    from shardserve.config import EngineConfig, ModelConfig, ParallelConfig
    from shardserve.distributed.rendezvous import free_port
    from shardserve.executor import messages as m
    from shardserve.executor.channel import HeadChannel, publish_addresses
    from shardserve.executor.ray_executor import place_ray_workers
    from shardserve.executor.ray_utils import cluster_nodes, connect
    from shardserve.executor.worker import open_store

    head_ip = connect()
    config = EngineConfig(
        model=ModelConfig(device="cpu"),
        parallel=ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2, rendezvous_timeout=30),
    )
    free_before = {n.node_id: n.available.get("CPU", 0.0) for n in cluster_nodes()}
    port = free_port()
    store = open_store(head_ip, port, True, 30)
    workers = place_ray_workers(config, 0)
    channel = HeadChannel(head_ip, 0, list(range(workers.nnodes)))
    publish_addresses(store, 0, channel.addresses)
    rings = workers.start_relays(channel.addresses.nodes)
    workers.run_ranks(head_ip, port, rings, entry=_stand_in_rank)
    hellos = _gather(channel, m.Hello, 4)
    channel.send(m.ProfileRequest(), 30, lambda: None)
    slots = {r: c.num_blocks for r, c in _gather(channel, m.KVCapacity, 4).items()}
    places = [vars(p) for p in workers.places]
    node_places = [vars(p) for p in workers.node_places]
    groups = [ray.util.placement_group_table(pg)["state"] for pg in workers.reservation.groups]
    healthy = workers.alive()
    bundles = [len(s.bundles) for s in workers.reservation.stages]
    os.kill(workers.places[2].pid, signal.SIGKILL)
    rank_failures, noticed_after = _wait_failures(workers, 1)
    os.kill(workers.node_places[1].pid, signal.SIGKILL)
    failures, relay_noticed_after = _wait_failures(workers, 2)
    pgs = list(workers.reservation.groups)
    node0_ring = Path("/dev/shm") / rings[0].name  # node 0's actors are all alive: kill() must unlink it
    ring_before_kill = node0_ring.exists()
    workers.kill()
    ring_after_kill = node0_ring.exists()
    channel.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # Ray returns the bundles' CPUs asynchronously
        free_after = {n.node_id: n.available.get("CPU", 0.0) for n in cluster_nodes()}
        if free_after == free_before:
            break
        time.sleep(0.2)
    return {
        "places": places,
        "node_places": node_places,
        "rings": [{"name": r.name, "num_readers": r.num_readers} for r in rings],
        "hello_pids": {r: h.pid for r, h in hellos.items()},
        "reader_slots": slots,
        "groups": groups,
        "bundles": bundles,
        "healthy": healthy,
        "rank_failures": [f.rank for f in rank_failures],
        "failures": [
            {"rank": f.rank, "node_rank": f.node_rank, "exitcode": f.exitcode, "text": f.describe()} for f in failures
        ],  # fmt: skip
        "ring_before_kill": ring_before_kill,
        "ring_after_kill": ring_after_kill,
        "noticed_after": noticed_after,
        "relay_noticed_after": relay_noticed_after,
        "removed": [ray.util.placement_group_table(pg)["state"] for pg in pgs],
        "free_before": free_before,
        "free_after": free_after,
    }


def reserve(tp: int, pp: int, timeout: float) -> dict:
    from shardserve.executor.ray_utils import InsufficientResourcesError, connect, rank_bundle
    from shardserve.executor.ray_utils import reserve as ray_reserve

    connect()
    start = time.monotonic()
    try:
        reservation = ray_reserve(tp, pp, rank_bundle("cpu"), timeout)
    except InsufficientResourcesError as e:
        return {"ok": False, "elapsed": time.monotonic() - start, "message": str(e)}
    stages = [vars(s) for s in reservation.stages]
    reservation.release()
    return {"ok": True, "elapsed": time.monotonic() - start, "stages": stages}


def chat(url: str) -> dict:
    import httpx
    import openai
    from procs import PROMPT, wait_healthy

    wait_healthy(url, [], timeout=300)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
        temperature=0,
    )  # fmt: skip
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})  # fmt: skip
    status = httpx.get(f"{url}/cluster/status", timeout=30).json()
    return {"answer": answer.choices[0].message.content, "completion": completion.choices[0].text, "status": status}


def kill(url: str, rank: int) -> dict:
    """Kill ``rank``'s actor process mid-stream: what the client saw (see ``procs.kill_rank_mid_stream``)."""
    import httpx
    from procs import Stream, complete, wait_healthy, watch_health

    wait_healthy(url, [], timeout=300)
    expected = complete(url)
    ranks = httpx.get(f"{url}/cluster/status", timeout=30).json()["ranks"]
    victim = next(r for r in ranks if r["rank"] == rank)
    stream = Stream(url)
    stream.start()
    stream.wait_tokens(3)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    saw_503, back_after = watch_health(url, timeout=90)
    stream.join(10)
    when, error = stream.error_event()
    after = complete(url) if back_after is not None else None
    ranks_after = httpx.get(f"{url}/cluster/status", timeout=30).json()["ranks"] if back_after is not None else []
    return {"error_after": when - killed_at, "error": error, "saw_503": saw_503, "back_after": back_after,
            "same_text": after == expected, "victim": victim, "ranks_before": ranks,
            "ranks_after": ranks_after}  # fmt: skip


def kill_only(url: str, rank: int) -> dict:
    """Kill ``rank``'s actor once the server is healthy (for ``--max-restarts 0``)."""
    import httpx
    from procs import complete, wait_healthy

    wait_healthy(url, [], timeout=300)
    complete(url)
    ranks = httpx.get(f"{url}/cluster/status", timeout=30).json()["ranks"]
    victim = next(r for r in ranks if r["rank"] == rank)
    os.kill(victim["pid"], signal.SIGKILL)
    return {"victim": victim}


def failover(url: str, rank: int) -> dict:
    """Kill ``rank``'s actor behind Ray Serve (engine with no restart left) and wait for a new replica to answer."""
    import httpx
    from procs import complete, wait_healthy

    wait_healthy(url, [], timeout=300)
    expected = complete(url)
    before = httpx.get(f"{url}/cluster/status", timeout=30).json()
    victim = next(r for r in before["ranks"] if r["rank"] == rank)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    codes, after = [], None
    while time.monotonic() - killed_at < 300:
        try:
            resp = httpx.get(f"{url}/cluster/status", timeout=10)
            codes.append(resp.status_code)
            now = resp.json() if resp.status_code == 200 else None
            if now and now["head"]["pid"] != before["head"]["pid"] and len(now["ranks"]) == len(before["ranks"]):
                after = now
                break
        except httpx.HTTPError:
            codes.append(None)
        time.sleep(1)
    back_after = time.monotonic() - killed_at if after else None
    text = complete(url) if after else None
    return {"before": before, "after": after, "back_after": back_after, "same_text": text == expected,
            "saw_503": 503 in codes}  # fmt: skip


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "workers":
        result = workers()
    elif cmd == "reserve":
        result = reserve(int(rest[0]), int(rest[1]), float(rest[2]))
    elif cmd == "chat":
        result = chat(rest[0])
    elif cmd == "kill":
        result = kill(rest[0], int(rest[1]))
    elif cmd == "kill-only":
        result = kill_only(rest[0], int(rest[1]))
    elif cmd == "failover":
        result = failover(rest[0], int(rest[1]))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(result))
