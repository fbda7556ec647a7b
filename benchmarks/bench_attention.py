"""Decode attention over the paged KV cache at a large batch, against the KV bytes it must read.

At the offline workload of ``bench_gpu.py`` (256 running requests of about 1,150 tokens) a decode step reads
about 38 GB of KV cache (Llama-3.1-8B: 32 layers x 4 KiB per token), more than twice the weights, so the
decode attention kernel's bandwidth sets much of the step. This times one layer's decode attention
(``paged_attention``, q_len 1 per request, block tables of shuffled blocks as a used cache has) for a sweep of
the kernel's tiling knobs, beside ``torch.nn.functional.scaled_dot_product_attention`` over the same K/V laid
out contiguously (a peer that reads the same bytes without paging), and prints each as a fraction of the
device-to-device copy bandwidth measured in the same run.

    python benchmarks/bench_attention.py --batch 256 --context 1152
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import _timed_cuda, copy_bandwidth

from shardserve.model_executor.kernels.attention import paged_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1152)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="fp8: an e4m3 cache")
    args = ap.parse_args()
    dev = torch.device("cuda")
    b, c, h, hkv, d, bs = args.batch, args.context, args.heads, args.kv_heads, args.head_dim, args.block_size
    blocks_per_seq = -(-c // bs)
    num_blocks = b * blocks_per_seq
    g = torch.Generator(device=dev).manual_seed(0)
    cache = torch.randn((2, num_blocks, bs, hkv, d), dtype=torch.bfloat16, device=dev, generator=g)
    table = torch.randperm(num_blocks, device=dev, generator=g).to(torch.int32).view(b, blocks_per_seq)
    seq_lens = torch.full((b,), c, dtype=torch.int32, device=dev)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
    q = torch.randn((b, h, d), dtype=torch.bfloat16, device=dev, generator=g)
    fp8 = args.kv_cache_dtype == "fp8"
    if fp8:  # the peer reads the bf16 values the e4m3 cache holds (scale 1): same math, twice the bytes
        cache = cache.to(torch.float8_e4m3fn)
    kv_bytes = 2 * b * c * hkv * d * cache.element_size()
    bw = copy_bandwidth()  # bytes read + written per second, as the batch-1 decode bound of bench_gpu.py uses
    print(
        f"batch {b}, context {c}, {h}/{hkv} heads x {d}, {cache.dtype}: {kv_bytes / 1e9:.2f} GB of K/V per layer; "
        f"copy {bw / 1e9:.0f} GB/s"
    )

    # The peer: the same K/V contiguous per request, SDPA (flash or efficient backend) with GQA.
    gathered = [cache[i][table.long()].to(torch.bfloat16).view(b, blocks_per_seq * bs, hkv, d) for i in (0, 1)]
    dense = [x[:, :c].transpose(1, 2).contiguous() for x in gathered]
    gathered.clear()
    qd = q.view(b, h, 1, d)
    t = _timed_cuda(lambda: F.scaled_dot_product_attention(qd, dense[0], dense[1], enable_gqa=True), args.reps)
    peer_bytes = 2 * b * c * hkv * d * 2
    print(f"{'torch SDPA (contiguous bf16 K/V)':<44} {t * 1e6:8.1f} us  {peer_bytes / t / bw:5.2f} of copy")
    ref = F.scaled_dot_product_attention(qd, dense[0], dense[1], enable_gqa=True).view(b, h, d)
    dense.clear()

    scale = d**-0.5
    rows = []
    f16 = (False, True) if fp8 else (False,)
    for block_n, warps, stages, f16_dot in itertools.product((32, 64, 128), (2, 4, 8), (None, 3), f16):

        def fn(block_n=block_n, warps=warps, stages=stages, f16_dot=f16_dot):
            return paged_attention(q, cache, table, seq_lens, qsl, 1, scale, num_kv_splits=1, num_warps=warps,
                                   block_n=block_n, num_stages=stages, f16_dot=f16_dot)  # fmt: skip

        try:
            out = fn()
            err = (out.float() - ref.float()).abs().max().item()
            t = _timed_cuda(fn, args.reps)
        except Exception as e:  # a tiling that does not compile (shared memory)
            print(f"block_n {block_n} warps {warps} stages {stages} f16 {f16_dot}: {type(e).__name__}")
            continue
        rows.append((t, block_n, warps, stages, f16_dot, err))
    default = paged_attention(q, cache, table, seq_lens, qsl, 1, scale)
    t_default = _timed_cuda(lambda: paged_attention(q, cache, table, seq_lens, qsl, 1, scale), args.reps)
    print(
        f"{'paged_attention, defaults':<44} {t_default * 1e6:8.1f} us  {kv_bytes / t_default / bw:5.2f} of copy"
        f"  max err {(default.float() - ref.float()).abs().max().item():.3g}"
    )
    for t, block_n, warps, stages, f16_dot, err in sorted(rows)[:12]:
        label = f"paged, block_n {block_n} warps {warps} stages {stages}" + (" fp16 dots" if f16_dot else "")
        print(
            f"{label:<44} {t * 1e6:8.1f} us  {kv_bytes / t / bw:5.2f} of copy  max err {err:.3g}"
            f"  {t_default / t:5.2f}x defaults"
        )


if __name__ == "__main__":
    main()
