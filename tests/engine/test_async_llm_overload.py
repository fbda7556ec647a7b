"""AsyncLLM under client churn and overload (tiny random Llama, one process, CPU).

Aborted streams must give every KV block back; a full waiting queue must refuse (EngineOverloadedError)
rather than grow, and everything admitted must still finish.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from shardserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.engine.async_llm import AsyncLLM, EngineOverloadedError
from shardserve.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NUM_STREAMS = 1000
CONCURRENCY = 32


def make_engine(model_dir, **scheduler) -> AsyncLLM:
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32", device="cpu", max_model_len=256),
        cache=CacheConfig(num_kv_blocks=64, block_size=16),
        scheduler=SchedulerConfig(**scheduler),
    )
    return AsyncLLM(config)


async def wait_idle(engine: AsyncLLM, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats.num_running == stats.num_waiting == 0) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)


def test_aborted_streams_leave_no_kv_block_in_use(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_num_seqs=16, max_num_batched_tokens=512)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    got_tokens = []

    async def leave_early(i: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            # Distinct prompts (no prefix sharing hides a leak); leave after 1..3 outputs.
            stream = engine.generate([1, 100 + i % 500, 7, 3000 + i], params, f"abort-{i}")
            try:
                async for out in stream:
                    got_tokens.append(out.outputs[0].num_output_tokens)
                    if out.outputs[0].num_output_tokens > i % 3:
                        break
            finally:
                await stream.aclose()

    async def run() -> None:
        gate = asyncio.Semaphore(CONCURRENCY)
        await asyncio.wait_for(asyncio.gather(*(leave_early(i, gate) for i in range(NUM_STREAMS))), 180)

    try:
        start = time.monotonic()
        asyncio.run(run())
        elapsed = time.monotonic() - start
        stats = asyncio.run(wait_idle(engine))
        bm = engine.engine.block_manager
        assert (stats.num_running, stats.num_waiting) == (0, 0)
        assert stats.kv_cache_usage == 0.0 and bm.num_free_blocks == bm.num_blocks == 64
        assert all(b.ref_count == 0 for b in bm.blocks)
        assert not engine.engine.scheduler.requests and not engine._sinks
        # Every stream produced output before it left (so each one held blocks at some point).
        assert len(got_tokens) >= NUM_STREAMS
        print(f"{NUM_STREAMS} aborted streams in {elapsed:.1f} s")
    finally:
        engine.shutdown()


def test_full_queue_refuses_and_admitted_requests_finish(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_num_seqs=1, max_num_batched_tokens=64, max_queue_len=2)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def one(i: int) -> str:
        try:
            async for out in engine.generate([1, 520, 3327, i], params, f"q-{i}"):
                if out.finished:
                    return "done" if out.outputs[0].num_output_tokens == 24 else "short"
        except EngineOverloadedError:
            return "refused"
        return "lost"

    async def flood() -> list[str]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(20))), 120)

    try:
        results = asyncio.run(flood())
        assert set(results) <= {"done", "refused"}, results
        assert results.count("refused") >= 10 and results.count("done") >= 2
        assert engine.stats().num_free_blocks == 64
    finally:
        engine.shutdown()
