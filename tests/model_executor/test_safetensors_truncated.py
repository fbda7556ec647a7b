"""A truncated or corrupt safetensors file is a ValueError naming the file (the GGUF case is in test_gguf_loader)."""

from __future__ import annotations

import pytest
import torch

from shardserve.model_executor.loader.weights import iter_safetensors


@pytest.mark.parametrize("keep", [4, 40, 0.5, 0.99])
def test_truncated_safetensors_is_value_error(tmp_path, keep):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(64)}, str(path))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep) if isinstance(keep, float) else keep)
    with pytest.raises(ValueError, match="cannot read safetensors file .*model.safetensors"):
        for _, source in iter_safetensors(tmp_path):
            source.load()


def test_garbage_header_is_value_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"not json at all")
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        list(iter_safetensors(tmp_path))
