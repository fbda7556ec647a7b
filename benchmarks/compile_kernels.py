"""Compile (not run) every GGUF Triton kernel and those of a decode step under PDL for a CUDA target, on a
machine without a GPU.

    python benchmarks/compile_kernels.py [--arch 90]
    PYTHONPATH=/tmp/triton36 python benchmarks/compile_kernels.py   # another Triton, e.g. the device's 3.6

The Triton interpreter (CPU tests) accepts code that the compiler refuses, and Triton versions differ in
what they accept (3.6 turns a plain local assigned from compile-time values into a tensor; 3.9 keeps it a
constant), so a kernel change is best compiled here, with the device's Triton (``pip download
triton==VERSION`` and ``pip install --target``), before spending device time. Prints one line per kernel
family and the Triton version; exits non-zero on the first compile error.
"""

from __future__ import annotations

import argparse
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from shardserve.model_executor.kernels import attention as at
from shardserve.model_executor.kernels import elementwise as ew
from shardserve.model_executor.kernels import gguf_dequant as dq
from shardserve.model_executor.kernels import gguf_dp4a as d4
from shardserve.model_executor.kernels import gguf_gemv as gv
from shardserve.model_executor.kernels import gguf_mma as mm


def _unwrap(fn):
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _compile(fn, types: dict, const: dict, arch: int, warps: int = 4):
    fn = _unwrap(fn)
    names = fn.arg_names
    sig = {n: ("constexpr" if n in const else types.get(n, "i32")) for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    if const.get("PDL"):  # kernels/pdl.py: the wait and the launch of the next kernel, and any L2 prefetch
        ptx = kernel.asm["ptx"]
        wanted = ["griddepcontrol.wait", "griddepcontrol.launch_dependents"]
        wanted += ["prefetch.global.L2"] if const.get("PF") else []
        missing = [w for w in wanted if w not in ptx]
        if missing:
            raise RuntimeError(f"{fn.__name__} with PDL: no {', '.join(missing)} in its PTX")
    return kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    arch = ap.parse_args().arch
    print(f"Triton {triton.__version__}, sm_{arch}")
    # (ggml type, type size, PER, V): packed layouts and file order (V = 0)
    for q, ts, per, v in [(12, 144, 1, 16), (14, 210, 4, 8), (14, 210, 2, 4), (8, 34, 2, 4), (12, 144, 1, 0),
                          (14, 210, 4, 0), (8, 34, 2, 0)]:  # fmt: skip
        bs = 32 if q == 8 else 256
        sub = 32 if q in (8, 12) else 16
        lay = dict(QTYPE=q, BS=bs, TS=ts, SUB=sub, PER=per, V=v)
        _compile(dq._dequant_kernel, {"W": "*u8", "Y": "*bf16"}, dict(**lay, BLOCK_N=16, TILE_K=512), arch)
        _compile(dq._embedding_kernel, {"IDS": "*i64", "W": "*u8", "Y": "*bf16"}, dict(**lay, BLOCK_T=4, TILE_K=512),
                 arch)  # fmt: skip
        _compile(gv._gguf_gemv_kernel, {"X": "*fp32", "W": "*u8", "Y": "*fp32"},
                 dict(**lay, BLOCK_M=2, SILU_MUL=True, BLOCK_N=16, TILE_K=256, EVEN=False), arch)  # fmt: skip
        _compile(gv._gguf_matmul_kernel, {"X": "*bf16", "W": "*u8", "Y": "*bf16"},
                 dict(**lay, SILU_MUL=True, PRECISION="tf32", DOT_FP32=False, BLOCK_M=16, BLOCK_N=64, TILE_K=128),
                 arch)  # fmt: skip
        print(f"dequantize, embedding, FMA GEMV, tensor-core tiles: type {q}, unit {per}, chunk {v} B: ok")
    ptr = {"XQ": "*i8", "XD": "*fp32", "XS": "*fp32", "W": "*u8", "Y": "*bf16"}
    for q, per, nb, v in [(12, 1, 16, 0), (12, 1, 16, 16), (14, 4, 16, 0), (14, 4, 16, 8), (14, 2, 6, 0),
                          (14, 2, 6, 4), (8, 2, 128, 0), (8, 2, 128, 4)]:  # fmt: skip
        for rows_fast, silu, m in [(False, False, 1), (True, True, 4), (False, True, 2)]:
            const = dict(PER=per, BLOCK_M=m, SILU_MUL=silu, ASM=True, ROWS_FAST=rows_fast, V=v, CSW=nb // per * v // 4,
                         XP=bool(v), XCS=nb // per * 4, BLOCK_N=8, NBT=16, EVEN=not silu)  # fmt: skip
            _compile(d4._KERNELS[q], ptr, const, arch)
        print(f"int8 GEMV: type {q}, unit {per}, chunk {v} B: ok")
    for q, per in [(12, 1), (14, 4), (14, 2), (8, 2)]:
        for sp, silu, m, pf in [(8, False, 1, 0), (4, True, 4, 2), (2, False, 2, 1)]:
            const = dict(BLOCK_M=m, SILU_MUL=silu, ASM=True, BLOCK_N=32 // sp * 2, NBT=2, S=sp, PER=per, EVEN=not silu,
                         PF=pf, PDL=pf > 0)  # fmt: skip
            _compile(d4._SPLIT_KERNELS[q], ptr, const, arch)
        print(f"int8 GEMV, blocks split across threads (with and without PDL): type {q}, unit {per}: ok")
    for v in (0, 16):
        _compile(mm._q4_k_mma_kernel, ptr, dict(SILU_MUL=True, V=v, CS=16 * v, BLOCK_M=16, BLOCK_N=64), arch)
    print("int8 tensor-core (MMA) kernel: ok")
    for ue in (0, 64, 256, 1024):
        _compile(d4._quantize_kernel, {"X": "*bf16", "XQ": "*i8", "XD": "*fp32", "XS": "*fp32"},
                 dict(GROUPS=32, UE=ue, PDL=ue == 0), arch)  # fmt: skip
        for res in (False, True):
            types = {"X": "*bf16", "R": "*bf16", "RO": "*bf16", "W": "*bf16", "Y": "*bf16", "XQ": "*i8", "XD": "*fp32"}
            types["XS"] = "*fp32"
            const = dict(HAS_RESIDUAL=res, BLOCK=4096, CHUNK=512, UE=ue, PDL=res)
            _compile(d4._rms_norm_int8_kernel, {**types, "eps": "fp32"}, const, arch)
    print("activation quantization, RMSNorm with int8 output: ok")
    # the decode step's other kernels, as the layers launch them under PDL (Llama-3.1-8B's heads)
    bf = "*bf16"
    _compile(ew._rms_norm_kernel, {"X": bf, "R": bf, "W": bf, "Y": bf, "eps": "fp32"},
             dict(HAS_RESIDUAL=True, BLOCK=4096, PDL=True), arch, warps=8)  # fmt: skip
    _compile(ew._rotary_kernel, {"Q": bf, "K": bf, "V": bf, "POS": "*i64", "COS": "*fp32", "SIN": "*fp32", "KC": bf,
                                 "VC": bf, "SLOTS": "*i64", "k_inv_scale": "fp32", "v_inv_scale": "fp32"},
             dict(NUM_Q_HEADS=32, NUM_K_HEADS=8, HEADS_PAD=32, HALF=64, HALF_PAD=64, STORE_KV=True, FP8=False,
                  PDL=True), arch)  # fmt: skip
    attn_ptr = {"Q": bf, "KC": bf, "VC": bf, "OUT": bf, "BLOCK_TABLES": "*i32", "SEQ_LENS": "*i32",
                "QUERY_START_LOC": "*i32", "PART_ACC": "*fp32", "PART_ML": "*fp32", "scale": "fp32", "v_scale": "fp32",
                "K_NEW": bf, "V_NEW": bf, "COS": "*fp32", "SIN": "*fp32", "SLOTS": "*i64",
                "k_inv_scale": "fp32", "v_inv_scale": "fp32"}  # fmt: skip
    attn = dict(NUM_HEADS=32, GROUP=4, GROUP_PAD=4, BLOCK_Q=4, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16,
                BLOCK_N=64, IEEE=False, NUM_SPLITS=4, F16_DOT=False, PDL=True)  # fmt: skip
    for rope in (False, True):  # True: the split decode rotates q and k and stores the new K/V itself
        _compile(at._paged_attention_kernel, attn_ptr, dict(attn, ROPE=rope, FP8=False), arch)
    merge = dict(NUM_HEADS=32, NUM_SPLITS=4, SPLITS_PAD=4, HEAD_DIM=128, HEAD_DIM_PAD=128, PDL=True)
    merge_ptr = {"PART_ACC": "*fp32", "PART_ML": "*fp32", "OUT": bf, "XQ": "*i8", "XD": "*fp32", "XS": "*fp32"}
    for int8 in (False, True):  # True: the merge also writes o_proj's int8 input (kernels/int8_groups.py)
        _compile(at._merge_splits_kernel, merge_ptr, dict(merge, INT8=int8), arch)
    print("RMSNorm, RoPE with KV store, paged attention (with and without RoPE inside) and its merge, under PDL: ok")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a compile error: its message names the kernel line
        print(f"compile error: {e}", file=sys.stderr)
        sys.exit(1)
