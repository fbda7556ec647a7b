"""Host work per decode step, this tree beside a baseline commit measured in the same run.

A near-zero-compute random model (hidden 64, 2 layers, 8 heads, a 512-token word-level vocabulary,
``--load-format dummy``) decodes with 1, 64 and 256 running requests, in process and with TP=2/4/8, PP=2
and TP=2 x PP=2 worker processes. For each layout it prints, per decode step (medians over the measured
steps), in milliseconds:

- ``step``: wall time of one engine step at the head;
- ``head``: head time not spent waiting for the ranks or the GPU (scheduling, step message, inputs and kernel
  launches in process, bookkeeping, outputs); in process on the CPU, the model's own compute is left out;
- ``worker``: the slowest rank's time per step outside the model (control messages, applying the step,
  inputs, token hand-over), and ``coll``: its time inside the model's collectives;
- ``ctrl``: the control channel alone, from a separate run where every rank answers at once with no model:
  the head sending a step of that many running requests and receiving its output (TP ranks as processes).

The same measurements run on ``--baseline`` (a commit: checked out with ``git worktree`` in a temporary
folder; or a folder holding that commit's tree), through the same wrappers, so the ratios compare like with
like. Each layout runs in a fresh process (``--child``) with the tree on ``PYTHONPATH``; the workers are
timed by a ``sitecustomize`` that this script writes and that the worker processes import at start.

    python benchmarks/bench_host_overhead.py --baseline 3843dbe --json-out host.json
    python benchmarks/bench_host_overhead.py --device cuda --layouts 1x1 --batches 1 256   # GPU, graphs, async
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHAPE = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "model_type": "llama",
}  # fmt: skip
PROMPT_LEN = 16

# Worker-side timing: imported by every process of a child run (through PYTHONPATH), it wraps the step entry
# of the model runner, the model's forward/logits and the process-group collectives, and writes per-step
# figures to $BENCH_HOST_DIR/rank-<pid>.json every 20 steps.
SITECUSTOMIZE = textwrap.dedent("""
    import json, os, sys, time
    if os.environ.get("BENCH_HOST_DIR"):
        import importlib.abc, importlib.util

        def _install():
            import shardserve.distributed.parallel_state as ps
            import shardserve.model_executor.model_runner as mr
            from shardserve.model_executor.models import llama
            stats = {"step": [], "model": [], "coll": []}
            acc = {"model": 0.0, "coll": 0.0}
            def wrap(owner, name, key):
                fn = getattr(owner, name)
                def wrapper(*a, **k):
                    t = time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        acc[key] += time.perf_counter() - t
                setattr(owner, name, wrapper)
            for name in ("forward", "compute_logits"):
                wrap(llama.LlamaForCausalLM, name, "model")
            for name in ("all_reduce", "all_gather", "broadcast", "send", "recv", "isend", "irecv"):
                if hasattr(ps.GroupCoordinator, name):
                    wrap(ps.GroupCoordinator, name, "coll")
            entry = "execute_async" if hasattr(mr.ModelRunner, "execute_async") else "execute"
            step_fn = getattr(mr.ModelRunner, entry)
            def step(self, *a, **k):
                acc["model"] = acc["coll"] = 0.0
                t = time.perf_counter()
                out = step_fn(self, *a, **k)
                stats["step"].append(time.perf_counter() - t)
                stats["model"].append(acc["model"])
                stats["coll"].append(acc["coll"])
                if len(stats["step"]) % 20 == 0:
                    path = os.path.join(os.environ["BENCH_HOST_DIR"], f"rank-{os.getpid()}.json")
                    with open(path + ".tmp", "w") as f:
                        json.dump(stats, f)
                    os.replace(path + ".tmp", path)
                return out
            setattr(mr.ModelRunner, entry, step)

        class _Hook(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "shardserve.model_executor.model_runner" and not getattr(self, "done", False):
                    self.done = True
                    spec = importlib.util.find_spec(name)
                    loader = spec.loader
                    orig = loader.exec_module
                    def exec_module(module):
                        orig(module)
                        _install()
                    loader.exec_module = exec_module
                    return spec
                return None

        sys.meta_path.insert(0, _Hook())
""")


# --------------------------------------------------------------------------------------- child: engine


def child_engine(args) -> dict:
    """One layout and batch on the tree in PYTHONPATH: decode steps through the engine, timed at the head."""
    import shardserve.engine.llm_engine as le
    from shardserve import LLM, SamplingParams

    llm = LLM(
        args.model_dir, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, load_format="dummy",
        dtype="float32" if args.device == "cpu" else "bfloat16", device=args.device,
        num_kv_blocks=max(64, args.batch * 8), block_size=16, max_num_seqs=max(args.batch, 1),
        max_num_batched_tokens=max(2048, args.batch * PROMPT_LEN), max_model_len=PROMPT_LEN + args.steps + 64,
    )  # fmt: skip
    engine = llm.engine
    executor = engine.executor
    waited = [0.0]
    if hasattr(executor, "runner") and args.device == "cpu":  # in process on the CPU: the model runs on the head
        target, names = type(executor.runner.model), ("forward", "compute_logits")
    else:  # worker processes, or a GPU: the head waits in collect() for the ranks or the device
        target, names = type(executor), ("collect",)
    for name in names:
        fn = getattr(target, name)

        def wrapper(*a, _fn=fn, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                waited[0] += time.perf_counter() - t

        setattr(target, name, wrapper)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + args.warmup + 8, ignore_eos=True)
    processor = getattr(llm, "processor", None)
    for i in range(args.batch):
        prompt = [3 + (i * 7 + j) % 500 for j in range(PROMPT_LEN)]
        (req,) = engine.make_requests(f"r{i}", prompt, params)
        if processor is not None:  # this design: text is made outside the engine
            processor.add_request(req.request_id, None, req.prompt_token_ids, req.params, req.arrival_time)
            engine.add_request(req)
        else:
            engine.add_request(req, None)
    step_s, head_s = [], []
    for i in range(args.warmup + args.steps):
        waited[0] = 0.0
        t = time.perf_counter()
        outs = engine.step()
        if processor is not None:
            processor.process(outs, time.monotonic())
        dt = time.perf_counter() - t
        if i >= args.warmup:
            step_s.append(dt)
            head_s.append(dt - waited[0])
    llm.shutdown()
    del le
    return {"step_ms": 1e3 * statistics.median(step_s), "head_ms": 1e3 * statistics.median(head_s)}


# --------------------------------------------------------------------------------------- child: channel


def _peer_new(rank: int, ring, replies: str, steps: int) -> None:
    from shardserve.executor import messages as m
    from shardserve.executor.channel import WorkerChannel

    channel = WorkerChannel(ring, rank, replies)
    channel.send(m.Hello(rank, os.getpid(), "bench"))
    while True:
        msg = channel.recv()
        if isinstance(msg, m.Shutdown):
            break
        if rank == 0:
            n = int(sum(m.as_i32(msg.rows) >= 0))
            channel.send(m.StepOutput(msg.step_id, sampled=m.i32([7] * n)))
    channel.close()


def _peer_old(rank: int, world: int, port: int, steps: int) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from shardserve.executor.messages import ModelRunnerOutput, Shutdown

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world + 1,
                            timeout=timedelta(seconds=120))  # fmt: skip
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=world)
        if isinstance(box[0], Shutdown):
            break
        if rank == 0:
            out = ModelRunnerOutput(box[0].step_id, sampled={r.request_id: 7 for r in box[0].scheduled})
            dist.send_object_list([out], dst=world)
    dist.destroy_process_group()


def _running_steps(batch: int, steps: int):
    """``steps`` decode steps of ``batch`` running requests from the tree's own scheduler (head side)."""
    from shardserve.config import SchedulerConfig
    from shardserve.engine.block_manager import BlockManager
    from shardserve.engine.request import Request
    from shardserve.engine.scheduler import Scheduler
    from shardserve.sampling_params import SamplingParams

    bm = BlockManager(batch * 64, 16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * PROMPT_LEN)),
                      bm, 4096)  # fmt: skip
    for i in range(batch):
        sched.add_request(Request(f"r{i}", list(range(3, 3 + PROMPT_LEN)), SamplingParams(max_tokens=10_000), 10_000))
    return sched, bm


