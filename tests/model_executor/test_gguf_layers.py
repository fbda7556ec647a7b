"""GGUF layers: TP slices cut along blocks equal the unsharded result, Q/K un-permutation on block rows,
per-type row groups, byte accounting, and a tiny Llama through the kernels equal to its dequantized self.

TP ranks are simulated in one process (each rank's layer is built with a stand-in TP group and its partial
result combined as the collective would); the kernels run under the Triton interpreter.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("triton")

from gguf_test_files import TINY, blocks, llamacpp_permute, tiny_llama_gguf, write_gguf  # noqa: E402

from shardserve.distributed import parallel_state as ps  # noqa: E402
from shardserve.model_executor.layers import embed_head, linear  # noqa: E402
from shardserve.model_executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding  # noqa: E402
from shardserve.model_executor.layers.linear import (  # noqa: E402
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from shardserve.model_executor.layers.quantization.base import model_weight_bytes  # noqa: E402
from shardserve.model_executor.layers.quantization.gguf import (  # noqa: E402
    GGUFConfig,
    GGUFLinearMethod,
    gguf_weight_bytes,
)
from shardserve.model_executor.layers.quantization.gguf_blocks import unpack_rows  # noqa: E402
from shardserve.model_executor.loader import load_model, pp_partition_by_memory  # noqa: E402
from shardserve.model_executor.loader.resolve import open_gguf, resolve_model  # noqa: E402
from shardserve.model_executor.loader.weights import GGUFSource  # noqa: E402
from shardserve.model_executor.models import llama  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Layer tests run their kernels on the GPU where there is one, else under the interpreter."""
interpreted = pytest.mark.skipif(
    DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") != "1",
    reason="a CPU model through the Triton interpreter (on CUDA machines the layer tests cover the kernels)",
)
K_SUPER, K_SMALL = 1536, 192  # input features: TP 2 and 3 cut whole blocks of 256 / 32, TP 4 does not


def _deq(raw: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).copy())


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    """A GGUF file of layer-shaped tensors, and their dequantized values (Q/K un-permuted)."""
    rng = np.random.default_rng(0)
    spec = {
        "col.weight": (24, K_SUPER, "Q4_K"),
        "row.weight": (8, K_SUPER, "Q6_K"),
        "rowsmall.weight": (8, K_SMALL, "Q5_1"),
        "mlp.gate_proj.weight": (12, K_SMALL, "Q8_0"),
        "mlp.up_proj.weight": (12, K_SMALL, "Q8_0"),
        "attn.q_proj.weight": (HEADS * HEAD_DIM, 256, "Q4_K"),
        "attn.k_proj.weight": (KV_HEADS * HEAD_DIM, 256, "Q4_K"),
        "attn.v_proj.weight": (KV_HEADS * HEAD_DIM, 256, "Q6_K"),
        "embed.weight": (10, 256, "Q6_K"),
    }
    raw, values = {}, {}
    for name, (rows, cols, qtype) in spec.items():
        data = blocks(rng, rows, cols, qtype)
        values[name] = _deq(data, qtype)
        if name in ("attn.q_proj.weight", "attn.k_proj.weight"):
            data = llamacpp_permute(data, HEADS if "q_proj" in name else KV_HEADS)
        raw[name] = (data, qtype)
    reader = open_gguf(write_gguf(tmp_path_factory.mktemp("gguf-layers") / "layers.gguf", raw))
    heads = {"attn.q_proj.weight": HEADS, "attn.k_proj.weight": KV_HEADS}
    sources = {t.name: GGUFSource(t, heads.get(t.name)) for t in reader.tensors}
    config = GGUFConfig({n: int(gguf.GGMLQuantizationType[q]) for n, (_, q) in raw.items()}, kernels_on_cpu=True)
    config.packed_modules_mapping = dict(llama.LlamaForCausalLM.packed_modules_mapping)
    return SimpleNamespace(sources=sources, values=values, config=config)


