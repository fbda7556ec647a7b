import numpy as np
import pytest
import torch

from shardserve.executor.messages import SamplingOptions
from shardserve.model_executor.sampler import SamplingState, compute_logprobs, hash_uniform

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def state(*rows: SamplingOptions, vocab: int, prompts=None, outputs=None) -> SamplingState:
    """A sampling state with one row per options (row i = options i)."""
    st = SamplingState(max_rows=len(rows) + 2, vocab_size=vocab, device=DEVICE)
    for i, opts in enumerate(rows):
        prompt = np.asarray(prompts[i] if prompts else [], dtype=np.int32)
        output = np.asarray(outputs[i] if outputs else [], dtype=np.int32)
        st.add(i, opts, prompt, output)
    st.flush()
    return st


def draw(st: SamplingState, logits: torch.Tensor, positions=None) -> torch.Tensor:
    n = logits.shape[0]
    rows = np.arange(n)
    pos = torch.zeros(n, dtype=torch.long) if positions is None else torch.as_tensor(positions)
    return st.sample(logits.clone().to(DEVICE), rows, torch.from_numpy(rows).to(DEVICE), pos.to(DEVICE)).cpu()


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    st = state(*[SamplingOptions(temperature=0.0)] * 4, vocab=50)
    assert torch.equal(draw(st, logits), logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_and_min_p_one_are_argmax():
    logits = torch.randn(3, 50)
    st = state(SamplingOptions(top_k=1), SamplingOptions(top_p=1e-6), SamplingOptions(min_p=1.0), vocab=50)
    for _ in range(5):
        assert torch.equal(draw(st, logits), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_varies_with_seed_and_position_and_ignores_the_batch():
    logits = torch.zeros(3, 1000)
    st = state(SamplingOptions(seed=1), SamplingOptions(seed=1), SamplingOptions(seed=2), vocab=1000)
    pos = torch.tensor([5, 5, 5])
    a = draw(st, logits, pos)
    assert a[0] == a[1] and a[0] != a[2]
    assert draw(st, logits, pos).tolist() == a.tolist()  # same seed and position: same token
    assert draw(st, logits, pos + 1)[0] != a[0]  # the next position draws anew
    alone = state(SamplingOptions(seed=2), vocab=1000)
    assert draw(alone, logits[:1], pos[:1]).item() == a[2].item()  # another batch, same token


def test_huge_seeds_wrap_instead_of_failing():
    st = state(SamplingOptions(seed=2**64 + 7), SamplingOptions(seed=7), SamplingOptions(seed=-(2**63)), vocab=100)
    tokens = draw(st, torch.zeros(3, 100), [3, 3, 3])
    assert tokens[0] == tokens[1] and 0 <= int(tokens[2]) < 100


def test_hash_uniform_is_uniform():
    u = hash_uniform(torch.tensor([3, 4], device=DEVICE), torch.tensor([0, 0], device=DEVICE), 20000).cpu()
    assert ((u > 0) & (u < 1)).all()
    assert u.mean().item() == pytest.approx(0.5, abs=0.01) and u.std().item() == pytest.approx(12**-0.5, abs=0.01)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    st = state(*[SamplingOptions(seed=s) for s in range(3000)], vocab=3)
    logits = probs.log()[None].repeat(3000, 1)
    counts = torch.bincount(draw(st, logits), minlength=3).float()
    assert torch.allclose(counts / 3000, probs, atol=0.04)


def test_top_k_restricts_support():
    st = state(*[SamplingOptions(top_k=2, seed=s) for s in range(300)], vocab=5)
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]]).repeat(300, 1)
    assert set(draw(st, logits).tolist()) == {0, 1}


def test_penalties_apply_on_the_device_and_count_sampled_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    st = state(SamplingOptions(temperature=0.0, repetition_penalty=2.0), vocab=4, prompts=[[0, 1]])
    row0 = torch.tensor([0], device=DEVICE)
    changed = logits.clone().to(DEVICE)
    st._apply_penalties(changed, row0, row0)
    assert changed[0].tolist() == [1.0, -4.0, 1.0, 1.0]
    opts = SamplingOptions(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25)
    st = state(opts, vocab=4, outputs=[[2, 2, 3]])
    changed = logits.clone().to(DEVICE)
    st._apply_penalties(changed, row0, row0)
    assert changed[0, 2].item() == pytest.approx(1.0 - 1.0 - 0.25)
    assert changed[0, 3].item() == pytest.approx(1.0 - 0.5 - 0.25)
    assert changed[0, 0].item() == 2.0
    token = draw(st, logits).item()  # greedy after penalties: token 0
    assert token == 0 and st.output_counts[0].tolist() == [1, 0, 2, 1]


def test_logprobs_match_log_softmax_with_rank():
    logits = torch.randn(2, 30)
    tokens = torch.tensor([3, int(logits[1].argmax())])
    chosen, rank, top_vals, top_ids = compute_logprobs(logits, tokens, 2)
    ref = torch.log_softmax(logits, -1)
    assert chosen[0].item() == pytest.approx(ref[0, 3].item(), abs=1e-6)
    assert rank[0].item() == int((ref[0] > ref[0, 3]).sum()) + 1 and rank[1].item() == 1
    assert top_ids[0].tolist() == ref[0].topk(2).indices.tolist()
    assert top_vals.shape == (2, 2)


def test_a_mixed_batch_greedy_seeded_penalized_and_sampled_rows():
    """One step with every kind of row (the paths that move host arrays to the device): greedy rows are the
    argmax, a penalized greedy row avoids its prompt's token and then its own output, seeded rows repeat."""
    logits = torch.zeros(4, 64)
    logits[:, 7] = 5.0
    logits[:, 9] = 4.0
    rows = (
        SamplingOptions(temperature=0.0),
        SamplingOptions(seed=11),
        SamplingOptions(temperature=0.0, repetition_penalty=100.0),
        SamplingOptions(temperature=1.0),
    )
    st = state(*rows, vocab=64, prompts=[[], [], [7], []])
    pos = [3, 3, 3, 3]
    first = draw(st, logits, pos)
    assert first[0] == 7 and first[2] == 9  # greedy; the penalty pushes token 7 below 9
    second = draw(st, logits, pos)
    assert second[1] == first[1]  # the seeded row draws the same token at the same position
    # the sampled 9 now counts as seen: 5 / 100 beats 4 / 100, and both draws are counted
    assert second[2] == 7 and st.output_counts[2, 7].item() == 1 and st.output_counts[2, 9].item() == 1
