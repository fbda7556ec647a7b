"""Launches of the int8 GGUF decode GEMV for Nsight Compute (``ncu``): one of each kernel on Llama-3.1-8B
shapes, x rounded to int8 beforehand, so that the profiler's stall reasons, occupancy and memory
throughput can be read per kernel.

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        -k regex:"_q4_k_kernel|_q6_k_kernel" python benchmarks/ncu_dp4a.py

Each case runs twice (the first compiles); both launches are profiled. Prints the cases in launch order.
"""

from __future__ import annotations

import numpy as np
import torch

from shardserve.model_executor.kernels import gguf_dp4a as k
from shardserve.model_executor.layers.quantization.gguf_blocks import block_type, pack_rows, random_blocks

CASES = [("Q4_K", "qkv", 6144, 4096, False), ("Q4_K", "gate_up", 28672, 4096, True),
         ("Q4_K", "down", 4096, 14336, False), ("Q6_K", "down", 4096, 14336, False),
         ("Q6_K", "lm_head", 128256, 4096, False)]  # fmt: skip


def main() -> None:
    rng = np.random.default_rng(0)
    for tname, name, n, kdim, silu in CASES:
        bt = block_type(tname)
        w = torch.from_numpy(random_blocks(rng, n, kdim, bt.type_id, (2e-4, 2e-3))).cuda()
        x = torch.randn(1, kdim, dtype=torch.bfloat16, device="cuda")
        for packed in (False, True):
            wl = pack_rows(w, bt.type_id) if packed else w
            xq = k.quantize_activations(x, k.x_unit(bt.type_id, kdim // bt.block_size, packed))
            for _ in range(2):
                k.gguf_gemv_dp4a(x, wl, bt.type_id, silu, packed=packed, quantized=xq)
            torch.cuda.synchronize()
            print(f"{tname} {name} {n}x{kdim} {'packed' if packed else 'file order'}: 2 launches", flush=True)
        del w


if __name__ == "__main__":
    main()