@pytest.fixture
def tp_rank(monkeypatch):
    """``tp_rank(r, size)``: layers built afterwards see TP rank ``r`` of ``size``."""

    def set_rank(rank: int, size: int) -> None:
        group = SimpleNamespace(rank_in_group=rank, world_size=size)
        monkeypatch.setattr(linear, "get_tp_group", lambda: group)
        monkeypatch.setattr(embed_head, "get_tp_group", lambda: group)
        monkeypatch.setattr(llama, "get_tp_group", lambda: group)

    return set_rank


def _build(cls, *args, **kwargs):
    """A layer with its parameters on ``DEVICE``."""
    with torch.device(DEVICE):
        return cls(*args, **kwargs)


def _run(fn, *tensors):
    """``fn`` on ``DEVICE`` copies of ``tensors``, result back on the CPU."""
    return fn(*(t.to(DEVICE) for t in tensors)).cpu()


def _load(layer, sources, names_and_shards):
    for name, shard_id in names_and_shards:
        layer.weight.weight_loader(layer.weight, sources[name], shard_id)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def _close(got, want, tol=5e-6):
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() < tol


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_column_parallel_slices_rows(tensors, tp_rank, tp):
    x = torch.randn(3, K_SUPER)
    parts = []
    for r in range(tp):
        tp_rank(r, tp)
        layer = _build(ColumnParallelLinear, K_SUPER, 24, quant_config=tensors.config, prefix="col")
        assert isinstance(layer.quant_method, GGUFLinearMethod) and layer.weight.dtype == torch.uint8
        _load(layer, tensors.sources, [("col.weight", None)])
        parts.append(_run(lambda x, layer=layer: layer.quant_method.apply(layer, x), x))
    _close(torch.cat(parts, dim=1), x @ tensors.values["col.weight"].T)


@pytest.mark.parametrize("name,k", [("row.weight", K_SUPER), ("rowsmall.weight", K_SMALL)])
@pytest.mark.parametrize("tp", [2, 3])
def test_row_parallel_slices_whole_blocks(tensors, tp_rank, name, k, tp):
    x = torch.randn(2, k)
    total = torch.zeros(2, 8)
    n = k // tp
    for r in range(tp):
        tp_rank(r, tp)
        layer = _build(RowParallelLinear, k, 8, quant_config=tensors.config, prefix=name[: -len(".weight")])
        _load(layer, tensors.sources, [(name, None)])
        assert layer.weight.numel() == 8 * tensors.sources[name].load_blocks(1, r * n, n).shape[1]
        total += _run(lambda x, layer=layer: layer.quant_method.apply(layer, x), x[:, r * n : (r + 1) * n])
    _close(total, x @ tensors.values[name].T)


def test_tp_cutting_a_block_is_a_clear_error(tensors, tp_rank):
    tp_rank(0, 4)  # 1536 / 4 = 384: not whole 256-element super-blocks
    with pytest.raises(ValueError, match=r"not whole Q6_K blocks of 256.*--tensor-parallel-size"):
        RowParallelLinear(K_SUPER, 8, quant_config=tensors.config, prefix="row")
    with pytest.raises(ValueError, match="would cut a block"):
        tensors.sources["row.weight"].load_blocks(1, 0, 384)


@pytest.mark.parametrize("tp", [1, 2])
def test_merged_gate_up_fused_swiglu(tensors, tp_rank, tp):
    x = torch.randn(2, K_SMALL)
    gate, up = tensors.values["mlp.gate_proj.weight"], tensors.values["mlp.up_proj.weight"]
    want = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    parts = []
    for r in range(tp):
        tp_rank(r, tp)
        layer = _build(
            MergedColumnParallelLinear, K_SMALL, [12, 12], quant_config=tensors.config, prefix="mlp.gate_up_proj"
        )
        assert len(layer.quant_method.groups) == 1  # one type: one group, SwiGLU fused in the GEMV
        _load(layer, tensors.sources, [("mlp.gate_proj.weight", 0), ("mlp.up_proj.weight", 1)])
        parts.append(_run(layer.forward_silu_and_mul, x))
    _close(torch.cat(parts, dim=1), want)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_unpermuted_blocks_and_mixed_types(tensors, tp_rank, tp):
    """q/k stored permuted (llama.cpp) come back in Hugging Face order, sliced by head; v (Q6_K) is its own
    group; with TP 4 > 2 KV heads each KV head is replicated on two ranks."""
    x = torch.randn(5, 256)  # 5 rows: the tensor-core path
    q, k, v = (tensors.values[f"attn.{p}_proj.weight"] for p in "qkv")
    for r in range(tp):
        tp_rank(r, tp)
        layer = _build(
            QKVParallelLinear, 256, HEAD_DIM, HEADS, KV_HEADS, quant_config=tensors.config, prefix="attn.qkv_proj"
        )
        assert [g.qtype for g in layer.quant_method.groups] == [12, 14]
        _load(layer, tensors.sources, [(f"attn.{p}_proj.weight", p) for p in "qkv"])
        y = _run(lambda x, layer=layer: layer.quant_method.apply(layer, x), x)
        qs, kvs = layer.q_size, layer.kv_size
        kv_head = r // layer.num_kv_head_replicas
        want = torch.cat([q[r * qs : (r + 1) * qs], k[kv_head * kvs : (kv_head + 1) * kvs], v[kv_head * kvs :][:kvs]])
        _close(y, x @ want.T)


