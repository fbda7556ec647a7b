"""Batch-1 decode tokens/s and 16-request throughput: shardserve beside transformers, same prompts, same run.

    python benchmarks/bench_cpu_latency_throughput.py [--model PATH] [--new-tokens 64] [--concurrency 16]

Both sides load the same GGUF (dequantized to fp32) and decode greedily with EOS ignored, so they do the
same amount of work. transformers' throughput figure uses one padded batch of all prompts with `generate`.
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain what a KV cache is in one paragraph.",
]


def bench_shardserve(model: str | None, new_tokens: int, concurrency: int) -> tuple[float, float]:
    from shardserve import LLM, SamplingParams

    llm = LLM(model, num_kv_blocks=1024, dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=4))  # warm-up
    start = time.perf_counter()
    llm.generate(PROMPTS[0], params)
    batch1 = new_tokens / (time.perf_counter() - start)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(concurrency)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    throughput = tokens / (time.perf_counter() - start)
    llm.shutdown()
    return batch1, throughput


def bench_transformers(gguf_path, new_tokens: int, concurrency: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, torch_dtype=torch.float32)
    model.eval()
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        ids = tok(PROMPTS[0], return_tensors="pt")
        model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
        start = time.perf_counter()
        model.generate(**ids, **kw)
        batch1 = new_tokens / (time.perf_counter() - start)
        tok.padding_side = "left"
        prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(concurrency)]
        batch = tok(prompts, return_tensors="pt", padding=True)
        start = time.perf_counter()
        out = model.generate(**batch, **kw)
        tokens = (out.shape[1] - batch["input_ids"].shape[1]) * concurrency
        throughput = tokens / (time.perf_counter() - start)
    return batch1, throughput


def main() -> None:
    from shardserve.model_executor.loader.resolve import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    gguf = default_model_path()
    print(f"model {gguf.name}, fp32 on CPU, {torch.get_num_threads()} threads, {args.new_tokens} new tokens")
    ours = bench_shardserve(None, args.new_tokens, args.concurrency)
    peer = bench_transformers(gguf, args.new_tokens, args.concurrency)
    print(f"{'':28s}{'shardserve':>12s}{'transformers':>14s}{'ratio':>8s}")
    print(f"{'batch-1 decode (tokens/s)':28s}{ours[0]:12.1f}{peer[0]:14.1f}{ours[0] / peer[0]:8.2f}")
    label = f"{args.concurrency} concurrent (tokens/s)"
    print(f"{label:28s}{ours[1]:12.1f}{peer[1]:14.1f}{ours[1] / peer[1]:8.2f}")


if __name__ == "__main__":
    main()
