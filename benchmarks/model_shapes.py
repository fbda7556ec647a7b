"""Model directories of real architectures with random weights, for benchmarks on the device.

``write_model_dir("Llama-3.1-8B", path)`` writes the model's config.json (from shardserve's built-in table
of well-known models, so nothing is downloaded) and a synthetic word-level tokenizer with one token per
vocabulary id, so that any generated id detokenizes. Serve it with ``--load-format dummy``.
"""

from __future__ import annotations

import json
from pathlib import Path

from shardserve.tools.known_models import find_known_model


def write_model_dir(name: str, path: str | Path, hf_config: dict | None = None) -> Path:
    """Write ``config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` for model ``name``
    (or for the given ``hf_config``).

    Raises:
        ValueError: ``name`` is not in the built-in table.
    """
    if hf_config is None:
        known = find_known_model(name)
        if known is None:
            raise ValueError(f"{name!r} is not a built-in model shape")
        hf_config = known.hf_config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(hf_config)
    vocab_size = int(cfg["vocab_size"])
    cfg.setdefault("architectures", ["LlamaForCausalLM"])
    cfg.setdefault("model_type", "llama")
    cfg["bos_token_id"], cfg["eos_token_id"] = 0, 1
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(path, vocab_size)
    return path


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer with tokens ``<s> </s> <unk> t3 .. t{vocab_size-1}``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {f"t{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
