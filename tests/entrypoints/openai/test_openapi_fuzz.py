"""schemathesis against a live server on the tiny random Llama: no generated request may get a 5xx.

Valid (positive) and invalid (negative) requests are generated from ``/openapi.json`` for every
operation; the run is bounded in examples per operation and in total time (``FUZZ_BUDGET_S``).
"""

from __future__ import annotations

import os
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from shardserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig  # noqa: E402
from shardserve.engine.async_llm import AsyncLLM  # noqa: E402
from shardserve.entrypoints.openai.api_server import ServerState  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BUDGET_S = float(os.environ.get("FUZZ_BUDGET_S", "60"))
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
"""Examples per operation and generation mode (upper bound; the time budget usually ends the run first)."""


class _OutOfTime(Exception):
    """Ends one operation's share of the time budget (hypothesis has no time limit of its own)."""


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    config = EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_model_len=128),
        cache=CacheConfig(num_kv_blocks=256, block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024),
    )
    llm = AsyncLLM(config)
    yield llm
    llm.shutdown()


def test_generated_requests_never_get_a_server_error(engine, serve_app):
    server = serve_app(ServerState(engine=engine, served_model_names=["tiny"], config=ServerConfig()))
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /generate"} <= labels
    for op in operations:  # bodies are described, so the fuzzer sends real payloads
        if op.method.upper() == "POST":
            assert op.body, f"{op.label} has no request body in /openapi.json"

    calls: dict[str, int] = {}
    failures: list[str] = []
    slots = [(mode, op) for mode in schemathesis.GenerationMode for op in operations]
    posts = sum(op.method.upper() == "POST" for _, op in slots)
    for mode, op in slots:
        # The GET operations have nothing to vary; the time goes to the POST bodies, evenly.
        stop_at = time.monotonic() + (BUDGET_S / posts if op.method.upper() == "POST" else 5.0)
        try:
            _fuzz(op, mode, stop_at, server.url, calls, failures)
        except _OutOfTime:
            pass
        except Unsatisfiable:  # nothing invalid to send to an operation without parameters or body
            assert mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET"
    print(f"schemathesis: {sum(calls.values())} calls: {calls}")
    assert not failures, "\n".join(failures[:10])
    assert len(calls) == len(operations) and all(
        calls[op.label] >= 10 for op in operations if op.method.upper() == "POST"
    )
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks or stats.num_running > 0


def _fuzz(op, mode, stop_at: float, url: str, calls: dict[str, int], failures: list[str]) -> None:
    """Send generated cases of one operation until ``stop_at``; record calls and 5xx answers."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        if time.monotonic() > stop_at:
            raise _OutOfTime
        response = case.call(base_url=url, timeout=60)
        calls[op.label] = calls.get(op.label, 0) + 1
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code} "
                            f"{response.text[:300]}")  # fmt: skip

    run()
