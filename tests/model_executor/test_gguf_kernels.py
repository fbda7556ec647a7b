"""GGUF kernels (Triton interpreter on CPU, the device on CUDA) against ``gguf.quants.dequantize`` + fp32 matmul.

Every block type with a kernel, on random blocks with finite small fp16 scales (``random_blocks``): the
decode GEMV (1-4 rows, plain and with SwiGLU fused), the tensor-core matmul (5+ rows, plain and SwiGLU),
the dequantize-to-scratch + cuBLAS path, whole-matrix dequantization, the embedding gather and the LM head
with vocabulary padding rows.

Tolerances (max |error| / max |reference|), per type: with fp32 activations every product is rounded once
(``fma(2**23 + v, x, -2**23 x)``) and sums run in fp32 in another order than numpy's, so about 1e-6 for
every type: ``TOL_FP32``. With bf16 activations the output is rounded to bf16 (2**-9 relative) and the
matmul kernel feeds bf16 weights to the tensor cores (one more 2**-9): ``TOL_BF16``. Dequantization and the
embedding lookup are exact in fp32 (same formulas, one rounding).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("triton")

from shardserve.model_executor.kernels.gguf_dequant import dequantize, embedding  # noqa: E402
from shardserve.model_executor.kernels.gguf_gemv import (  # noqa: E402
    GEMV_KERNEL_MAX_ROWS,
    gguf_gemv,
    gguf_linear,
    gguf_matmul,
)
from shardserve.model_executor.layers.quantization.gguf_blocks import (  # noqa: E402
    KERNEL_TYPES,
    block_type,
    dequantize_blocks,
    gguf_tensor_bytes,
    random_blocks,
)

TYPES = [t.name for t in KERNEL_TYPES.values()]
TOL_FP32 = {name: 5e-6 for name in TYPES}
TOL_BF16 = {name: 2.5e-2 for name in TYPES}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(name: str, rows: int, seed: int = 0):
    """``(blocks (rows, bytes) uint8 on DEVICE, reference fp32 (rows, cols), ggml type id, cols)``."""
    t = block_type(name)
    cols = 512 if t.block_size == 256 else 160  # two super-blocks / five blocks: an uneven tail for 32-blocks
    raw = random_blocks(np.random.default_rng(seed), rows, cols, name, scale=(1e-4, 1e-3))
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).copy())
    return torch.from_numpy(raw).to(DEVICE), ref, t.type_id, cols


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float().cpu() - ref).abs().max() / ref.abs().max()).item()


def _swiglu(y: torch.Tensor) -> torch.Tensor:
    half = y.shape[-1] // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nn.functional.silu(y[:, :half]) * y[:, half:]


@pytest.mark.parametrize("name", TYPES)
def test_cpu_dequantize_blocks_equals_gguf(name):
    """The CPU path's whole-tensor dequantization (gguf's per-type formulas in one call) is gguf's."""
    blocks, ref, qtype, cols = _case(name, 6)
    assert torch.equal(dequantize_blocks(blocks.cpu(), qtype), ref)
    assert dequantize_blocks(blocks.cpu(), qtype, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_and_embedding_exact(name):
    blocks, ref, qtype, cols = _case(name, 6)
    assert torch.equal(dequantize(blocks, qtype, cols, torch.float32).cpu(), ref)
    ids = torch.tensor([5, 0, 3, 3], device=DEVICE)
    assert torch.equal(embedding(blocks, qtype, cols, ids, torch.float32).cpu(), ref[ids.cpu()])
    assert blocks.shape[1] == gguf_tensor_bytes(name, (6, cols)) // 6


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_matches_reference(name, dtype):
    blocks, ref, qtype, cols = _case(name, 24, seed=1)
    tol = TOL_FP32[name] if dtype == torch.float32 else TOL_BF16[name]
    x = torch.randn(GEMV_KERNEL_MAX_ROWS, cols, generator=torch.Generator().manual_seed(2)).to(dtype)
    for m in (1, 2, 3, 4):
        want = x[:m].float() @ ref.T
        got = gguf_gemv(x[:m].to(DEVICE), blocks, qtype)
        assert got.dtype == dtype and got.shape == (m, 24)
        assert _rel(got, want) < tol, (m, _rel(got, want))
        fused = gguf_gemv(x[:m].to(DEVICE), blocks, qtype, silu_and_mul=True)
        assert fused.shape == (m, 12) and _rel(fused, _swiglu(want)) < tol


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_matches_reference(name, dtype):
    blocks, ref, qtype, cols = _case(name, 40, seed=3)  # 40 features: a partial tile
    tol = TOL_FP32[name] if dtype == torch.float32 else TOL_BF16[name]
    x = torch.randn(19, cols, generator=torch.Generator().manual_seed(4)).to(dtype)
    want = x.float() @ ref.T
    for m in (5, 19):  # a decode batch in one row tile, and a prefill over two
        assert _rel(gguf_matmul(x[:m].to(DEVICE), blocks, qtype), want[:m]) < tol
    fused = gguf_matmul(x.to(DEVICE), blocks, qtype, silu_and_mul=True)
    assert fused.shape == (19, 20) and _rel(fused, _swiglu(want)) < tol


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0"])
def test_linear_paths_agree(name):
    """gguf_linear's three paths (GEMV, fused matmul, dequantize + cuBLAS) and an output column slice."""
    blocks, ref, qtype, cols = _case(name, 16, seed=5)
    x = torch.randn(9, cols, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    want = x.float().cpu() @ ref.T
    assert _rel(gguf_linear(x, blocks, qtype, dequant_min_rows=10**9), want) < TOL_FP32[name]
    assert _rel(gguf_linear(x, blocks, qtype, dequant_min_rows=5), want) < TOL_FP32[name]
    assert _rel(gguf_linear(x[:2], blocks, qtype), want[:2]) < TOL_FP32[name]
    wide = torch.zeros(9, 40, device=DEVICE)
    gguf_linear(x, blocks, qtype, out=wide[:, 8:24], dequant_min_rows=10**9)
    assert _rel(wide[:, 8:24], want) < TOL_FP32[name] and not wide[:, :8].any() and not wide[:, 24:].any()
    swiglu = gguf_linear(x, blocks, qtype, silu_and_mul=True, dequant_min_rows=5)
    assert _rel(swiglu, _swiglu(want)) < TOL_FP32[name]


def test_lm_head_with_padding_rows():
    """A Q6_K LM head whose vocabulary is padded with zero blocks: zero logits there, the rest exact."""
    blocks, ref, qtype, cols = _case("Q6_K", 10, seed=7)
    padded = torch.cat([blocks, torch.zeros(2, blocks.shape[1], dtype=torch.uint8, device=DEVICE)])
    h = torch.randn(3, cols).to(DEVICE)
    logits = gguf_linear(h, padded, qtype)
    assert logits.shape == (3, 12) and not logits[:, 10:].any()
    assert _rel(logits[:, :10], h.cpu() @ ref.T) < TOL_FP32["Q6_K"]


def test_shape_errors():
    blocks, _, qtype, cols = _case("Q4_K", 4)
    with pytest.raises(ValueError, match="does not match"):
        gguf_gemv(torch.randn(1, cols + 256, device=DEVICE), blocks, qtype)
    with pytest.raises(ValueError, match="at most"):
        gguf_gemv(torch.randn(GEMV_KERNEL_MAX_ROWS + 1, cols, device=DEVICE), blocks, qtype)
    with pytest.raises(ValueError, match="no GGUF kernel"):
        dequantize(blocks, 20, cols, torch.float32)  # IQ4_NL


@pytest.mark.skipif(DEVICE == "cuda", reason="forces configs through the interpreter's autotuner stand-in")
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q2_K", "Q4_1"])
def test_tiles_shorter_than_a_block(name, monkeypatch):
    """Tiles of 32-128 elements (the GPU configs that keep registers in check) cut K-quant super-blocks."""
    import triton

    from shardserve.model_executor.kernels import gguf_gemv as kernels

    blocks, ref, qtype, cols = _case(name, 32, seed=8)
    x = torch.randn(6, cols, generator=torch.Generator().manual_seed(9))
    want = x @ ref.T
    for kernel, config, m in (
        (kernels._gguf_gemv_kernel, triton.Config({"BLOCK_N": 8, "TILE_K": 128}), 2),
        (kernels._gguf_matmul_kernel, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "TILE_K": 32}), 6),
        (kernels._gguf_matmul_kernel, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "TILE_K": 64}), 6),
    ):
        monkeypatch.setattr(kernel, "early_config_prune", lambda configs, args, c=config, **kw: [c])
        kernel.cache.clear()
        got = kernels.gguf_linear(x[:m], blocks, qtype, dequant_min_rows=10**9)
        assert kernel.best_config.kwargs == config.kwargs
        assert _rel(got, want[:m]) < TOL_FP32[name], config
    kernels._gguf_gemv_kernel.cache.clear()
    kernels._gguf_matmul_kernel.cache.clear()


