"""Async scheduling: a decoding request is scheduled again while its step is in flight."""

import pytest

from shardserve.config import SchedulerConfig
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler
from shardserve.executor.messages import StepOutput, i32
from shardserve.sampling_params import SamplingParams

EOS = 0


def make():
    bm = BlockManager(64, 4, True)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), bm, 256, async_scheduling=True)
    s.eos_token_ids = frozenset({EOS})
    return s, bm


def req(rid, n_prompt, max_tokens=8, **kw):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw), max_tokens)


def finish(s, step, token):
    s.update_from_output(step, StepOutput(step.step_id, sampled=i32([token for r in step.scheduled if r.sample])))


def test_decode_is_scheduled_with_a_placeholder_while_the_prefill_is_in_flight():
    s, _ = make()
    r = req("a", 5)
    s.add_request(r)
    s0 = s.schedule()
    s1 = s.schedule()  # step 0 still in flight
    assert s1.scheduled[0].input_pending and s1.scheduled[0].num_tokens == 1
    assert s1.scheduled[0].start_position == 5 and s1.scheduled[0].sample
    assert s.schedule().is_empty  # at most two steps of one request in flight
    finish(s, s0, 11)
    finish(s, s1, 12)
    assert r.output_token_ids == [11, 12] and r.num_computed_tokens == 6 and not r.in_flight
    s2 = s.schedule()
    assert not s2.scheduled[0].input_pending and s2.scheduled[0].start_position == 6


def test_pending_token_that_ends_the_request_by_length_gets_no_second_step():
    s, _ = make()
    r = req("a", 3, max_tokens=1)
    s.add_request(r)
    s0 = s.schedule()
    assert s.schedule().is_empty
    finish(s, s0, 9)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == [9]


def test_step_after_eos_is_discarded_and_blocks_are_freed():
    s, bm = make()
    r = req("a", 3)
    s.add_request(r)
    s0 = s.schedule()
    s1 = s.schedule()
    finish(s, s0, EOS)
    assert r.status is RequestStatus.FINISHED_STOPPED
    finish(s, s1, 5)  # the speculative step's token is dropped
    assert r.output_token_ids == [EOS]
    assert bm.usage == 0.0


def test_penalties_do_not_wait_for_the_previous_token():
    """Penalty counts live on the device, so a request with penalties is scheduled ahead like any other."""
    s, _ = make()
    s.add_request(req("a", 3, repetition_penalty=1.2))
    s.schedule()
    assert s.schedule().scheduled[0].input_pending


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_llm_tokens_match_with_and_without_async_scheduling(tiny_llama_dir, max_tokens):
    from shardserve import LLM
    from shardserve import SamplingParams as SP

    prompts = [[1, 520, 3327, 314], [1, 17, 99, 42, 8, 1000, 77]]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, async_scheduling=async_scheduling)
        try:
            outs = llm.generate(prompts, SP(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            seeded = llm.generate(prompts[:1], SP(temperature=0.8, seed=3, max_tokens=max_tokens, ignore_eos=True))
            assert llm.engine.block_manager.usage == 0.0
        finally:
            llm.shutdown()
        results.append([o.outputs[0].token_ids for o in outs + seeded])
    assert results[0] == results[1]
    assert all(len(t) == max_tokens for t in results[1])
