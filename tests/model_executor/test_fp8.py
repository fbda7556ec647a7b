"""FP8 weights: the Llama-3.1 checkpoint formats and ``--quantization fp8`` against the same weights dequantized
(transformers as the reference), the FP8 kernels under Triton's interpreter, TP sharding, bytes held."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/model_executor: model_test_utils

from model_test_utils import prefill_then_decode, save_expected, tp_worker  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from shardserve.config import ModelConfig  # noqa: E402
from shardserve.distributed import parallel_state as ps  # noqa: E402
from shardserve.model_executor.kernels import TRITON_INTERPRET  # noqa: E402
from shardserve.model_executor.kernels import fp8 as fp8_kernels  # noqa: E402
from shardserve.model_executor.kernels.fp8 import fp8_gemv, fp8_gemv_config  # noqa: E402
from shardserve.model_executor.layers.quantization.base import model_weight_bytes  # noqa: E402
from shardserve.model_executor.layers.quantization.fp8 import (  # noqa: E402
    Fp8Config,
    Fp8LinearMethod,
    fp8_config_for,
    fp8_linear_bytes,
    quantize_weight_per_row,
)
from shardserve.model_executor.loader import iter_weights, load_model  # noqa: E402
from shardserve.model_executor.loader.resolve import resolve_model  # noqa: E402
from shardserve.model_executor.models.llama import LlamaForCausalLM  # noqa: E402

if not torch.cuda.is_available() and not TRITON_INTERPRET:
    pytest.skip("the FP8 kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
KERNEL_DEVICE = "cpu" if TRITON_INTERPRET else "cuda"
"""Where the kernel tests put their tensors: the interpreter's CPU, or the GPU when Triton compiles."""

FP8 = torch.float8_e4m3fn
PROMPT = [5, 17, 200, 3, 99, 42, 7, 150, 18, 255, 64, 1]
DECODED = [77, 131]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# FP8 tolerance of the tiny model's logits (|max| ~4.5) when activations are quantized too: e4m3 rounds each
# element by up to 2^-4 of itself at every matmul input. Measured over the three formats: max error 0.09-0.11 of
# the largest logit, mean 0.017-0.021, cosine similarity of each position's logits >= 0.990.
FP8_MAX_ERR, FP8_MEAN_ERR, FP8_MIN_COSINE = 0.15, 0.03, 0.98


@pytest.fixture(scope="module", autouse=True)
def single_process_groups():
    ps.init_single_process(torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def hf_model():
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return hf


def _calibrate(hf) -> dict[str, float]:
    """Largest |input| of each linear layer over the prompt: what a static ``input_scale`` is made from."""
    amax: dict[str, float] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=name: amax.__setitem__(n, float(a[0].abs().max())))
        for name, m in hf.named_modules()
        if name.rpartition(".")[2] in LINEARS
    ]
    with torch.no_grad():
        hf(torch.tensor([PROMPT + DECODED]))
    for h in hooks:
        h.remove()
    return amax