def child_channel(args) -> dict:
    """Round trip of the control path alone: the head sends a step of ``batch`` running requests to ``tp``
    rank processes, rank 0 answers at once; ms per step."""
    import multiprocessing as mp

    import numpy as np

    ctx = mp.get_context("spawn")
    sched, bm = _running_steps(args.batch, args.steps)
    new_design = Path(args.tree, "shardserve", "executor", "channel.py").exists()
    if new_design:
        from shardserve.executor import messages as m
        from shardserve.executor.channel import HeadChannel

        head = HeadChannel("127.0.0.1", args.tp, [])
        procs = [ctx.Process(target=_peer_new, args=(r, head.ring_spec, head.addresses.replies, args.steps))
                 for r in range(args.tp)]  # fmt: skip
        for p in procs:
            p.start()
        for _ in range(args.tp):
            head.recv(120, lambda: None)

        def round_trip(step):
            head.send(step.to_message(bm), 60, lambda: None)
            out = head.recv(60, lambda: None)
            from shardserve.executor.messages import StepOutput

            sched.update_from_output(step, out if isinstance(out, StepOutput) else None)

        def stop():
            head.send(m.Shutdown(), 60, lambda: None)
    else:
        from datetime import timedelta

        import torch.distributed as dist

        from shardserve.distributed.rendezvous import free_port
        from shardserve.executor.messages import Shutdown

        port = free_port()
        procs = [ctx.Process(target=_peer_old, args=(r, args.tp, port, args.steps)) for r in range(args.tp)]
        for p in procs:
            p.start()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=args.tp,
                                world_size=args.tp + 1, timeout=timedelta(seconds=120))  # fmt: skip

        def round_trip(step):
            dist.broadcast_object_list([step], src=args.tp)
            box = [None]
            dist.recv_object_list(box, src=0)
            sched.update_from_output(step, box[0])

        def stop():
            dist.broadcast_object_list([Shutdown()], src=args.tp)

    times = []
    for i in range(args.warmup + args.steps):
        step = sched.schedule()
        t = time.perf_counter()
        round_trip(step)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    stop()
    for p in procs:
        p.join(30)
    del np
    return {"ctrl_ms": 1e3 * statistics.median(times)}


