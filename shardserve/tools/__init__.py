"""Operator tools: ``shardserve plan`` (capacity planner), ``shardserve netbench`` (interconnect benchmark),
``shardserve doctor`` (pre-launch checks, logic in :mod:`shardserve.tools.doctor`) and ``shardserve status``
(a running launch, in :mod:`shardserve.tools.status`).

The command bodies here only parse options and render; the logic is in :mod:`shardserve.tools.plan`
and :mod:`shardserve.tools.netbench`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

MAX_TABLE_ROWS = 15


def register(app: typer.Typer) -> None:
    """Add the ``plan`` and ``netbench`` commands to the main CLI app."""
    app.command("plan")(plan_command)
    app.command("netbench")(netbench_command)
    app.command("doctor")(doctor_command)
    from shardserve.tools.status import status_command

    app.command("status")(status_command)
    from shardserve.tools.bench_serve import bench_app

    app.add_typer(bench_app, name="bench")


# ----------------------------------------------------------------------------- plan


def plan_command(
    model: str = typer.Argument(
        ...,
        help="Built-in name (llama-3.1-70b, meta-llama/Llama-3.1-70B-Instruct, ...-Q4_K_S), .gguf file, "
        "HF directory, or hub id in the local HF cache.",
    ),
    gpu_memory: Optional[str] = typer.Option(None, help="Memory per GPU, e.g. 80GB or 24GiB (default: from --gpu)."),
    gpus_per_node: int = typer.Option(8, help="GPUs in each node."),
    nodes: Optional[int] = typer.Option(None, help="Nodes available (default: search up to 16)."),
    max_model_len: int = typer.Option(8192, help="Tokens each sequence must reach (prompt + output)."),
    max_num_seqs: int = typer.Option(64, help="Concurrent sequences wanted at --max-model-len."),
    dtype: str = typer.Option(
        "bf16", help="serve's --dtype (bf16, fp16, fp32): activations, unquantized weights and the KV cache."
    ),
    weight_dtype: Optional[str] = typer.Option(
        None,
        help="How a built-in model's checkpoint is stored: bf16, fp8 (an FP8 checkpoint), a GGML type (q8_0) or a "
        "llama.cpp file type (Q4_K_S, Q4_K_M, Q5_K_M, Q6_K: the GGUF file llama-quantize writes) "
        "(default: the name's quant suffix, else bf16).",
    ),
    quantization: Optional[str] = typer.Option(
        None,
        "--quantization",
        "-q",
        help="serve's --quantization: gguf (keep GGUF blocks, also on --device cpu) or fp8 (quantize a bf16 "
        "checkpoint at load); default: the checkpoint's own (GGUF blocks on CUDA, FP8 checkpoints in FP8).",
    ),
    kv_cache_dtype: str = typer.Option("auto", help="serve's --kv-cache-dtype: auto (--dtype) or fp8 (1 byte)."),
    device: str = typer.Option("cuda", help="The device serve runs on: cuda, or cpu (dequantizes GGUF and FP8)."),
    gpu: Optional[str] = typer.Option(
        None, help="GPU model for memory and HBM bandwidth: H100, H200, A100-80, L40S, RTX 4090, RTX 3090 Ti."
    ),
    hbm_bandwidth: Optional[float] = typer.Option(None, help="HBM bandwidth in TB/s (overrides --gpu)."),
    gpu_memory_utilization: float = typer.Option(0.9, help="Fraction of GPU memory shardserve may use."),
    max_num_batched_tokens: int = typer.Option(2048, help="Tokens per forward, for the activation estimate."),
    activation_reserve: Optional[str] = typer.Option(
        None, help="Per-GPU reserve for activations and runtime, e.g. 2GB (default: estimated)."
    ),
    netbench_json: Optional[Path] = typer.Option(
        None, help="Output of `shardserve netbench --json` for communication times."
    ),
    inter_node_gbps: Optional[float] = typer.Option(
        None, help="Inter-node bandwidth in Gb/s (default: from --netbench-json)."
    ),
    tp: Optional[int] = typer.Option(None, help="Also evaluate this tensor-parallel size."),
    pp: Optional[int] = typer.Option(None, help="Also evaluate this pipeline-parallel size."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of tables."),
) -> None:
    """Plan TP x PP for a model on given GPUs: memory per rank, KV capacity, decode bound, warnings.

    Exits 1 when no layout holds the model (or the --tp/--pp layout does not).
    """
    from shardserve.tools import plan as planner
    from shardserve.tools.netbench import NetbenchReport
    from shardserve.tools.plan_weights import load_model_weights

    try:
        spec = planner.find_gpu(gpu) if gpu else None
        if gpu_memory is None and spec is None:
            raise ValueError("give --gpu-memory (e.g. 80GB) or --gpu")
        inputs = planner.PlanInputs(
            gpu_memory_bytes=planner.parse_bytes(gpu_memory) if gpu_memory else spec.memory_bytes,
            gpus_per_node=gpus_per_node,
            nodes=nodes,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            dtype=dtype,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            device=device,
            compute_capability=spec.compute_capability if spec else None,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_batched_tokens=max_num_batched_tokens,
            activation_reserve_bytes=planner.parse_bytes(activation_reserve) if activation_reserve else None,
            hbm_bandwidth=hbm_bandwidth * 1e12 if hbm_bandwidth else (spec.hbm_bandwidth if spec else None),
            inter_node_gbps=inter_node_gbps,
            netbench=NetbenchReport.load_json(netbench_json) if netbench_json else None,
            tp=tp,
            pp=pp,
        )
        weights = load_model_weights(model, weight_dtype)
        report = planner.make_plan(weights, inputs)
    except (ValueError, OSError) as e:
        raise typer.BadParameter(str(e)) from e
    console = Console()
    if json_out:
        console.print_json(json.dumps(report.to_dict()))
    else:
        _render_plan(console, report)
    if not report.fits:
        raise typer.Exit(1)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def _render_plan(console: Console, report) -> None:
    from shardserve.tools.plan import recommendation_key

    fitting = sorted((p for p in report.layouts if p.fits), key=recommendation_key)
    rows = fitting or sorted(report.layouts, key=lambda p: -p.kv_cache_bytes_per_rank)[:8]
    if report.chosen is not None and report.chosen not in rows:
        rows = [report.chosen, *rows]
    table = Table(
        title=f"{report.model}: weights {_gb(report.weight_bytes)} GB, KV {report.kv_bytes_per_token} B/token"
    )
    for col in (
        "TP",
        "PP",
        "GPUs",
        "nodes",
        "weights/GPU GB",
        "KV/GPU GB",
        "seqs",
        "decode tok/s",
        "comm ms/tok",
        "note",
    ):
        table.add_column(col, justify="left" if col == "note" else "right")
    for p in rows[:MAX_TABLE_ROWS]:
        notes = []
        if p is report.recommended:
            notes.append("[bold green]recommended[/]")
        if p is report.recommended_full_batch and p is not report.recommended:
            notes.append("[green]fewest GPUs for --max-num-seqs[/]")
        if p is report.chosen:
            notes.append("chosen")
        if p.tp_crosses_nodes:
            notes.append("[red]TP crosses nodes[/]")
        if not p.fits:
            notes.append("[red]does not fit[/]")
        comm = (p.allreduce_s_per_token or 0) + (p.p2p_s_per_token or 0)
        table.add_row(
            str(p.tp),
            str(p.pp),
            str(p.num_gpus),
            str(p.num_nodes),
            _gb(p.max_weight_bytes_per_rank),
            _gb(max(0, p.kv_cache_bytes_per_rank)),
            str(p.max_concurrent_seqs),
            f"{1 / p.decode_s_per_token:.1f}" if p.decode_s_per_token else "-",
            f"{comm * 1e3:.2f}" if p.allreduce_s_per_token is not None or p.p2p_s_per_token is not None else "-",
            ", ".join(notes),
        )
    console.print(table)
    if len(rows) > MAX_TABLE_ROWS:
        console.print(f"({len(rows) - MAX_TABLE_ROWS} more layouts fit; --json lists all)")
    rec = report.recommended
    if rec is not None:
        console.print(
            f"[bold]Recommendation:[/] --tensor-parallel-size {rec.tp} --pipeline-parallel-size {rec.pp}"
            f" ({rec.num_gpus} GPU(s) on {rec.num_nodes} node(s))"
        )
    for line in report.reasoning:
        console.print(f"  - {line}")
    for line in report.warnings:
        console.print(f"[bold yellow]warning:[/] {line}")


# ----------------------------------------------------------------------------- netbench


def _size(text: str) -> int:
    """Bytes from ``4096``, ``64KiB`` or ``1GiB`` (a bare number is bytes here)."""
    from shardserve.tools.plan import parse_bytes

    return int(text) if text.strip().isdigit() else parse_bytes(text)


def netbench_command(
    nproc: Optional[int] = typer.Option(
        None, help="Local processes, one GPU each on CUDA (default: all GPUs, or 2 on CPU)."
    ),
    device: str = typer.Option("auto", help="auto, cuda (NCCL) or cpu (gloo)."),
    min_bytes: str = typer.Option("8", help="Smallest message (bytes, or e.g. 1KiB)."),
    max_bytes: Optional[str] = typer.Option(None, help="Largest message (default 1GiB on GPU, 64MiB on CPU)."),
    factor: int = typer.Option(2, help="Size multiplier between points."),
    ops: str = typer.Option("all_reduce,all_gather,reduce_scatter,sendrecv", help="Comma-separated operations."),
    iters: int = typer.Option(20, help="Timed iterations per point."),
    warmup: int = typer.Option(5, help="Untimed iterations per point."),
    simulated_nodes: int = typer.Option(1, help="Split the local processes into this many pretend nodes."),
    init_timeout: float = typer.Option(60.0, help="Seconds to wait for the process group (and any collective)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Write a bus-bandwidth plot (PNG) here."),
) -> None:
    """Measure all_reduce / all_gather / reduce_scatter / sendrecv bandwidth (nccl-tests busbw/algbw)."""
    from shardserve.tools import netbench as nb

    if nproc is None:
        nproc = max(2, nb.torch.cuda.device_count()) if device != "cpu" else 2
    try:
        launch = nb.LocalLaunch(
            nproc=nproc,
            device=device,
            ops=tuple(o.strip() for o in ops.split(",") if o.strip()),
            iters=iters,
            warmup=warmup,
            simulated_nodes=simulated_nodes,
            init_timeout_s=init_timeout,
        )
        default_max = nb.DEFAULT_MAX_BYTES_GPU if launch.resolved_device() == "cuda" else nb.DEFAULT_MAX_BYTES_CPU
        launch.sizes = tuple(nb.message_sizes(_size(min_bytes), _size(max_bytes) if max_bytes else default_max, factor))
        report = nb.launch_local(launch)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    _render_netbench(Console(), report)
    if json_path:
        report.save_json(json_path)
    if plot:
        nb.save_plot(report, plot)


def _render_netbench(console: Console, report) -> None:
    from shardserve.tools.netbench import format_size

    table = Table(
        title=f"netbench: {report.backend} on {report.device}, {report.world_size} ranks, {report.nnodes} node(s); "
        "time in us, bandwidth in GB/s",
        box=box.SIMPLE_HEAD,
    )
    for col in ("group", "op", "n", "size", "time", "algbw", "busbw"):
        table.add_column(col, justify="left" if col in ("group", "op") else "right", no_wrap=True)
    for r in report.results:
        table.add_row(
            r.group,
            r.op,
            str(r.group_size),
            format_size(r.size_bytes),
            f"{r.time_us:.1f}",
            f"{r.algbw_gb_s:.3f}",
            f"{r.busbw_gb_s:.3f}",
        )
    console.print(table)
    console.print("busbw as defined in https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md")


# ----------------------------------------------------------------------------- doctor

_STATUS_STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}


def doctor_command(
    model: Optional[str] = typer.Argument(
        None, help="As for serve: GGUF file, HF directory or hub id (default: embedded model)."
    ),
    tensor_parallel_size: int = typer.Option(
        1, "--tensor-parallel-size", "-tp", help="TP ranks per stage, as for serve."
    ),
    pipeline_parallel_size: Optional[int] = typer.Option(
        None, "--pipeline-parallel-size", "-pp", help="Pipeline stages (default: one per node)."
    ),
    device: str = typer.Option("auto", help="auto, cuda or cpu, as for serve."),
    nnodes: Optional[int] = typer.Option(None, help="Nodes in the launch (default: from the scheduler's env)."),
    node_rank: Optional[int] = typer.Option(None, help="This node's rank; 0 is the head."),
    master_addr: Optional[str] = typer.Option(None, help="Head node address."),
    master_port: Optional[int] = typer.Option(None, help="Head node rendezvous port (the next port is used too)."),
    timeout: float = typer.Option(
        60.0, help="Seconds each cross-node step may wait (reaching the head, rendezvous, all-reduce)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
) -> None:
    """Check this node (or, run on every node with the same flags, the whole launch) before `serve`."""
    import os

    from shardserve.distributed.launch import discover_launch
    from shardserve.tools.doctor import Plan
    from shardserve.tools.doctor_cluster import run_doctor

    try:
        launch = discover_launch(
            os.environ, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port
        )
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
        if timeout <= 0 or tensor_parallel_size < 1 or (pipeline_parallel_size or 1) < 1:
            raise ValueError("--timeout, -tp and -pp must be positive")
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    plan = Plan(launch, tensor_parallel_size, pipeline_parallel_size or launch.nnodes, device, model, timeout)
    report = run_doctor(plan)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _render_doctor(Console(), report)
    if report.failed:
        raise typer.Exit(1)


def _render_doctor(console: Console, report) -> None:
    table = Table(
        title=f"shardserve doctor: node {report.node_rank} of {report.nnodes}, TP {report.tp} x PP {report.pp}",
        box=box.SIMPLE_HEAD,
    )
    for col in ("node", "check", "status", "detail", "fix"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        style = _STATUS_STYLE.get(c.status, "")
        table.add_row("all" if c.node is None else str(c.node), c.name, f"[{style}]{c.status}[/]", c.detail, c.fix)
    console.print(table)
    counts = {s: sum(c.status == s for c in report.checks) for s in _STATUS_STYLE}
    console.print(f"{counts['PASS']} passed, {counts['WARN']} warning(s), {counts['FAIL']} failure(s)")
