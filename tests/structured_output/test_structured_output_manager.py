"""Engine side on the embedded tokenizer: tokenizer info, compile cache, matchers, batch fill, apply."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from bitmask_utils import allowed_ids

from shardserve.structured_output import (
    StructuredOutputManager,
    apply_bitmask,
    build_tokenizer_info,
    from_structured_outputs,
)

YES_NO = from_structured_outputs({"choice": ["yes", "no"]})


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_tokenizer_info_matches_the_tokenizer(smollm_tokenizer):
    info = build_tokenizer_info(smollm_tokenizer)
    assert info.vocab_size == smollm_tokenizer.vocab_size == 49152
    assert sorted(info.stop_token_ids) == sorted(smollm_tokenizer.eos_token_ids)
    assert info.vocab_type.name == "BYTE_LEVEL"
    # Tokens decode to their bytes (the GPT-2 byte alphabet undone): " hello" is one token with a space.
    token = encode(smollm_tokenizer, " hello")
    assert len(token) == 1 and info.decoded_vocab[token[0]] == b" hello"


def test_padded_model_vocab_rows_are_never_allowed(smollm_tokenizer):
    mgr = StructuredOutputManager(smollm_tokenizer, vocab_size=49152 + 100)
    try:
        assert mgr.vocab_size == 49252 and mgr.bitmask_width == math.ceil(49252 / 32)
        m = mgr.matcher(from_structured_outputs({"regex": ".+"}))
        bitmask = mgr.allocate_bitmask(1)
        mgr.fill_bitmask([m], bitmask)
        allowed = allowed_ids(bitmask, 0, mgr.vocab_size)
        assert len(allowed) > 40000 and allowed.max() < 49152
    finally:
        mgr.shutdown()


def test_special_tokens_are_never_allowed_and_stop_only_at_the_end(manager, smollm_tokenizer):
    m = manager.matcher(from_structured_outputs({"regex": "[a-z ]+"}))
    bitmask = manager.allocate_bitmask(1)
    manager.fill_bitmask([m], bitmask)
    allowed = set(allowed_ids(bitmask, 0, manager.vocab_size).tolist())
    im_start = smollm_tokenizer.backend.token_to_id("<|im_start|>")
    assert im_start not in allowed and not (allowed & smollm_tokenizer.eos_token_ids)
    assert m.accept_tokens(encode(smollm_tokenizer, "ab"))
    manager.fill_bitmask([m], bitmask)
    assert smollm_tokenizer.eos_token_ids <= set(allowed_ids(bitmask, 0, manager.vocab_size).tolist())


def test_compile_cache_hits_on_an_equal_spec(manager):
    spec = from_structured_outputs({"regex": "cache-[0-9]{4}"})
    hits, misses = manager.cache_hits, manager.cache_misses
    first = manager.compile(spec)
    assert (manager.cache_hits, manager.cache_misses) == (hits, misses + 1)
    again = manager.compile(from_structured_outputs({"regex": "cache-[0-9]{4}"}))
    assert again is first and manager.cache_hits == hits + 1
    assert manager.compile_async(spec).result(timeout=30) is first


def test_cache_keeps_at_most_cache_size_entries(smollm_tokenizer):
    mgr = StructuredOutputManager(smollm_tokenizer, cache_size=2)
    try:
        specs = [from_structured_outputs({"regex": f"x{i}"}) for i in range(3)]
        for spec in specs:
            mgr.compile(spec)
        mgr.compile(specs[0])  # evicted as least recently used
        assert mgr.cache_misses == 4
    finally:
        mgr.shutdown()


def test_choice_matcher_allows_only_the_choices_then_stop(manager, smollm_tokenizer):
    m = manager.matcher(YES_NO)
    bitmask = manager.allocate_bitmask(1)
    manager.fill_bitmask([m], bitmask)
    texts = {smollm_tokenizer.decode([int(i)]) for i in allowed_ids(bitmask, 0, manager.vocab_size)}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts)
    assert not m.accept_token(encode(smollm_tokenizer, "maybe")[0])  # rejected, state unchanged
    assert m.accept_tokens(encode(smollm_tokenizer, "yes"))
    assert m.is_completed() and not m.is_terminated()
    manager.fill_bitmask([m], bitmask)
    assert set(allowed_ids(bitmask, 0, manager.vocab_size).tolist()) == smollm_tokenizer.eos_token_ids
    assert m.accept_token(smollm_tokenizer.eos_token_id) and m.is_terminated()
    assert not m.accept_token(encode(smollm_tokenizer, "no")[0])


def test_rollback_restores_the_earlier_state(manager, smollm_tokenizer):
    m = manager.matcher(from_structured_outputs({"regex": "(abc|abd)"}))
    bitmask = manager.allocate_bitmask(1)
    manager.fill_bitmask([m], bitmask)
    before = allowed_ids(bitmask, 0, manager.vocab_size).tolist()
    ids = [smollm_tokenizer.backend.token_to_id(c) for c in "ab"]
    assert m.accept_tokens(ids)
    m.rollback(2)
    manager.fill_bitmask([m], bitmask)
    assert allowed_ids(bitmask, 0, manager.vocab_size).tolist() == before
    with pytest.raises(ValueError, match="cannot roll back 1"):
        m.rollback(1)


def test_reasoning_section_is_unconstrained_until_its_end_tokens(manager, smollm_tokenizer):
    end = encode(smollm_tokenizer, "</think>")
    m = manager.matcher(YES_NO, reasoning_end_ids=end)
    bitmask = manager.allocate_bitmask(2)
    thinking = encode(smollm_tokenizer, "hmm, let me think")
    assert m.in_reasoning and m.accept_tokens(thinking)
    assert manager.fill_bitmask([None, m], bitmask) == []
    assert m.accept_tokens(end) and not m.in_reasoning
    assert manager.fill_bitmask([None, m], bitmask) == [1]
    assert not m.accept_token(encode(smollm_tokenizer, "maybe")[0])
    assert m.accept_tokens(encode(smollm_tokenizer, "no")) and m.is_completed()
    m.rollback(len(encode(smollm_tokenizer, "no")) + 1)  # back across the end of the reasoning section
    assert m.in_reasoning and m.accept_token(end[-1]) and not m.in_reasoning


def test_fill_touches_only_grammar_rows_and_skips_terminated_ones(manager, smollm_tokenizer):
    done = manager.matcher(YES_NO)
    assert done.accept_tokens(encode(smollm_tokenizer, "no") + [smollm_tokenizer.eos_token_id])
    live = manager.matcher(YES_NO)
    bitmask = manager.allocate_bitmask(4)
    bitmask[0] = 7
    rows = manager.fill_bitmask([None, live, done, None], bitmask)
    assert rows == [1]
    assert bitmask[0].eq(7).all() and bitmask[3].eq(-1).all() and not bitmask[1].eq(-1).all()


def test_submit_fill_is_none_without_grammars(manager):
    assert manager.submit_fill([None, None]) is None
    assert manager.submit_fill([]) is None


def test_submit_fill_matches_the_synchronous_fill(manager, smollm_tokenizer):
    a, b = manager.matcher(YES_NO), manager.matcher(from_structured_outputs({"regex": "[0-9]+"}))
    assert a.accept_tokens(encode(smollm_tokenizer, "y"))
    expected = manager.allocate_bitmask(3)
    assert manager.fill_bitmask([a, None, b], expected) == [0, 2]
    result = manager.submit_fill([a, None, b]).result(timeout=30)
    assert result.rows == [0, 2] and result.bitmask.shape == (3, manager.bitmask_width)
    assert torch.equal(result.bitmask[[0, 2]], expected[[0, 2]])


def test_fill_packed_matches_the_fill(manager, smollm_tokenizer):
    a, b = manager.matcher(YES_NO), manager.matcher(from_structured_outputs({"regex": "[0-9]+"}))
    assert a.accept_tokens(encode(smollm_tokenizer, "y"))
    expected = manager.allocate_bitmask(3)
    manager.fill_bitmask([a, None, b], expected)
    rows, packed = manager.fill_packed([a, None, b])  # rows 0 and 2: gathered
    assert rows == [0, 2] and packed == expected[[0, 2]].numpy().tobytes()
    rows, packed = manager.fill_packed([None, a, b])  # a contiguous run: one slice
    manager.fill_bitmask([None, a, b], expected)
    assert rows == [1, 2] and packed == expected[1:3].numpy().tobytes()
    assert manager.fill_packed([None, None]) == ([], b"")
    assert a.accept_tokens(encode(smollm_tokenizer, "es"))  # nothing is left pending on the matchers


def test_accept_while_the_fill_is_pending_raises(manager, smollm_tokenizer):
    gate = threading.Event()
    manager._pool.submit(gate.wait, 30)  # hold the fill thread so the fill below stays pending
    m = manager.matcher(YES_NO)
    future = manager.submit_fill([m])
    try:
        with pytest.raises(RuntimeError, match="being filled"):
            m.accept_token(encode(smollm_tokenizer, "y")[0])
    finally:
        gate.set()
    assert future.result(timeout=30).rows == [0]
    assert m.accept_tokens(encode(smollm_tokenizer, "yes"))


def test_two_buffers_alternate(manager):
    m = manager.matcher(YES_NO)
    first = manager.submit_fill([m]).result(timeout=30).bitmask
    second = manager.submit_fill([m]).result(timeout=30).bitmask
    third = manager.submit_fill([m]).result(timeout=30).bitmask
    assert first.data_ptr() != second.data_ptr() and first.data_ptr() == third.data_ptr()


def test_apply_bitmask_masks_only_the_given_rows(manager, smollm_tokenizer):
    m = manager.matcher(YES_NO)
    bitmask = manager.allocate_bitmask(3)
    rows = manager.fill_bitmask([None, m, None], bitmask)
    logits = torch.randn(3, manager.vocab_size)
    original = logits.clone()
    apply_bitmask(logits, bitmask, rows)
    allowed = allowed_ids(bitmask, 1, manager.vocab_size)
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
    assert torch.equal(logits[1, allowed], original[1, allowed])
    assert int(torch.isfinite(logits[1]).sum()) == len(allowed)
    choice = smollm_tokenizer.decode([int(logits[1].argmax())])
    assert "yes".startswith(choice) or "no".startswith(choice)


def test_apply_bitmask_takes_a_row_tensor_or_every_row(manager):
    m = manager.matcher(YES_NO)
    bitmask = manager.allocate_bitmask(3)
    rows = manager.fill_bitmask([None, m, m], bitmask)
    logits = torch.randn(3, manager.vocab_size)
    expected = logits.clone()
    apply_bitmask(expected, bitmask, rows)
    by_tensor = logits.clone()
    apply_bitmask(by_tensor, bitmask, torch.tensor(rows, dtype=torch.int32))
    assert torch.equal(by_tensor, expected)
    every = logits[1:].clone()
    apply_bitmask(every, bitmask[1:], None)
    assert torch.equal(every, expected[1:])
    untouched = logits.clone()
    apply_bitmask(untouched, bitmask, torch.zeros(0, dtype=torch.int32))
    assert torch.equal(untouched, logits)


def test_apply_bitmask_masks_logit_columns_past_the_bitmask(manager):
    m = manager.matcher(from_structured_outputs({"regex": ".+"}))
    bitmask = manager.allocate_bitmask(1)
    rows = manager.fill_bitmask([m], bitmask)
    logits = torch.zeros(1, manager.bitmask_width * 32 + 64)  # e.g. a vocabulary padded for TP
    apply_bitmask(logits, bitmask, rows)
    assert torch.isinf(logits[0, manager.bitmask_width * 32 :]).all()
    assert torch.isfinite(logits[0, :1000]).any()


def test_apply_bitmask_without_rows_is_a_no_op(manager):
    logits = torch.randn(2, manager.vocab_size)
    original = logits.clone()
    apply_bitmask(logits, manager.allocate_bitmask(2).zero_(), [])
    assert torch.equal(logits, original)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_bitmask_half_precision_logits(manager, dtype):
    m = manager.matcher(YES_NO)
    bitmask = manager.allocate_bitmask(1)
    rows = manager.fill_bitmask([m], bitmask)
    logits = torch.zeros(1, manager.vocab_size, dtype=dtype)
    apply_bitmask(logits, bitmask, rows)
    assert int(torch.isfinite(logits[0]).sum()) == len(allowed_ids(bitmask, 0, manager.vocab_size))


def test_json_object_allows_any_object_but_nothing_else(manager, smollm_tokenizer):
    m = manager.matcher(from_structured_outputs({"json_object": True}))
    assert not m.accept_token(encode(smollm_tokenizer, "[")[0])
    assert m.accept_tokens(encode(smollm_tokenizer, '{"free": [1, {"key": null}]}'))
    assert m.is_completed()


def test_a_pending_compile_does_not_hold_up_a_fill(manager):
    gate = threading.Event()
    manager._compile_pool.submit(gate.wait, 30)  # a long compile in progress
    try:
        pending = manager.compile_async(from_structured_outputs({"regex": "blocked-[a-z]"}))
        assert manager.submit_fill([manager.matcher(YES_NO)]).result(timeout=10).rows == [0]
        assert not pending.done()
    finally:
        gate.set()
    assert pending.result(timeout=30) is not None


def test_a_refused_submit_leaves_the_matchers_usable(smollm_tokenizer):
    mgr = StructuredOutputManager(smollm_tokenizer)
    m = mgr.matcher(YES_NO)
    mgr.shutdown()
    with pytest.raises(RuntimeError):
        mgr.submit_fill([m])
    assert m.accept_tokens(encode(smollm_tokenizer, "yes"))
