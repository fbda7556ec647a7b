"""Decode-batch matmuls: our Triton GEMV (``kernels/gemv.py``) beside cuBLAS (``F.linear``), same run.

    python benchmarks/bench_gemv.py [--model Llama-3.1-8B] [--tp 1] [--rows 1 2 4] [--sweep]

For each linear layer of one decoder layer (this TP rank's shard) and the LM head, at each row count,
prints both times (replayed from a CUDA graph that cycles through copies of the weight, so that it is
read from memory as in a decode step, not from L2), the bandwidth each reaches against the
device-to-device copy bandwidth measured in the same run, and the ratio. ``--sweep`` also times every
kernel configuration and prints the best, which is how ``gemv_config`` was chosen.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import copy_bandwidth, time_matmul_cold

from shardserve.model_executor.kernels.gemv import gemv, gemv_config
from shardserve.tools.known_models import find_known_model


def layer_shapes(model: str, tp: int) -> dict[str, tuple[int, int]]:
    """``name -> (N, K)`` of one TP rank's weights."""
    cfg = find_known_model(model).hf_config
    h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    kv, d = cfg.get("num_key_value_heads", heads), cfg.get("head_dim", h // heads)
    return {
        "qkv_proj": ((heads + 2 * kv) * d // tp, h),
        "o_proj": (h, heads * d // tp),
        "gate_up_proj": (2 * inter // tp, h),
        "down_proj": (h, inter // tp),
        "lm_head": (cfg["vocab_size"] // tp, h),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; {args.model} TP={args.tp}")
    total = {m: [0.0, 0.0] for m in args.rows}
    for name, (n, k) in layer_shapes(args.model, args.tp).items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        nbytes = w.numel() * 2
        for m in args.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            want = F.linear(x.float(), w.float())
            err = (gemv(x, w).float() - want).abs().max().item() / want.abs().max().item()
            t_cublas = time_matmul_cold(F.linear, x, w)
            t_ours = time_matmul_cold(gemv, x, w)
            if name != "lm_head":
                total[m][0] += t_cublas
                total[m][1] += t_ours
            print(
                f"{name:>12} ({n:6d}, {k:5d}) rows {m}: cuBLAS {t_cublas * 1e6:6.1f} us ({nbytes / t_cublas / bw:.2f} "
                f"of copy), ours {t_ours * 1e6:6.1f} us ({nbytes / t_ours / bw:.2f}) config {gemv_config(n, k)}; "
                f"ours/cuBLAS time {t_ours / t_cublas:.2f}; max rel err {err:.1e}"
            )
            if args.sweep:
                results = []
                for bn, bk, warps, stages in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (2, 3, 4)):
                    if bn * bk > 8192 or k % bk:
                        continue
                    cfg = (bn, bk, warps, stages)
                    try:
                        t = time_matmul_cold(lambda x, w, cfg=cfg: gemv(x, w, config=cfg), x, w)
                    except OutOfResources as e:
                        print(f"    {cfg}: {type(e).__name__}")
                        continue
                    results.append((t, cfg))
                results.sort()
                print("    best: " + ", ".join(f"{c} {nbytes / t / bw:.2f}" for t, c in results[:5]))
    for m, (c, o) in total.items():
        print(f"one layer's matmuls, rows {m}: cuBLAS {c * 1e6:.1f} us, ours {o * 1e6:.1f} us, ours/cuBLAS {o / c:.2f}")


if __name__ == "__main__":
    main()
