"""FP8 beside bf16, same run: ``--quantization fp8`` (weights) and ``--kv-cache-dtype fp8`` (KV cache).

    python benchmarks/bench_fp8.py [--model Llama-3.1-8B] [--num-requests 1000] [--json-out fp8.json]
    python benchmarks/bench_fp8.py --tiny --device cpu    # runs the script end to end on a CPU (figures meaningless)

Random bf16 weights of the real architecture (``benchmarks/model_shapes.py``), random token ids, EOS ignored.
Each part runs in its own process (as in ``bench_gpu.py``), so one's GPU memory does not constrain the next:

- ``hw``: device-to-device copy bandwidth (``bench_gpu.copy_bandwidth``: bytes read + written per second).
- ``kernels`` (CUDA): each matmul of one decoder layer at 1, 2, 4, 16, 256 and 4096 rows: bf16 (our GEMV at
  1-2 rows, cuBLAS above) beside FP8 (our FP8 GEMV at 1-2 rows; per-token activation quantization +
  ``torch._scaled_mm`` above, also timed at 1-2 rows to show where the GEMV wins), weights cold in L2
  (``bench_gpu.time_matmul_cold``). At 1 row each time is also given as a fraction of copy bandwidth for the
  bytes that layer holds (2 per weight in bf16; 1 plus a 4-byte scale per row in FP8).
- ``bf16``, ``fp8`` (``--quantization fp8``), ``kv8`` (bf16 weights, ``--kv-cache-dtype fp8``): the
  ``shardserve`` part of ``bench_gpu.py`` (``part_shardserve``) with that setting: batch-1 decode tok/s
  (128-token prompt, 256 new), TTFT at 128 and 2048 tokens, the offline workload (N requests of 1024 random
  ids, 256 new tokens, temperature 1), the KV capacity in tokens the engine allocated, and the weight bytes the
  model holds. The batch-1 bound of each is copy bandwidth / weight bytes held (every weight read once per
  token).

The report prints every figure with its label, then the ratios issue 13 sets targets for: FP8 / bf16 batch-1
decode (>= 1.7x) and offline throughput (>= 1.3x); fp8-KV / auto KV capacity (2x) and throughput (>= 1.0x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_gpu import _strip_opt, part_shardserve

VARIANTS = {
    "bf16": {},
    "fp8": {"quantization": "fp8"},
    "kv8": {"kv_cache_dtype": "fp8"},
    "fp8s": {"quantization": "fp8"},
}
"""Setting name -> extra ``LLM`` arguments (the same flags as ``shardserve serve``). ``fp8s`` is ``fp8`` with
each layer's FP8 GEMV at the fastest configuration the ``kernels`` part's ``--sweep`` found for its shape
(passed to the part as ``--fp8-gemv-configs``), to time a tiling rule before it is written into
:func:`~shardserve.model_executor.kernels.fp8.fp8_gemv_config`."""
KERNEL_ROWS = (1, 2, 4, 16, 256, 4096)
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
)
"""``--tiny``: a 2-layer Llama that runs anywhere, to check the script (its figures mean nothing)."""


def part_hw(args) -> dict:
    if args.device == "cuda":
        from bench_gpu import copy_bandwidth

        return {"copy_bandwidth_GBps": copy_bandwidth() / 1e9, "device": torch.cuda.get_device_name()}
    src = torch.empty(1 << 27, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    dt = (time.perf_counter() - t0) / 5
    return {"copy_bandwidth_GBps": 2 * src.numel() / dt / 1e9, "device": "cpu"}


def part_kernels(args) -> dict:
    if args.device != "cuda":
        return {"skipped": "the kernel timings need CUDA graphs"}
    import torch.nn.functional as F
    from bench_gpu import copy_bandwidth, time_matmul_cold

    from shardserve.model_executor.kernels.fp8 import fp8_gemv, quantize_per_token
    from shardserve.model_executor.layers.quantization.base import linear
    from shardserve.model_executor.layers.quantization.fp8 import (
        fp8_linear_bytes,
        quantize_weight_per_row,
        scaled_mm_rowwise,
    )

    bw = copy_bandwidth()
    res: dict = {"copy_bandwidth_GBps": bw / 1e9, "layers": {}}
    for name, (n, k) in layer_shapes(args.model_dir, args.tp).items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device=args.device) * 0.02
        q, s = quantize_weight_per_row(w)

        def fp8_mm(x, wq, s=s):
            xq, xs = quantize_per_token(x)
            return scaled_mm_rowwise(xq, wq, xs, s)

        def fp8_path(x, wq, s=s):
            return fp8_gemv(x, wq, s) if x.shape[0] <= 2 else fp8_mm(x, wq)

        rows = {}
        for m in args.kernel_rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=args.device)
            want = F.linear(x.float(), q.float() * s[:, None])
            got = fp8_path(x, q).float()
            entry = {
                "bf16_us": time_matmul_cold(linear, x, w) * 1e6,
                "fp8_us": time_matmul_cold(fp8_path, x, q) * 1e6,
                "fp8_max_rel_err": float((got - want).abs().max() / want.abs().max()),
            }
            if m <= 2:
                entry["fp8_scaled_mm_us"] = time_matmul_cold(fp8_mm, x, q) * 1e6
            if m == 1:
                entry["bf16_of_copy"] = n * k * 2 / (entry["bf16_us"] * 1e-6) / bw
                entry["fp8_of_copy"] = fp8_linear_bytes((n, k)) / (entry["fp8_us"] * 1e-6) / bw
                if args.sweep:
                    entry["sweep"] = _sweep_fp8_gemv(x, q, s, fp8_linear_bytes((n, k)) / bw, time_matmul_cold)
            rows[m] = entry
        res["layers"][name] = {"shape": [n, k], "rows": rows}
        del w, q
        torch.cuda.empty_cache()
    return res


def _sweep_fp8_gemv(x, q, s, copy_seconds: float, time_matmul_cold) -> list[list]:
    """The five fastest ``fp8_gemv`` configurations ``[config, fraction of copy bandwidth]`` at ``x``'s rows."""
    import itertools

    from triton.runtime.errors import OutOfResources

    from shardserve.model_executor.kernels.fp8 import fp8_gemv

    found = []
    for bn, bk, warps, stages in itertools.product((2, 4, 8, 16), (512, 1024, 2048, 4096), (4, 8), (2, 3)):
        if q.shape[1] % bk or bn * bk > 16384 or bn * bk < 2048:  # past 16K products a program spills
            continue
        cfg = (bn, bk, warps, stages)
        try:
            t = time_matmul_cold(lambda x, w, cfg=cfg: fp8_gemv(x, w, s, config=cfg), x, q)
        except OutOfResources:
            continue
        found.append([list(cfg), copy_seconds / t])
    return sorted(found, key=lambda c: -c[1])[:5]


