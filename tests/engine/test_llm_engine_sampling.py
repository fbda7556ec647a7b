"""Sampling features end to end through ``LLM.generate`` on a tiny random Llama: logit_bias, allowed_token_ids,
bad_words, min_tokens, top_logprobs -1 and prompt_logprobs (against transformers)."""

from __future__ import annotations

import math

import pytest
import torch

from shardserve import LLM, SamplingParams

PROMPT = [1, 520, 3327, 314, 4649, 3135]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    engine = LLM(
        str(tiny_llama_dir), dtype="float32", num_kv_blocks=128, block_size=8, max_num_batched_tokens=16, max_num_seqs=4
    )
    yield engine
    engine.shutdown()


def tokens(llm, **kw) -> list[int]:
    return llm.generate([PROMPT], SamplingParams(**{**GREEDY, "max_tokens": 8, **kw}))[0].outputs[0].token_ids


def test_logit_bias_plus_100_forces_a_token_and_minus_100_bans_it(llm):
    baseline = tokens(llm)
    assert tokens(llm, logit_bias={"77": 100}) == [77] * 8
    banned = tokens(llm, logit_bias={baseline[0]: -100})
    assert banned[0] != baseline[0] and baseline[0] not in banned
    assert tokens(llm) == baseline


def test_allowed_token_ids_are_the_only_tokens_sampled(llm):
    allowed = [11, 500, 7000, 20000]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True, allowed_token_ids=allowed)
    out = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    assert set(out) <= set(allowed) and len(set(out)) > 1


def test_bad_words_never_appear(llm):
    baseline = tokens(llm, max_tokens=12)
    word = llm.tokenizer.decode([baseline[2]]).strip()
    assert word
    sequences = llm.engine._bad_words_ids([word])
    out = tokens(llm, max_tokens=12, bad_words=[word])
    assert out != baseline
    for seq in sequences:
        assert not any(out[i : i + len(seq)] == seq for i in range(len(out)))


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached(llm):
    eos = next(iter(llm.tokenizer.eos_token_ids))
    forced = {"temperature": 0.0, "max_tokens": 20, "logit_bias": {eos: 100}}
    assert llm.generate([PROMPT], SamplingParams(**forced))[0].outputs[0].token_ids == [eos]
    out = llm.generate([PROMPT], SamplingParams(**forced, min_tokens=5))[0].outputs[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and eos not in out.token_ids[:5]
    stop = {"temperature": 0.0, "max_tokens": 20, "logit_bias": {42: 100}, "stop_token_ids": [42], "min_tokens": 3}
    out = llm.generate([PROMPT], SamplingParams(**stop))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == 42 and out.stop_reason == 42


def test_top_logprobs_minus_one_is_capped_by_max_logprobs_and_more_is_refused(llm):
    out = llm.generate([PROMPT], SamplingParams(**GREEDY, max_tokens=2, logprobs=-1))[0].outputs[0]
    assert all(len(entry) in (20, 21) for entry in out.logprobs)  # the sampled token is added when not in the top
    with pytest.raises(ValueError, match=r"logprobs 21 .*--max-logprobs 20"):
        llm.generate([PROMPT], SamplingParams(logprobs=21))
    with pytest.raises(ValueError, match=r"logit_bias: token id .* outside the vocabulary"):
        llm.generate([PROMPT], SamplingParams(logit_bias={10**6: 1}))


def test_top_logprobs_minus_one_without_a_cap_is_the_whole_vocabulary(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=32, max_logprobs=-1)
    try:
        out = llm.generate([PROMPT], SamplingParams(**GREEDY, max_tokens=1, logprobs=-1))[0].outputs[0]
    finally:
        llm.shutdown()
    entry = out.logprobs[0]
    vocab = llm.engine.source.arch.vocab_size
    assert len(entry) == vocab
    assert math.fsum(math.exp(lp.logprob) for lp in entry.values()) == pytest.approx(1.0, abs=1e-3)
    assert sorted(lp.rank for lp in entry.values()) == list(range(1, vocab + 1))


@pytest.fixture(scope="module")
def reference_logprobs(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32)
    prompt = list(range(300, 340))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    return prompt, torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("n", [1, 2])
def test_prompt_logprobs_match_transformers_over_chunked_prefill(llm, reference_logprobs, n):
    """A 40-token prompt in chunks of 16 (max_num_batched_tokens): every position but the first, each with
    the prompt token's logprob and rank and the top 3, as transformers' log_softmax gives them."""
    prompt, ref = reference_logprobs
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3, n=n)
    for _ in range(2):  # the second run would hit the prefix cache: prompt logprobs turn it off
        out = llm.generate([prompt], params)[0]
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for t in range(1, len(prompt)):
            entry = got[t]
            want = ref[t - 1]
            assert entry[prompt[t]].logprob == pytest.approx(want[prompt[t]].item(), abs=1e-3)
            assert entry[prompt[t]].rank == int((want > want[prompt[t]]).sum()) + 1
            top = want.topk(3)
            for rank, (value, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                assert entry[tid].logprob == pytest.approx(value, abs=1e-3)
                if tid != prompt[t]:
                    assert entry[tid].rank == rank
        assert len(out.outputs) == n
