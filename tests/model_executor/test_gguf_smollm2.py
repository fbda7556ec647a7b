"""The embedded SmolLM2-135M GGUF: our logits and greedy tokens vs transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model_test_utils import SingleSequence  # noqa: E402

from shardserve.distributed import parallel_state as ps  # noqa: E402
from shardserve.model_executor.loader import load_model  # noqa: E402
from shardserve.model_executor.loader.resolve import default_model_path, resolve_model  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 32

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def models():
    path = default_model_path()
    ps.init_single_process(torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: extra threads only add contention on a shared CI machine
    source = resolve_model(None)
    ours = load_model(source, torch.float32, torch.device("cpu"), (0, source.arch.num_hidden_layers))
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    yield source, ours, tok, _transformers_gguf_model(path)
    ps.destroy_model_parallel()
    torch.set_num_threads(threads)


def _transformers_gguf_model(path):
    """transformers' own GGUF reading (config, dequantization, Q/K un-permutation) into its Llama.

    ``from_pretrained(gguf_file=...)`` is the same code path but also requires ``accelerate``, which is
    not a dependency; ``load_gguf_checkpoint`` is what it calls.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    return hf.eval()


def test_metadata(models):
    source, ours, _, hf = models
    assert source.format == "gguf" and source.name == "SmolLM2-135M-Instruct"
    arch = source.arch
    cfg = hf.config
    assert (arch.hidden_size, arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads) == (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    )
    assert arch.vocab_size == cfg.vocab_size and arch.intermediate_size == cfg.intermediate_size
    assert arch.tie_word_embeddings == cfg.tie_word_embeddings
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_prefill_logits_match_transformers(models):
    _, ours, tok, hf = models
    ids = tok(PROMPTS[0] + " a city with a long history, and", return_tensors="pt").input_ids[0].tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    got = SingleSequence(ours, num_blocks=16, block_size=16).step(ids)
    assert got.shape == ref.shape
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() < 1e-3 * scale
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(models, prompt):
    _, ours, tok, hf = models
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    ref_new = ref[0, ids.shape[1] :].tolist()
    eos = hf.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    seq = SingleSequence(ours, num_blocks=8, block_size=16)
    logits = seq.step(ids[0].tolist())
    out = []
    for _ in range(NEW_TOKENS):
        logits[-1, eos] = float("-inf")  # what min_new_tokens does in transformers
        out.append(int(logits[-1].argmax()))
        logits = seq.step([out[-1]])
    assert len(ref_new) == NEW_TOKENS
    assert out == ref_new