@pytest.mark.parametrize("pack_rows", [False, True])
def test_mixed_type_projection_quantizes_its_input_once(tmp_path, tp_rank, monkeypatch, pack_rows):
    """A q/k Q4_K + v Q6_K projection at decode rows (bf16): x is rounded to int8 once per x layout that its
    groups' int8 GEMVs read (file order: once for both; packed rows: once per type, the x unit being the
    type's thread unit), and the result equals each group's GEMV on its own (and the dequantized weights,
    to the int8 rounding of x)."""
    from shardserve.model_executor.kernels import gguf_dp4a

    rng = np.random.default_rng(21)
    k, heads_, kv_heads, head_dim = 512, 2, 1, 16  # 512: two Q6_K blocks per row, the int8 GEMV's unit
    raw, values = {}, {}
    for name, rows, qtype in (("q_proj", heads_ * head_dim, "Q4_K"), ("k_proj", kv_heads * head_dim, "Q4_K"),
                              ("v_proj", kv_heads * head_dim, "Q6_K")):  # fmt: skip
        data = blocks(rng, rows, k, qtype)
        values[name] = _deq(data, qtype)
        if name != "v_proj":
            data = llamacpp_permute(data, heads_ if name == "q_proj" else kv_heads)
        raw[f"attn.{name}.weight"] = (data, qtype)
    reader = open_gguf(write_gguf(tmp_path / "mixed.gguf", raw))
    heads = {"attn.q_proj.weight": heads_, "attn.k_proj.weight": kv_heads}
    sources = {t.name: GGUFSource(t, heads.get(t.name)) for t in reader.tensors}
    config = GGUFConfig({n: int(gguf.GGMLQuantizationType[q]) for n, (_, q) in raw.items()}, kernels_on_cpu=True)
    config.packed_modules_mapping = dict(llama.LlamaForCausalLM.packed_modules_mapping)
    config.pack_rows = pack_rows
    tp_rank(0, 1)
    layer = _build(QKVParallelLinear, k, head_dim, heads_, kv_heads, quant_config=config, prefix="attn.qkv_proj")
    _load(layer, sources, [(f"attn.{p}_proj.weight", p) for p in "qkv"])
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16).to(DEVICE)
    calls = []
    quantize = gguf_dp4a.quantize_activations
    monkeypatch.setattr(
        gguf_dp4a, "quantize_activations", lambda t, unit=0: calls.append((*t.shape, unit)) or quantize(t, unit)
    )
    y = layer.quant_method.apply(layer, x).float().cpu()
    method = layer.quant_method
    assert method.packed == pack_rows  # the kernels read these rows: packed after loading unless turned off
    assert calls == ([(2, k, 256), (2, k, 512)] if pack_rows else [(2, k, 0)])  # Q4_K: 1 block, Q6_K: a pair
    apart = [gguf_dp4a.gguf_gemv_dp4a(x, w, q, packed=pack_rows).float().cpu() for w, q, _, _ in method._views]
    assert torch.equal(y, torch.cat(apart, 1))
    # packed, the bytes are the file's rows reordered (Q4_K q/k)
    loaded = torch.cat([sources[f"attn.{p}_proj.weight"].load_blocks() for p in "qk"])
    q4k = method._views[0][0].cpu()
    assert torch.equal(unpack_rows(q4k, 12) if pack_rows else q4k, loaded)
    assert torch.equal(q4k, loaded) != pack_rows
    want = x.float().cpu() @ torch.cat([values["q_proj"], values["k_proj"], values["v_proj"]]).T
    _close(y, want, tol=2e-2)


