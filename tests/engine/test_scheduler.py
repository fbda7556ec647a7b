"""Scheduler behaviour driven by a fake model that returns a fixed next token."""

from shardserve.config import SchedulerConfig
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler
from shardserve.executor.messages import StepOutput, as_i32, i32
from shardserve.sampling_params import SamplingParams

EOS = 0


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, max_len=256, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    s = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), bm, max_len)
    s.eos_token_ids = frozenset({EOS})
    return s, bm


def req(rid, n_prompt, max_tokens=4, **kw):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw), max_tokens)


def sampled(step, tokens):
    """The output rank's answer to ``step``: ``tokens[request_id]`` (or one token for all) per sampling request."""
    ids = [tokens if isinstance(tokens, int) else tokens[r.request_id] for r in step.scheduled if r.sample]
    return StepOutput(step.step_id, sampled=i32(ids))


def run_step(s, token=7):
    step = s.schedule()
    s.update_from_output(step, sampled(step, token))
    return step


def test_long_prompt_is_prefilled_in_chunks_and_samples_once():
    s, _ = make(budget=8)
    r = req("a", 20)
    s.add_request(r)
    steps = [run_step(s) for _ in range(3)]
    assert [x.scheduled[0].num_tokens for x in steps] == [8, 8, 4]
    assert [x.scheduled[0].sample for x in steps] == [False, False, True]
    assert [x.scheduled[0].start_position for x in steps] == [0, 8, 16]
    assert r.output_token_ids == [7]


def test_new_request_joins_running_batch():
    s, _ = make()
    s.add_request(req("a", 4, max_tokens=10))
    run_step(s)
    s.add_request(req("b", 4))
    step = run_step(s)
    assert {x.request_id for x in step.scheduled} == {"a", "b"}
    assert [x.num_tokens for x in step.scheduled] == [1, 4]  # a decodes, b prefills


def test_stops_on_max_tokens_eos_and_stop_token_ids():
    s, bm = make()
    a, b, c = req("a", 3, max_tokens=2), req("b", 3, max_tokens=10), req("c", 3, max_tokens=10, stop_token_ids=[5])
    for r in (a, b, c):
        s.add_request(r)
    step = s.schedule()
    s.update_from_output(step, sampled(step, {"a": 7, "b": EOS, "c": 5}))
    assert b.status == RequestStatus.FINISHED_STOPPED and c.status == RequestStatus.FINISHED_STOPPED
    assert c.stop_reason == 5
    run_step(s)
    assert a.status == RequestStatus.FINISHED_LENGTH and a.output_token_ids == [7, 7]
    assert bm.num_free_blocks == bm.num_blocks


def test_min_tokens_and_ignore_eos_delay_eos():
    s, _ = make()
    r = req("a", 3, max_tokens=5, min_tokens=2)
    s.add_request(r)
    run_step(s, token=EOS)
    assert not r.status.finished  # one token < min_tokens
    run_step(s, token=EOS)
    assert r.status == RequestStatus.FINISHED_STOPPED


def test_preempts_newest_when_blocks_run_out_and_everything_finishes_without_leak():
    s, bm = make(num_blocks=6, block_size=4, budget=64)
    reqs = [req(f"r{i}", 8, max_tokens=8) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    seen_preemption = False
    for _ in range(200):
        if not s.requests:
            break
        step = run_step(s)
        seen_preemption |= bool(step.freed_rows) and s.num_preemptions > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)
    assert all(len(r.output_token_ids) == 8 for r in reqs)
    assert s.num_preemptions > 0 and seen_preemption
    assert bm.num_free_blocks == bm.num_blocks


def test_max_num_seqs_bounds_the_batch():
    s, _ = make(max_seqs=2)
    for i in range(5):
        s.add_request(req(f"r{i}", 2))
    step = s.schedule()
    assert len(step.scheduled) == 2 and s.num_waiting == 3


def test_in_flight_request_is_not_rescheduled():
    s, _ = make()
    s.add_request(req("a", 4, max_tokens=10))
    s.add_request(req("b", 4, max_tokens=10))
    first = s.schedule()
    assert {x.request_id for x in first.scheduled} == {"a", "b"}
    assert s.schedule().is_empty  # both in flight: a second micro-batch has nothing to take
    s.add_request(req("c", 4))
    second = s.schedule()
    assert [x.request_id for x in second.scheduled] == ["c"]


def test_prefix_hit_skips_cached_tokens():
    s, _ = make(block_size=4)
    a = req("a", 12, max_tokens=1)
    s.add_request(a)
    run_step(s)
    assert a.status.finished
    b = req("b", 12, max_tokens=1)
    s.add_request(b)
    step = s.schedule()
    assert b.num_cached_tokens == 8
    assert step.to_message(s.block_manager).new_requests[0].num_computed_tokens == 8
    assert step.scheduled[0].start_position == 8 and step.scheduled[0].num_tokens == 4


def test_abort_frees_blocks_and_is_reported_to_workers():
    s, bm = make()
    a = req("a", 8, max_tokens=10)
    s.add_request(a)
    run_step(s)
    row = a.row
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert bm.num_free_blocks == bm.num_blocks
    s.add_request(req("b", 2))
    step = s.schedule()
    message = step.to_message(bm)
    assert row in as_i32(message.freed_rows).tolist()
    assert message.new_requests[0].row == row  # the freed row is reused, after the ranks free it


def test_step_message_carries_diffs_not_tokens():
    """A running request's step says how many tokens and which new blocks; its tokens never travel again."""
    s, bm = make(block_size=4)
    a = req("a", 4, max_tokens=10)
    s.add_request(a)
    first = s.schedule()
    new = first.to_message(bm).new_requests
    assert len(new) == 1 and as_i32(new[0].prompt_token_ids).tolist() == [1, 2, 3, 4]
    s.update_from_output(first, sampled(first, 9))
    step = s.schedule()  # decode of token 5: a new block (4 tokens per block)
    message = step.to_message(bm)
    assert message.new_requests == []
    assert as_i32(message.rows).tolist() == [a.row] and as_i32(message.num_new_tokens).tolist() == [1]
    assert as_i32(message.block_rows).tolist() == [a.row] and len(as_i32(message.block_ids)) == 1
