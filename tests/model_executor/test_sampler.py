import pytest
import torch

from shardserve.model_executor.sampler import SamplingRow, apply_penalties, compute_logprobs, sample
from shardserve.sampling_params import SamplingParams


def row(gen_seed=None, prompt=(), output=(), **kw):
    gen = None
    if gen_seed is not None:
        gen = torch.Generator().manual_seed(gen_seed)
    return SamplingRow(SamplingParams(**kw), gen, list(prompt), list(output))


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    tokens = sample(logits.clone(), [row(temperature=0.0) for _ in range(4)])
    assert torch.equal(tokens, logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_argmax():
    logits = torch.randn(3, 50)
    rows = [row(temperature=1.0, top_k=1), row(temperature=1.0, top_p=1e-6), row(temperature=1.0, min_p=1.0)]
    assert torch.equal(sample(logits.clone(), rows), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_varies_with_seed():
    logits = torch.zeros(1, 1000)
    r1, r2, r3 = row(gen_seed=1), row(gen_seed=1), row(gen_seed=2)
    a = [sample(logits.clone(), [r1]).item() for _ in range(8)]
    b = [sample(logits.clone(), [r2]).item() for _ in range(8)]
    c = [sample(logits.clone(), [r3]).item() for _ in range(8)]
    assert a == b and a != c


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log()[None]
    r = row(gen_seed=0)
    counts = torch.zeros(3)
    n = 3000
    for _ in range(n):
        counts[sample(logits.clone(), [r]).item()] += 1
    assert torch.allclose(counts / n, probs, atol=0.04)


def test_top_k_restricts_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    r = row(gen_seed=0, top_k=2)
    seen = {sample(logits.clone(), [r]).item() for _ in range(300)}
    assert seen == {0, 1}


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    out = apply_penalties(logits.clone(), [row(prompt=[0, 1], repetition_penalty=2.0)])
    assert out[0].tolist() == [1.0, -4.0, 1.0, 1.0]
    out = apply_penalties(logits.clone(), [row(output=[2, 2, 3], frequency_penalty=0.5, presence_penalty=0.25)])
    assert out[0, 2].item() == pytest.approx(1.0 - 1.0 - 0.25)
    assert out[0, 3].item() == pytest.approx(1.0 - 0.5 - 0.25)
    assert out[0, 0].item() == 2.0


def test_logprobs_match_log_softmax_with_rank():
    logits = torch.randn(2, 30)
    tokens = torch.tensor([3, int(logits[1].argmax())])
    res = compute_logprobs(logits, tokens, [2, None])
    ref = torch.log_softmax(logits, -1)
    chosen, rank, top = res[0]
    assert chosen == pytest.approx(ref[0, 3].item(), abs=1e-6)
    assert rank == int((ref[0] > ref[0, 3]).sum()) + 1
    assert [t for t, _ in top] == ref[0].topk(2).indices.tolist()
    assert res[1] is None