@pytest.mark.parametrize("tp", [1, 3])
def test_embedding_and_lm_head_padded_vocab(tensors, tp_rank, tp):
    table = tensors.values["embed.weight"]  # 10 rows: padded to 12 over 3 ranks
    ids = torch.tensor([9, 0, 4, 7, 3])
    h = torch.randn(2, 256)
    emb_sum, logits = torch.zeros(5, 256), []
    for r in range(tp):
        tp_rank(r, tp)
        emb = _build(VocabParallelEmbedding, 10, 256, quant_config=tensors.config, prefix="embed")
        emb.weight.weight_loader(emb.weight, tensors.sources["embed.weight"])
        head = _build(ParallelLMHead, 10, 256, quant_config=tensors.config, prefix="lm_head")
        head.tie_weights(emb)
        in_range = (ids >= emb.vocab_start) & (ids < emb.vocab_end)
        local = torch.where(in_range, ids - emb.vocab_start, 0)
        emb_sum += _run(lambda i, emb=emb: emb.quant_method.embedding(emb, i), local) * in_range[:, None]
        logits.append(_run(lambda h, head=head: head.quant_method.apply(head, h), h))
    assert torch.equal(emb_sum, table[ids])
    _close(torch.cat(logits, dim=1)[:, :10], h @ table.T)


# -- byte accounting and pipeline partition ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf")


def _meta_model(path, config=None):
    from shardserve.model_executor.models.llama import LlamaForCausalLM

    source = resolve_model(None if path is None else str(path))
    config = config or GGUFConfig.from_reader(open_gguf(source.path))
    config.packed_modules_mapping = dict(LlamaForCausalLM.packed_modules_mapping)
    with torch.device("meta"):
        return LlamaForCausalLM(source.arch, None, config)


def test_weight_bytes_equal_what_layers_allocate(tiny_gguf, tp_rank):
    predicted = gguf_weight_bytes(open_gguf(tiny_gguf), TINY["kv_heads"], 1, torch.float32)
    tp_rank(0, 1)
    model = _meta_model(tiny_gguf)
    assert model_weight_bytes(model) == predicted.total
    layer0 = [p for n, p in model.named_parameters() if n.startswith("model.layers.0.")]
    assert sum(p.numel() * p.element_size() for p in layer0) == predicted.layers[0]
    assert predicted.layers[0] != predicted.layers[1] and not predicted.tied
    assert predicted.scratch == 2 * TINY["inter"] * TINY["hidden"] * 4  # gate_up in fp32
    # o_proj is Q5_K over 256 inputs: TP=2 would cut its only super-block, in the accounting as in the model
    with pytest.raises(ValueError, match="cut a block"):
        gguf_weight_bytes(open_gguf(tiny_gguf), TINY["kv_heads"], 2, torch.float32)
    tp_rank(0, 2)
    with pytest.raises(ValueError, match="not whole Q5_K blocks"):
        _meta_model(tiny_gguf)


def test_weight_bytes_per_rank_of_the_embedded_model(tp_rank):
    """SmolLM2-135M Q4_1 over TP=3 (9 heads, 3 KV heads): every rank allocates what the accounting says."""
    from shardserve.model_executor.loader.resolve import default_model_path

    reader = open_gguf(default_model_path())
    predicted = gguf_weight_bytes(reader, 3, 3, torch.float32)
    assert predicted.tied
    for r in range(3):
        tp_rank(r, 3)
        assert model_weight_bytes(_meta_model(None)) == predicted.total