def _write_fp8_checkpoint(hf, path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Save ``hf`` in an FP8 format; returns the state dict with every quantized weight dequantized."""
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    amax = _calibrate(hf) if fmt == "ct_tensor" else {}
    ignored = {"model.layers.1.mlp.down_proj"} if fmt == "fbgemm" else set()
    tensors, dequantized = {}, {}
    for name, w in state.items():
        module = name.removesuffix(".weight")
        if module.rpartition(".")[2] not in LINEARS or module in ignored:
            tensors[name] = dequantized[name] = w.contiguous()
            continue
        if fmt == "ct_tensor":
            scale = w.abs().max() / 448.0
            q = (w / scale).to(FP8)
            tensors[f"{module}.weight_scale"] = scale.reshape(1)
            tensors[f"{module}.input_scale"] = torch.tensor([amax[module] / 448.0])
            dequantized[name] = q.float() * scale
        else:  # per output channel, stored [N, 1]
            q, scale = quantize_weight_per_row(w)
            tensors[f"{module}.weight_scale"] = scale[:, None].contiguous()
            dequantized[name] = q.float() * scale[:, None]
        tensors[name] = q
    if fmt == "ct_tensor":  # an FP8 KV-cache scheme too: per-layer k/v scales
        for i in range(hf.config.num_hidden_layers):
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.5 + i)
            tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.25)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    cfg = hf.config.to_dict()
    cfg["quantization_config"] = _quant_config(fmt, sorted(ignored))
    (path / "config.json").write_text(json.dumps(cfg))
    return dequantized


def _quant_config(fmt: str, ignored: list[str]) -> dict:
    if fmt == "fbgemm":
        return {
            "quant_method": "fbgemm_fp8",
            "activation_scale_ub": 1200.0,
            "modules_to_not_convert": ignored + ["lm_head"],
        }
    static = fmt == "ct_tensor"
    weights = {"num_bits": 8, "type": "float", "strategy": "tensor" if static else "channel", "symmetric": True}
    acts = {"num_bits": 8, "type": "float", "strategy": "tensor" if static else "token", "dynamic": not static}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"} if static else None,
    }


def _hf_logits(hf, state: dict[str, torch.Tensor]) -> torch.Tensor:
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict(state)
    with torch.no_grad():
        return ref(torch.tensor([PROMPT + DECODED])).logits[0].float()


def _load(path: Path, quantization: str | None = None, cpu_dequantize: bool = True):
    source = resolve_model(str(path))
    layers = (0, source.arch.num_hidden_layers)
    if cpu_dequantize:
        return load_model(source, torch.float32, torch.device("cpu"), layers, quantization=quantization)
    cfg = fp8_config_for(quantization, source)
    cfg.cpu_dequantize = False  # keep FP8 and run the GPU path's kernels (interpreter, CPU _scaled_mm)
    cfg.packed_modules_mapping = dict(LlamaForCausalLM.packed_modules_mapping)
    model = LlamaForCausalLM(source.arch, layers, cfg)
    with torch.no_grad():
        model.load_weights(iter_weights(source))
    return model.eval()


def _logits(model) -> torch.Tensor:
    return prefill_then_decode(model, PROMPT + DECODED, len(PROMPT))


@pytest.mark.parametrize("fmt", ["ct_tensor", "ct_channel", "fbgemm"])
def test_fp8_checkpoint_matches_dequantized_weights(hf_model, tmp_path, fmt):
    dequantized = _write_fp8_checkpoint(hf_model, tmp_path / fmt, fmt)
    want = _hf_logits(hf_model, dequantized)

    # CPU default: weights dequantized at load, so only the loading (formats, scales, fusing) is under test.
    cpu = _load(tmp_path / fmt)
    torch.testing.assert_close(_logits(cpu), want, atol=1e-4, rtol=1e-4)
    qkv = cpu.model.layers["0"].self_attn.qkv_proj
    assert isinstance(qkv.quant_method, Fp8LinearMethod) and qkv.weight.dtype == torch.float32

    # The GPU path's math: FP8 weights, FP8 GEMV at one row (decode), activations quantized per token (or with
    # the static scale) and torch._scaled_mm for the 12-token prefill.
    fp8 = _load(tmp_path / fmt, cpu_dequantize=False)
    assert fp8.model.layers["0"].mlp.gate_up_proj.weight.dtype == FP8
    _assert_fp8_close(_logits(fp8), want)


def _assert_fp8_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs() / want.abs().max()
    assert 0 < err.mean() < FP8_MEAN_ERR and err.max() < FP8_MAX_ERR, (float(err.mean()), float(err.max()))
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > FP8_MIN_COSINE


def test_checkpoint_details_kv_scales_ignored_layers_and_static_scale(hf_model, tmp_path):
    _write_fp8_checkpoint(hf_model, tmp_path / "ct", "ct_tensor")
    model = _load(tmp_path / "ct", cpu_dequantize=False)
    attn = [layer.self_attn.attn for layer in model.model.layers.values()]
    assert [(a.k_scale, a.v_scale) for a in attn] == [(0.5, 0.25), (1.5, 0.25)]
    qkv = model.model.layers["0"].self_attn.qkv_proj
    # q, k and v keep their own per-tensor scales, repeated over their rows; one static input scale (the max).
    q_rows, kv_rows = qkv.q_size, qkv.kv_size
    assert qkv.weight_scale[:q_rows].unique().numel() == 1 and qkv.weight_scale.unique().numel() == 3
    assert qkv.input_scale.shape == (3,) and torch.equal(qkv.static_input_scale, qkv.input_scale.max().reshape(1))
    assert kv_rows * 2 + q_rows == qkv.weight.shape[0]
    assert model.lm_head.weight.dtype == torch.float32  # lm_head is ignored

    _write_fp8_checkpoint(hf_model, tmp_path / "fb", "fbgemm")
    fb = _load(tmp_path / "fb", cpu_dequantize=False)
    assert fb.model.layers["1"].mlp.down_proj.weight.dtype == torch.float32  # modules_to_not_convert
    assert fb.model.layers["0"].mlp.down_proj.weight.dtype == FP8
    assert fb.model.layers["0"].mlp.down_proj.quant_method.config.activation_scale_ub == 1200.0


def test_quantization_fp8_loads_a_bf16_checkpoint(hf_model, tmp_path):
    path = tmp_path / "bf16"
    hf_model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    hf_model.float()
    state = {k: v.to(torch.bfloat16).float() for k, v in hf_model.state_dict().items()}
    # The reference: per output row, amax / 448, as the loader computes it on each rank's slice (TP = 1: all).
    dequantized = dict(state)
    for name, w in state.items():
        if name.removesuffix(".weight").rpartition(".")[2] in LINEARS:
            q, s = quantize_weight_per_row(w)
            dequantized[name] = q.float() * s[:, None]
    want = _hf_logits(hf_model, dequantized)

    model = _load(path, quantization="fp8")
    torch.testing.assert_close(_logits(model), want, atol=1e-4, rtol=1e-4)
    fp8 = _load(path, quantization="fp8", cpu_dequantize=False)
    down = fp8.model.layers["1"].mlp.down_proj
    assert down.weight.dtype == FP8 and "weight_scale" in dict(down.named_buffers())
    _assert_fp8_close(_logits(fp8), want)
    # Bytes held: every linear at one byte per weight plus a 4-byte scale per row; the rest fp32.
    arch = resolve_model(str(path)).arch
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    shapes = [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]
    linear = arch.num_hidden_layers * sum(fp8_linear_bytes(s) for s in shapes)
    rest = 4 * (2 * arch.vocab_size * h + (2 * arch.num_hidden_layers + 1) * h)  # the RoPE tables are not weights
    assert model_weight_bytes(fp8) == linear + rest


@pytest.mark.parametrize("static,ub", [(False, None), (True, None), (False, 2.0)])
def test_fp8_linear_paths_equal_their_emulation(static, ub):
    """One row-parallel FP8 layer: 1-2 rows through the FP8 GEMV equal the dequantized matmul; 12 rows through
    per-token (or static) activation quantization and torch._scaled_mm (bf16 out) equal the same quantization
    done in PyTorch followed by an fp32 matmul, exactly."""
    from shardserve.model_executor.layers.linear import RowParallelLinear

    gen = torch.Generator().manual_seed(3)
    cfg = Fp8Config("compressed-tensors", "channel", static_activations=static, activation_scale_ub=ub)
    cfg.cpu_dequantize = False
    layer = RowParallelLinear(64, 48, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    q, s = quantize_weight_per_row(torch.randn(48, 64, generator=gen))
    layer.weight.weight_loader(layer.weight, q)
    layer.weight_scale.weight_loader(layer.weight_scale, s[:, None])
    if static:
        layer.input_scale.weight_loader(layer.input_scale, torch.tensor([0.01]))
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.quant_method.use_scaled_mm
    x = torch.randn(12, 64, generator=gen)
    w = q.float() * s[:, None]
    torch.testing.assert_close(layer(x[:2]), x[:2] @ w.T, atol=1e-4, rtol=1e-5)
    if static:
        sa = torch.full((12, 1), 0.01)
    else:
        sa = x.abs().amax(1, keepdim=True).clamp(max=ub if ub else float("inf")) / 448
    xq = (x * (1 / sa)).clamp(-448, 448).to(FP8).float() * sa
    assert torch.equal(layer(x), (xq @ w.T).to(torch.bfloat16).float())
    assert (layer(x) - x @ w.T).abs().max() > 0  # activations really were quantized


def test_fp8_gemv_config_rule():
    """The H200-fitted tiling (kernels/fp8.py): 8 rows x 1024 where K >= N, 8 x 512 from N = 4 K, 16 rows on 8
    warps between; BLOCK_K halves to divide K, never below 256."""
    assert fp8_gemv_config(4096, 4096) == (8, 1024, 4, 3)  # o_proj
    assert fp8_gemv_config(4096, 14336) == (8, 1024, 4, 3)  # down_proj (14336 = 14 x 1024)
    assert fp8_gemv_config(28672, 4096) == (8, 512, 4, 3)  # gate_up_proj
    assert fp8_gemv_config(6144, 4096) == (16, 512, 8, 2)  # qkv_proj
    assert fp8_gemv_config(3584, 768)[1] == 256 and fp8_gemv_config(37, 300)[1] == 256


def test_fp8_gemv_matches_dequantized_matmul():
    """The GEMV reads float8 weights (the interpreter loads and converts e4m3 like the GPU) and scales rows, at
    each of the tiling rule's three picks, with and without SwiGLU, ragged N and K (masked tiles)."""
    gen = torch.Generator().manual_seed(5)
    cases = [
        (1, 64, 2048, False, False),  # 8 x 1024
        (2, 37, 300, True, False),  # 8 x 256, both dimensions masked
        (1, 40, 512, False, True),  # 8 x 512 after halving
        (2, 96, 64, False, False),  # N = 1.5 K: 16 x 256 on 8 warps, K masked
        (1, 300, 64, False, True),  # gate/up N = 9.4 K: 8 x 256
    ]

    def dev(t):
        return None if t is None else t.to(KERNEL_DEVICE)

    for rows, n, k, bias, silu in cases:
        x = torch.randn(rows, k, generator=gen)
        q, scale = quantize_weight_per_row(torch.randn(n * (2 if silu else 1), k, generator=gen))
        b = torch.randn(n, generator=gen) if bias else None
        got = fp8_gemv(dev(x), dev(q), dev(scale), dev(b), silu_and_mul=silu).float().cpu()
        want = torch.nn.functional.linear(x, q.float() * scale[:, None], b)
        if silu:
            want = torch.nn.functional.silu(want[:, :n]) * want[:, n:]
        torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=1e-4)
    with pytest.raises(ValueError, match="at most 2 rows"):
        fp8_gemv(torch.zeros(3, 16), q, scale)
    with pytest.raises(ValueError, match="float8_e4m3fn weight"):
        fp8_gemv(torch.zeros(1, 16), torch.zeros(4, 16), torch.ones(4))