# -- the int8 dot-product GEMV (kernels/gguf_dp4a.py) ----------------------------------------------------
# Its only error is rounding x to int8 per 32 elements (at most dx / 2 per element), so it is checked two
# ways: against the exact product of the weights with the *quantized* x (the kernel's arithmetic: products
# are exact integers, sums fp32, the output rounded to bf16: TOL_DP4A_EXACT), and against the exact product
# with x itself (the int8 rounding on top, about 0.4% of a group's largest value: TOL_DP4A).

DP4A_NAMES = ["Q4_K", "Q6_K", "Q8_0"]
TOL_DP4A_EXACT = 1e-2  # bf16 output rounding (2**-9) and the fp32 sums
TOL_DP4A_SWIGLU = 3e-2  # gate and up each within TOL_DP4A_EXACT of their max, rounded to bf16, multiplied
TOL_DP4A = 3e-2


def _dp4a_case(name: str, rows: int, seed: int, cols: int | None = None):
    """Like ``_case``, with rows long enough for a whole thread unit (a block pair for Q6_K and Q8_0)."""
    t = block_type(name)
    cols = cols or (512 if t.block_size == 256 else 192)
    raw = random_blocks(np.random.default_rng(seed), rows, cols, name, scale=(1e-4, 1e-3))
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).copy())
    return torch.from_numpy(raw).to(DEVICE), ref, t.type_id, cols