def test_pp_partition_by_bytes():
    from shardserve.model_executor.layers.quantization.base import ModelWeightBytes

    w = ModelWeightBytes(layers=[10, 10, 30, 10, 10, 30], embed=20, lm_head=20, final_norm=0)
    assert pp_partition_by_memory(6, [1.0, 1.0], w) == [3, 3]  # 70 | 70 bytes
    assert pp_partition_by_memory(6, [1.0, 1.0]) == [3, 3]
    heavy = ModelWeightBytes(layers=[10] * 6, embed=40, lm_head=0, final_norm=0)
    assert pp_partition_by_memory(6, [1.0, 1.0], heavy) == [1, 5]  # 40 + 10 | 50: the embedding weighs on stage 0
    assert pp_partition_by_memory(6, [1.0, 0.0, 1.0], w) == [3, 1, 2]  # at least one layer each
    with pytest.raises(ValueError, match="layers"):
        pp_partition_by_memory(4, [1.0, 1.0], w)


# -- a whole model through the kernels ---------------------------------------------------------------


@pytest.fixture
def single_process():
    ps.init_single_process(torch.device("cpu"))
    yield
    ps.destroy_model_parallel()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # silu of very negative gates: exp(-g) = inf
@interpreted
def test_tiny_model_through_kernels_equals_dequantized(tiny_gguf, single_process, monkeypatch):
    """Every block type of ``TINY_TYPES`` in one model: prefill (tensor-core kernel) then decode (GEMV, SwiGLU
    fused), embedding gather and Q6_K LM head; logits equal the model dequantized at load."""
    from model_test_utils import prefill_then_decode

    source = resolve_model(str(tiny_gguf))
    layers = (0, source.arch.num_hidden_layers)
    reference = load_model(source, torch.float32, torch.device("cpu"), layers)  # dequantized at load
    assert reference.model.layers["0"].self_attn.qkv_proj.weight.dtype == torch.float32
    original = GGUFConfig.from_reader
    monkeypatch.setattr(GGUFConfig, "from_reader", classmethod(lambda cls, r: original(r, kernels_on_cpu=True)))
    quantized = load_model(source, torch.float32, torch.device("cpu"), layers, quantization="gguf")
    qkv = quantized.model.layers["0"].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.uint8 and len(qkv.quant_method.groups) == 2
    assert quantized.weight_bytes < reference.weight_bytes / 5
    ids = [5, 17, 92, 3, 41, 60, 8, 77]
    want = prefill_then_decode(reference, ids, 6)
    got = prefill_then_decode(quantized, ids, 6)
    assert want.abs().max() > 1 and want.std() > 0.1  # not a degenerate model
    _close(got, want, tol=1e-4)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # silu of very negative gates
@interpreted
@pytest.mark.parametrize("pack_rows", [False, True])
def test_int8_rounding_fused_into_the_norms(tiny_gguf, single_process, monkeypatch, pack_rows):
    """fp16 decode rows through the tiny model's two decoder layers: where ``qkv_proj``/``gate_up_proj`` take
    an int8 GEMV (layer 0's Q4_K q/k and gate/up, layer 1's Q8_0 gate/up), the RMSNorm before it rounds its
    output to int8 in the same kernel (without a residual, as in the first layer, and with one), in the x
    layout of the weight's rows (plain for file order, the unit's elements when packed), and the layer's
    outputs are those of the unfused path (the norm in torch, x rounded by its own kernel)."""
    from model_test_utils import SingleSequence

    from shardserve.model_executor.kernels import gguf_dp4a

    monkeypatch.setattr(GGUFConfig, "pack_rows", pack_rows)
    source = resolve_model(str(tiny_gguf))
    original = GGUFConfig.from_reader
    monkeypatch.setattr(GGUFConfig, "from_reader", classmethod(lambda cls, r: original(r, kernels_on_cpu=True)))
    layers = (0, source.arch.num_hidden_layers)
    model = load_model(source, torch.float16, torch.device("cpu"), layers, quantization="gguf")
    units = []
    real = gguf_dp4a.rms_norm_int8
    monkeypatch.setattr(gguf_dp4a, "rms_norm_int8", lambda *a: units.append(a[4]) or real(*a))
    gen = torch.Generator().manual_seed(5)
    x = (0.5 * torch.randn(1, 256, generator=gen)).to(torch.float16)
    residual = (0.5 * torch.randn(1, 256, generator=gen)).to(torch.float16)

    def run():
        seq = SingleSequence(model, dtype=torch.float16)
        meta, pos = seq.meta(1), torch.zeros(1, dtype=torch.long)
        out = []
        for name, res in (("0", None), ("0", residual), ("1", residual)):
            y, r = model.model.layers[name](pos, x.clone(), None if res is None else res.clone(), meta)
            out += [y.float(), r.float()]
        return out

    fused = run()
    # layer 0: both norms (twice), layer 1: the second; packed x in units of a Q4_K block / Q8_0 pair
    assert units == ([256, 256, 256, 256, 64] if pack_rows else [0] * 5)
    monkeypatch.setattr(GGUFLinearMethod, "int8_input_unit", lambda self, layer, x: None)
    plain = run()
    assert len(units) == 5  # the unfused path: no fused norm
    for got, want in zip(fused, plain):
        assert torch.isfinite(want).all() and want.abs().max() > 0.1
        _close(got, want, tol=1e-2)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # silu of very negative gates