def test_quantize_per_token_dynamic_bounded_and_static():
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(2)) * torch.tensor([1, 10, 0.01, 0, 100.0])[:, None]

    def quantize_per_token(x, static_scale=None, scale_ub=None):  # on the kernel's device, results on the CPU
        q, s = fp8_kernels.quantize_per_token(x.to(KERNEL_DEVICE), static_scale, scale_ub)
        return q.cpu(), s.cpu()

    q, s = quantize_per_token(x)
    want_s = (x.abs().amax(1, keepdim=True) / 448).clamp(min=1 / (448 * 512))
    torch.testing.assert_close(s, want_s)
    want_q = (x * (1 / want_s)).clamp(-448, 448).to(FP8)
    torch.testing.assert_close(q.float(), want_q.float(), atol=0, rtol=2**-3)  # at most one e4m3 step apart
    assert (q.float() * s - x).abs().max() <= (x.abs().amax(1, keepdim=True) * 2**-4).max()
    q, s = quantize_per_token(x, scale_ub=5.0)  # rows past the bound saturate
    assert s[4, 0] == pytest.approx(5.0 / 448) and q[4].float().abs().max() == 448
    q, s = quantize_per_token(x, static_scale=torch.tensor([0.05], device=KERNEL_DEVICE))
    assert torch.equal(s, torch.full((5, 1), 0.05)) and q.float().isfinite().all()


