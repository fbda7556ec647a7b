"""On a GPU: shardserve's CUDA path (Triton kernels, CUDA graphs, TP/PP) against `transformers`, same weights.

    python benchmarks/check_gpu_equivalence.py [-tp 2] [-pp 1]

A small random Llama (llama3 rope, GQA) saved by transformers; fp32 on both sides (TF32 off), greedy,
32 new tokens for prompts of several lengths in one batch (a decode batch of 5 runs the graph of size 8),
then the longest alone and the two shortest together (batch 1 and 2).
Prints MATCH/MISMATCH per prompt and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-tp", "--tp", type=int, default=1)
    ap.add_argument("-pp", "--pp", type=int, default=1)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()
    from model_shapes import write_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardserve import LLM, SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    path = Path(tempfile.mkdtemp()) / "tiny-llama"
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    )
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    ref.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, cfg.vocab_size)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 17, 40, 100, 300)]
    new = 32
    ref = ref.to("cuda").eval()
    expected = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = ref.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
            expected.append(out[0, len(p) :].tolist())
    del ref
    torch.cuda.empty_cache()
    llm = LLM(
        str(path),
        dtype="float32",
        device="cuda",
        tensor_parallel_size=args.tp,
        pipeline_parallel_size=args.pp,
        max_num_seqs=16,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=0.3,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    outs = llm.generate(prompts, params)
    # Alone too: decode at batch 1 and 2 takes the small-batch paths (GEMV, split-KV attention).
    outs += llm.generate([prompts[-1]], params) + llm.generate(prompts[:2], params)
    llm.shutdown()
    ok = True
    for p, want, got in zip(prompts + prompts[-1:] + prompts[:2], expected + expected[-1:] + expected[:2], outs):
        ids = got.outputs[0].token_ids
        same = list(ids) == want
        ok &= same
        first_diff = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), None)
        print(f"prompt {len(p):4d} tokens: {'MATCH' if same else f'MISMATCH at {first_diff}'}")
    print(f"TP={args.tp} PP={args.pp} eager={args.enforce_eager}: {'all match' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
