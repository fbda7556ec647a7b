"""Where a batch-1 decode step's GPU time goes: per-kernel profile and the matmuls against copy bandwidth.

    python benchmarks/profile_decode.py --model Llama-3.1-8B [--context 384] [--batch-size 1] [--gguf Q4_K_M]

Builds the engine on random bf16 weights of the real shape (with ``--gguf RECIPE``: a GGUF file of that
llama.cpp recipe's tensor types, random blocks, weights kept quantized; only the per-kernel profile),
fills the captured decode graph's static buffers with a request of ``--context`` tokens, and:
- profiles graph replays with ``torch.profiler`` (CUDA activity), printing each kernel's mean time per
  step and its share of the step;
- times each linear layer's matmul alone at the decode batch (``F.linear``, CUDA events) and prints the
  bandwidth it reaches against the device-to-device copy bandwidth measured in the same run;
- times the paged-attention kernel alone at several context lengths;
- captures the step again with programmatic dependent launch off and on in three forms
  (``kernels/pdl.py``) and prints each replay time and whether the outputs are equal.

``--offline N`` instead profiles N requests of the offline-throughput workload of ``bench_gpu.py`` and
prints kernel time by category (cuBLAS matmuls, attention, ...) against wall time.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import _timed_cuda, _timed_graph, copy_bandwidth, time_matmul_cold
from model_shapes import write_model_dir


def fill_graph_inputs(graphs, bs: int, context: int) -> None:
    """Put ``bs`` requests of ``context`` tokens each, on distinct KV blocks, into the static buffers."""
    blocks = -(-context // graphs.block_size)
    for i in range(bs):
        table = torch.arange(i * blocks, (i + 1) * blocks, dtype=torch.int32)
        graphs.block_tables[i, :blocks].copy_(table)
        graphs.seq_lens[i] = context
        graphs.positions[i] = context - 1
        graphs.slot_mapping[i] = (i * blocks) * graphs.block_size + context - 1
    graphs.input_ids[:bs].fill_(7)


def kernel_table(fn, reps: int) -> list[tuple[str, float, int]]:
    """(kernel name, mean us per call, launches per call) of ``reps`` calls of ``fn``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time
            count[ev.name] += 1
    rows = [(name, total[name] / reps, count[name] // reps) for name in total]
    return sorted(rows, key=lambda r: -r[1])


CATEGORIES = (
    ("matmul (cuBLAS)", re.compile(r"nvjet|gemm|cutlass|xmma|splitKreduce", re.I)),
    ("matmul (our GEMV)", re.compile(r"_gemv")),
    ("attention", re.compile(r"_paged_attention|_merge_splits")),
    ("norm, RoPE + KV store, SiLU", re.compile(r"_rms_norm|_rotary|_silu|_store_kv")),
)


def profile_offline(llm, num_requests: int, input_len: int, output_len: int) -> None:
    """Where the offline-throughput workload's time goes: kernel time by category against wall time."""
    from torch.profiler import ProfilerActivity, profile

    from shardserve import SamplingParams

    vocab = llm.engine.source.arch.vocab_size
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(3, vocab, (num_requests, input_len), generator=g).tolist()
    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    by_name: dict[str, float] = collections.defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            by_name[ev.key] += ev.device_time_total / 1e6
    busy = sum(by_name.values())
    tokens = num_requests * (input_len + output_len)
    print(
        f"== offline {num_requests} x {input_len} in / {output_len} out: wall {wall:.2f} s "
        f"({tokens / wall:.0f} total tok/s under the profiler), kernels {busy:.2f} s, "
        f"GPU idle {wall - busy:.2f} s ({(wall - busy) / wall:.0%})"
    )
    totals = collections.defaultdict(float)
    for name, t in by_name.items():
        cat = next((c for c, rx in CATEGORIES if rx.search(name)), "other (sampling, copies, embedding)")
        totals[cat] += t
    for cat, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{t:8.2f} s {t / wall:6.1%} of wall  {cat}")
    print("top kernels:")
    for name, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{t:8.2f} s {t / wall:6.1%}  {name[:100]}")


def pdl_ab(graphs, bs: int) -> dict:
    """The same decode step captured again under five launch settings (``kernels/pdl.py``): programmatic
    dependent launch off; on for every kernel, with the int8 GEMVs' L2 prefetch before their wait; on
    without that prefetch; on for all but the int8 GEMVs and activation rounding (``kernels/gguf_dp4a``);
    on with RoPE and the KV store in their own launch again (``layers/attention.FUSE_ROPE`` off).
    Prints each replay time and whether its output equals PDL off bit for bit; returns the graphs by
    setting (none where PDL is not available)."""
    from shardserve.model_executor.kernels import gguf_dp4a, pdl
    from shardserve.model_executor.layers import attention

    pdl.set_pdl(True)
    if not pdl.pdl_enabled(graphs.input_ids):
        print("== PDL: off or not available on this GPU (compute capability 9.0+)")
        return {}
    budget, launch, fuse = gguf_dp4a._PREFETCH_BYTES, gguf_dp4a.pdl_launch, attention.FUSE_ROPE
    variants = {
        "off": (False, budget, launch, fuse),
        "on": (True, budget, launch, fuse),
        "on, no prefetch": (True, 0, launch, fuse),
        "on, not gguf_dp4a": (True, budget, lambda x: {}, fuse),
        "on, RoPE apart": (True, budget, launch, False),
    }
    results, captured = {}, {}
    try:
        for name, (on, prefetch, launcher, fuse_rope) in variants.items():
            pdl.set_pdl(on)
            gguf_dp4a._PREFETCH_BYTES, gguf_dp4a.pdl_launch = prefetch, launcher
            attention.FUSE_ROPE = fuse_rope
            with torch.inference_mode():
                graphs._forward(bs)  # compile this variant
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = graphs._forward(bs)
            graph.replay()
            torch.cuda.synchronize()
            first = out.clone() if isinstance(out, torch.Tensor) else out.hidden_states.clone()
            results[name] = (_timed_cuda(graph.replay, 200) * 1e3, first)
            captured[name] = graph
    finally:
        pdl.set_pdl(True)
        gguf_dp4a._PREFETCH_BYTES, gguf_dp4a.pdl_launch = budget, launch
        attention.FUSE_ROPE = fuse
    off_ms, off_out = results["off"]
    for name, (ms, out) in results.items():
        print(f"== PDL {name:>18}: graph replay {ms:.3f} ms ({off_ms / ms:.3f}x of off); output equal to off: "
              f"{torch.equal(out, off_out)}")  # fmt: skip
    print(f"== PDL: fastest setting {min(results, key=lambda k: results[k][0])!r}")
    return captured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--gguf", default=None, metavar="RECIPE", help="profile a GGUF file of this recipe (Q4_K_M, ...)")
    ap.add_argument(
        "--offline",
        type=int,
        default=0,
        metavar="N",
        help="instead: profile N requests of the offline-throughput workload (1024 in / 256 out)",
    )
    args = ap.parse_args()
    if args.offline:
        from shardserve import LLM

        model_dir = write_model_dir(args.model, Path(tempfile.mkdtemp()) / args.model)
        llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=4096, max_num_seqs=256,
                  max_num_batched_tokens=8192)  # fmt: skip
        profile_offline(llm, args.offline, 1024, 256)
        llm.shutdown()
        return

    from shardserve import LLM, SamplingParams

    if args.gguf:
        from gguf_models import write_llama_gguf

        from shardserve.tools.known_models import find_known_model

        path = Path(tempfile.mkdtemp()) / f"{args.model}.{args.gguf}.gguf"
        written = write_llama_gguf(path, find_known_model(args.model).hf_config, args.gguf, log=lambda m: None)
        print(f"== wrote {args.model} {args.gguf}: {written['file_bytes'] / 1e9:.2f} GB in {written['seconds']:.0f} s")
        t0 = time.perf_counter()
        llm = LLM(str(path), dtype="bfloat16", max_model_len=8192, max_num_seqs=args.batch_size)
        print(f"== loaded in {time.perf_counter() - t0:.0f} s")
    else:
        model_dir = write_model_dir(args.model, Path(tempfile.mkdtemp()) / args.model)
        llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=8192, max_num_seqs=64)
    llm.generate([[5] * 16], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    runner = llm.engine.executor.runner
    graphs = runner.graphs
    bs = next(s for s in graphs.sizes if s >= args.batch_size)
    fill_graph_inputs(graphs, bs, args.context)
    graph = graphs.graphs[bs]
    step_ms = _timed_cuda(graph.replay, 100) * 1e3
    # per kernel without PDL: under it a kernel starts early and waits, so its time would include the wait
    graph = pdl_ab(graphs, bs).get("off", graph)
    rows = kernel_table(graph.replay, args.reps)
    if not rows:  # this profiler does not see kernels inside graphs: profile the same step eagerly
        print("(profiler sees no kernels inside the graph: eager forward of the same step)")
        with torch.inference_mode():
            rows = kernel_table(lambda: graphs._forward(bs), args.reps)
    profiled = sum(r[1] for r in rows)
    print(
        f"== {args.model} decode batch {bs}, context {args.context}: graph replay {step_ms:.3f} ms "
        f"(CUDA events, as served), kernels sum {profiled / 1e3:.3f} ms without PDL"
    )
    print(f"{'us/step':>9} {'share':>6} {'n':>4}  kernel")
    for name, us, n in rows[:25]:
        print(f"{us:9.1f} {us / profiled:6.1%} {n:4d}  {name[:110]}")
    if args.gguf:
        llm.shutdown()
        return

    copy_bw = copy_bandwidth()
    print(f"== matmuls alone at batch {bs} (copy bandwidth {copy_bw / 1e9:.0f} GB/s)")
    layer = next(iter(runner.model.model.layers.values()))
    linears = {
        "qkv_proj": layer.self_attn.qkv_proj.weight,
        "o_proj": layer.self_attn.o_proj.weight,
        "gate_up_proj": layer.mlp.gate_up_proj.weight,
        "down_proj": layer.mlp.down_proj.weight,
        "lm_head": runner.model.lm_head.weight,
    }
    per_layer_us = 0.0
    for name, w in linears.items():
        x = torch.randn(bs, w.shape[1], dtype=w.dtype, device=w.device)
        t = time_matmul_cold(F.linear, x, w)
        bw = w.numel() * w.element_size() / t
        if name != "lm_head":
            per_layer_us += t * 1e6
        print(f"{name:>13} {tuple(w.shape)}: {t * 1e6:7.1f} us, {bw / 1e9:6.0f} GB/s = {bw / copy_bw:.2f} of copy")
    layers = len(runner.model.model.layers)
    print(f"matmuls of {layers} layers: {per_layer_us * layers / 1e3:.3f} ms")

    from shardserve.model_executor.kernels.attention import paged_attention

    attn = layer.self_attn.attn
    cache = attn.kv_cache
    print(f"== paged attention alone, batch {bs}")
    for ctx in (128, 384, 1024, 4096):
        blocks = -(-ctx // cache.shape[2])
        if blocks * bs > cache.shape[1]:
            break
        q = torch.randn(bs, attn.num_heads, attn.head_dim, dtype=cache.dtype, device=cache.device)
        tables = torch.arange(bs * blocks, dtype=torch.int32, device=cache.device).view(bs, blocks)
        seq_lens = torch.full((bs,), ctx, dtype=torch.int32, device=cache.device)
        qsl = torch.arange(bs + 1, dtype=torch.int32, device=cache.device)
        args_ = (q, cache, tables, seq_lens, qsl, 1, attn.scale)
        t = _timed_graph(lambda a=args_: paged_attention(*a))
        kv_bytes = 2 * bs * ctx * attn.num_kv_heads * attn.head_dim * cache.element_size()
        print(f"context {ctx:5d}: {t * 1e6:6.1f} us/layer, KV {kv_bytes / t / 1e9:5.0f} GB/s")
    print("== prefill attention alone: 8 prompts x 1024 tokens, tile rows x warps")
    n, ctx = 8, 1024
    blocks = -(-ctx // cache.shape[2])
    q = torch.randn(n * ctx, attn.num_heads, attn.head_dim, dtype=cache.dtype, device=cache.device)
    tables = torch.arange(n * blocks, dtype=torch.int32, device=cache.device).view(n, blocks)
    seq_lens = torch.full((n,), ctx, dtype=torch.int32, device=cache.device)
    qsl = torch.arange(0, (n + 1) * ctx, ctx, dtype=torch.int32, device=cache.device)
    flops = 4 * n * (ctx * (ctx + 1) // 2) * attn.num_heads * attn.head_dim  # causal QK^T and PV
    for block_m, warps in ((64, 4), (128, 4), (128, 8), (64, 8)):
        args_ = (q, cache, tables, seq_lens, qsl, ctx, attn.scale)
        t = _timed_cuda(lambda a=args_, b=block_m, w=warps: paged_attention(*a, block_m=b, num_warps=w), 20)
        print(f"block_m {block_m:3d}, {warps} warps: {t * 1e6:7.1f} us/layer, {flops / t / 1e12:5.0f} TFLOP/s")
    llm.shutdown()


if __name__ == "__main__":
    main()
