"""The worker loop driven by a fake channel: what a rank answers to each message, in order."""

from __future__ import annotations

import numpy as np
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

    def __init__(self, messages: list[m.HeadMessage] | None):
        self.messages = list(messages or [])
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


def _only(token: int, vocab: int) -> bytes:
    """A one-row bitmask that allows ``token`` alone."""
    words = np.zeros((vocab + 31) // 32, np.uint32)
    words[token // 32] = np.uint32(1 << (token % 32))
    return words.view(np.int32).tobytes()


def test_a_grammar_step_sends_what_it_holds_then_waits_for_its_bitmask_keeping_other_messages(tiny_config):
    """Step 0 (grammar) runs its forward and waits; step 1 and a stats request that arrive before bitmask 0
    are kept and handled after it, in order; step 1 sends step 0's held output before waiting for bitmask 1;
    each bitmask decides its token."""
    ps.init_single_process(torch.device("cpu"))
    scheduler = Scheduler(tiny_config.scheduler, BlockManager(32, 4), 64, async_scheduling=True)
    req = Request("g", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), 8)
    req.grammar = object()  # any matcher: the step message only carries the flag
    scheduler.add_request(req)
    first, second = scheduler.schedule(), scheduler.schedule()
    steps = [first.to_message(scheduler.block_manager), second.to_message(scheduler.block_manager)]
    assert all(s.grammar for s in steps)
    channel = FakeChannel(None)
    try:
        worker = Worker(tiny_config, torch.device("cpu"), 0, channel)
        vocab = worker.runner.arch.vocab_size
        channel.messages = [
            m.ProfileRequest(), m.InitKVCache(32, 64), steps[0], steps[1], m.StatsRequest(),
            m.GrammarBitmask(0, m.i32([0]), _only(4242, vocab)), m.GrammarBitmask(1, m.i32([0]), _only(77, vocab)),
            m.FlushOutputs(), m.Shutdown(),
        ]  # fmt: skip
        worker.loop()
    finally:
        ps.destroy_model_parallel()
    kinds = [type(x).__name__ for x in channel.sent]
    assert kinds == ["KVCapacity", "Ready", "StepOutput", "WorkerStats", "StepOutput"]
    outputs = [x for x in channel.sent if isinstance(x, m.StepOutput)]
    assert [o.step_id for o in outputs] == [0, 1]
    assert [m.as_i32(o.sampled).tolist() for o in outputs] == [[4242], [77]]


def test_a_shutdown_while_waiting_for_a_bitmask_ends_the_loop(tiny_config):
    ps.init_single_process(torch.device("cpu"))
    scheduler = Scheduler(tiny_config.scheduler, BlockManager(32, 4), 64, async_scheduling=True)
    req = Request("g", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8), 8)
    req.grammar = object()
    scheduler.add_request(req)
    step = scheduler.schedule().to_message(scheduler.block_manager)
    channel = FakeChannel([m.ProfileRequest(), m.InitKVCache(32, 64), step, m.Shutdown()])
    try:
        Worker(tiny_config, torch.device("cpu"), 0, channel).loop()  # returns instead of waiting forever
    finally:
        ps.destroy_model_parallel()
    assert [type(x).__name__ for x in channel.sent] == ["KVCapacity", "Ready"]
