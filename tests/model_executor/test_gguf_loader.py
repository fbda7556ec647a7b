"""GGUF reading: dequantization per tensor type, Q/K un-permutation, name mapping, malformed files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from shardserve.model_executor.loader.resolve import open_gguf, resolve_model  # noqa: E402
from shardserve.model_executor.loader.weights import GGUFSource, gguf_to_hf_name, unpermute_qk  # noqa: E402

T = gguf.GGMLQuantizationType
QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]
# The gguf package dequantizes these but cannot quantize them: we write random blocks with sane scales.
K_QUANTS = {"Q4_K": [(0, 2), (2, 4)], "Q6_K": [(208, 210)]}  # byte ranges of the fp16 scales in a block


def _write(path, tensors: dict[str, tuple[np.ndarray, object]], arch: str = "llama", meta: dict | None = None):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        if isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _k_quant_blocks(rng, rows: int, qtype: str) -> np.ndarray:
    block, nbytes = gguf.GGML_QUANT_SIZES[T[qtype]]
    raw = rng.integers(0, 256, size=(rows, 2, nbytes), dtype=np.uint8)
    for lo, hi in K_QUANTS[qtype]:
        scale = rng.uniform(0.001, 0.05, size=(rows, 2)).astype(np.float16)
        raw[:, :, lo:hi] = scale.view(np.uint8).reshape(rows, 2, 2)
    return raw.reshape(rows, 2 * nbytes)


@pytest.fixture(scope="module")
def quant_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    tensors, expected = {}, {}
    for name in QUANTIZABLE:
        q = gguf.quants.quantize(x, T[name])
        tensors[name] = (q, T[name])
        expected[name] = gguf.quants.dequantize(q, T[name])
    for name in K_QUANTS:
        raw = _k_quant_blocks(rng, 6, name)
        tensors[name] = (raw, T[name])
        expected[name] = gguf.quants.dequantize(raw, T[name])
    path = tmp_path_factory.mktemp("gguf") / "quants.gguf"
    _write(path, tensors)
    return path, x, expected


@pytest.mark.parametrize("qtype", QUANTIZABLE + list(K_QUANTS))
def test_dequantize_and_slice(quant_file, qtype):
    path, x, expected = quant_file
    tensor = next(t for t in open_gguf(path).tensors if t.name == qtype)
    assert tensor.tensor_type == T[qtype]
    source = GGUFSource(tensor)
    assert source.shape == (6, 512)
    full = source.load()
    assert full.dtype == torch.float32
    np.testing.assert_array_equal(full.numpy(), expected[qtype])
    assert torch.isfinite(full).all()
    if qtype in QUANTIZABLE:  # the values are the original ones up to the quantization error
        tol = {"F32": 0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 3e-2}.get(qtype, 0.5)
        assert np.abs(full.numpy() - x).max() <= tol
    torch.testing.assert_close(source.load(0, 2, 3), full[2:5], rtol=0, atol=0)
    torch.testing.assert_close(source.load(1, 256, 128), full[:, 256:384], rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        source.load(0, 4, 3)


def _llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py LlamaModel.permute, written out independently of the loader.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape", [(32, 8), (32,)])
def test_unpermute_inverts_llamacpp_permute(shape):
    w = torch.randn(shape)
    permuted = _llamacpp_permute(w, 4)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, 4), w)


def test_name_mapping():
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gguf_to_hf_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    assert gguf_to_hf_name("blk.3.ffn_up.weight") == "model.layers.3.mlp.up_proj.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None


@pytest.mark.parametrize("cut", [10, 2000, -100])
def test_truncated_gguf_is_value_error(quant_file, tmp_path, cut):
    path, _, _ = quant_file
    data = path.read_bytes()
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"truncated|not a readable GGUF"):
        open_gguf(bad)


def test_truncated_embedded_model(tmp_path):
    from shardserve.model_executor.loader.resolve import default_model_path

    src = default_model_path()
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(src, "rb") as f, open(bad, "wb") as g:
        shutil.copyfileobj(f, g, length=1 << 20)
        g.truncate(src.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"truncated"):
        resolve_model(str(bad))


def test_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        resolve_model(str(bad))


# -- a whole tiny model through GGUF, against transformers ------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_gguf_model_matches_transformers(tmp_path, arch):
    """Write a random transformers model as llama.cpp would (names, Q/K permutation for llama) and compare."""
    transformers = pytest.importorskip("transformers")
    from model_test_utils import prefill_then_decode

    from shardserve.distributed import parallel_state as ps
    from shardserve.model_executor.loader import load_model

    kw = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
    )
    cfg = transformers.LlamaConfig(**kw) if arch == "llama" else transformers.Qwen3Config(**kw, head_dim=16)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape) if "norm" in name else 0.15 * torch.randn(p.shape))
    names = {
        "embed_tokens": "token_embd",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "q_norm": "attn_q_norm",
        "k_norm": "attn_k_norm",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }
    tensors = {}
    for name, p in hf.state_dict().items():
        w = p.detach().clone()
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            w = _llamacpp_permute(w, 4 if "q_proj" in name else 2)
        if name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            parts = name.split(".")
            gname = (
                ".".join(["blk", parts[2], names[parts[-2]], parts[-1]])
                if parts[1] == "layers"
                else f"{names[parts[1]]}.weight"
            )
        tensors[gname] = (w.numpy(), T.F32 if w.dim() == 1 or arch == "qwen3" else T.F16)
    meta = {
        f"{arch}.{k}": v
        for k, v in {
            "embedding_length": 64,
            "feed_forward_length": 96,
            "block_count": 2,
            "attention.head_count": 4,
            "attention.head_count_kv": 2,
            "attention.layer_norm_rms_epsilon": 1e-5,
            "rope.freq_base": 5000.0,
            "context_length": 64,
            "vocab_size": 128,
            "attention.key_length": 16,
        }.items()
    }
    path = tmp_path / f"tiny-{arch}.F16.gguf"
    _write(path, {k: (v.astype(np.float16) if q == T.F16 else v, q) for k, (v, q) in tensors.items()}, arch, meta)
    if arch == "llama":  # compare against the fp16-rounded weights that went into the file
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 2:
                    p.copy_(p.half().float())

    source = resolve_model(str(path))
    assert source.arch.architecture == arch and source.name == f"tiny-{arch}"
    assert source.arch.tie_word_embeddings is False and source.arch.qk_norm == (arch == "qwen3")
    ps.init_single_process(torch.device("cpu"))
    try:
        model = load_model(source, torch.float32, torch.device("cpu"), (0, 2))
        ids = [3, 99, 14, 15, 92, 65, 35, 89, 79, 32]
        ours = prefill_then_decode(model, ids, 8)
    finally:
        ps.destroy_model_parallel()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_header_reader_agrees_with_gguf_reader(quant_file):
    from shardserve.model_executor.loader.resolve import default_model_path, gguf_field, read_gguf_header

    for path in (quant_file[0], default_model_path()):
        reader, header = open_gguf(path), read_gguf_header(path)
        assert header.data_offset == reader.data_offset
        assert len(header.tensors) == len(reader.tensors)
        for t in reader.tensors:
            info = header.tensors[t.name]
            assert info.shape == tuple(t.shape.tolist()) and info.type_name == t.tensor_type.name
            assert (info.offset, info.n_bytes, info.n_elements) == (t.data_offset, t.n_bytes, t.n_elements)
        for key in reader.fields:
            if key.startswith("GGUF."):
                continue
            value = gguf_field(reader, key)
            if key in header.fields:
                assert header.fields[key] == (pytest.approx(value) if isinstance(value, float) else value), key
            else:  # string arrays: only their length is read
                assert header.array_lengths[key] == len(value), key
