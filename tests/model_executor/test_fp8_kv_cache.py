"""``--kv-cache-dtype fp8``: the e4m3 paged cache in the Triton kernels (interpreter on a CPU), in the PyTorch
path of the attention layer, and in the engine (block count, greedy tokens)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_kernels import DEVICE, _metadata

from shardserve.config import CacheConfig, EngineConfig, ModelConfig
from shardserve.model_executor.kernels.attention import paged_attention, store_kvcache
from shardserve.model_executor.kernels.elementwise import rotary_embedding
from shardserve.model_executor.layers.attention import Attention, quantize_fp8
from shardserve.model_executor.layers.rotary_embedding import RotaryEmbedding

FP8 = torch.float8_e4m3fn
# e4m3 keeps 3 mantissa bits: a cached element is off by up to 2^-4 of itself, 0.2 for a 3-sigma randn value.
# Outputs weigh many of them, so the mean error is a tenth of that (measured: max 0.12, mean 0.014).
FP8_ATOL, FP8_MEAN_ERR = 0.2, 0.025

CASES = {
    "prefill+chunked+decode": (8, 4, 16, [5, 3, 1], [5, 20, 9]),
    "decode_only_gqa3": (9, 3, 64, [1, 1, 1], [1, 17, 40]),
    "long_prefill": (4, 4, 16, [70], [70]),
}


def _inputs(num_heads, num_kv_heads, head_dim, q_lens, seq_lens, seed):
    gen = torch.Generator().manual_seed(seed)
    block_size, num_blocks = 4, 64
    meta = _metadata(q_lens, seq_lens, block_size, num_blocks, gen)
    n = sum(q_lens)
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    # Earlier context (chunked prefill, decode) already in the cache: random values in the fp32 cache.
    cache32 = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    return meta, q, k, v, cache32


def _reference(meta, q, k, v, cache32):
    """fp32 attention of the PyTorch path over an fp32 cache: what the FP8 cache approximates."""
    n, num_heads, head_dim = q.shape
    ref = Attention(num_heads, k.shape[1], head_dim, scale=head_dim**-0.5)
    ref.kv_cache = cache32.clone()
    ref._store(k, v, meta.slot_mapping)
    return ref._varlen(q, k, v, meta)


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.37, 0.61)])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_fp8_cache_matches_fp32_reference(case, k_scale, v_scale):
    meta, q, k, v, cache32 = _inputs(*CASES[case], seed=1)
    want = _reference(meta, q, k, v, cache32)

    cache8 = torch.stack([quantize_fp8(cache32[0], k_scale), quantize_fp8(cache32[1], v_scale)])
    store_kvcache(k, v, cache8, meta.slot_mapping, k_scale=k_scale, v_scale=v_scale)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    args = (q, cache8, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len, q.shape[2] ** -0.5)
    got = paged_attention(*args, **scales)
    torch.testing.assert_close(got, want, atol=FP8_ATOL, rtol=0)
    assert 0 < (got - want).abs().mean() < FP8_MEAN_ERR  # close, and the cache really was quantized

    # Exactly the attention over the dequantized cache: the kernel's FP8 math adds no error of its own.
    deq = torch.stack([cache8[0].float() * k_scale, cache8[1].float() * v_scale])
    exact = paged_attention(*args[:1], deq, *args[2:])
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)

    # The PyTorch path of the layer (CPU) reads and writes the FP8 cache the same way.
    layer = Attention(q.shape[1], k.shape[1], q.shape[2], scale=q.shape[2] ** -0.5)
    layer.k_scale, layer.v_scale = k_scale, v_scale
    layer.kv_cache = torch.stack([quantize_fp8(cache32[0], k_scale), quantize_fp8(cache32[1], v_scale)]).cpu()
    n = q.shape[0]
    meta_cpu = _metadata_to_cpu(meta)
    out = layer(q.cpu().reshape(n, -1), k.cpu().reshape(n, -1), v.cpu().reshape(n, -1), meta_cpu)
    torch.testing.assert_close(out.view_as(q), got.cpu(), atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.kv_cache.view(torch.uint8), cache8.cpu().view(torch.uint8))


def _metadata_to_cpu(meta):
    from dataclasses import replace

    fields = ("slot_mapping", "query_start_loc", "seq_lens", "block_tables")
    return replace(meta, **{f: getattr(meta, f).cpu() for f in fields})


@pytest.mark.parametrize("f16_dot", [True, False])
def test_half_precision_queries_over_an_fp8_cache(f16_dot):
    """bf16 queries (a served bf16 model): fp16 dot products (the default, e4m3 widens to fp16 exactly) and
    bf16 ones both match the fp32 attention over the dequantized cache within bf16 rounding. The interpreter
    mis-converts e4m3 to bf16, so the bf16-dot form is checked on CUDA only."""
    if not f16_dot and DEVICE != "cuda":
        pytest.skip("Triton's interpreter converts e4m3 to bf16 wrongly")
    gen = torch.Generator().manual_seed(7)
    meta = _metadata([1, 1, 4], [70, 9, 33], 4, 128, gen)
    cache = quantize_fp8(torch.randn(2, 128, 4, 2, 64, generator=gen), 0.5).to(DEVICE)
    q = torch.randn(6, 8, 64, generator=gen).to(DEVICE)
    args = (cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len, 64**-0.5)
    want = paged_attention(q, (cache.float() * 0.5).to(DEVICE), *args[1:])
    got = paged_attention(q.to(torch.bfloat16), *args, k_scale=0.5, v_scale=0.5, f16_dot=f16_dot)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.03, rtol=0.02)


@pytest.mark.parametrize("num_kv_splits", [3, 16])
def test_split_kv_decode_with_fp8_cache_matches_one_pass(num_kv_splits):
    gen = torch.Generator().manual_seed(4)
    seq_lens = [9, 150, 37]
    meta = _metadata([1] * 3, seq_lens, 4, 128, gen)
    cache = quantize_fp8(torch.randn(2, 128, 4, 2, 32, generator=gen), 0.5).to(DEVICE)
    q = torch.randn(3, 8, 32, generator=gen).to(DEVICE)
    args = (q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 1, 32**-0.5)
    scales = dict(k_scale=0.5, v_scale=0.5)
    want = paged_attention(*args, num_kv_splits=1, **scales)
    got = paged_attention(*args, num_kv_splits=num_kv_splits, **scales)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    deq = (cache.float() * 0.5).to(DEVICE)
    torch.testing.assert_close(got, paged_attention(q, deq, *args[2:], num_kv_splits=1), atol=1e-5, rtol=1e-5)


def test_store_fp8_scales_rounds_and_saturates():
    """Stored bytes are ``k / k_scale`` rounded to e4m3; values past 448 saturate instead of turning NaN."""
    k = torch.tensor([[[1.0, -3.3, 1000.0, 0.01]]], device=DEVICE)
    v = torch.tensor([[[2.0, -2000.0, 0.3, 5.0]]], device=DEVICE)
    cache = torch.zeros(2, 2, 2, 1, 4, dtype=FP8, device=DEVICE)
    store_kvcache(k, v, cache, torch.tensor([3], device=DEVICE), k_scale=2.0, v_scale=0.5)
    got = cache.view(2, 4, 4)[:, 3].float().cpu()
    torch.testing.assert_close(got[0], torch.tensor([0.5, -1.625, 448.0, 0.005]), atol=2e-3, rtol=0)
    torch.testing.assert_close(got[1], torch.tensor([4.0, -448.0, 0.625, 10.0]))
    assert cache.float().isfinite().all()
    assert cache.view(torch.uint8).view(2, 4, 4)[:, :3].eq(0).all()  # other slots untouched


def test_rotary_fused_with_fp8_store_matches_rotary_then_quantize():
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, d = 6, 2, 16
    rope = RotaryEmbedding(d, 64, 10000.0)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * d, generator=gen).to(DEVICE)
    positions = torch.tensor([0, 7, 3, 63], device=DEVICE)
    slots = torch.tensor([5, 0, -1, 17], device=DEVICE)
    cos, sin = rope.cos_cache.to(DEVICE), rope.sin_cache.to(DEVICE)

    def split(t):
        q, k, v = t.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        return q.view(4, heads, d), k.view(4, kv_heads, d), v.view(4, kv_heads, d)

    want_qkv = qkv.clone()
    q, k, v = split(want_qkv)
    rotary_embedding(positions, q, k, cos, sin)
    want_cache = torch.zeros(2, 8, 4, kv_heads, d, dtype=FP8, device=DEVICE)
    store_kvcache(k, v, want_cache, slots, k_scale=0.25, v_scale=0.5)
    got_qkv, got_cache = qkv.clone(), torch.zeros_like(want_cache)
    q, k, v = split(got_qkv)
    rotary_embedding(positions, q, k, cos, sin, v=v, kv_cache=got_cache, slot_mapping=slots, k_scale=0.25, v_scale=0.5)
    # Rounding to e4m3 may flip a value that lies on a rounding boundary; compare as numbers one e4m3 step apart.
    torch.testing.assert_close(got_cache.float(), want_cache.float(), atol=1e-6, rtol=2**-3)
    torch.testing.assert_close(got_qkv[:, : heads * d], want_qkv[:, : heads * d], atol=1e-5, rtol=1e-5)
    assert got_cache.float().abs().sum() > 0


def test_kv_cache_dtype_validation(monkeypatch):
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of"):
        CacheConfig(kv_cache_dtype="fp8_e5m2")
    assert CacheConfig(kv_cache_dtype="fp8_e4m3").cache_torch_dtype(torch.bfloat16) == FP8
    assert CacheConfig().cache_torch_dtype(torch.bfloat16) == torch.bfloat16
    EngineConfig(model=ModelConfig(device="cpu"), cache=CacheConfig(kv_cache_dtype="fp8"))  # CPU: fine
    # A CUDA GPU older than Ada/Hopper is refused when the config is built, naming the flag.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8 needs a GPU with FP8 support.*A100 has 8\.0"):
        EngineConfig(model=ModelConfig(device="cuda"), cache=CacheConfig(kv_cache_dtype="fp8"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    EngineConfig(model=ModelConfig(device="cuda"), cache=CacheConfig(kv_cache_dtype="fp8"))


def test_engine_fp8_kv_cache_doubles_blocks(tiny_llama_dir):
    """Same ``--cpu-kv-cache-gib``, bf16 model: a block takes half the bytes, so twice as many fit."""
    from shardserve import LLM, SamplingParams

    gib = 0.001
    found = {}
    for kv_dtype in ("auto", "fp8"):
        llm = LLM(str(tiny_llama_dir), dtype="bfloat16", device="cpu", cpu_kv_cache_gib=gib, kv_cache_dtype=kv_dtype)
        try:
            runner = llm.engine.executor.runner
            out = llm.generate([[5, 17, 200, 3, 99]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
            assert len(out[0].outputs[0].token_ids) == 8
            cache_dtypes = {c.dtype for c in runner.kv_caches}
            found[kv_dtype] = runner.kv_block_bytes(), llm.engine.block_manager.num_blocks, cache_dtypes
        finally:
            llm.shutdown()
    (bytes16, blocks16, dtypes16), (bytes8, blocks8, dtypes8) = found["auto"], found["fp8"]
    assert dtypes16 == {torch.bfloat16} and dtypes8 == {FP8}
    assert bytes16 == 2 * bytes8
    assert blocks16 == int(gib * 2**30 // bytes16) and blocks8 == int(gib * 2**30 // bytes8) >= 2 * blocks16


@pytest.mark.slow
def test_engine_fp8_kv_cache_keeps_greedy_tokens_of_smollm2():
    """The embedded SmolLM2-135M (fp32 on CPU), greedy: with an FP8 KV cache each prompt's tokens equal the
    model-dtype cache's until, at most, a near tie of the reference (top-2 logprobs within 0.3 nats), where
    FP8 takes the runner-up."""
    from shardserve import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    runs = {}
    for kv_dtype in ("auto", "fp8"):
        llm = LLM(None, device="cpu", dtype="float32", cpu_kv_cache_gib=0.05, kv_cache_dtype=kv_dtype)
        try:
            runs[kv_dtype] = [o.outputs[0] for o in llm.generate(prompts, params)]
        finally:
            llm.shutdown()
    assert "Paris" in runs["fp8"][0].text
    for ref, fp8 in zip(runs["auto"], runs["fp8"]):
        a, b = ref.token_ids, fp8.token_ids
        first = next((i for i in range(len(a)) if a[i] != b[i]), None)
        if first is None:
            continue
        top = sorted(ref.logprobs[first].items(), key=lambda kv: -kv[1].logprob)
        assert first >= 2, (a, b)
        assert b[first] == top[1][0] and top[0][1].logprob - top[1][1].logprob < 0.3, (first, top, b[first])