def swept_configs(results: dict) -> dict[str, list[int]]:
    """``"NxK" -> [BLOCK_N, BLOCK_K, num_warps, num_stages]``: the fastest 1-row FP8 GEMV configuration of each
    layer the ``kernels`` part swept (empty without ``--sweep``)."""
    out = {}
    for layer in results.get("kernels", {}).get("layers", {}).values():
        sweep = layer["rows"].get("1", {}).get("sweep")  # rows keyed as JSON keeps them: strings
        if sweep:
            out["x".join(map(str, layer["shape"]))] = sweep[0][0]
    return out


def layer_shapes(model_dir: str, tp: int) -> dict[str, tuple[int, int]]:
    """``name -> (N, K)`` of one TP rank's weights of one decoder layer (``bench_gemv.py``'s, from config.json)."""
    from shardserve.model_executor.loader.resolve import resolve_model

    a = resolve_model(model_dir).arch
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    return {
        "qkv_proj": ((q + 2 * kv) // tp, a.hidden_size),
        "o_proj": (a.hidden_size, q // tp),
        "gate_up_proj": (2 * a.intermediate_size // tp, a.hidden_size),
        "down_proj": (a.hidden_size, a.intermediate_size // tp),
    }


def part_variant(args) -> dict:
    args.llm_kwargs = dict(VARIANTS[args.variant])
    if args.fp8_gemv_configs:  # fp8s: the swept configuration per (N, K), the rule's pick elsewhere
        from shardserve.model_executor.kernels import fp8 as fp8_kernels

        table = {tuple(map(int, key.split("x"))): tuple(cfg) for key, cfg in json.loads(args.fp8_gemv_configs).items()}
        rule = fp8_kernels.fp8_gemv_config
        fp8_kernels.fp8_gemv_config = lambda n, k: table.get((n, k)) or rule(n, k)
    if args.device == "cpu":
        args.llm_kwargs["device"] = "cpu"
    return part_shardserve(args)


def _write_tiny_dir() -> str:
    from model_shapes import write_model_dir

    path = Path(tempfile.mkdtemp()) / "tiny-llama"
    return str(write_model_dir("tiny", path, hf_config=TINY))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random Llama instead of --model")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("-tp", "--tp", type=int, default=1)
    ap.add_argument("-pp", "--pp", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=None, help="offline workload size (default 1000; tiny 8)")
    ap.add_argument("--input-len", type=int, default=None, help="default 1024 (tiny 64)")
    ap.add_argument("--output-len", type=int, default=None, help="default 256 (tiny 16)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--kernel-rows", type=int, nargs="*", default=list(KERNEL_ROWS))
    ap.add_argument("--sweep", action="store_true", help="also time FP8 GEMV configurations at 1 row")
    ap.add_argument("--parts", default="hw,kernels,bf16,fp8,kv8", help="also fp8s (after kernels with --sweep)")
    ap.add_argument("--fp8-gemv-configs", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-timeout", type=float, default=400.0, help="seconds per part before it is killed")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--disable-custom-all-reduce", action="store_true")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    small = args.tiny
    args.num_requests = args.num_requests if args.num_requests is not None else (8 if small else 1000)
    args.input_len = args.input_len or (64 if small else 1024)
    args.output_len = args.output_len or (16 if small else 256)
    if args.part:  # child process
        parts = {"hw": part_hw, "kernels": part_kernels, "variant": part_variant}
        print("RESULT " + json.dumps(parts[args.part](args)), flush=True)
        return
    if args.model_dir is None:
        if args.tiny:
            args.model_dir = _write_tiny_dir()
        else:
            from model_shapes import write_model_dir

            args.model_dir = str(write_model_dir(args.model, Path(tempfile.mkdtemp()) / args.model))
    results: dict = {"model": "tiny" if args.tiny else args.model, "tp": args.tp, "device": args.device}
    base = [sys.executable, __file__, "--model-dir", args.model_dir] + _strip_opt(sys.argv[1:], "--parts")
    for part in args.parts.split(","):
        extra = ["--part", part] if part in ("hw", "kernels") else ["--part", "variant", "--variant", part]
        if part == "fp8s":
            extra += ["--fp8-gemv-configs", json.dumps(swept_configs(results))]
        results[part] = _run_part(base + extra, args.part_timeout)
        print(f"[{part}] {json.dumps(results[part])[:400]}", flush=True)
        if args.json_out:  # after every part, so a later failure keeps the figures so far
            Path(args.json_out).write_text(json.dumps(results, indent=1))
    print("\n".join(report(results, args)))


def _run_part(cmd: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        print((e.stderr or b"")[-3000:] if isinstance(e.stderr, str) else "", file=sys.stderr)
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}"}
    out = json.loads(line[len("RESULT ") :])
    out["part_seconds"] = time.perf_counter() - t0
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _check(value: float | None, target: float) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x (target >= {target}x: {'PASS' if value >= target - 1e-9 else 'MISS'})"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def report(r: dict, args) -> list[str]:
    """Every figure with its label, then the ratios against bf16 measured in the same run."""
    lines = [f"== bench_fp8: {r['model']} TP={r['tp']} on {r['device']}"]
    hw = r.get("hw", {})
    bw = hw.get("copy_bandwidth_GBps")
    if bw:
        lines.append(f"device {hw.get('device')}: copy bandwidth {bw:.0f} GB/s (read + written)")
    kernels = r.get("kernels", {})
    for name, layer in kernels.get("layers", {}).items():
        n, k = layer["shape"]
        for m, e in layer["rows"].items():
            extra = ""
            if "fp8_scaled_mm_us" in e:
                extra += f", FP8 via _scaled_mm {e['fp8_scaled_mm_us']:.1f} us"
            if "bf16_of_copy" in e:
                extra += f"; of copy bandwidth: bf16 {e['bf16_of_copy']:.2f}, FP8 {e['fp8_of_copy']:.2f}"
            if e.get("sweep"):
                extra += "; FP8 GEMV sweep best " + ", ".join(f"{tuple(c)} {f:.2f}" for c, f in e["sweep"])
            lines.append(
                f"kernel {name} ({n} x {k}) rows {m}: bf16 {e['bf16_us']:.1f} us, FP8 {e['fp8_us']:.1f} us, "
                f"FP8/bf16 time {e['fp8_us'] / e['bf16_us']:.2f}{extra}; FP8 max rel err {e['fp8_max_rel_err']:.1e}"
            )
    if kernels.get("skipped"):
        lines.append(f"kernels: skipped ({kernels['skipped']})")
    for v in VARIANTS:
        res = r.get(v)
        if res is None:
            continue
        if "error" in res:
            lines.append(f"[{v}] failed: {res['error']}")
            continue
        wb, decode = res.get("weight_bytes"), res["batch1_decode_tok_s"]
        line = f"[{v}] batch-1 decode {decode:.1f} tok/s"
        if wb:
            line += f"; weights held {_gb(wb)}"
            if bw:
                bound = bw * 1e9 / wb
                line += f"; bound {bound:.1f} tok/s (copy bandwidth / weight bytes), {decode / bound:.2f} of it"
        lines.append(line)
        lines.append(
            f"[{v}] TTFT 128-token prompt {res['ttft_128_ms']:.1f} ms, 2048-token {res['ttft_2048_ms']:.1f} ms"
        )
        if "total_tok_s" in res:
            lines.append(
                f"[{v}] offline throughput {res['total_tok_s']:.0f} total tok/s ({res['output_tok_s']:.0f} output) "
                f"over {res['requests']} requests of {args.input_len} in / {args.output_len} out"
            )
        lines.append(f"[{v}] KV cache capacity {res['kv_capacity_tokens']} tokens")
    b, f, k, fs = (r.get(v) if r.get(v) and "error" not in r[v] else {} for v in ("bf16", "fp8", "kv8", "fp8s"))
    lines.append(
        "FP8 weights / bf16, batch-1 decode: "
        + _check(_ratio(f.get("batch1_decode_tok_s"), b.get("batch1_decode_tok_s")), 1.7)
    )
    if fs:
        lines.append(
            f"FP8 weights at the swept GEMV configurations {swept_configs(r)} / bf16, batch-1 decode: "
            + _check(_ratio(fs.get("batch1_decode_tok_s"), b.get("batch1_decode_tok_s")), 1.7)
        )
    lines.append(
        "FP8 weights / bf16, offline total tok/s: " + _check(_ratio(f.get("total_tok_s"), b.get("total_tok_s")), 1.3)
    )
    lines.append(
        "FP8 KV / auto KV, KV capacity in tokens: "
        + _check(_ratio(k.get("kv_capacity_tokens"), b.get("kv_capacity_tokens")), 2.0)
    )
    lines.append(
        "FP8 KV / auto KV, offline total tok/s: " + _check(_ratio(k.get("total_tok_s"), b.get("total_tok_s")), 1.0)
    )
    if b.get("batch1_tokens") and f.get("batch1_tokens"):
        same = next((i for i, (x, y) in enumerate(zip(b["batch1_tokens"], f["batch1_tokens"])) if x != y), 32)
        lines.append(f"FP8 weights vs bf16 greedy batch-1 tokens: the first {same} of 32 agree (random weights)")
    if args.device == "cpu":
        lines.append("(CPU run: FP8 weights are dequantized there; these figures only show the script works)")
    return lines


if __name__ == "__main__":
    main()
