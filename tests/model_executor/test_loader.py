"""Model resolution, pipeline layer ranges and safetensors sources."""

from __future__ import annotations

import json

import pytest
import torch

from shardserve.model_executor.loader import iter_weights, pp_layer_range
from shardserve.model_executor.loader.resolve import (
    default_model_path,
    gguf_model_name,
    normalize_hf_config,
    resolve_model,
)
from shardserve.model_executor.loader.weights import iter_safetensors


@pytest.mark.parametrize(
    "num_layers, pp, expected",
    [
        (30, 1, [(0, 30)]),
        (8, 2, [(0, 4), (4, 8)]),
        (10, 3, [(0, 3), (3, 6), (6, 10)]),
        (11, 4, [(0, 2), (2, 5), (5, 8), (8, 11)]),
        (3, 3, [(0, 1), (1, 2), (2, 3)]),
    ],
)
def test_pp_layer_range_even_split_remainder_last(num_layers, pp, expected):
    ranges = [pp_layer_range(num_layers, pp, r) for r in range(pp)]
    assert ranges == expected
    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_pp_layer_range_partition():
    assert [pp_layer_range(12, 3, r, [2, 6, 4]) for r in range(3)] == [(0, 2), (2, 8), (8, 12)]
    assert pp_layer_range(4, 2, 0, [0, 4]) == (0, 0)


@pytest.mark.parametrize("partition", [[2, 2, 2], [5, 5], [-1, 13, 0]])
def test_pp_layer_range_bad_partition(partition):
    with pytest.raises(ValueError, match="sum"):
        pp_layer_range(12, 3 if len(partition) == 3 else 2, 0, partition)


def test_pp_layer_range_bad_rank_or_size():
    with pytest.raises(ValueError, match="out of range"):
        pp_layer_range(8, 2, 2)
    with pytest.raises(ValueError, match="exceed"):
        pp_layer_range(2, 3, 0)


def test_default_model_is_the_embedded_gguf():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    source = resolve_model(None)
    assert source.format == "gguf" and source.path == path
    assert source.generation_config["eos_token_id"] == source.arch.eos_token_id


def test_gguf_model_name():
    from pathlib import Path

    assert gguf_model_name(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert gguf_model_name(Path("Llama-3.2-1B-Instruct-Q4_K_M.gguf")) == "Llama-3.2-1B-Instruct"
    assert gguf_model_name(Path("tiny.gguf")) == "tiny"


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub.constants import HF_HUB_CACHE

    with pytest.raises(ValueError) as err:
        resolve_model("no-such-org/no-such-model-xyz")
    assert "no-such-org/no-such-model-xyz" in str(err.value) and str(HF_HUB_CACHE) in str(err.value)


def test_bad_paths(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        resolve_model(str(tmp_path / "missing" / "deeper"))


@pytest.mark.parametrize("missing", ["./nope.gguf", "nope.gguf", "../models/x", "~/m/x", "models/x.gguf", "a/b/c"])
def test_missing_local_paths_are_not_looked_up_on_the_hub(missing, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub lookup"))
    with pytest.raises(ValueError, match="not found") as err:
        resolve_model(missing)
    assert missing in str(err.value) and "cache" not in str(err.value)


def test_hub_hint_names_a_command_of_the_installed_huggingface_hub():
    from importlib.metadata import distribution

    from shardserve.model_executor.loader.resolve import download_command

    command = download_command("org/name")
    scripts = {ep.name for ep in distribution("huggingface_hub").entry_points if ep.group == "console_scripts"}
    assert command.endswith(" download org/name") and command.split()[0] in scripts, scripts


def _tiny_config(**extra) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        **extra,
    }


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config(model_type="gpt2")))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        resolve_model(str(tmp_path))


def test_config_fields_overrides_and_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            _tiny_config(
                rope_parameters={
                    "rope_theta": 500000.0,
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
            )
        )
    )
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 2], "transformers_version": "x"})
    )
    source = resolve_model(str(tmp_path), hf_overrides={"num_hidden_layers": 3})
    assert source.format == "hf" and source.name == tmp_path.name
    assert source.arch.rope_theta == 500000.0 and source.arch.rope_scaling["rope_type"] == "llama3"
    assert "rope_theta" not in source.arch.rope_scaling
    assert source.arch.num_hidden_layers == 3 and source.arch.head_dim == 8
    assert source.generation_config == {"temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 2]}


def test_normalize_keeps_explicit_fields():
    cfg = normalize_hf_config({"rope_theta": 1.0, "rope_parameters": {"rope_theta": 2.0, "rope_type": "default"}})
    assert cfg["rope_theta"] == 1.0 and "rope_scaling" not in cfg


def test_missing_field_is_value_error(tmp_path):
    cfg = _tiny_config()
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="intermediate_size"):
        resolve_model(str(tmp_path))


def test_pickled_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    source = resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="pickled checkpoints are not loaded"):
        list(iter_weights(source))


def test_sharded_safetensors_slices(tmp_path):
    from safetensors.torch import save_file

    a, b = torch.randn(6, 4), torch.randn(3, 10)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    sources = dict(iter_safetensors(tmp_path))
    assert sources["a"].shape == (6, 4) and sources["b"].shape == (3, 10)
    assert torch.equal(sources["a"].load(), a)
    assert torch.equal(sources["a"].load(0, 2, 3), a[2:5])
    assert torch.equal(sources["b"].load(1, 5), b[:, 5:])
    with pytest.raises(ValueError, match="out of range"):
        sources["b"].load(1, 8, 5)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        list(iter_safetensors(tmp_path))


def test_pp_partition_by_memory_is_proportional_and_sums():
    from shardserve.model_executor.loader import pp_partition_by_memory

    assert pp_partition_by_memory(32, [24e9, 24e9]) == [16, 16]
    assert pp_partition_by_memory(32, [48e9, 16e9]) == [24, 8]  # three times the memory, three times the layers
    sizes = pp_partition_by_memory(80, [80e9, 24e9, 24e9])
    assert sum(sizes) == 80 and sizes[0] > max(sizes[1:]) and abs(sizes[1] - sizes[2]) <= 1 and min(sizes) >= 1
    assert pp_partition_by_memory(3, [1e12, 1.0, 1.0]) == [1, 1, 1]  # every stage keeps a layer


def test_loading_progress_goes_to_the_log_without_a_terminal(caplog, monkeypatch):
    import io
    import types

    from shardserve.model_executor import loader

    monkeypatch.setattr(loader, "PROGRESS_LOG_INTERVAL_S", 0.0)
    monkeypatch.setattr(loader, "sys", types.SimpleNamespace(stderr=io.StringIO()))  # not a terminal
    items = [(f"w{i}", None) for i in range(4)]
    with caplog.at_level("INFO", logger=loader.logger.name):
        assert list(loader._with_progress(items, "m")) == items
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "loading m: 4 tensors" and lines[3].startswith("loading m: 3/4 tensors (75%)"), lines
    assert len(lines) == 4  # nothing after the last tensor: load_model logs "loaded ..." itself
