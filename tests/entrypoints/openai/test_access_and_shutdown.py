"""Access control, CORS, request timeouts and the SIGTERM drain, over the scripted fake engine.

The drain is started with ``server.begin_drain()``, which is what the SIGTERM handler calls (signals
only reach the main thread; these servers run in threads).
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest
from conftest import FakeAsyncLLM

from shardserve.config import ServerConfig
from shardserve.entrypoints.openai.access import is_loopback, warn_if_open
from shardserve.entrypoints.openai.api_server import ServerState

pytestmark = pytest.mark.timeout(120)

KEY = "s3cret-key"
COMPLETION = {"prompt": "one two three", "max_tokens": 3}
GENERATE = {"text": "one two three", "sampling_params": {"max_new_tokens": 3}}


@pytest.fixture
def fake(smollm_tokenizer):
    return FakeAsyncLLM(smollm_tokenizer)


def start(serve_app, fake, **config) -> str:
    return serve_app(ServerState(engine=fake, served_model_names=["fake-model"], config=ServerConfig(**config))).url


def sse_data(resp: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in resp.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize(
    "method,path,body",
    [("GET", "/v1/models", None), ("POST", "/v1/completions", COMPLETION), ("POST", "/generate", GENERATE)],
)
def test_api_key_missing_wrong_right(serve_app, fake, method, path, body):
    url = start(serve_app, fake, api_key=KEY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
        r = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_health_public_metrics_protected_only_when_asked(serve_app, fake):
    open_url = start(serve_app, fake, api_key=KEY)
    assert httpx.get(open_url + "/health", timeout=30).status_code == 200
    assert httpx.get(open_url + "/metrics", timeout=30).status_code == 200
    locked = start(serve_app, fake, api_key=KEY, protect_metrics=True)
    assert httpx.get(locked + "/health", timeout=30).status_code == 200
    assert httpx.get(locked + "/metrics", timeout=30).status_code == 401
    r = httpx.get(locked + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200 and "shardserve:" in r.text


def test_cors_preflight_only_when_configured(serve_app, fake):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    url = start(serve_app, fake, api_key=KEY, allowed_origins=["https://app.example"], allow_credentials=True)
    r = httpx.options(url + "/v1/chat/completions", headers=preflight, timeout=30)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert r.headers["access-control-allow-credentials"] == "true"
    other = httpx.options(
        url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}, timeout=30
    )
    assert "access-control-allow-origin" not in other.headers
    plain = start(serve_app, fake)
    r = httpx.options(plain + "/v1/chat/completions", headers=preflight, timeout=30)
    assert "access-control-allow-origin" not in r.headers


def test_public_bind_without_key_warns(caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
    with caplog.at_level(logging.WARNING):
        warn_if_open(ServerConfig(host="127.0.0.1"))
        warn_if_open(ServerConfig(host="0.0.0.0", api_key=KEY))
        assert not caplog.records
        warn_if_open(ServerConfig(host="0.0.0.0"))
    assert "without --api-key" in caplog.text


def test_stream_past_request_timeout_ends_with_error_event(serve_app, fake):
    fake.step_s = 0.05
    url = start(serve_app, fake, request_timeout=0.5)
    body = {**COMPLETION, "max_tokens": 200, "stream": True}
    start_t = time.monotonic()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
        events = sse_data(resp)
    assert time.monotonic() - start_t < 5
    assert events[-1] == "[DONE]" and '"request_timeout"' in events[-2]
    assert 1 <= len(events) - 2 < 200 and fake.aborted and not fake.active


def stream_in_thread(url: str, body: dict, out: dict) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
                out["status"] = resp.status_code
                out["events"] = sse_data(resp)
        except httpx.HTTPError as e:  # the server cut the connection
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_drain_refuses_new_requests_and_finishes_running_ones(serve_app, fake):
    fake.step_s = 0.02
    server = serve_app(
        ServerState(engine=fake, served_model_names=["fake-model"], config=ServerConfig(shutdown_timeout=30))
    )
    out: dict = {}
    thread = stream_in_thread(server.url, {**COMPLETION, "max_tokens": 100, "stream": True}, out)
    assert wait_for(lambda: fake.active)
    assert server.server.begin_drain()
    assert wait_for(lambda: httpx.get(server.url + "/health", timeout=5).status_code == 503)
    assert httpx.get(server.url + "/health", timeout=5).json()["status"] == "draining"
    refused = httpx.post(server.url + "/v1/completions", json=COMPLETION, timeout=5)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    thread.join(30)
    assert out["status"] == 200 and out["events"][-1] == "[DONE]"
    assert '"finish_reason":"length"' in out["events"][-2] and not fake.aborted
    assert wait_for(lambda: server.server.should_exit) and server.server.state.drain.aborted == 0


def test_drain_aborts_what_outlives_the_shutdown_timeout(serve_app, fake, monkeypatch):
    fake.step_s = 0.05
    aborted_reasons = []
    fake.abort_all = aborted_reasons.append  # the real AsyncLLM ends its streams; the fake is closed by the server
    server = serve_app(
        ServerState(engine=fake, served_model_names=["fake-model"], config=ServerConfig(shutdown_timeout=0.5))
    )
    monkeypatch.setattr("shardserve.entrypoints.openai.lifecycle.ABORT_GRACE_S", 0.5)
    out: dict = {}
    thread = stream_in_thread(server.url, {**COMPLETION, "max_tokens": 200, "stream": True}, out)
    assert wait_for(lambda: fake.active)
    start_t = time.monotonic()
    assert server.server.begin_drain()
    assert wait_for(lambda: server.server.should_exit, timeout=10)
    assert 0.5 <= time.monotonic() - start_t < 5
    assert server.server.state.drain.aborted == 1 and "shutdown-timeout" in aborted_reasons[0]
    thread.join(30)
    # The fake ignores abort_all, so uvicorn's own grace period ends the stream: it never completes.
    assert "error" in out or out["events"][-1] != "[DONE]" or '"finish_reason":"length"' not in out["events"][-2]