# ------------------------------------------------------------------------------------------- parent


def run_child(tree: Path, kind: str, tp: int, pp: int, batch: int, args, scratch: Path) -> dict:
    stats_dir = Path(tempfile.mkdtemp(dir=scratch))
    # The tree first; other entries kept (site packages carried to the device), but never the other tree.
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(scratch), str(tree), *inherited]),
           "BENCH_HOST_DIR": str(stats_dir)}  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--tree", str(tree), "--tp", str(tp),
           "--pp", str(pp), "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--model-dir", str(args.model_dir)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=tree)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ranks = [json.loads(p.read_text()) for p in stats_dir.glob("rank-*.json")]
    if kind == "engine" and ranks:
        skip = args.warmup
        worker = [statistics.median([s - mm for s, mm in zip(r["step"], r["model"])][skip:] or [0]) for r in ranks]
        coll = [statistics.median(r["coll"][skip:] or [0]) for r in ranks]
        result["worker_ms"], result["coll_ms"] = 1e3 * max(worker), 1e3 * max(coll)
    return result


def baseline_tree(spec: str, scratch: Path) -> tuple[Path, bool]:
    """A folder with the baseline's tree: ``spec`` itself, or a temporary git worktree of that commit."""
    if Path(spec).is_dir():
        return Path(spec).resolve(), False
    path = scratch / f"baseline-{spec}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), spec], check=True,
                   capture_output=True)  # fmt: skip
    return path, True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="3843dbe", help="commit (git worktree) or folder; 'none' to skip")
    ap.add_argument("--layouts", nargs="*", default=["1x1", "2x1", "4x1", "8x1", "1x2", "2x2"], help="TPxPP")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 64, 256])
    ap.add_argument("--channel-tp", type=int, nargs="*", default=[8], help="ranks for the control-path round trip")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tree", default=str(REPO), help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child_engine(args) if args.child == "engine" else child_channel(args)
        print(json.dumps(result))
        return
    scratch = Path(tempfile.mkdtemp(prefix="bench-host-"))
    (scratch / "sitecustomize.py").write_text(SITECUSTOMIZE)
    if args.model_dir is None:
        sys.path.insert(0, str(HERE))
        from model_shapes import write_model_dir

        args.model_dir = write_model_dir("tiny", scratch / "tiny-64", hf_config=SHAPE)
    trees = {"this": REPO}
    cleanup = None
    if args.baseline != "none":
        trees["baseline"], made = baseline_tree(args.baseline, scratch)
        cleanup = trees["baseline"] if made else None
    results: dict = {}
    try:
        for layout in args.layouts:
            tp, pp = map(int, layout.split("x"))
            for batch in args.batches:
                for name, tree in trees.items():
                    r = run_child(tree, "engine", tp, pp, batch, args, scratch)
                    results.setdefault(f"{layout} b{batch}", {})[name] = r
                    print(f"{layout:>4} batch {batch:>3} {name:>8}: {_fmt(r)}", flush=True)
        for tp in args.channel_tp:
            for batch in args.batches:
                for name, tree in trees.items():
                    r = run_child(tree, "channel", tp, 1, batch, args, scratch)
                    results.setdefault(f"ctrl tp{tp} b{batch}", {})[name] = r
                    print(f"ctrl tp{tp} batch {batch:>3} {name:>8}: {_fmt(r)}", flush=True)
    finally:
        if cleanup is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(cleanup)], capture_output=True)
    print_table(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": args.device, "results": results}, indent=1))


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    return "  ".join(f"{k[:-3]} {v:7.3f} ms" for k, v in r.items())


def print_table(results: dict) -> None:
    print("\nms per decode step (medians); ratio = this tree / baseline")
    print(f"{'layout':<14} {'metric':<8} {'this':>9} {'baseline':>9} {'ratio':>7}")
    for key, by_tree in results.items():
        this, base = by_tree.get("this", {}), by_tree.get("baseline", {})
        for metric in ("step_ms", "head_ms", "worker_ms", "coll_ms", "ctrl_ms"):
            if metric not in this:
                continue
            b = base.get(metric)
            ratio = f"{this[metric] / b:7.2f}" if b else "      -"
            bs = f"{b:9.3f}" if b is not None else "        -"
            print(f"{key:<14} {metric[:-3]:<8} {this[metric]:9.3f} {bs} {ratio}")


if __name__ == "__main__":
    main()