def test_weight_bytes_and_config_errors(tmp_path, monkeypatch):
    cfg = Fp8Config.from_hf_config(_quant_config("ct_tensor", []))
    assert (cfg.serialized, cfg.weight_strategy, cfg.static_activations) == (True, "tensor", True)
    # 8B's down_proj row-parallel over TP=2: half the columns, every row's scale, plus a static input scale.
    got = cfg.weight_bytes("model.layers.3.mlp.down_proj.weight", (4096, 14336), torch.bfloat16, 2, 1)
    assert got == 4096 * 7168 + 4 * 4096 + 4
    assert cfg.weight_bytes("model.layers.3.mlp.down_proj.weight_scale", (1,), torch.float32) == 0
    assert cfg.weight_bytes("lm_head.weight", (1000, 64), torch.bfloat16, 2, 0) == 500 * 64 * 2
    assert fp8_linear_bytes((6144, 4096), tp_size=4, split_dim=0) == 1536 * 4096 + 4 * 1536

    with pytest.raises(ValueError, match="only FP8"):
        Fp8Config.from_hf_config(
            {**_quant_config("ct_channel", []), "config_groups": {"g": {"weights": {"type": "int", "num_bits": 8}}}}
        )
    with pytest.raises(ValueError, match="block-wise"):
        Fp8Config.from_hf_config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    cfg.packed_modules_mapping = dict(LlamaForCausalLM.packed_modules_mapping)
    cfg.ignore = ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="some of"):
        cfg.is_ignored("model.layers.0.self_attn.qkv_proj")
    cfg.ignore = ["re:.*self_attn.*"]
    assert cfg.is_ignored("model.layers.0.self_attn.qkv_proj") and not cfg.is_ignored("model.layers.0.mlp.down_proj")

    with pytest.raises(ValueError, match="not one"):  # a GGUF file
        fp8_config_for("fp8", resolve_model(None))
    # An FP8 GPU is needed: refused below compute capability 8.9 at config time and at load.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA A10")
    with pytest.raises(ValueError, match=r"--quantization fp8 needs a GPU with FP8 support.*A10 has 8\.6"):
        ModelConfig(quantization="fp8", device="cuda")
    with pytest.raises(ValueError, match=r"an FP8 checkpoint \(compressed-tensors\) needs a GPU"):
        cfg.verify_device(torch.device("cuda", 0))
    cfg.verify_device(torch.device("cpu"))


