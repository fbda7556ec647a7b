"""shardserve bench serve: metric math and arrivals on synthetic data, then end to end against a live
server on the tiny random Llama and against a closed port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from procs import TINY, running_server

from shardserve.distributed.rendezvous import free_port
from shardserve.tools.bench_serve import (
    BenchConfig,
    BenchmarkResult,
    RequestResult,
    arrival_intervals,
    calculate_metrics,
    format_result,
    random_requests,
    send_offsets,
    summarize,
    tpot,
)

REPO = Path(__file__).resolve().parents[2]
VLLM_KEYS = ["completed", "failed", "total_input_tokens", "total_output_tokens", "duration", "request_throughput",
             "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls",
             "errors"]  # fmt: skip
METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")


def _stats_keys(percentiles=("90", "99")) -> list[str]:
    return [f"{s}_{m}_ms" for m in METRIC_NAMES for s in ("mean", "median", "std", *(f"p{p}" for p in percentiles))]


# ----------------------------------------------------------------------------- metric math


def test_summarize_matches_numpy_definitions():
    values = [0.010, 0.020, 0.030, 0.040, 0.100]  # seconds
    s = summarize("ttft", values, (50, 90, 99, 99.9))
    assert s["mean_ttft_ms"] == pytest.approx(40.0)
    assert s["median_ttft_ms"] == pytest.approx(30.0) == s["p50_ttft_ms"]
    assert s["std_ttft_ms"] == pytest.approx(np.std([10, 20, 30, 40, 100]))  # population std, as vLLM
    # linear interpolation between 40 ms (rank 3) and 100 ms (rank 4): 40 + 0.6 * 60 and 40 + 0.96 * 60
    assert s["p90_ttft_ms"] == pytest.approx(76.0)
    assert s["p99_ttft_ms"] == pytest.approx(97.6)
    assert s["p99.9_ttft_ms"] == pytest.approx(99.76)
    assert summarize("itl", [], (99,)) == {
        "mean_itl_ms": 0.0,
        "median_itl_ms": 0.0,
        "std_itl_ms": 0.0,
        "p99_itl_ms": 0.0,
    }


def _result(start: float, chunk_times: list[float], output_tokens: int, prompt_len: int = 10) -> RequestResult:
    """A request sent at ``start`` whose text chunks arrived at ``chunk_times`` (seconds)."""
    ttft = chunk_times[0] - start
    itl = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    return RequestResult(success=True, prompt_len=prompt_len, output_tokens=output_tokens, ttft=ttft, itl=itl,
                         latency=chunk_times[-1] - start, start_time=start)  # fmt: skip


def test_tpot_and_itl_from_synthetic_timestamps():
    a = _result(0.0, [0.5, 0.6, 0.7, 0.8, 0.9], output_tokens=5)  # one token per chunk, 100 ms apart
    b = _result(1.0, [1.2, 1.5, 2.1], output_tokens=7)  # 7 tokens in 3 chunks
    assert tpot(a) == pytest.approx(0.1)
    assert tpot(b) == pytest.approx((1.1 - 0.2) / 6)
    assert tpot(_result(0.0, [0.3], output_tokens=1)) is None
    failed = RequestResult(success=False, prompt_len=10, error="HTTP 500")
    m = calculate_metrics([a, b, failed], duration=4.0, percentiles=(50, 99))
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (20, 12)
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(8.0)
    assert m["mean_ttft_ms"] == pytest.approx((500 + 200) / 2)
    assert m["mean_tpot_ms"] == pytest.approx((100 + 900 / 6) / 2)
    itls_ms = [100, 100, 100, 100, 300, 600]  # every gap of every request, pooled
    assert m["mean_itl_ms"] == pytest.approx(np.mean(itls_ms))
    assert m["median_itl_ms"] == pytest.approx(100)
    assert m["p99_itl_ms"] == pytest.approx(np.percentile(itls_ms, 99))
    assert m["mean_e2el_ms"] == pytest.approx((900 + 1100) / 2)
    table = format_result(BenchmarkResult(BenchConfig(model="x", percentiles=(50, 99)), m, []))
    assert table.startswith("============ Serving Benchmark Result ============")
    assert "Successful requests:                     2" in table and "P99 ITL (ms):" in table


def test_poisson_arrivals_have_mean_one_over_rate_and_are_seeded():
    rate = 4.0
    x = arrival_intervals(20000, rate, 1.0, np.random.default_rng(7))
    assert x.mean() == pytest.approx(1 / rate, rel=0.03)
    assert x.std() / x.mean() == pytest.approx(1.0, rel=0.05)  # exponential: coefficient of variation 1
    assert np.array_equal(x, arrival_intervals(20000, rate, 1.0, np.random.default_rng(7)))
    assert not np.array_equal(x, arrival_intervals(20000, rate, 1.0, np.random.default_rng(8)))
    steady = arrival_intervals(20000, rate, 8.0, np.random.default_rng(7))  # gamma shape 8: same mean, less spread
    assert steady.mean() == pytest.approx(1 / rate, rel=0.03)
    assert steady.std() / steady.mean() == pytest.approx(1 / np.sqrt(8), rel=0.05)
    assert not arrival_intervals(5, float("inf"), 1.0, np.random.default_rng(0)).any()
    offsets = send_offsets(np.array([0.5, 0.25, 1.0]))
    assert offsets.tolist() == [0.0, 0.5, 0.75]


def test_random_dataset_lengths_and_seed():
    cfg = BenchConfig(model="m", num_prompts=50, random_input_len=100, random_output_len=20, random_range_ratio=0.5)
    reqs = random_requests(cfg, np.random.default_rng(3))
    assert all(50 <= r.prompt_len <= 150 and len(r.prompt) == r.prompt_len for r in reqs)
    assert all(10 <= r.output_len <= 30 for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 5
    assert [r.prompt for r in reqs] == [r.prompt for r in random_requests(cfg, np.random.default_rng(3))]
    chat = random_requests(BenchConfig(model="m", endpoint="/v1/chat/completions", num_prompts=2, random_input_len=7),
                           np.random.default_rng(0))  # fmt: skip
    assert isinstance(chat[0].prompt, str) and len(chat[0].prompt.split()) == 7
    with pytest.raises(ValueError, match="range-ratio"):
        BenchConfig(random_range_ratio=1.0)
    with pytest.raises(ValueError, match="endpoint"):
        BenchConfig(endpoint="/v1/embeddings")


# ----------------------------------------------------------------------------- end to end


def _bench(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("OPENAI_API_KEY", None)
    cmd = [sys.executable, "-m", "shardserve", "bench", "serve", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _saved(result_dir: Path) -> dict:
    files = list(result_dir.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def tiny_server(tiny_llama_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("bench-server") / "server.log"
    with running_server([str(tiny_llama_dir), *TINY[:-1], "warning"], log) as url:
        yield url


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_serve_against_live_server(tiny_server, tmp_path):
    args = ["--base-url", tiny_server, "--num-prompts", "8", "--request-rate", "4", "--random-input-len", "16",
            "--random-output-len", "8", "--timeout", "120", "--save-result", "--result-dir", "tmp"]  # fmt: skip
    proc = _bench(args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "============ Serving Benchmark Result ============" in proc.stdout
    result = _saved(tmp_path / "tmp")
    for key in VLLM_KEYS + _stats_keys():
        assert key in result, key
    assert result["completed"] == 8 and result["failed"] == 0, result["errors"]
    assert result["total_output_tokens"] == 64
    assert result["total_input_tokens"] == 8 * 16
    assert result["model_id"] == httpx.get(tiny_server + "/v1/models", timeout=10).json()["data"][0]["id"]
    for m in METRIC_NAMES:
        assert result[f"p99_{m}_ms"] >= result[f"median_{m}_ms"] > 0, m
    # ~2 s of Poisson arrivals at 4 req/s; bounded well below the per-request timeout
    assert 0 < result["duration"] < 120
    assert all(len(itl) >= 1 for itl in result["itls"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_serve_chat_endpoint(tiny_server, tmp_path):
    args = ["--base-url", tiny_server, "--endpoint", "/v1/chat/completions", "--num-prompts", "3",
            "--random-input-len", "10", "--random-output-len", "4", "--max-concurrency", "2", "--timeout", "120",
            "--save-result", "--result-dir", str(tmp_path), "--result-filename", "chat.json"]  # fmt: skip
    proc = _bench(args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "chat.json").read_text())
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (3, 0, 12), result["errors"]
    assert result["max_concurrency"] == 2
    assert all(n > 10 for n in result["input_lens"])  # the server's prompt_tokens include the chat template


def test_bench_serve_closed_port_fails_every_request_quickly(tmp_path):
    port = free_port()  # nothing listens here
    args = ["--base-url", f"http://127.0.0.1:{port}", "--model", "none", "--num-prompts", "6", "--request-rate",
            "inf", "--random-input-len", "4", "--random-output-len", "2", "--timeout", "10", "--save-result",
            "--result-dir", str(tmp_path)]  # fmt: skip
    start = time.monotonic()
    proc = _bench(args, tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr  # nothing completed
    result = _saved(tmp_path)
    assert (result["completed"], result["failed"]) == (0, 6)
    assert all("Connect" in e for e in result["errors"]), result["errors"]
    assert elapsed < 60


def test_requests_to_a_silent_server_time_out():
    import socket

    from shardserve.tools.bench_serve import run_benchmark

    with socket.socket() as silent:  # the kernel completes connections; nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        cfg = BenchConfig(base_url=f"http://127.0.0.1:{silent.getsockname()[1]}", model="m", num_prompts=3,
                          random_input_len=4, random_output_len=2, timeout=1.0)  # fmt: skip
        start = time.monotonic()
        result = run_benchmark(cfg)
    assert time.monotonic() - start < 10
    assert (result.metrics["completed"], result.metrics["failed"]) == (0, 3)
    assert all(r.error == "timed out after 1.0 s" for r in result.requests)
