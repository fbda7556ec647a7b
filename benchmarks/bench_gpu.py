"""GPU latency and offline throughput: shardserve beside `transformers` and the hardware bounds, same run.

    python benchmarks/bench_gpu.py --model Llama-3.1-8B [-tp 1] [--num-requests 1000] [--json-out r.json]

Random bf16 weights of the real architecture (``benchmarks/model_shapes.py``), random token ids.
Each part runs in its own process so that the GPU memory of one does not constrain the next:
- ``hw``: device-to-device copy bandwidth (bytes read + written per second) and the bf16 matmul rate
  (8192^3, mean of 10 after 3 warm-ups). The batch-1 decode bound is copy bandwidth / weight bytes
  (every weight is read once per token); the compute bound is matmul rate / (2 x parameters) tokens/s.
- ``shardserve``: batch-1 decode tokens/s after the first token (128-token prompt, 256 new tokens),
  time to first token for 128- and 2048-token prompts (median of 3, fresh prompts: no prefix-cache hits),
  and the offline workload: N requests of 1024 random input ids and 256 output tokens (EOS ignored,
  temperature 1, as ``vllm bench throughput`` samples), output and total tokens/s.
- ``transformers``: ``generate`` at batch 1 (decode tokens/s), and on the throughput workload's shape at
  batch sizes 16/32/64 (best reported), a subset of requests, static padding-free batches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _timed_cuda(fn, reps: int, warmup: int = 3) -> float:
    """Mean seconds of ``fn()`` over ``reps`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _timed_graph(fn, calls: int = 20, reps: int = 20) -> float:
    """Mean seconds of one ``fn()`` replayed from a CUDA graph of ``calls`` calls (no launch overhead:
    a Triton kernel launched from Python costs tens of microseconds of CPU, more than a small GEMV runs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _timed_cuda(graph.replay, reps) / calls


def time_matmul_cold(op, x: torch.Tensor, w: torch.Tensor, l2_bytes: int = 256 << 20) -> float:
    """Seconds of ``op(x, w)`` with ``w`` not in L2, as in a decode step where each layer's weights are
    read once: the graph cycles through copies of ``w`` totalling at least ``l2_bytes``."""
    copies = [w] + [w.clone() for _ in range(-(-l2_bytes // (w.numel() * w.element_size())) - 1)]
    t = _timed_graph(lambda: [op(x, c) for c in copies], calls=1, reps=20)
    return t / len(copies)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (1 GiB buffers)."""
    n = 1 << 30
    src = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n / _timed_cuda(lambda: dst.copy_(src), 20)


def part_hw(args) -> dict:
    copy_bw = copy_bandwidth()
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = _timed_cuda(lambda: a @ b, 10)
    return {
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "bf16_matmul_TFLOPs": 2 * 8192**3 / t / 1e12,
        "device": torch.cuda.get_device_name(),
    }


def _random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (num, length), generator=g).tolist()


def part_shardserve(args) -> dict:
    from shardserve import LLM, SamplingParams

    llm = LLM(
        args.model_dir,
        load_format="dummy",
        dtype="bfloat16",
        tensor_parallel_size=args.tp,
        pipeline_parallel_size=args.pp,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=4096,
        enforce_eager=args.enforce_eager,
        disable_custom_all_reduce=args.disable_custom_all_reduce,
        **getattr(args, "llm_kwargs", {}),  # e.g. quantization, kv_cache_dtype (benchmarks/bench_fp8.py)
    )
    vocab = llm.engine.source.arch.vocab_size
    greedy = dict(temperature=0.0, ignore_eos=True)
    res: dict = {"kv_capacity_tokens": llm.engine.block_manager.num_blocks * llm.config.cache.block_size}
    if getattr(llm.engine.executor, "runner", None) is not None:  # one process: the weight bytes it holds
        from shardserve.model_executor.layers.quantization.base import model_weight_bytes

        res["weight_bytes"] = model_weight_bytes(llm.engine.executor.runner.model)
    llm.generate(_random_prompts(2, 128, vocab, 99), SamplingParams(max_tokens=16, **greedy))  # warm-up

    def ttft(length: int, seed: int) -> float:
        times = []
        for p in _random_prompts(3, length, vocab, seed):
            t0 = time.perf_counter()
            llm.generate([p], SamplingParams(max_tokens=1, **greedy))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    res["ttft_128_ms"] = ttft(128, 1) * 1e3
    res["ttft_2048_ms"] = ttft(2048, 2) * 1e3
    new = 256
    t0 = time.perf_counter()
    out = llm.generate(_random_prompts(1, 128, vocab, 3), SamplingParams(max_tokens=new, **greedy))
    total = time.perf_counter() - t0
    assert len(out[0].outputs[0].token_ids) == new
    first = (
        out[0].metrics.first_token_time - out[0].metrics.arrival_time if out[0].metrics else res["ttft_128_ms"] / 1e3
    )
    res["batch1_decode_tok_s"] = (new - 1) / (total - first)
    res["batch1_tokens"] = out[0].outputs[0].token_ids[:32]
    runner = getattr(llm.engine.executor, "runner", None)
    if runner is not None and runner.graphs is not None:  # where a decode step's GPU time goes
        res["graph_bs1_forward_ms"] = _timed_cuda(runner.graphs.graphs[1].replay, 100) * 1e3
        h = torch.zeros(1, llm.engine.source.arch.hidden_size, dtype=torch.bfloat16, device="cuda")
        res["lm_head_argmax_ms"] = _timed_cuda(lambda: runner.model.compute_logits(h).argmax(-1), 100) * 1e3
    if args.num_requests:
        prompts = _random_prompts(args.num_requests, args.input_len, vocab, 4)
        params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.output_len, ignore_eos=True, seed=None)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        res.update(
            throughput_s=dt,
            output_tok_s=out_tokens / dt,
            total_tok_s=(out_tokens + args.num_requests * args.input_len) / dt,
            requests=args.num_requests,
        )
    llm.shutdown()
    return res


def part_transformers(args) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(args.model_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.eval()
    vocab = cfg.vocab_size
    res: dict = {}

    def gen(batch: list[list[int]], new: int) -> float:
        ids = torch.tensor(batch, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(_random_prompts(1, 128, vocab, 99), 8)
    t_first = gen(_random_prompts(1, 128, vocab, 5), 1)
    t_all = gen(_random_prompts(1, 128, vocab, 3), 128)
    res["batch1_decode_tok_s"] = 127 / (t_all - t_first)
    best = {}
    for bs in args.peer_batch_sizes:
        try:
            prompts = _random_prompts(bs, args.input_len, vocab, 7)
            dt = gen(prompts, args.output_len)
        except torch.OutOfMemoryError:
            break
        rate = bs * (args.input_len + args.output_len) / dt
        res[f"bs{bs}_total_tok_s"] = rate
        res[f"bs{bs}_output_tok_s"] = bs * args.output_len / dt
        if rate > best.get("total_tok_s", 0):
            best = {"batch_size": bs, "total_tok_s": rate, "output_tok_s": bs * args.output_len / dt}
        torch.cuda.empty_cache()
    res["best"] = best
    return res


PARTS = {"hw": part_hw, "shardserve": part_shardserve, "transformers": part_transformers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("-tp", "--tp", type=int, default=1)
    ap.add_argument("-pp", "--pp", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--peer-batch-sizes", type=int, nargs="*", default=[16, 32, 64])
    ap.add_argument("--parts", default="hw,shardserve,transformers")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--disable-custom-all-reduce", action="store_true")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.part:  # child process
        print("RESULT " + json.dumps(PARTS[args.part](args)), flush=True)
        return
    if args.model_dir is None:
        from model_shapes import write_model_dir

        args.model_dir = str(write_model_dir(args.model, Path(tempfile.mkdtemp()) / args.model))
    results: dict = {"model": args.model, "tp": args.tp, "pp": args.pp}
    for part in args.parts.split(","):
        cmd = [sys.executable, __file__, "--part", part, "--model-dir", args.model_dir] + _strip_opt(
            sys.argv[1:], "--parts"
        )
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
            results[part] = {"error": f"exit {proc.returncode}"}
            continue
        results[part] = json.loads(line[len("RESULT ") :])
        print(f"[{part} done in {time.perf_counter() - t0:.0f} s] {results[part]}", flush=True)
    report(results, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


def _strip_opt(cmd: list[str], opt: str) -> list[str]:
    out, skip = [], False
    for a in cmd:
        if skip:
            skip = False
            continue
        if a == opt:
            skip = True
            continue
        out.append(a)
    return out


def report(r: dict, args) -> None:
    from shardserve.model_executor.loader.resolve import resolve_model

    arch = resolve_model(args.model_dir).arch
    params = arch.num_params()
    weight_bytes = 2 * params
    hw, ours, peer = r.get("hw", {}), r.get("shardserve", {}), r.get("transformers", {})
    lines = [
        f"model {args.model} ({params / 1e9:.2f} B params, {weight_bytes / 1e9:.1f} GB bf16), TP={args.tp} PP={args.pp}"
    ]
    if "copy_bandwidth_GBps" in hw:
        bw = hw["copy_bandwidth_GBps"] * 1e9 * args.tp * args.pp
        bound = bw / weight_bytes
        compute = hw["bf16_matmul_TFLOPs"] * 1e12 * args.tp * args.pp / (2 * params)
        lines.append(
            f"device {hw['device']}: copy {hw['copy_bandwidth_GBps']:.0f} GB/s, bf16 matmul "
            f"{hw['bf16_matmul_TFLOPs']:.0f} TFLOP/s per GPU"
        )
        lines.append(f"batch-1 decode bound {bound:.1f} tok/s; compute bound {compute:.0f} tok/s")
        if "batch1_decode_tok_s" in ours:
            lines.append(
                f"shardserve batch-1 decode {ours['batch1_decode_tok_s']:.1f} tok/s "
                f"= {ours['batch1_decode_tok_s'] / bound:.2f} of bound"
            )
        if "total_tok_s" in ours:
            lines.append(
                f"shardserve throughput {ours['total_tok_s']:.0f} total tok/s "
                f"({ours['output_tok_s']:.0f} output) = {ours['total_tok_s'] / compute:.2f} of compute bound"
            )
    for k in ("ttft_128_ms", "ttft_2048_ms"):
        if k in ours:
            lines.append(f"shardserve {k} {ours[k]:.1f}")
    if "batch1_decode_tok_s" in peer:
        lines.append(f"transformers batch-1 decode {peer['batch1_decode_tok_s']:.1f} tok/s")
        if "batch1_decode_tok_s" in ours:
            lines.append(
                f"  ratio shardserve/transformers {ours['batch1_decode_tok_s'] / peer['batch1_decode_tok_s']:.2f}"
            )
    if peer.get("best") and "total_tok_s" in ours:
        b = peer["best"]
        lines.append(
            f"transformers best throughput {b['total_tok_s']:.0f} total tok/s at batch {b['batch_size']}; "
            f"ratio {ours['total_tok_s'] / b['total_tok_s']:.1f}x"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
