"""The worker loop driven by a fake channel: what a rank answers to each message, in order."""

from __future__ import annotations

import pytest
import torch

from shardserve import LLM, SamplingParams
from shardserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.distributed import parallel_state as ps
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.request import Request
from shardserve.engine.scheduler import Scheduler
from shardserve.executor import messages as m
from shardserve.executor.worker import Worker

PROMPTS = [[1, 520, 3327, 314, 4649, 3135], [42, 7, 913, 2050]]


class FakeChannel:
    """Hands the worker a fixed list of messages and records its answers."""

    def __init__(self, messages: list[m.HeadMessage]):
        self.messages = list(messages)
        self.sent: list[m.RankMessage] = []

    def recv(self, timeout=None, check=None) -> m.HeadMessage:
        return m.decode_step_message(m.encode(self.messages.pop(0)))  # through the codec, as on the wire

    def send(self, message: m.RankMessage) -> None:
        self.sent.append(m.decode_reply(m.encode(message)))


@pytest.fixture()
def tiny_config(tiny_llama_dir):
    return EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu"),
        cache=CacheConfig(block_size=4, num_kv_blocks=32),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, async_scheduling=True),
    )


def test_worker_answers_profile_init_steps_flush_stats_and_stops(tiny_config, tiny_llama_dir):
    ps.init_single_process(torch.device("cpu"))
    scheduler = Scheduler(tiny_config.scheduler, BlockManager(32, 4), 64, async_scheduling=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    requests = [Request(str(i), p, greedy, 8) for i, p in enumerate(PROMPTS)]
    for r in requests:
        scheduler.add_request(r)
    first = scheduler.schedule()  # prefill of both, sampling their first tokens
    second = scheduler.schedule()  # async: decodes whose inputs are the first step's samples
    assert all(s.input_pending for s in second.scheduled)
    steps = [first, second]
    channel = FakeChannel(
        [m.ProfileRequest(), m.InitKVCache(32, 64)]
        + [s.to_message(scheduler.block_manager) for s in steps]
        + [m.FlushOutputs(), m.StatsRequest(), m.Shutdown()]
    )
    try:
        worker = Worker(tiny_config, torch.device("cpu"), 0, channel)
        worker.loop()
    finally:
        ps.destroy_model_parallel()
    kinds = [type(x).__name__ for x in channel.sent]
    # Step 0's output goes out once step 1 is launched; step 1's when the head asks for it.
    assert kinds == ["KVCapacity", "Ready", "StepOutput", "StepOutput", "WorkerStats"]
    assert channel.sent[0] == m.KVCapacity(0, 32, worker.runner.model.weight_allocated_bytes)
    assert channel.sent[0].weight_bytes > 0
    outputs = channel.sent[2:4]
    assert [o.step_id for o in outputs] == [first.step_id, second.step_id]
    for step, out in zip(steps, outputs):
        scheduler.update_from_output(step, out)
    stats = channel.sent[4]
    assert stats.num_steps == 2 and stats.forward_s > 0

    llm = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=32, block_size=4)
    try:
        want = [o.outputs[0].token_ids[:2] for o in llm.generate(PROMPTS, greedy)]
    finally:
        llm.shutdown()
    assert [r.output_token_ids for r in requests] == want


def test_a_malformed_message_stops_the_worker_with_an_error(tiny_config):
    ps.init_single_process(torch.device("cpu"))
    bad = m.Step(0, rows=m.i32([9]), num_new_tokens=m.i32([1]), sample=bytes([1]))  # row 9 of a 4-row batch
    channel = FakeChannel([m.ProfileRequest(), m.InitKVCache(32, 64), bad])
    try:
        worker = Worker(tiny_config, torch.device("cpu"), 0, channel)
        with pytest.raises(m.MalformedMessageError, match="row"):
            worker.loop()
    finally:
        ps.destroy_model_parallel()
