"""The int8 GGUF decode GEMV (``kernels/gguf_dp4a.py``) at every tiling, on the Llama-3.1-8B shapes.

    python benchmarks/sweep_dp4a.py [--types Q4_K,Q6_K,Q8_0] [--rows 1] [--tilings 16x8x4,8x16x4] [--both-layouts]

A program of the GEMV takes ``BLOCK_N`` weight rows and ``NBT`` blocks (block pairs for Q6_K and Q8_0)
of each at a time, one per thread (``BLOCK_N * NBT = 32 * num_warps``), so a launch has ``N * NBT``
threads whatever ``BLOCK_N``: few rows (``o_proj``, ``down_proj``: 4096) and a small ``NBT`` leave most of
the GPU idle. This times each tiling, the activation quantization included, with cold weights (a graph
cycles through copies larger than L2), and prints the weight bandwidth against the copy bandwidth measured
in the same run, beside the tiling that ``gguf_dp4a.tiling`` picks (marked ``*``). ``--both-layouts`` times each tiling
with the weight rows and with the blocks as the fastest axis across a warp's threads (``r`` / ``b``).
``--rows-layout file|packed|both`` times the weights in file order and/or in the packed row layout that
the layers take with ``GGUFConfig.pack_rows`` (``gguf_blocks.row_layout``; cells marked ``p``, x then
packed too, and at the rule's tiling once more with x in plain rows; with ``both``, file order only at the
rule's tiling, as the baseline), and checks on each shape that the packed result equals file order's at
the same tiling.
At the rule's tiling each layout is timed once more as the GEMV alone, x rounded to int8 beforehand (what
the layers do where the RMSNorm writes the int8 x).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import copy_bandwidth, time_matmul_cold

# (name, N, K, SwiGLU) per type, as llama.cpp's Q4_K_M and Q8_0 recipes place them in Llama-3.1-8B (and, "_70b",
# in Llama-3.1-70B)
SHAPES = {
    "Q4_K": [("qk", 5120, 4096, False), ("qkv", 6144, 4096, False), ("o", 4096, 4096, False),
             ("gate_up", 28672, 4096, True), ("down", 4096, 14336, False), ("qkv_70b", 10240, 8192, False),
             ("o_70b", 8192, 8192, False), ("gate_up_70b", 57344, 8192, True), ("down_70b", 8192, 28672, False)],
    "Q6_K": [("v", 1024, 4096, False), ("down", 4096, 14336, False), ("lm_head", 128256, 4096, False)],
    "Q8_0": [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 28672, 4096, True),
             ("down", 4096, 14336, False), ("lm_head", 128256, 4096, False)],
}  # fmt: skip
TILINGS = [(32, 4, 4), (32, 8, 8), (32, 16, 16), (64, 4, 8), (16, 8, 4), (8, 8, 2), (32, 2, 2), (128, 1, 4),
           (8, 16, 4), (64, 2, 4)]  # fmt: skip
"""(BLOCK_N, NBT, num_warps)"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--tilings", default=None, help="BLOCK_NxNBTxWARPS,... (default: all of TILINGS)")
    ap.add_argument("--both-layouts", action="store_true")
    ap.add_argument("--shapes", default=None, help="names of SHAPES to time (default: all)")
    ap.add_argument("--rows-layout", choices=("file", "packed", "both"), default="both")
    ap.add_argument(
        "--split",
        default=None,
        help="S,S,...: time instead the kernels that split a block (Q4_K) or unit (Q6_K) across S threads, "
        "at each --split-tilings NBTxWARPS, beside the thread-per-unit kernel at its rule's tiling",
    )
    ap.add_argument("--split-tilings", default="1x4,2x4,4x4,8x4")
    ap.add_argument(
        "--split-cells",
        default=None,
        help="SxNBTxWARPS[eE][rREGS],... instead of --split x --split-tilings ('eE': E times the rows a program, "
        "so that each thread holds E slices and has E loads in flight; 'rREGS': compiled for at most REGS "
        "registers a thread, gguf_gemv_dp4a's max_registers); 'rule': split_tiling's pick only",
    )
    args = ap.parse_args()
    if args.split or args.split_cells:
        return sweep_split(args)
    tilings = TILINGS if not args.tilings else [tuple(int(v) for v in t.split("x")) for t in args.tilings.split(",")]
    from shardserve.model_executor.kernels import gguf_dp4a as k
    from shardserve.model_executor.layers.quantization.gguf_blocks import pack_rows

    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; GB/s of weight (fraction of copy), {args.rows} row(s)")
    for tname, bt, q, name, n, kdim, silu, w, x, units in _cases(args, args.types.split(",")):
        wp = pack_rows(w, q)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        picked = k.tiling(n, units, sms)
        chunk = k.kernel_layout(q, kdim // bt.block_size, True)[1]
        picked_packed = k.tiling(n, units, sms, chunk)
        cells = [f"rule {picked[0]}x{picked[1]}/{picked[2]}w, packed {picked_packed[0]}x{picked_packed[1]}"]
        if wp is not w:  # the packed rows give file order's result at the same tiling (blocks fastest)
            c = (*picked_packed, False)
            same = k.gguf_gemv_dp4a(x, w, q, silu, config=c)
            diff = (k.gguf_gemv_dp4a(x, wp, q, silu, config=c, packed=True).float() - same.float()).abs().max()
            cells.append(f"packed==file: {bool(diff == 0)}")
        layouts = (False, True) if args.both_layouts else (None,)
        rows_layouts = {"file": (False,), "packed": (True,), "both": (False, True)}[args.rows_layout]
        for bn, nbt, warps in tilings:
            if nbt > triton.next_power_of_2(units) or (silu and bn < 2):
                continue
            for packed in rows_layouts:
                if args.rows_layout == "both" and not packed and (bn, nbt, warps) != picked:
                    continue  # file order as the baseline: at the rule's tiling only
                for rows_fast in layouts if not packed else (None,):
                    c = (bn, nbt, warps) if rows_fast is None else (bn, nbt, warps, rows_fast)

                    def op(x_, w_, q=q, f=silu, c=c, p=packed):
                        return k.gguf_gemv_dp4a(x_, w_, q, f, config=c, packed=p)

                    t = time_matmul_cold(op, x, wp if packed else w)
                    frac = w.numel() / t / copy_bw
                    default = rows_fast in (None, k._ROWS_FAST[q] and not packed)
                    mark = "*" if (bn, nbt, warps) == (picked_packed if packed else picked) and default else ""
                    lay = "p" if packed else "" if rows_fast is None else ("r" if rows_fast else "b")
                    cells.append(f"{bn}x{nbt}/{warps}w{lay} {w.numel() / t / 1e9:5.0f} ({frac:.2f}){mark}")
                    if mark:  # the GEMV alone, x rounded to int8 beforehand (as where the RMSNorm writes it)
                        xq = k.quantize_activations(x, k.x_unit(q, kdim // bt.block_size, packed))

                        def op_q(x_, w_, q=q, f=silu, c=c, p=packed, xq=xq):
                            return k.gguf_gemv_dp4a(x_, w_, q, f, config=c, packed=p, quantized=xq)

                        t = time_matmul_cold(op_q, x, wp if packed else w)
                        cells.append(f"{lay} GEMV alone {w.numel() / t / 1e9:5.0f} ({w.numel() / t / copy_bw:.2f})")
                    if packed and mark:  # the same with x in plain rows (what packing x adds)

                        def op_x(x_, w_, q=q, f=silu, c=c):
                            return k.gguf_gemv_dp4a(x_, w_, q, f, config=c, packed=True, x_packed=False)

                        t = time_matmul_cold(op_x, x, wp)
                        cells.append(f"{bn}x{nbt}/{warps}w p, x plain {w.numel() / t / 1e9:5.0f} "
                                     f"({w.numel() / t / copy_bw:.2f})")  # fmt: skip
        print(f"{tname} {name:>8} {n}x{kdim} ({w.numel() / 1e6:.1f} MB): " + ", ".join(cells), flush=True)
        del wp


def _cases(args, types: list[str]):
    """Per shape of ``SHAPES`` that ``args`` selects: ``(type name, block type, ggml type, shape name, N, K,
    SwiGLU, random weight blocks on CUDA, x (args.rows, K) bf16, thread units per row)``."""
    from shardserve.model_executor.kernels import gguf_dp4a as k
    from shardserve.model_executor.layers.quantization.gguf_blocks import block_type, random_blocks

    rng = np.random.default_rng(0)
    for tname in types:
        bt = block_type(tname)
        q = bt.type_id
        for name, n, kdim, silu in SHAPES[tname]:
            if args.shapes and name not in args.shapes.split(","):
                continue
            w = torch.from_numpy(random_blocks(rng, n, kdim, q, (2e-4, 2e-3))).cuda()
            x = torch.randn(args.rows, kdim, dtype=torch.bfloat16, device="cuda")
            units = kdim // bt.block_size // k._unit(q, kdim // bt.block_size)
            yield tname, bt, q, name, n, kdim, silu, w, x, units
            del w


def _split_cell(spec: str) -> tuple[int, int, int, int, int | None]:
    """``SxNBTxWARPS[eE][rREGS]`` -> ``(S, NBT, warps, elements a thread E (default 1), register cap or None)``."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:e(\d+))?(?:r(\d+))?", spec)
    if m is None:
        raise SystemExit(f"--split-cells: {spec!r} is not SxNBTxWARPS[eE][rREGS]")
    sp, nbt, warps, per_thread, regs = m.groups()
    return int(sp), int(nbt), int(warps), int(per_thread or 1), int(regs) if regs else None


def sweep_split(args) -> None:
    """The split kernels (``gguf_gemv_dp4a(..., split=S)``) at each S and NBT x num_warps tiling (BLOCK_N =
    32 num_warps / (NBT S)), x rounded to int8 beforehand (the GEMV alone), beside the thread-per-unit
    kernel at its rule's tiling; each split result is checked against that kernel's (relative max error)."""
    from shardserve.model_executor.kernels import gguf_dp4a as k

    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; GB/s of weight (fraction of copy), {args.rows} row(s), "
          "x rounded beforehand; cells SxNBT/warps", flush=True)  # fmt: skip
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for tname, _, q, name, n, kdim, silu, w, x, units in _cases(args, args.types.split(",")):
        xq = k.quantize_activations(x)
        picked = k.tiling(n, units, sms)
        ref = k.gguf_gemv_dp4a(x, w, q, silu, config=picked, quantized=xq).float()

        def op0(x_, w_, q=q, f=silu, c=picked, xq=xq):
            return k.gguf_gemv_dp4a(x_, w_, q, f, config=c, quantized=xq)

        def cell(label, t, nbytes=w.numel()):
            return f"{label} {nbytes / t / 1e9:5.0f} ({nbytes / t / copy_bw:.2f})"

        cells = [cell(f"unit {picked[0]}x{picked[1]}/{picked[2]}w", time_matmul_cold(op0, x, w))]
        rule_s, rule = k.split_tiling(q, n, units, sms)
        _, rule_nbt, rule_w = rule

        def op_rule(x_, w_, q=q, f=silu, xq=xq, s=rule_s, c=rule):
            return k.gguf_gemv_dp4a(x_, w_, q, f, quantized=xq, split=s, config=c)

        cells.append(cell(f"rule {rule_s}x{rule_nbt}/{rule_w}w", time_matmul_cold(op_rule, x, w)))
        if args.split_cells == "rule":
            grid = []
        elif args.split_cells:
            grid = [_split_cell(c) for c in args.split_cells.split(",")]
        else:
            grid = [(sp, *(int(v) for v in c.split("x")), 1, None) for sp in (int(v) for v in args.split.split(","))
                    for c in args.split_tilings.split(",")]  # fmt: skip
        for sp, nbt, warps, per_thread, regs in grid:
            bn = per_thread * 32 * warps // (nbt * sp)
            if bn < (2 if silu else 1) or nbt > triton.next_power_of_2(units):
                continue
            c = (bn, nbt, warps)
            got = k.gguf_gemv_dp4a(x, w, q, silu, config=c, quantized=xq, split=sp, max_registers=regs).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()

            def op(x_, w_, q=q, f=silu, c=c, sp=sp, xq=xq, r=regs):
                return k.gguf_gemv_dp4a(x_, w_, q, f, config=c, quantized=xq, split=sp, max_registers=r)

            label = f"{sp}x{nbt}/{warps}w" + (f" e{per_thread}" if per_thread > 1 else "")
            label += f" r{regs}" if regs else ""
            cells.append(cell(label, time_matmul_cold(op, x, w))
                         + (f" err {err:.1e}" if err > 1e-2 else ""))  # fmt: skip
        print(f"{tname} {name:>8} {n}x{kdim} ({w.numel() / 1e6:.1f} MB): " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
