"""A rank that dies or stalls (PP=2 on one node, tiny random Llama): the head fails the running request
at once, /health turns 503, every rank is restarted and the server answers correctly again; a request
that was still waiting is served after the restart. With ``--max-restarts 0`` the server exits non-zero.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from procs import (
    PROMPT,
    TINY,
    Stream,
    child_pid,
    complete,
    pid_alive,
    serve,
    stop,
    wait_healthy,
    wait_pid,
    watch_health,
)

from shardserve.distributed.rendezvous import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WATCHDOG_S = 5


def start(model, tmp_path, *extra):
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    proc = serve([str(model), "-pp", "2", *TINY, "--port", str(port), *extra], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc])
    except AssertionError:
        stop([proc])
        raise AssertionError(log.read_text()[-3000:]) from None
    return proc, url, log


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    # One running request at a time, so that a second one waits in the queue.
    proc, url, log = start(tiny_llama_dir, tmp_path_factory.mktemp("restart"), "--max-num-seqs", "1",
                           "--watchdog-timeout", str(WATCHDOG_S))  # fmt: skip
    yield proc, url, log
    stop([proc])


def waiting_requests(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("shardserve:num_requests_waiting"))
    return float(line.rsplit(" ", 1)[1])


def test_killed_rank_fails_stream_restarts_and_keeps_waiting_request(server):
    proc, url, log = server
    expected = complete(url)
    stream = Stream(url)
    stream.start()
    stream.wait_tokens(3)
    waiting: dict = {}
    queued = threading.Thread(target=lambda: waiting.update(text=complete(url, timeout=120)), daemon=True)
    queued.start()
    deadline = time.monotonic() + 10
    while waiting_requests(url) < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.05)

    victim = wait_pid(proc.pid, "shardserve-r1")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    saw_503, back_after = watch_health(url, timeout=60)
    stream.join(10)
    when, error = stream.error_event()
    assert when - killed_at < 10
    assert (
        error["code"] == "engine_dead" and f"rank 1 (node 0, pid {victim}) was killed by signal 9" in error["message"]
    )
    assert saw_503 and back_after is not None and back_after < 60
    queued.join(60)
    assert waiting.get("text") == expected  # it had not started: kept, and served by the new generation
    assert complete(url) == expected
    assert child_pid(proc.pid, "shardserve-r1") not in (None, victim)
    text = log.read_text()
    assert f"rank 1 (node 0, pid {victim}) was killed by signal 9 while the head was" in text  # rank, node, phase
    assert "generation 0 -> 1" in text


def test_stalled_rank_is_restarted_after_the_watchdog_timeout(server):
    proc, url, _ = server
    expected = complete(url)
    stream = Stream(url)
    stream.start()
    stream.wait_tokens(3)
    victim = wait_pid(proc.pid, "shardserve-r1")
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    stream.join(WATCHDOG_S + 15)
    when, error = stream.error_event()
    assert WATCHDOG_S - 1 <= when - stopped_at < WATCHDOG_S + 10
    assert "--watchdog-timeout" in error["message"]
    saw_503, back_after = watch_health(url, timeout=60)
    assert back_after is not None
    assert complete(url) == expected
    assert not pid_alive(victim)


def test_no_restart_left_exits_non_zero(tiny_llama_dir, tmp_path):
    proc, url, log = start(tiny_llama_dir, tmp_path, "--max-restarts", "0")
    try:
        ranks = [wait_pid(proc.pid, f"shardserve-r{r}") for r in (0, 1)]
        os.kill(ranks[1], signal.SIGKILL)  # while idle: the head notices without a request
        code = proc.wait(timeout=60)
        assert code != 0
        assert not any(pid_alive(pid) for pid in ranks)
        assert "no restart left (--max-restarts 0)" in log.read_text()
    finally:
        stop([proc])


def test_health_was_ok_in_between(server):
    # The server fixture survived two restarts and still serves (guards against a test order effect).
    _, url, _ = server
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    assert httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60).status_code == 200
