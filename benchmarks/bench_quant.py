"""GGUF weights kept quantized on the GPU: decode and prefill speed beside bf16 and the bandwidth bound, and
the GPU memory the weights take beside what the accounting predicts, all measured in the same run.

    python benchmarks/bench_quant.py                       # 8B Q4_K_M + Q8_0, 70B Q4_K_M, bf16 8B, kernels
    python benchmarks/bench_quant.py --skip-70b            # without the 42 GB file
    python benchmarks/bench_quant.py --parts hw,bf16,gguf --models Llama-3.1-8B --recipes Q4_K_M
    python benchmarks/bench_quant.py --tiny                # CPU smoke run of the script itself

Files: GGUF files of the Llama-3.1-8B/-70B shapes (``benchmarks/model_shapes.py`` table) in the tensor types
of llama.cpp's Q4_K_M and Q8_0 recipes, random blocks with small finite scales (``gguf_models.py``), written
to ``--workdir`` and deleted after their part unless ``--keep-files``. bf16 runs use random weights of the
same architecture (``--load-format dummy``). Each part runs in its own process so that one part's GPU
memory does not constrain the next.

Figures (each printed with its label; ``--json-out`` saves them all):
- ``copy bandwidth``: device-to-device copy of 1 GiB, bytes read + written per second.
- ``batch-1 decode``: tokens/s after the first token, 128-token prompt, 256 new tokens, greedy, EOS ignored,
  CUDA graphs. ``bound (held)`` = copy bandwidth / weight bytes held (every weight read once per token, the
  issue's definition); ``bound (read)`` leaves out the embedding table, of which a step reads one row.
- ``vs bf16``: the GGUF model's batch-1 decode over bf16's of the same shape in the same run.
- ``weights``: bytes of the model's tensors, ``torch.cuda.memory_allocated`` growth over the load, and
  ``gguf_weight_bytes`` (what ``shardserve plan`` should count), with the ratio allocated / predicted.
- ``batch-16 decode``: output tokens/s of 16 requests decoding together (the tensor-core GGUF kernel).
- ``prefill``: tokens/s of a 2048-token prompt (one step: 2048 / time to first token, median of 3 fresh
  prompts) for the default policy and for each prefill path forced: ``fused`` (tiles dequantized in
  registers, ``tl.dot``) and ``dequant+cuBLAS`` (each weight dequantized to a bf16 scratch buffer).
- ``kernels`` part: per layer shape of the 8B model and GGUF type, the decode GEMV (1 row) and the
  tensor-core kernel (16 rows) in GB/s of weights read and as a fraction of copy bandwidth (weights cold
  in L2: a CUDA graph cycles over copies), and the prefill paths at 2048 rows in TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

TINY_CONFIG = {
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
TARGETS = {"Q4_K_M": (2.5, 0.65), "Q8_0": (1.7, None)}
"""recipe -> (batch-1 decode over bf16, fraction of its own bound) from issue 13; 70B: bound only."""


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _hf_config(model: str, tiny: bool) -> dict:
    if tiny:
        return dict(TINY_CONFIG)
    from shardserve.tools.known_models import find_known_model

    known = find_known_model(model)
    if known is None:
        raise SystemExit(f"{model!r} is not a built-in model shape")
    return dict(known.hf_config)


# -- parts (each runs in a child process) ------------------------------------------------------------


def part_hw(spec: dict) -> dict:
    if _cuda():
        from bench_gpu import copy_bandwidth

        return {"copy_bandwidth_GBps": copy_bandwidth() / 1e9, "device": torch.cuda.get_device_name()}
    n = 256 << 20
    src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return {"copy_bandwidth_GBps": 2 * n * 5 / (time.perf_counter() - t0) / 1e9, "device": "cpu"}


def _timed(fn, reps: int) -> float:
    """Seconds per call: CUDA graph replay over ``reps`` calls on the GPU, wall clock on the CPU."""
    if _cuda():
        from bench_gpu import _timed_graph

        return _timed_graph(fn, calls=reps, reps=5)
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _cold(op, weights: list[torch.Tensor]) -> float:
    """Seconds of ``op(w)`` per weight, cycling over copies of the weight so that L2 does not hold it."""
    return _timed(lambda: [op(w) for w in weights], reps=1 if not _cuda() else 3) / len(weights)


def part_kernels(spec: dict) -> dict:
    import numpy as np

    from shardserve.model_executor.kernels.gemv import gemv
    from shardserve.model_executor.kernels.gguf_dequant import dequantize
    from shardserve.model_executor.kernels.gguf_dp4a import gguf_gemv_dp4a
    from shardserve.model_executor.kernels.gguf_dp4a import supports as dp4a_supports
    from shardserve.model_executor.kernels.gguf_gemv import gguf_gemv, gguf_matmul
    from shardserve.model_executor.kernels.gguf_mma import gguf_mma
    from shardserve.model_executor.kernels.gguf_mma import supports as mma_supports
    from shardserve.model_executor.layers.quantization.gguf_blocks import block_type, random_blocks

    dev = "cuda" if _cuda() else "cpu"
    dtype = torch.bfloat16 if _cuda() else torch.float32
    cfg = spec["hf_config"]
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = h, cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = [
        ("qkv_proj", q + 2 * kv, h, False),
        ("o_proj", h, h, False),
        ("gate_up_proj", 2 * i, h, True),
        ("down_proj", h, i, False),
        ("lm_head", cfg["vocab_size"], h, False),
    ]
    copy_bw = spec["copy_bandwidth_GBps"] * 1e9
    rows: list[dict] = []
    rng = np.random.default_rng(0)
    l2_bytes = 256 << 20 if _cuda() else 1
    prefill_m = 2048 if _cuda() else 64
    for name, n, k, silu in shapes:
        w16 = torch.randn(n, k, dtype=dtype, device=dev) * 0.02
        copies16 = [w16] + [w16.clone() for _ in range(-(-l2_bytes // w16.nbytes) - 1)]
        x1 = torch.randn(1, k, dtype=dtype, device=dev)
        t = _cold(lambda w, x=x1, f=silu: gemv(x, w, silu_and_mul=f) if _cuda() else x @ w.T, copies16)
        rows.append({"shape": name, "N": n, "K": k, "type": "bf16", "rows": 1, "GBps": w16.nbytes / t / 1e9})
        del copies16
        for qtype in spec["types"]:
            bt = block_type(qtype)
            blocks = torch.from_numpy(random_blocks(rng, n, k, qtype, (2e-4, 2e-3))).to(dev)
            copies = [blocks] + [blocks.clone() for _ in range(-(-l2_bytes // blocks.nbytes) - 1)]
            paths = spec.get("paths", ["fma", "tensor_core", "dp4a"])
            runs = [("fma", 1, gguf_gemv), ("tensor_core", 16, gguf_matmul)]
            runs = [r for r in runs if r[0] in paths]
            x1 = torch.randn(1, k, dtype=dtype, device=dev)
            if "dp4a" in paths and dp4a_supports(x1, blocks, bt.type_id):
                runs += [("dp4a", m, gguf_gemv_dp4a) for m in spec.get("dp4a_rows", (1, 2, 4))]
            if "mma" in paths and mma_supports(x1, blocks, bt.type_id):
                runs += [("mma", m, gguf_mma) for m in spec.get("mma_rows", (8, 16))]
            for kernel, m, fn in runs:
                x = torch.randn(m, k, dtype=dtype, device=dev)
                t = _cold(lambda w, x=x, fn=fn, q=bt.type_id, f=silu: fn(x, w, q, silu_and_mul=f), copies)
                rows.append(
                    {"shape": name, "N": n, "K": k, "type": qtype, "kernel": kernel, "rows": m,
                     "GBps": blocks.nbytes / t / 1e9}
                )  # fmt: skip
                print(f"PROGRESS {name} {qtype} {kernel} rows={m}: {rows[-1]['GBps']:.0f} GB/s "
                      f"({rows[-1]['GBps'] * 1e9 / copy_bw:.2f} of copy)", flush=True)  # fmt: skip
            if name != "lm_head" and spec.get("prefill", True):  # prefill paths at 2048 rows: TFLOP/s
                x = torch.randn(prefill_m, k, dtype=dtype, device=dev)
                flops = 2 * prefill_m * n * k
                t_fused = _timed(lambda x=x, b=blocks, q=bt.type_id: gguf_matmul(x, b, q), 3)
                t_deq = _timed(lambda x=x, b=blocks, q=bt.type_id, k=k: x @ dequantize(b, q, k, dtype).T, 3)
                t_16 = _timed(lambda x=x, w=w16: x @ w.T, 3)
                rows.append(
                    {"shape": name, "type": qtype, "rows": prefill_m, "fused_TFLOPs": flops / t_fused / 1e12,
                     "dequant_cublas_TFLOPs": flops / t_deq / 1e12, "bf16_cublas_TFLOPs": flops / t_16 / 1e12}
                )  # fmt: skip
            del copies, blocks
        del w16
    for r in rows:
        if "GBps" in r:
            r["of_copy"] = r["GBps"] * 1e9 / copy_bw
    return {"kernels": rows}


def part_serve(spec: dict) -> dict:
    from bench_gpu import _random_prompts

    from shardserve import LLM, SamplingParams

    cuda = _cuda()
    if spec.get("row_layout"):
        from shardserve.model_executor.layers.quantization.gguf import GGUFConfig

        GGUFConfig.pack_rows = spec["row_layout"] == "packed"  # this child process only
    kw = dict(
        dtype="bfloat16" if cuda else "float32",
        max_model_len=4096,
        max_num_seqs=16,
        max_num_batched_tokens=spec["prefill_len"],
    )
    if spec["format"] == "bf16":
        kw["load_format"] = "dummy"
    elif not cuda:
        kw["quantization"] = "gguf"  # the CPU default dequantizes at load
    if not cuda:
        kw.update(device="cpu", num_kv_blocks=256)
    t0 = time.perf_counter()
    llm = LLM(spec["path"], **kw)
    res: dict = {"load_s": time.perf_counter() - t0}
    runner = llm.engine.executor.runner
    model = runner.model
    res["weight_bytes"] = model.weight_bytes
    res["weight_allocated_bytes"] = model.weight_allocated_bytes
    res["embed_bytes"] = sum(p.numel() * p.element_size() for p in model.model.embed_tokens.parameters())
    res["kv_cache_tokens"] = runner.num_blocks * runner.block_size
    if spec["format"] == "gguf":
        from shardserve.model_executor.layers.quantization.gguf import gguf_weight_bytes
        from shardserve.model_executor.loader.resolve import open_gguf

        dtype = torch.bfloat16 if cuda else torch.float32
        res["predicted_bytes"] = gguf_weight_bytes(
            open_gguf(spec["path"]), llm.engine.source.arch.num_key_value_heads, 1, dtype
        ).total
    vocab = llm.engine.source.arch.vocab_size
    greedy = dict(temperature=0.0, ignore_eos=True)
    new = spec["new_tokens"]
    llm.generate(_random_prompts(2, 128, vocab, 99), SamplingParams(max_tokens=16, **greedy))  # warm-up
    t0 = time.perf_counter()
    out = llm.generate(_random_prompts(1, 128, vocab, 3), SamplingParams(max_tokens=new, **greedy))[0]
    total = time.perf_counter() - t0
    first = out.metrics.first_token_time - out.metrics.arrival_time if out.metrics else 0.0
    res["batch1_decode_tok_s"] = (len(out.outputs[0].token_ids) - 1) / (total - first)
    res["batch1_tokens"] = out.outputs[0].token_ids[:16]
    if runner.graphs is not None and 1 in runner.graphs.graphs:
        from bench_gpu import _timed_cuda

        res["graph_bs1_forward_ms"] = _timed_cuda(runner.graphs.graphs[1].replay, 50) * 1e3
    t0 = time.perf_counter()
    outs = llm.generate(_random_prompts(16, 128, vocab, 4), SamplingParams(max_tokens=spec["batch_tokens"], **greedy))
    res["batch16_decode_output_tok_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)

    def prefill_rate(seed: int) -> float:
        llm.generate(_random_prompts(1, spec["prefill_len"], vocab, seed + 100), SamplingParams(max_tokens=1))
        times = []
        for p in _random_prompts(3, spec["prefill_len"], vocab, seed):
            t = time.perf_counter()
            llm.generate([p], SamplingParams(max_tokens=1, **greedy))
            times.append(time.perf_counter() - t)
        return spec["prefill_len"] / statistics.median(times)

    res["prefill_tok_s"] = prefill_rate(10)
    qc = model.quant_config
    if qc is not None and qc.name == "gguf" and spec.get("prefill_paths", True):
        from shardserve.model_executor.layers.quantization.gguf_blocks import DEQUANT_MIN_ROWS, GEMV_MAX_ROWS

        res["dequant_min_rows_default"] = DEQUANT_MIN_ROWS
        for mode, rows in (("fused", 10**9), ("dequant_cublas", GEMV_MAX_ROWS + 1)):
            qc.dequant_min_rows = rows
            res[f"prefill_{mode}_tok_s"] = prefill_rate(20 if mode == "fused" else 30)
        qc.dequant_min_rows = DEQUANT_MIN_ROWS
    llm.shutdown()
    return res


PARTS = {"hw": part_hw, "kernels": part_kernels, "serve": part_serve}


# -- driver ----------------------------------------------------------------------------------------


def _child(part: str, spec: dict, timeout: float, env: dict) -> dict:
    """Run one part in a child process; its progress lines (``PROGRESS ...``) are echoed as they come."""
    cmd = [sys.executable, __file__, "--part", part, "--spec", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []

    def pump() -> None:
        for ln in proc.stdout:
            lines.append(ln)
            if ln.startswith("PROGRESS "):
                print(ln[len("PROGRESS ") :], end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        print(f"[{part} {spec.get('label', '')}] timed out after {timeout:.0f} s", flush=True)
        return {"error": "timeout"}
    reader.join(timeout=10)
    stderr = proc.stderr.read()
    line = next((ln for ln in lines if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print("".join(lines)[-3000:], stderr[-6000:], file=sys.stderr)
        print(f"[{part} {spec.get('label', '')}] failed (exit {proc.returncode})", flush=True)
        return {"error": f"exit {proc.returncode}"}
    out = json.loads(line[len("RESULT ") :])
    print(f"[{part} {spec.get('label', '')} done in {time.perf_counter() - t0:.0f} s]", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="Llama-3.1-8B,Llama-3.1-70B")
    ap.add_argument("--skip-70b", action="store_true", help="leave out every 70B part (no 42 GB file)")
    ap.add_argument("--recipes", default="Q4_K_M,Q8_0", help="GGUF recipes for the 8B model")
    ap.add_argument("--recipes-70b", default="Q4_K_M", help="GGUF recipes for the 70B model")
    ap.add_argument("--parts", default="hw,kernels,bf16,gguf")
    ap.add_argument("--kernel-types", default="Q4_K,Q6_K,Q8_0")
    ap.add_argument("--kernel-paths", default="fma,tensor_core,dp4a,mma", help="kernels part: which paths to time")
    ap.add_argument("--dp4a-rows", default="1,2,4", help="kernels part: rows of x for the int8 GEMV")
    ap.add_argument("--mma-rows", default="8,16", help="kernels part: rows of x for the int8 tensor-core kernel")
    ap.add_argument("--no-kernel-prefill", action="store_true", help="kernels part: skip the 2048-row prefill paths")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU: checks the script, not speed")
    ap.add_argument("--workdir", default=None, help="where GGUF files go (default: a temporary directory)")
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument(
        "--no-prefill-paths",
        action="store_true",
        help="serve part: time prefill on the default path only (not fused and dequant+cuBLAS apart)",
    )
    ap.add_argument(
        "--gguf-row-layout",
        default="file",
        help="gguf part: file (file order, as served), packed (GGUFConfig.pack_rows), or file,packed (one load each)",
    )
    ap.add_argument("--part-timeout", type=float, default=1800.0, help="seconds per child process")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:  # child process
        print("RESULT " + json.dumps(PARTS[args.part](json.loads(args.spec))), flush=True)
        return

    from gguf_models import write_llama_gguf
    from model_shapes import write_model_dir

    env = dict(os.environ)
    if args.tiny and not _cuda():
        env.setdefault("TRITON_INTERPRET", "1")  # the kernels part runs under Triton's interpreter
        args.new_tokens, args.prefill_len = min(args.new_tokens, 8), min(args.prefill_len, 64)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_quant_"))
    workdir.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    models = ["tiny"] if args.tiny else [m for m in args.models.split(",") if not (args.skip_70b and "70B" in m)]
    results: dict = {"models": {}}
    hw = _child("hw", {"label": ""}, args.part_timeout, env) if parts & {"hw", "kernels", "gguf", "bf16"} else {}
    results["hw"] = hw
    if "copy_bandwidth_GBps" in hw:
        print(f"device {hw['device']}: copy bandwidth {hw['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
    common = {"new_tokens": args.new_tokens, "prefill_len": args.prefill_len, "batch_tokens": 8 if args.tiny else 64,
              "prefill_paths": not args.no_prefill_paths}  # fmt: skip
    for model in models:
        cfg = _hf_config(model, args.tiny)
        entry: dict = results["models"].setdefault(model, {})
        if "kernels" in parts and "70B" not in model and "copy_bandwidth_GBps" in hw:
            spec = {"label": model, "hf_config": cfg, "copy_bandwidth_GBps": hw["copy_bandwidth_GBps"]}
            spec["types"] = args.kernel_types.split(",")
            spec["paths"] = args.kernel_paths.split(",")
            spec["dp4a_rows"] = [int(r) for r in args.dp4a_rows.split(",")]
            spec["mma_rows"] = [int(r) for r in args.mma_rows.split(",")]
            spec["prefill"] = not args.no_kernel_prefill
            entry["kernels"] = _child("kernels", spec, args.part_timeout, env).get("kernels", [])
            _print_kernels(model, entry["kernels"])
        if "bf16" in parts:
            if "70B" in model:
                print(f"[{model} bf16] skipped: 141 GB of bf16 weights do not fit one GPU", flush=True)
            else:
                hf_dir = write_model_dir(model, workdir / f"{model}-hf", hf_config=cfg)
                spec = {"label": f"{model} bf16", "path": str(hf_dir), "format": "bf16", **common}
                entry["bf16"] = _child("serve", spec, args.part_timeout, env)
                _print_serve(model, "bf16", entry, hw)
        if "gguf" in parts:
            recipes = (args.recipes_70b if "70B" in model else args.recipes).split(",")
            for recipe in recipes:
                path = workdir / f"{model}.{recipe}.gguf"
                written = write_llama_gguf(path, cfg, recipe, log=lambda m: print(m, flush=True))
                print(
                    f"[{model} {recipe}] wrote {_size(written['file_bytes'])} in {written['seconds']:.0f} s: "
                    + ", ".join(f"{t} {_size(b)}" for t, b in sorted(written["bytes_by_type"].items())),
                    flush=True,
                )
                for layout in args.gguf_row_layout.split(","):
                    key = recipe if layout == "file" else f"{recipe} packed"
                    spec = {"label": f"{model} {key}", "path": str(path), "format": "gguf", "row_layout": layout,
                            **common}  # fmt: skip
                    entry[key] = {"file": written, **_child("serve", spec, args.part_timeout, env)}
                    _print_serve(model, key, entry, hw)
                if not args.keep_files:
                    path.unlink(missing_ok=True)
    if not args.keep_files and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    _print_summary(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


def _print_kernels(model: str, rows: list[dict]) -> None:
    for r in rows:
        if "GBps" in r:
            print(
                f"[{model} kernel] {r['shape']} {r['N']}x{r['K']} {r['type']} {r.get('kernel', '')} rows={r['rows']}: "
                f"{r['GBps']:.0f} GB/s of weights = {r['of_copy']:.2f} of copy bandwidth",
                flush=True,
            )
        else:
            print(
                f"[{model} kernel] {r['shape']} {r['type']} prefill rows={r['rows']}: fused {r['fused_TFLOPs']:.0f} "
                f"TFLOP/s, dequant+cuBLAS {r['dequant_cublas_TFLOPs']:.0f}, bf16 cuBLAS {r['bf16_cublas_TFLOPs']:.0f}",
                flush=True,
            )


def _print_serve(model: str, fmt: str, entry: dict, hw: dict) -> None:
    r = entry.get(fmt, {})
    tag = f"[{model} {fmt}]"
    if "batch1_decode_tok_s" not in r:
        print(f"{tag} no result ({r.get('error', 'missing')})", flush=True)
        return
    line = f"{tag} weights held {_size(r['weight_bytes'])}, allocated {_size(r['weight_allocated_bytes'])}"
    if "predicted_bytes" in r:
        line += (
            f", predicted (gguf_weight_bytes) {_size(r['predicted_bytes'])}: allocated / predicted "
            f"{r['weight_allocated_bytes'] / r['predicted_bytes']:.3f} (target within 5%)"
        )
    print(line + f"; KV cache {r['kv_cache_tokens']} tokens; load {r['load_s']:.0f} s", flush=True)
    tok_s = r["batch1_decode_tok_s"]
    line = f"{tag} batch-1 decode {tok_s:.1f} tok/s"
    if "copy_bandwidth_GBps" in hw:
        bw = hw["copy_bandwidth_GBps"] * 1e9
        held, read = bw / r["weight_bytes"], bw / (r["weight_bytes"] - r["embed_bytes"])
        r["bound_held_tok_s"], r["bound_read_tok_s"] = held, read
        line += (
            f"; bound (held bytes) {held:.1f} tok/s -> {tok_s / held:.2f} of bound; "
            f"bound (bytes read per token) {read:.1f} tok/s -> {tok_s / read:.2f}"
        )
    if "graph_bs1_forward_ms" in r:
        line += f"; graph replay {r['graph_bs1_forward_ms']:.2f} ms/step"
    print(line, flush=True)
    bf16 = entry.get("bf16", {}).get("batch1_decode_tok_s")
    if fmt != "bf16" and bf16:
        print(f"{tag} batch-1 decode vs bf16 (same run): {tok_s / bf16:.2f}x", flush=True)
    line = f"{tag} batch-16 decode {r['batch16_decode_output_tok_s']:.0f} output tok/s"
    line += f"; prefill {r['prefill_tok_s']:.0f} tok/s"
    if "prefill_fused_tok_s" in r:
        line += (
            f" (default: dequant+cuBLAS from {r['dequant_min_rows_default']} rows); forced fused tl.dot "
            f"{r['prefill_fused_tok_s']:.0f} tok/s, forced dequant+cuBLAS {r['prefill_dequant_cublas_tok_s']:.0f} tok/s"
        )
    bf16_prefill = entry.get("bf16", {}).get("prefill_tok_s")
    if fmt != "bf16" and bf16_prefill:
        line += f"; bf16 prefill {bf16_prefill:.0f} tok/s"
    print(line, flush=True)


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def _print_summary(results: dict) -> None:
    print("== summary against issue 13's targets")
    for model, entry in results["models"].items():
        bf16 = entry.get("bf16", {}).get("batch1_decode_tok_s")
        for recipe, (vs_bf16, of_bound) in TARGETS.items():
            r = entry.get(recipe, {})
            if "batch1_decode_tok_s" not in r:
                continue
            tok_s = r["batch1_decode_tok_s"]
            parts = [f"{model} {recipe}: batch-1 {tok_s:.1f} tok/s"]
            if bf16 and "70B" not in model:
                ok = "met" if tok_s / bf16 >= vs_bf16 else "MISSED"
                parts.append(f"{tok_s / bf16:.2f}x bf16 (target {vs_bf16}x: {ok})")
            bound = r.get("bound_held_tok_s")
            want = of_bound if "70B" not in model else 0.65
            if bound and want:
                ok = "met" if tok_s / bound >= want else "MISSED"
                parts.append(f"{tok_s / bound:.2f} of bound (target {want}: {ok})")
            if "predicted_bytes" in r:
                ratio = r["weight_allocated_bytes"] / r["predicted_bytes"]
                parts.append(f"allocated/predicted {ratio:.3f} ({'met' if abs(ratio - 1) <= 0.05 else 'MISSED'})")
            print("  " + "; ".join(parts))


if __name__ == "__main__":
    main()
