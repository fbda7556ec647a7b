"""``shardserve serve`` flags for failures, overload and access reach the configs; SIGTERM drains and exits 0."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from procs import TINY, Stream, serve, stop, wait_healthy
from typer.testing import CliRunner

from shardserve.cli import app
from shardserve.distributed.rendezvous import free_port


def test_flags_reach_the_server_and_engine_configs(monkeypatch):
    seen = {}

    def fake_run_node(config, server, launch):
        seen.update(config=config, server=server)
        return 0

    monkeypatch.setattr("shardserve.launcher.run_node", fake_run_node)
    args = ["serve", "--device", "cpu", "--api-key", "k", "--protect-metrics", "--allowed-origins", '["https://a.example"]',
            "--allowed-origins", "https://b.example,https://c.example", "--allow-credentials",
            "--max-request-body-bytes", "1000", "--request-timeout", "7.5", "--shutdown-timeout", "3",
            "--max-queue-len", "5", "--max-num-seqs", "4", "--watchdog-timeout", "9",
            "--max-restarts", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    server, config = seen["server"], seen["config"]
    assert server.api_key == "k" and server.protect_metrics and server.allow_credentials
    assert server.allowed_origins == ["https://a.example", "https://b.example", "https://c.example"]
    assert server.allowed_methods == ["*"] and server.allowed_headers == ["*"]
    assert (server.max_request_body_bytes, server.request_timeout, server.shutdown_timeout) == (1000, 7.5, 3.0)
    assert (config.scheduler.max_queue_len, config.scheduler.max_num_seqs) == (5, 4)
    assert (config.parallel.watchdog_timeout, config.parallel.max_restarts) == (9.0, 1)
    bad = CliRunner().invoke(app, ["serve", "--device", "cpu", "--request-timeout", "0"])
    assert bad.exit_code == 2 and "--request-timeout" in bad.output


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_drains_running_stream_refuses_new_ones_and_exits_zero(tiny_llama_dir, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    proc = serve([str(tiny_llama_dir), *TINY, "--port", str(port), "--shutdown-timeout", "60"], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc])
        stream = Stream(url, max_tokens=240)
        stream.start()
        stream.wait_tokens(2)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        refused = None
        while refused is None and time.monotonic() < deadline:
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
            refused = r if r.status_code == 503 else None
        assert refused is not None and "shutting down" in refused.json()["error"]["message"]
        assert httpx.get(url + "/health", timeout=10).json()["status"] == "draining"
        stream.join(60)
        assert stream.error is None and stream.events[-1][1] == "[DONE]"
        assert '"finish_reason":"length"' in stream.events[-2][1]  # the running stream was not cut
        assert len(stream.events) > 200  # one event per token with text
        assert proc.wait(timeout=60) == 0
        assert "drained: every request finished" in log.read_text()
    finally:
        stop([proc])
