"""Driver scripts for the Ray backend tests: run inside the Ray head's network namespace, print one JSON line.

``python ray_driver.py workers``: start :class:`RayWorkers` for TP 2 x PP 2 with a stand-in rank entry and a
node service, kill rank 2's actor, watch ``failures()``, then ``kill()``.
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


def _sleep_forever(*_args) -> None:
    while True:
        time.sleep(1)


def workers() -> dict:
    import ray

    from shardserve.config import EngineConfig, ModelConfig, ParallelConfig
    from shardserve.executor.ray_executor import start_ray_workers
    from shardserve.executor.ray_utils import cluster_nodes, connect

    connect()
    config = EngineConfig(
        model=ModelConfig(device="cpu"),
        parallel=ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2, rendezvous_timeout=30),
    )
    free_before = {n.node_id: n.available.get("CPU", 0.0) for n in cluster_nodes()}
    workers = start_ray_workers(config, "127.0.0.1", 1, 0, entry=_sleep_forever, node_service=_sleep_forever)
    places = [vars(p) for p in workers.places]
    node_places = [vars(p) for p in workers.node_places]
    groups = [ray.util.placement_group_table(pg)["state"] for pg in workers.reservation.groups]
    healthy = workers.alive()
    bundles = [len(s.bundles) for s in workers.reservation.stages]
    os.kill(workers.places[2].pid, signal.SIGKILL)
    killed = time.monotonic()
    failures = []
    while time.monotonic() - killed < 20 and not failures:
        failures = workers.failures()
        time.sleep(0.1)
    noticed_after = time.monotonic() - killed
    pgs = list(workers.reservation.groups)
    workers.kill()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # Ray returns the bundles' CPUs asynchronously
        free_after = {n.node_id: n.available.get("CPU", 0.0) for n in cluster_nodes()}
        if free_after == free_before:
            break
        time.sleep(0.2)
    return {
        "places": places,
        "node_places": node_places,
        "groups": groups,
        "bundles": bundles,
        "healthy": healthy,
        "failures": [
            {"rank": f.rank, "node_rank": f.node_rank, "exitcode": f.exitcode, "text": f.describe()} for f in failures
        ],  # fmt: skip
        "noticed_after": noticed_after,
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