@interpreted
def test_int8_rounding_fused_into_the_attention_merge(tmp_path, single_process, monkeypatch):
    """fp16 decode steps of a tiny model whose ``o_proj`` takes the int8 GEMV (Q4_K, then Q8_0): with the
    attention's GPU path (forced here, under the interpreter) and its decode split over the context, the merge
    kernel writes the int8 input of ``o_proj``, and the logits are bit for bit those of ``o_proj`` rounding
    its input itself."""
    from gguf_test_files import TINY_TYPES, tiny_llama_gguf
    from model_test_utils import SingleSequence

    from shardserve.model_executor.kernels import attention as attention_kernels
    from shardserve.model_executor.layers.attention import Attention

    types = [dict(TINY_TYPES[0], attn_output="Q4_K"), dict(TINY_TYPES[1], attn_output="Q8_0")]
    source = resolve_model(str(tiny_llama_gguf(tmp_path / "tiny-o.gguf", seed=3, types=types)))
    original = GGUFConfig.from_reader
    monkeypatch.setattr(GGUFConfig, "from_reader", classmethod(lambda cls, r: original(r, kernels_on_cpu=True)))
    model = load_model(source, torch.float16, torch.device("cpu"), (0, source.arch.num_hidden_layers),
                       quantization="gguf")  # fmt: skip
    from shardserve.model_executor.layers import attention as attention_layer

    monkeypatch.setattr(attention_layer, "use_triton", lambda x: True)  # the GPU path, under the interpreter
    monkeypatch.setattr(attention_kernels, "num_kv_splits_for", lambda *a: 3)
    fused = []
    real = attention_kernels.paged_attention
    monkeypatch.setattr(attention_kernels, "paged_attention",
                        lambda *a, **kw: fused.append(kw.get("int8_out") is not None) or real(*a, **kw))  # fmt: skip

    gen = torch.Generator().manual_seed(7)
    xs = [(0.5 * torch.randn(1, 256, generator=gen)).to(torch.float16) for _ in range(4)]
    residual = (0.5 * torch.randn(1, 256, generator=gen)).to(torch.float16)

    def run():  # four decode steps through both decoder layers (random fp16 logits of the whole model overflow)
        seq = SingleSequence(model, dtype=torch.float16)
        out = []
        for step, x in enumerate(xs):
            meta, pos = seq.meta(1), torch.tensor([step])
            for name in ("0", "1"):
                y, r = model.model.layers[name](pos, x.clone(), residual.clone(), meta)
                out += [y, r]
            seq.seq_len += 1
        return out

    merged = run()
    assert fused == [True] * 8  # both layers of every decode step
    monkeypatch.setattr(Attention, "forward_int8", lambda self, *a: (self.forward(*a), None))
    plain = run()
    assert fused[8:] == [False] * 8
    for i, (got, want) in enumerate(zip(merged, plain)):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)  # the random MLP overflows fp16
        if i % 2:  # the residual stream after attention: finite and not trivial
            assert torch.isfinite(want).all() and want.float().std() > 0.01


