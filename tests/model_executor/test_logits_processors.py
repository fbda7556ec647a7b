"""logit_bias, allowed_token_ids, bad_words and min_tokens in the batched sampler, on the device (CPU here)."""

import numpy as np
import pytest
import torch

from shardserve.executor.messages import SamplingOptions
from shardserve.model_executor.sampler import SamplingState
from shardserve.sampling_params import SamplingParams

V = 40
GREEDY = {"temperature": 0.0}


def options(**kw) -> SamplingOptions:
    bad_words = kw.pop("bad_words_ids", None)
    eos = kw.pop("eos", ())
    return SamplingOptions.of(SamplingParams(**GREEDY, **kw), eos_token_ids=eos, bad_words=bad_words)


def make(*rows: SamplingOptions, prompts=None) -> SamplingState:
    st = SamplingState(max_rows=len(rows) + 1, vocab_size=V, device=torch.device("cpu"))
    for i, opts in enumerate(rows):
        prompt = np.asarray(prompts[i] if prompts else [1, 2, 3], dtype=np.int32)
        st.add(i, opts, prompt, np.zeros(0, np.int32))
    st.flush()
    return st


def draw(st, logits, positions=None, stop_allowed=None):
    n = logits.shape[0]
    rows = np.arange(n)
    pos = np.full(n, 3) if positions is None else np.asarray(positions)
    out = st.sample(logits.clone(), rows, torch.from_numpy(rows), torch.from_numpy(pos), pos, stop_allowed)
    return out.tolist()


def test_logit_bias_plus_100_makes_a_token_next_and_minus_100_bans_the_best():
    logits = torch.randn(3, V)
    best = logits.argmax(-1)
    st = make(options(logit_bias={7: 100}), options(logit_bias={int(best[1]): -100}), options())
    tokens = draw(st, logits)
    assert tokens[0] == 7
    assert tokens[1] != best[1] and tokens[1] == int(logits[1].topk(2).indices[1])
    assert tokens[2] == best[2]  # a row without a bias in the same batch is untouched


def test_allowed_token_ids_restrict_sampling_to_the_set():
    st = make(*[SamplingOptions.of(SamplingParams(seed=s, allowed_token_ids=[3, 9, 30])) for s in range(50)])
    logits = torch.randn(50, V)
    assert set(draw(st, logits)) <= {3, 9, 30}
    assert len(set(draw(st, logits))) > 1  # sampled within the set, not one forced token


def test_bad_words_ban_single_tokens_always_and_the_last_token_after_the_prefix():
    logits = torch.zeros(2, V)
    logits[:, 5] = 10.0  # token 5 is everyone's favourite, token 6 the runner-up
    logits[:, 6] = 9.0
    st = make(options(bad_words_ids=[[5]]), options(bad_words_ids=[[8, 5]]), prompts=[[1, 2, 3], [1, 2, 8]])
    assert draw(st, logits) == [6, 6]  # row 1's history ends with 8: "8 5" is banned
    # Row 1 now ends with 6: 5 is allowed again; the history is updated on the device after each sample.
    assert draw(st, logits) == [6, 5]


def test_bad_words_of_different_lengths_grow_the_tables():
    logits = torch.zeros(2, V)
    logits[:, 5] = 10.0
    st = SamplingState(max_rows=3, vocab_size=V, device=torch.device("cpu"))
    st.add(0, options(bad_words_ids=[[4, 5]]), np.asarray([1, 4], np.int32), np.zeros(0, np.int32))
    st.add(1, options(bad_words_ids=[[2, 3, 5], [9]]), np.asarray([2, 3], np.int32), np.zeros(0, np.int32))
    st.flush()
    rows = np.arange(2)
    pos = np.asarray([2, 2])
    out = st.sample(logits.clone(), rows, torch.from_numpy(rows), torch.from_numpy(pos), pos)
    assert 5 not in out.tolist()


def test_min_tokens_bans_stop_tokens_until_reached_then_lets_them_through():
    logits = torch.zeros(1, V)
    logits[0, 2] = 10.0  # EOS = 2 is the best token
    st = make(options(min_tokens=2, stop_token_ids=[11], eos=(2,)))  # prompt of 3 tokens
    assert draw(st, logits, positions=[3]) == [0]  # EOS banned: the next best (ties: lowest id)
    logits[0, 11] = 9.0
    assert draw(st, logits, positions=[4]) == [0]  # stop_token_ids banned too
    assert draw(st, logits, positions=[5]) == [2]  # two outputs exist: EOS may end it
    # A grammar that is complete may stop at once: the head exempts the row.
    assert draw(st, logits, positions=[3], stop_allowed=np.asarray([0])) == [2]


def test_min_tokens_with_ignore_eos_bans_only_stop_token_ids():
    opts = SamplingOptions.of(SamplingParams(min_tokens=3, ignore_eos=True, stop_token_ids=[4]), eos_token_ids=(2,))
    assert np.frombuffer(opts.min_tokens_stop_ids, "<i4").tolist() == [4]


def test_rows_without_constraints_skip_the_work():
    st = make(options(), options())
    assert not st.modifies_logits(np.arange(2)).any()
    st = make(options(logit_bias={1: 1.0}), options())
    assert st.modifies_logits(np.arange(2)).tolist() == [True, False]


def test_a_reused_row_forgets_its_previous_constraints():
    st = make(options(logit_bias={7: 100}, allowed_token_ids=[7], bad_words_ids=[[3]], min_tokens=5, eos=(2,)))
    st.add(0, options(), np.asarray([1], np.int32), np.zeros(0, np.int32))
    logits = torch.randn(1, V)
    assert draw(st, logits) == [int(logits.argmax())]


def test_token_ids_outside_the_vocabulary_are_refused():
    st = SamplingState(max_rows=1, vocab_size=V, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="logit_bias"):
        st.add(0, options(logit_bias={V: 1.0}), np.asarray([1], np.int32), np.zeros(0, np.int32))