@pytest.mark.parametrize("name", DP4A_NAMES)
def test_dp4a_quantize_activations_round_trip(name):
    """xq * dx is within dx / 2 of x; dx = max|x| / 127 per group of 32; xs = dx * sum(xq) per 16."""
    from shardserve.model_executor.kernels.gguf_dp4a import quantize_activations

    x = (torch.randn(3, 256, generator=torch.Generator().manual_seed(11)) * 3).to(torch.bfloat16)
    xq, dx, xs = quantize_activations(x.to(DEVICE))
    xq, dx, xs, xf = xq.cpu().float(), dx.cpu(), xs.cpu(), x.float()
    groups = xf.view(3, -1, 32)
    assert torch.allclose(dx, groups.abs().amax(-1) / 127)
    assert ((xq.view(3, -1, 32) * dx[..., None] - groups).abs() <= dx[..., None] / 2 * 1.0001).all()
    assert xq.abs().max() == 127
    assert torch.allclose(xs, xq.view(3, -1, 16).sum(-1) * dx.repeat_interleave(2, dim=1))


@pytest.mark.parametrize("unit", [64, 256, 1024])  # Q8_0 pairs, Q4_K blocks, Q6_K fours
def test_dp4a_packed_activations_are_the_plain_ones_reordered(unit):
    """quantize_activations(x, unit): per row, each array cut into units (unit elements of x: unit codes,
    unit / 32 dx, unit / 16 sums) and stored chunk-major across them, 16 bytes per chunk; an array with
    less than a chunk per unit (Q8_0's 2 dx) stays in order."""
    from shardserve.model_executor.kernels.gguf_dp4a import quantize_activations

    x = torch.randn(2, 2048, generator=torch.Generator().manual_seed(19)).to(torch.bfloat16).to(DEVICE)
    plain = [t.cpu() for t in quantize_activations(x)]
    packed = [t.cpu() for t in quantize_activations(x, unit)]
    units = 2048 // unit
    for a, b, per_unit, chunk in zip(plain, packed, (unit, unit // 32, unit // 16), (16, 4, 4)):
        want = a
        if per_unit % chunk == 0:
            want = a.view(2, units, per_unit // chunk, chunk).transpose(1, 2).reshape(2, -1)
        assert torch.equal(b, want)
    assert not torch.equal(plain[0], packed[0])
    with pytest.raises(ValueError, match="units of 1024"):
        quantize_activations(x[:, :1536], 1024)


@pytest.mark.parametrize("k,unit", [(512, 256), (2048, 1024), (768, 0), (512, 64), (1536, 256)])
def test_rms_norm_int8_equals_norm_then_quantize(k, unit):
    """The RMSNorm that feeds an int8 GEMV: its output, the residual sum it returns and its int8 x (in
    the layout ``unit``) equal ``elementwise.rms_norm`` followed by ``quantize_activations`` bit for bit
    (fp16: the interpreter adds bf16 wrongly). A row is cut into chunks of 512, one program each: 768
    (not a power of two) ends in a half-empty chunk, 1536 and 2048 take 3 and 4."""
    from shardserve.model_executor.kernels.elementwise import rms_norm
    from shardserve.model_executor.kernels.gguf_dp4a import quantize_activations, rms_norm_int8

    gen = torch.Generator().manual_seed(k + unit)
    x, residual = (torch.randn(3, k, generator=gen).to(torch.float16).to(DEVICE) for _ in range(2))
    w = (torch.rand(k, generator=gen) + 0.5).to(torch.float16).to(DEVICE)
    for res in (None, residual):
        r_ref, r_in = (None, None) if res is None else (res.clone(), res.clone())
        y_ref = rms_norm(x, w, 1e-5, r_ref)
        y, r_sum, q = rms_norm_int8(x, w, 1e-5, r_in, unit)
        assert torch.equal(y, y_ref)
        if res is None:
            assert r_sum is None
        else:  # the sum in a new tensor, the inputs untouched
            assert torch.equal(r_sum, r_ref) and torch.equal(r_in, res)
        assert all(torch.equal(a, b) for a, b in zip(q, quantize_activations(y_ref, unit)))
    with pytest.raises(ValueError, match="whole groups"):
        rms_norm_int8(x[:, :500], w[:500], 1e-5)


@pytest.mark.parametrize("name", DP4A_NAMES)
@pytest.mark.parametrize("rows", [8, 6])  # whole tiles, and a partial one (masked rows)
def test_dp4a_gemv_matches_reference(name, rows):
    """Against the two references above, 1, 3 and 4 rows of x, plain and SwiGLU."""
    from shardserve.model_executor.kernels.gguf_dp4a import DP4A_MAX_ROWS, gguf_gemv_dp4a

    blocks, ref, qtype, cols = _dp4a_case(name, rows, seed=12)
    x = torch.randn(DP4A_MAX_ROWS, cols, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    for m in (1, 3, DP4A_MAX_ROWS):  # 3: a row tile with a masked row
        _check_int8_kernel(gguf_gemv_dp4a, blocks, ref, qtype, x[:m])


def test_dp4a_tiling_rule():
    """The int8 GEMV's tiling: 4 warps of one thread unit each, as many units per row at a time (NBT) as
    fill an H200's 132 SMs with about 1024 threads each, at most 16 and at most the row's units; the
    choices measured best on the 8B shapes."""
    import triton

    from shardserve.model_executor.kernels.gguf_dp4a import _THREADS_PER_SM, _unit, tiling

    for rows in (1, 1024, 4096, 6144, 57344, 128256, 1 << 20):
        for units in (1, 2, 4, 14, 16, 56, 64):
            bn, nbt, warps = tiling(rows, units, 132)
            assert bn * nbt == 32 * warps and warps == 4
            assert nbt <= min(16, triton.next_power_of_2(units))
            assert rows * (nbt // 2) < 132 * _THREADS_PER_SM  # the next shallower tiling would fill the SMs
    assert tiling(6144, 16, 132) == tiling(4096, 56, 132) == (8, 16, 4)  # qkv, down: 16 blocks in flight per row
    assert tiling(28672, 16, 132) == (32, 4, 4)  # gate/up of the 8B (2 x 14336 rows)
    assert tiling(128256, 4, 132) == (128, 1, 4)  # the LM head: one unit at a time
    assert tiling(4096, 16, 264) == (8, 16, 4) and tiling(28672, 16, 264) == (8, 16, 4)  # more SMs, deeper
    assert _unit(14, 56) == 4 and _unit(14, 14) == 2 and _unit(12, 16) == 1 and _unit(8, 128) == 2
    # packed rows: at least 64 consecutive bytes per row and load (NBT x chunk bytes) where the row has the units
    assert tiling(128256, 4, 132, 8) == (32, 4, 4)  # Q6_K LM head: all 4 units of a row (32 bytes)
    assert tiling(128256, 64, 132, 4) == (8, 16, 4)  # Q8_0 LM head: 16 pairs of 4-byte chunks
    assert tiling(28672, 16, 132, 16) == (32, 4, 4) and tiling(57344, 32, 132, 16) == (32, 4, 4)  # Q4_K gate/up
    assert tiling(6144, 16, 132, 16) == tiling(6144, 16, 132)  # already deep enough


def test_dp4a_split_tiling_rule():
    """The split kernels' tiling: 4 warps of BLOCK_N * NBT * S = 128 threads (Q4_K weights of more than 5120 rows:
    256, two rows' slices a thread, at 4 x 8, or 4 x 16 from 32 blocks a row); threads per row (S * NBT) the power
    of two that fills 132 SMs with 2048 threads each, 8-32 for Q4_K and 16-64 for Q6_K and Q8_0 (Q8_0 weights of
    more than a wave of rows at 16: 64), NBT at most the row's units; S = 4 for Q4_K and Q8_0 at 64 threads a row;
    the picks measured best on the 8B."""
    import triton

    from shardserve.model_executor.kernels.gguf_dp4a import _SPLIT_PER_ROW, _SPLIT_THREADS_PER_SM, split_tiling

    for qtype in (12, 14, 8):
        lo, hi = _SPLIT_PER_ROW[qtype]
        for rows in (1, 512, 1024, 4096, 6144, 28672, 128256, 1 << 20):
            for units in (1, 2, 4, 14, 16, 56):
                s, (bn, nbt, warps) = split_tiling(qtype, rows, units, 132)
                assert nbt <= triton.next_power_of_2(units)
                if qtype == 12 and rows > 5120:  # Q4_K, many rows: 4 x 8 (4 x 16), two rows' slices a thread
                    want = 16 if units >= 32 else min(8, triton.next_power_of_2(units))
                    assert (s, nbt, warps) == (4, want, 4) and bn * nbt * s == 256
                    continue
                assert warps == 4 and bn * nbt * s == 128 and s in (4, 8)
                per_row = s * nbt
                assert per_row <= hi and (per_row >= lo or nbt == triton.next_power_of_2(units))
                many = rows * lo > 132 * _SPLIT_THREADS_PER_SM  # more than a wave at the fewest threads a row
                if lo < per_row < hi and nbt < triton.next_power_of_2(units):  # the fill decided it
                    assert rows * per_row <= 132 * _SPLIT_THREADS_PER_SM < rows * per_row * 2
                if qtype == 8 and many:  # Q8_0's many-row weights: the most threads a row
                    assert per_row == min(hi, 4 * triton.next_power_of_2(units))
                if qtype == 12:
                    assert s == 4
                elif qtype == 8:
                    assert (s == 4) == (many or rows * hi <= 132 * _SPLIT_THREADS_PER_SM)  # 64 threads a row asked for
                else:
                    assert s == 8
    assert split_tiling(12, 6144, 16, 132) == (4, (8, 8, 4))  # 8B q/k/v
    assert split_tiling(12, 4096, 16, 132) == split_tiling(12, 4096, 56, 132) == (4, (4, 8, 4))  # o, down
    assert split_tiling(12, 28672, 16, 132) == (4, (8, 8, 4))  # gate/up (2 x 14336 rows)
    assert split_tiling(12, 57344, 32, 132) == split_tiling(12, 8192, 112, 132) == (4, (4, 16, 4))  # 70B
    assert split_tiling(14, 4096, 14, 132) == (8, (2, 8, 4))  # Q6_K down (units of 4 blocks)
    assert split_tiling(14, 128256, 4, 132) == (8, (8, 2, 4))  # the Q6_K LM head
    assert split_tiling(8, 6144, 64, 132) == (8, (4, 4, 4))  # Q8_0 q/k/v (pairs of blocks)
    assert split_tiling(8, 4096, 64, 132) == split_tiling(8, 4096, 224, 132) == (4, (2, 16, 4))  # o, down
    assert split_tiling(12, 5120, 16, 132) == (4, (4, 8, 4))  # Q4_K q/k beside a Q6_K v
    assert split_tiling(8, 28672, 64, 132) == split_tiling(8, 128256, 64, 132) == (4, (2, 16, 4))  # gate/up, LM head


@pytest.mark.parametrize("name", DP4A_NAMES)
@pytest.mark.parametrize("rows_fast", [False, True])
def test_dp4a_gemv_both_thread_layouts(name, rows_fast):
    """Each type's kernel in either thread layout (weight rows or blocks fastest across a warp's threads,
    whichever the type does not use by default too), with a partial row tile, against both references.
    Rows of 4 Q6_K blocks: its 8-byte-aligned unit of 4 blocks (the other tests have pairs)."""
    from shardserve.model_executor.kernels.gguf_dp4a import _unit, gguf_gemv_dp4a

    blocks, ref, qtype, cols = _dp4a_case(name, 6, seed=17, cols=1024 if name == "Q6_K" else None)
    assert name != "Q6_K" or _unit(qtype, cols // 256) == 4
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(18)).to(torch.bfloat16)
    config = (4, 2, 1, rows_fast) if DEVICE == "cpu" else (4, 32, 4, rows_fast)

    def fn(x_, w_, q_, silu_and_mul=False):
        return gguf_gemv_dp4a(x_, w_, q_, silu_and_mul, config=config)

    _check_int8_kernel(fn, blocks, ref, qtype, x)


@pytest.mark.parametrize(
    "name,cols,split",
    [
        ("Q4_K", 512, 2),
        ("Q4_K", 512, 4),
        ("Q4_K", 512, 8),
        ("Q6_K", 1024, 4),
        ("Q6_K", 1024, 8),
        ("Q6_K", 512, 2),
        ("Q8_0", 192, 4),
        ("Q8_0", 192, 8),
    ],
)  # Q6_K: units of 4 blocks, and pairs; Q8_0: 3 pairs
def test_dp4a_split_gemv_matches_reference(name, cols, split):
    """The kernels that split a Q4_K block (Q6_K unit, Q8_0 pair) across ``split`` threads, a row tile with a masked
    row, against both references (1, 3 and 4 rows of x, plain and SwiGLU), and against the thread-per-unit
    kernel, and compiled for fewer registers; the packed layout and the rows-fast thread order are refused,
    and a register cap for the thread-per-unit kernel."""
    from shardserve.model_executor.kernels.gguf_dp4a import DP4A_MAX_ROWS, gguf_gemv_dp4a

    blocks, ref, qtype, cols = _dp4a_case(name, 6, seed=41 + split, cols=cols)
    x = torch.randn(DP4A_MAX_ROWS, cols, generator=torch.Generator().manual_seed(42)).to(torch.bfloat16)
    config = (8, 2, 1) if DEVICE == "cpu" else (32 // split, 4, 4)

    def fn(x_, w_, q_, silu_and_mul=False):
        return gguf_gemv_dp4a(x_, w_, q_, silu_and_mul, config=config, split=split)

    for m in (1, 3, DP4A_MAX_ROWS):
        _check_int8_kernel(fn, blocks, ref, qtype, x[:m])
    xd = x.to(DEVICE)
    unit = gguf_gemv_dp4a(xd, blocks, qtype, split=1).float().cpu()
    assert _rel(fn(xd, blocks, qtype), unit) < TOL_DP4A_EXACT  # the same sums in another order
    wide = (2 * config[0], *config[1:])  # two rows' slices a thread (the rule's Q4_K tiling above 5120 rows)
    assert _rel(gguf_gemv_dp4a(xd, blocks, qtype, config=wide, split=split), unit) < TOL_DP4A_EXACT
    assert _rel(gguf_gemv_dp4a(xd, blocks, qtype, True, config=wide, split=split),
                gguf_gemv_dp4a(xd, blocks, qtype, True, split=1).float().cpu()) < TOL_DP4A_EXACT  # fmt: skip
    # compiled for 32 registers a thread (spilling on CUDA; ignored by the interpreter): the same bits
    capped = gguf_gemv_dp4a(xd, blocks, qtype, config=config, split=split, max_registers=32)
    assert torch.equal(capped, fn(xd, blocks, qtype))
    with pytest.raises(ValueError, match="max_registers"):
        gguf_gemv_dp4a(xd, blocks, qtype, split=1, max_registers=32)
    with pytest.raises(ValueError, match="file order"):
        gguf_gemv_dp4a(xd, blocks, qtype, config=(*config, True), split=split)


def _check_int8_kernel(fn, blocks, ref, qtype, x):
    """``fn(x, blocks, qtype)`` (an int8 kernel: dp4a or MMA) against both references, plain and SwiGLU."""
    from shardserve.model_executor.kernels.gguf_dp4a import quantize_activations

    (m, cols), rows = x.shape, blocks.shape[0]
    xq, dx, _ = quantize_activations(x.to(DEVICE))
    xdq = (xq.cpu().float().view(m, -1, 32) * dx.cpu()[..., None]).view(m, cols)
    got = fn(x.to(DEVICE), blocks, qtype)
    assert got.dtype == torch.bfloat16 and got.shape == (m, rows)
    assert _rel(got, xdq @ ref.T) < TOL_DP4A_EXACT, m
    assert _rel(got, x.float() @ ref.T) < TOL_DP4A, m
    fused = fn(x.to(DEVICE), blocks, qtype, silu_and_mul=True)
    assert fused.shape == (m, rows // 2)
    assert _rel(fused, _swiglu(xdq @ ref.T)) < TOL_DP4A_SWIGLU, m
    # the fused epilogue itself: gate, silu, up and the output rounded to bf16 (the interpreter truncates)
    assert _rel(fused, _swiglu(got.float().cpu())) < 2 * TOL_DP4A_EXACT, m


def test_dp4a_prefetch_sectors():
    """Before its PDL wait a split GEMV asks L2 for each row's first tile, the whole tile where the launch's
    rows of it fit the byte budget, never more than the budget, nothing for a 128k-row LM head; no PDL (so
    no prefetch) off CUDA."""
    from shardserve.model_executor.kernels.gguf_dequant import kernel_layout
    from shardserve.model_executor.kernels.gguf_dp4a import _PREFETCH_BYTES, _TYPE_SIZE, prefetch_sectors, split_tiling
    from shardserve.model_executor.kernels.pdl import pdl_launch

    for qtype, rows, k in [(12, 6144, 4096), (12, 4096, 4096), (12, 28672, 4096), (12, 4096, 14336),
                           (14, 1024, 4096), (14, 4096, 14336), (14, 128256, 4096), (8, 6144, 4096),
                           (8, 28672, 4096), (8, 4096, 14336)]:  # fmt: skip
        nb = k // (32 if qtype == 8 else 256)
        per = kernel_layout(qtype, nb, False)[0]
        s, (_, nbt, _) = split_tiling(qtype, rows, nb // per, 132)
        unit = _TYPE_SIZE[qtype] * per
        pf = prefetch_sectors(unit, rows, nb // per, nbt, s)
        asked = rows * nbt * s * 32 * pf  # bytes over the launch
        assert asked <= _PREFETCH_BYTES
        tile = rows * min(nb // per, nbt) * unit
        if tile <= _PREFETCH_BYTES // 2:
            assert asked >= tile, (qtype, rows, k)  # the whole first tile
        if rows == 128256:
            assert pf == 0
    assert pdl_launch(torch.zeros(1)) == {}


@pytest.mark.skipif(DEVICE == "cpu", reason="programmatic dependent launch is a CUDA feature")
def test_pdl_chain_in_a_cuda_graph_matches_plain_launches():
    """The decode step's kernel chain (RMSNorm with int8 output, Q4_K GEMV, activation rounding, Q6_K
    GEMV, RMSNorm) captured in a CUDA graph with PDL gives the same bits as launched without it, on a GPU
    that has PDL; on one without, PDL is off."""
    from shardserve.model_executor.kernels import pdl
    from shardserve.model_executor.kernels.elementwise import rms_norm
    from shardserve.model_executor.kernels.gguf_dp4a import gguf_gemv_dp4a, rms_norm_int8

    w4, _, q4, cols = _dp4a_case("Q4_K", 1024, seed=61, cols=1024)
    w6, _, q6, _ = _dp4a_case("Q6_K", 1024, seed=62, cols=1024)
    gen = torch.Generator().manual_seed(63)
    x = torch.randn(1, cols, generator=gen).to(torch.bfloat16).cuda()
    res = torch.randn(1, cols, generator=gen).to(torch.bfloat16).cuda()
    nw = torch.rand(cols, generator=gen).to(torch.bfloat16).cuda() + 0.5

    def chain():
        y, r, xq = rms_norm_int8(x, nw, 1e-5, res)
        h = gguf_gemv_dp4a(y, w4, q4, quantized=xq)
        h = gguf_gemv_dp4a(h, w6, q6)
        return rms_norm(h, nw, 1e-5, r)

    outs = {}
    for on in (True, False):
        pdl.set_pdl(on)
        try:
            chain()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            outs[on] = out.clone()
        finally:
            pdl.set_pdl(True)
    assert torch.equal(outs[True], outs[False])
    assert pdl.pdl_enabled(x) == (torch.cuda.get_device_capability()[0] >= 9)


def test_dp4a_routing_and_refusals():
    """gguf_linear sends bf16 decode rows of the three types to the int8 GEMV (an output slice too) and
    everything else elsewhere; the kernel refuses what it cannot take."""
    from shardserve.model_executor.kernels import gguf_dp4a

    blocks, ref, qtype, cols = _dp4a_case("Q4_K", 16, seed=14)
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(15)).to(torch.bfloat16).to(DEVICE)
    assert gguf_dp4a.supports(x, blocks, qtype)
    assert not gguf_dp4a.supports(x.float(), blocks, qtype)  # fp32: the exact FMA GEMV
    assert not gguf_dp4a.supports(x[:, :256], blocks[:, :144], 2)  # Q4_0: no int8 kernel
    q8, _, q8_type, q8_cols = _dp4a_case("Q8_0", 4, seed=16)
    assert not gguf_dp4a.supports(torch.zeros(1, 96, dtype=torch.bfloat16, device=DEVICE), q8[:, : 3 * 34], q8_type)
    wide = torch.zeros(2, 40, dtype=torch.bfloat16, device=DEVICE)
    gguf_linear(x, blocks, qtype, out=wide[:, 8:24])
    assert _rel(wide[:, 8:24], x.float().cpu() @ ref.T) < TOL_DP4A and not wide[:, :8].any()
    with pytest.raises(ValueError, match="takes Q4_K/Q6_K/Q8_0"):
        gguf_dp4a.gguf_gemv_dp4a(x.float(), blocks, qtype)


# -- the int8 tensor-core kernel for Q4_K (kernels/gguf_mma.py), 5-16 rows ------------------------------------
# Same arithmetic as the dp4a GEMV (x rounded to int8 per 32, integer products, fp32 sums), so the same two
# references and tolerances.


@pytest.mark.parametrize("rows", [40, 22])  # several BLOCK_N tiles, and a partial one
def test_mma_matches_reference(rows):
    """5, 9 and 16 rows of x (a partial and a full 16-row tile), plain and SwiGLU."""
    from shardserve.model_executor.kernels.gguf_mma import MMA_MAX_ROWS, gguf_mma

    blocks, ref, qtype, cols = _dp4a_case("Q4_K", rows, seed=21)
    x = torch.randn(MMA_MAX_ROWS, cols, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16)
    for m in (5, 9, MMA_MAX_ROWS):
        _check_int8_kernel(gguf_mma, blocks, ref, qtype, x[:m])


def test_mma_routing_and_refusals(monkeypatch):
    """gguf_linear sends bf16 batches of 5-16 rows of Q4_K to the int8 tensor-core kernel (not the bf16
    tensor-core tiles); 17 rows, fp32 and Q6_K go to the tiles; the kernel refuses what it cannot take."""
    from shardserve.model_executor.kernels import gguf_gemv, gguf_mma

    blocks, ref, qtype, cols = _dp4a_case("Q4_K", 24, seed=23)
    q6, _, q6_type, _ = _dp4a_case("Q6_K", 24, seed=25)
    x = torch.randn(17, cols, generator=torch.Generator().manual_seed(24)).to(torch.bfloat16).to(DEVICE)
    calls = []
    real = gguf_gemv.gguf_matmul
    monkeypatch.setattr(gguf_gemv, "gguf_matmul", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    out = torch.zeros(8, 40, dtype=torch.bfloat16, device=DEVICE)
    gguf_linear(x[:8], blocks, qtype, out=out[:, 8:32])  # an output slice
    assert _rel(out[:, 8:32], x[:8].float().cpu() @ ref.T) < TOL_DP4A and not out[:, :8].any() and not calls
    gguf_linear(x, blocks, qtype)
    gguf_linear(x[:8].float(), blocks, qtype)
    gguf_linear(x[:6], q6, q6_type)
    assert calls == [17, 8, 6]
    assert not gguf_mma.supports(x, blocks, qtype)  # 17 rows
    assert not gguf_mma.supports(x[:8], q6, q6_type)
    with pytest.raises(ValueError, match="takes Q4_K"):
        gguf_mma.gguf_mma(x[:8].float(), blocks, qtype)


# -- the packed row layout (gguf_blocks.row_layout): every kernel reads it as it reads file order ----------

# (type, columns): Q4_K; Q6_K in units of four blocks and of pairs (6 blocks); Q8_0 in pairs, and an odd
# number of blocks (5: stays in file order)
PACKED_CASES = [("Q4_K", 512), ("Q6_K", 1024), ("Q6_K", 1536), ("Q8_0", 192), ("Q8_0", 160)]


def test_packed_row_layout_places_each_byte():
    """Byte o of unit u of a row lands at (o // V) * units * V + u * V + o % V, and unpacking restores the
    file order; types without a packed layout are returned as they are."""
    from shardserve.model_executor.layers.quantization.gguf_blocks import pack_rows, row_layout, unpack_rows

    for name, cols in PACKED_CASES + [("Q4_0", 256), ("Q5_K", 512)]:
        t = block_type(name)
        nb = cols // t.block_size
        per, v = row_layout(t.type_id, nb)
        gen = torch.Generator().manual_seed(3)
        raw = torch.randint(0, 256, (3, nb * t.type_size), dtype=torch.uint8, generator=gen)
        packed = pack_rows(raw, t.type_id)
        assert torch.equal(unpack_rows(packed, t.type_id), raw)
        unit_bytes, units = per * t.type_size, nb // per
        if name in ("Q4_0", "Q5_K") or (name == "Q8_0" and nb % 2):
            assert v == unit_bytes and packed is raw
            continue
        assert v in (4, 8, 16) and unit_bytes % v == 0
        for u in (0, units - 1):
            for o in (0, 1, v - 1, v, unit_bytes - 1):
                assert packed[1, (o // v) * units * v + u * v + o % v] == raw[1, u * unit_bytes + o]
    assert row_layout(14, 8) == (4, 8) and row_layout(14, 6) == (2, 4) and row_layout(12, 16) == (1, 16)
    assert row_layout(12, 16, packed=False) == (1, 144)


@pytest.mark.parametrize("name,cols", PACKED_CASES)
def test_packed_rows_give_the_same_results(name, cols):
    """Dequantization, the embedding gather, the fp32 GEMV and the tensor-core tiles on packed rows equal
    the same calls on file order bit for bit (same arithmetic, other addresses)."""
    from shardserve.model_executor.layers.quantization.gguf_blocks import pack_rows

    t = block_type(name)
    raw = random_blocks(np.random.default_rng(31), 12, cols, name, scale=(1e-4, 1e-3))
    blocks = torch.from_numpy(raw).to(DEVICE)
    packed = pack_rows(blocks, t.type_id)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).copy())
    assert torch.equal(dequantize(packed, t.type_id, cols, torch.float32, packed=True).cpu(), ref)
    ids = torch.tensor([11, 0, 4], device=DEVICE)
    assert torch.equal(embedding(packed, t.type_id, cols, ids, torch.float32, packed=True).cpu(), ref[ids.cpu()])
    x = torch.randn(6, cols, generator=torch.Generator().manual_seed(32)).to(DEVICE)
    for fn, m in ((gguf_gemv, 2), (gguf_matmul, 6)):
        for silu in (False, True):
            want = fn(x[:m], blocks, t.type_id, silu)
            assert torch.equal(fn(x[:m], packed, t.type_id, silu, packed=True), want), (fn.__name__, silu)


@pytest.mark.parametrize("name,cols", PACKED_CASES)
def test_packed_rows_in_the_int8_kernels(name, cols):
    """The int8 GEMV on packed rows (its default thread layout for them, blocks fastest) against both
    references, and equal to file order in the same thread layout; the MMA kernel (Q4_K) equal to file order."""
    from shardserve.model_executor.kernels.gguf_dp4a import gguf_gemv_dp4a, supports
    from shardserve.model_executor.kernels.gguf_mma import gguf_mma
    from shardserve.model_executor.layers.quantization.gguf_blocks import pack_rows

    blocks, ref, qtype, cols = _dp4a_case(name, 6, seed=33, cols=cols)
    packed = pack_rows(blocks, qtype)
    x = torch.randn(16, cols, generator=torch.Generator().manual_seed(34)).to(torch.bfloat16)
    if not supports(x[:2].to(DEVICE), blocks, qtype):  # an odd number of Q8_0 blocks: not an int8 GEMV shape
        assert packed is blocks
        return

    def fn(x_, w_, q_, silu_and_mul=False):
        return gguf_gemv_dp4a(x_, w_, q_, silu_and_mul, packed=True)

    _check_int8_kernel(fn, packed, ref, qtype, x[:2])
    config = (4, 2, 1, False) if DEVICE == "cpu" else (8, 16, 4, False)
    xd = x[:2].to(DEVICE)
    same = gguf_gemv_dp4a(xd, blocks, qtype, config=config)
    assert torch.equal(gguf_gemv_dp4a(xd, packed, qtype, config=config, packed=True), same)
    if name == "Q4_K":
        xd = x.to(DEVICE)
        assert torch.equal(gguf_mma(xd, packed, qtype, True, packed=True), gguf_mma(xd, blocks, qtype, True))
