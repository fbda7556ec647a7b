"""Failures stay where they belong (PP=2 on one node, tiny random Llama, faults injected on a worker rank):

- a request that a worker rank cannot add fails alone: the other requests of its batch complete, with the
  same text as alone, and no rank is restarted;
- a worker that raises out of a step has its exception quoted in the 503 body, and the group recovers;
- a worker that fails while loading has its exception quoted in the head's final error line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import httpx
import pytest
from procs import REPO, TINY, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BAD_TOKEN = 777
GOOD = [[1, 520, 3327, 314, 4649, 3135], [42, 7, 913, 2050, 11]]


def complete(url: str, prompt: list[int], max_tokens: int = 16) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def in_parallel(url: str, prompts: list[list[int]]) -> list[httpx.Response]:
    results: list = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = complete(url, prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


def test_a_request_a_worker_rank_cannot_add_fails_alone(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_FAULT_INJECTION", f"add_request:0:{BAD_TOKEN}")
    log = tmp_path / "server.log"
    with running_server([str(tiny_llama_dir), "-pp", "2", *TINY], log) as url:
        alone = [complete(url, p).json()["choices"][0]["text"] for p in GOOD]
        bad = [5, BAD_TOKEN, 9]
        good_a, failed, good_b = in_parallel(url, [GOOD[0], bad, GOOD[1]])
        assert failed.status_code == 500, failed.text
        assert "injected fault: rank 0 fails at add_request" in failed.json()["error"]["message"]
        assert good_a.status_code == 200 and good_b.status_code == 200
        assert [good_a.json()["choices"][0]["text"], good_b.json()["choices"][0]["text"]] == alone
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        usage = httpx.get(url + "/metrics", timeout=10).text
        assert "shardserve:kv_cache_usage_perc" in usage
    text = log.read_text()
    assert "restarting every rank" not in text


def test_an_exception_out_of_a_step_is_quoted_in_the_503_and_the_group_recovers(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_FAULT_INJECTION", f"step:1:{BAD_TOKEN}")
    log = tmp_path / "server.log"
    with running_server([str(tiny_llama_dir), "-pp", "2", *TINY, "--max-restarts", "1"], log) as url:
        failed = complete(url, [5, BAD_TOKEN, 9])
        assert failed.status_code == 503, failed.text
        message = failed.json()["error"]["message"]
        assert "rank 1" in message and "RuntimeError: injected fault: rank 1 fails at step" in message
        for _ in range(120):  # the ranks restart, then serve again
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                break
            threading.Event().wait(0.5)
        assert complete(url, GOOD[0]).status_code == 200


def test_a_worker_that_fails_to_load_is_quoted_in_the_final_error_line(tiny_llama_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SHARDSERVE_FAULT_INJECTION": "load:1"}
    args = [sys.executable, "-m", "shardserve", "serve", str(tiny_llama_dir), "-pp", "2", *TINY, "--port", "0"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "exiting:" in line]
    assert errors, done.stderr[-3000:]
    assert "rank 1" in errors[-1] and "RuntimeError: injected fault: rank 1 fails at load" in errors[-1]