def test_fp8_checkpoint_with_bf16_weights_is_refused(hf_model, tmp_path):
    path = tmp_path / "liar"
    hf_model.save_pretrained(path, safe_serialization=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = _quant_config("ct_channel", [])
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json says the checkpoint is FP8"):
        _load(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fp8_checkpoints_tensor_parallel_2_match_single_process(hf_model, tmp_path):
    """Per-channel scales split with the rows (QKV, gate/up) and replicated for row-parallel layers; per-tensor
    scales replicated."""
    ids = PROMPT + DECODED
    cases = []
    for fmt in ("ct_tensor", "ct_channel"):
        _write_fp8_checkpoint(hf_model, tmp_path / fmt, fmt)
        logits = prefill_then_decode(_load(tmp_path / fmt), ids, len(PROMPT))
        cases.append((str(tmp_path / fmt), save_expected(tmp_path / f"{fmt}.pt", ids, len(PROMPT), logits)))
    bad = tmp_path / "bad"
    _write_fp8_checkpoint(hf_model, bad, "ct_channel")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3, "head_dim": 16}))
    torch.multiprocessing.spawn(tp_worker, args=(2, _free_port(), cases, str(bad)), nprocs=2, join=True)


def test_engine_serves_quantization_fp8(tiny_llama_dir):
    """``LLM(..., quantization="fp8")`` (the ``--quantization fp8`` flag): every decoder linear is FP8 and it
    generates."""
    from shardserve import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), device="cpu", quantization="fp8", num_kv_blocks=16)
    try:
        model = llm.engine.executor.runner.model
        methods = {type(m.quant_method).__name__ for m in model.modules() if hasattr(m, "quant_method")}
        assert methods == {"Fp8LinearMethod", "UnquantizedLinearMethod"}  # the embedding and LM head stay plain
        assert isinstance(model.model.layers["3"].mlp.down_proj.quant_method, Fp8LinearMethod)
        out = llm.generate([[5, 17, 200, 3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        llm.shutdown()
