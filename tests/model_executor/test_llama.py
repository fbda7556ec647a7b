"""Our Llama-family model vs Hugging Face transformers on tiny random-weight checkpoints."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model_test_utils import SingleSequence, prefill_then_decode, save_expected, tp_worker  # noqa: E402

from shardserve.distributed import parallel_state as ps  # noqa: E402
from shardserve.model_executor.loader import load_model  # noqa: E402
from shardserve.model_executor.loader.resolve import resolve_model  # noqa: E402
from shardserve.model_executor.models.llama import IntermediateTensors  # noqa: E402

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
PROMPT = [5, 17, 200, 3, 99, 42, 7, 150, 18, 255, 64, 1]
DECODED = [77, 131]
CONFIGS = {
    "llama3": lambda: transformers.LlamaConfig(
        **TINY,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": lambda: transformers.MistralConfig(**TINY, head_dim=16),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen3_tied": lambda: transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True),
    "llama_kv1": lambda: transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 1}),
    "llama_3heads": lambda: transformers.LlamaConfig(**{**TINY, "num_attention_heads": 2, "hidden_size": 48}),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # Larger-than-init weights (and non-unit norms, biases) so that mapping mistakes show in the logits.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


@pytest.fixture(scope="module", autouse=True)
def single_process_groups():
    ps.init_single_process(torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only add contention on a shared CI machine
    yield
    torch.set_num_threads(threads)
    ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Saved tiny checkpoints and their transformers models (fp32, eager attention)."""
    out = {}
    for i, (name, make) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        hf = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
        _randomize(hf, i)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path, safe_serialization=True)
        out[name] = (path, hf)
    return out


def _hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _load(path: Path, layer_range=None):
    source = resolve_model(str(path))
    n = source.arch.num_hidden_layers
    return load_model(source, torch.float32, torch.device("cpu"), layer_range or (0, n))


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2", "qwen3_tied", "llama_kv1"])
def test_prefill_and_decode_match_transformers(checkpoints, name):
    path, hf = checkpoints[name]
    model = _load(path)
    ids = PROMPT + DECODED
    ours = prefill_then_decode(model, ids, len(PROMPT))
    ref = _hf_logits(hf, ids)
    assert ours.shape == (len(ids), 256)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama3", "qwen3_tied"])
def test_bfloat16_close_to_float32(checkpoints, name):
    path, _ = checkpoints[name]
    source = resolve_model(str(path))
    ref = prefill_then_decode(_load(path), PROMPT + DECODED, len(PROMPT))
    model = load_model(source, torch.bfloat16, torch.device("cpu"), (0, 2))
    assert model.model.layers["0"].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    seq = SingleSequence(model, dtype=torch.bfloat16)
    got = torch.cat([seq.step(PROMPT)] + [seq.step([t]) for t in DECODED])
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_arch_flags_read_from_config(checkpoints):
    assert resolve_model(str(checkpoints["qwen2"][0])).arch.attention_bias
    qwen3 = resolve_model(str(checkpoints["qwen3_tied"][0])).arch
    assert qwen3.qk_norm and qwen3.tie_word_embeddings and qwen3.head_dim == 32
    llama = resolve_model(str(checkpoints["llama3"][0]))
    assert llama.arch.rope_scaling["rope_type"] == "llama3"
    assert llama.format == "hf" and llama.generation_config.get("eos_token_id") is not None


@pytest.mark.parametrize("name", ["llama3", "qwen3_tied"])
def test_two_pipeline_stages_match_one(checkpoints, name):
    path, hf = checkpoints[name]
    first, last = _load(path, (0, 1)), _load(path, (1, 2))
    assert first.lm_head is None and last.model.embed_tokens is None
    assert len(first.attention_layers) == len(last.attention_layers) == 1
    seq0, seq1 = SingleSequence(first), SingleSequence(last)
    n = len(PROMPT)
    meta = seq0.meta(n)
    inter = first(torch.tensor(PROMPT), torch.arange(n), meta)
    assert isinstance(inter, IntermediateTensors) and inter.hidden_states.shape == (n, 64)
    hidden = last(None, torch.arange(n), seq1.meta(n), inter)
    torch.testing.assert_close(last.compute_logits(hidden), _hf_logits(hf, PROMPT), atol=1e-4, rtol=1e-4)


def test_missing_parameter_is_named(checkpoints):
    from safetensors.torch import load_file

    path, _ = checkpoints["llama3"]
    model = _load(path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight\[k\]"):
        model.load_weights(weights.items())


def test_stage_skips_other_layers_without_reading(checkpoints):
    from safetensors.torch import load_file

    path, _ = checkpoints["llama3"]
    model = _load(path, (1, 2))

    class Exploding:
        shape = (1,)

        def load(self, *args, **kwargs):
            raise AssertionError("a weight of another stage was read")

    weights = {k: v for k, v in load_file(path / "model.safetensors").items()}
    for k in list(weights):
        if k.startswith(("model.layers.0.", "model.embed_tokens")):
            weights[k] = Exploding()
    model.load_weights(weights.items())


def test_shape_mismatch_is_value_error(checkpoints):
    path, _ = checkpoints["llama3"]
    source = resolve_model(str(path), hf_overrides={"intermediate_size": 96})
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj.*expected size 96"):
        load_model(source, torch.float32, torch.device("cpu"), (0, 2))


def test_dummy_weights_are_deterministic_and_read_no_weights(checkpoints, tmp_path):
    path, _ = checkpoints["llama3"]
    source = resolve_model(str(path))
    source.path = tmp_path / "nowhere"  # dummy must not touch weight files
    a = load_model(source, torch.float32, torch.device("cpu"), (0, 2), dummy=True, seed=3)
    b = load_model(source, torch.float32, torch.device("cpu"), (0, 2), dummy=True, seed=3)
    c = load_model(source, torch.float32, torch.device("cpu"), (0, 2), dummy=True, seed=4)
    w = a.model.layers["0"].mlp.gate_up_proj.weight
    assert torch.equal(w, b.model.layers["0"].mlp.gate_up_proj.weight)
    assert not torch.equal(w, c.model.layers["0"].mlp.gate_up_proj.weight)
    assert abs(w.std().item() - 0.02) < 0.003
    assert torch.all(a.model.norm.weight == 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_tensor_parallel_2_matches_single_process(checkpoints, tmp_path):
    ids = PROMPT + DECODED
    cases = []
    for name in ("llama3", "qwen2", "qwen3_tied", "llama_kv1"):
        path, _ = checkpoints[name]
        logits = prefill_then_decode(_load(path), ids, len(PROMPT))
        cases.append((str(path), save_expected(tmp_path / f"{name}.pt", ids, len(PROMPT), logits)))
    # 2 heads of 24 wide: divisible by TP=2. Rebuild with 3 heads for the error case.
    bad = resolve_model(str(checkpoints["llama_3heads"][0]))
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    cfg = (
        (checkpoints["llama_3heads"][0] / "config.json")
        .read_text()
        .replace('"num_attention_heads": 2', '"num_attention_heads": 3')
    )
    (bad_dir / "config.json").write_text(cfg)
    assert bad.arch.num_attention_heads == 2
    torch.multiprocessing.spawn(tp_worker, args=(2, _free_port(), cases, str(bad_dir)), nprocs=2, join=True)