def test_cpu_bfloat16_halves_memory(tiny_gguf, single_process):
    """``--dtype bfloat16`` on the CPU: GGUF dequantized at load to bf16 holds half the bytes of fp32
    (KV cache too, it follows the dtype) and computes the same logits to bf16 precision."""
    from model_test_utils import prefill_then_decode

    source = resolve_model(str(tiny_gguf))
    layers = (0, source.arch.num_hidden_layers)
    fp32 = load_model(source, torch.float32, torch.device("cpu"), layers)
    bf16 = load_model(source, torch.bfloat16, torch.device("cpu"), layers)
    assert bf16.weight_bytes * 2 == fp32.weight_bytes
    assert bf16.model.layers["0"].mlp.down_proj.weight.dtype == torch.bfloat16
    ids = [5, 17, 92, 3, 41, 60]
    want = prefill_then_decode(fp32, ids, 6)
    got = _logits(bf16, ids, torch.bfloat16)
    assert ((got - want).norm() / want.norm()).item() < 0.15  # bf16 rounding through two random layers (~8%)


def _logits(model, ids, dtype=torch.float32):
    """Prefill logits of ``ids`` over a fresh KV cache of ``dtype``."""
    from model_test_utils import SingleSequence

    return SingleSequence(model, dtype=dtype).step(ids)


def test_types_without_kernel_dequantized_at_load_with_one_warning(tmp_path, single_process, caplog):
    """IQ4_NL and TQ2_0 (no kernel) are dequantized at load, named in one warning; the rest stays in blocks."""
    from gguf_test_files import TINY_TYPES

    types = [dict(TINY_TYPES[0], ffn_down="IQ4_NL", attn_output="TQ2_0"), dict(TINY_TYPES[1], ffn_up="IQ4_NL")]
    path = tiny_llama_gguf(tmp_path / "tiny-iq.gguf", seed=1, types=types)
    source = resolve_model(str(path))
    layers = (0, source.arch.num_hidden_layers)
    reference = load_model(source, torch.float32, torch.device("cpu"), layers)
    with caplog.at_level("WARNING"):
        quantized = load_model(source, torch.float32, torch.device("cpu"), layers, quantization="gguf")
    warnings = [r.getMessage() for r in caplog.records if "without a kernel" in r.getMessage()]
    assert len(warnings) == 1 and "IQ4_NL (2 tensors)" in warnings[0] and "TQ2_0 (1 tensors)" in warnings[0]
    layer0, layer1 = quantized.model.layers["0"], quantized.model.layers["1"]
    assert layer0.mlp.down_proj.weight.dtype == torch.float32 and layer0.self_attn.o_proj.weight.dtype == torch.float32
    assert layer1.mlp.gate_up_proj.weight.dtype == torch.float32  # gate Q8_0 + up IQ4_NL: the pair is dequantized
    assert layer0.mlp.gate_up_proj.weight.dtype == torch.uint8 and layer1.mlp.down_proj.weight.dtype == torch.uint8
    ids = [5, 17, 92, 3]
    torch.testing.assert_close(_logits(quantized, ids), _logits(reference, ids))


def test_prefill_policy_lm_head_never_dequantizes_to_scratch(tensors, tp_rank, monkeypatch):
    """From ``dequant_min_rows`` rows a linear layer dequantizes to a scratch buffer (cuBLAS); the LM head
    stays on the fused kernel whatever its rows."""
    from shardserve.model_executor.kernels import gguf_gemv

    calls = []
    real = gguf_gemv.dequantize
    monkeypatch.setattr(gguf_gemv, "dequantize", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(tensors.config, "dequant_min_rows", 6)
    tp_rank(0, 1)
    layer = _load(
        _build(ColumnParallelLinear, K_SUPER, 24, quant_config=tensors.config, prefix="col"),
        tensors.sources,
        [("col.weight", None)],
    )
    x = torch.randn(6, K_SUPER)
    _close(_run(lambda x: layer.quant_method.apply(layer, x), x), x @ tensors.values["col.weight"].T)
    assert calls == [(24, K_SUPER // 256 * 144)]
    head = _build(ParallelLMHead, 10, 256, quant_config=tensors.config, prefix="embed")
    head.weight.weight_loader(head.weight, tensors.sources["embed.weight"])
    h = torch.randn(8, 256)
    _close(_run(lambda h: head.quant_method.apply(head, h), h)[:, :10], h @ tensors.values["embed.weight"].T)
    assert len(calls) == 1
