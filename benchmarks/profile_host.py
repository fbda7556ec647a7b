"""Where the head's host time per decode step goes, by phase, for the hidden-64 model of
``bench_host_overhead.py`` (in process; ``--device cuda``: bf16, CUDA graphs, async scheduling).

Prints per phase the median ms per step (scheduling, the step message, the runner's input preparation,
the forward's launch or compute, sampling, waiting in ``collect``, the scheduler's update, the output
processor) and then a cProfile of the measured steps by own time.

    python benchmarks/profile_host.py --device cuda --batches 1 256
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(device: str, batch: int, steps: int, top: int, output_kind: str = "delta") -> None:
    from bench_host_overhead import PROMPT_LEN, SHAPE
    from model_shapes import write_model_dir

    import shardserve.engine.scheduler as sched_mod
    from shardserve import LLM, SamplingParams
    from shardserve.sampling_params import RequestOutputKind

    model_dir = write_model_dir("tiny", Path(tempfile.mkdtemp()) / "tiny-64", hf_config=SHAPE)
    max_model_len = PROMPT_LEN + 2 * steps + 64
    llm = LLM(
        model_dir,
        load_format="dummy",
        dtype="float32" if device == "cpu" else "bfloat16",
        device=device,
        num_kv_blocks=batch * -(-max_model_len // 16) + 16,
        block_size=16,
        max_num_seqs=batch,
        max_num_batched_tokens=max(2048, batch * PROMPT_LEN),
        max_model_len=max_model_len,
    )  # no preemption
    engine, processor = llm.engine, llm.processor
    times: dict[str, list[float]] = {}

    def wrap(owner, name, key):
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times.setdefault(key, []).append(time.perf_counter() - t)

        setattr(owner, name, wrapper)

    runner = engine.executor.runner
    wrap(type(runner.model), "forward", "forward")
    wrap(type(runner.model), "compute_logits", "logits")
    if runner.graphs is not None:
        wrap(runner.graphs, "run", "graph_replay")
    wrap(runner.batch, "prepare", "prepare")
    wrap(runner, "_sample", "sample")
    wrap(runner, "_apply_diff", "apply_diff")
    wrap(engine.scheduler, "schedule", "schedule")
    wrap(engine.scheduler, "update_from_output", "update")
    wrap(sched_mod.SchedulerOutput, "to_message", "to_message")
    wrap(engine.executor, "submit", "submit")
    wrap(engine.executor, "collect", "collect")
    wrap(processor, "process", "outputs")
    kind = RequestOutputKind.FINAL_ONLY if output_kind == "final" else RequestOutputKind.DELTA
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 16, ignore_eos=True, output_kind=kind)
    for i in range(batch):
        (req,) = engine.make_requests(f"r{i}", [3 + (i * 7 + j) % 500 for j in range(PROMPT_LEN)], params)
        processor.add_request(req.request_id, None, req.prompt_token_ids, req.params, req.arrival_time)
        engine.add_request(req)
    for _ in range(8):
        processor.process(engine.step(), time.monotonic())
    times.clear()
    wall = []
    for _ in range(steps):
        t = time.perf_counter()
        processor.process(engine.step(), time.monotonic())
        wall.append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    head = 1e3 * statistics.median([w - c for w, c in zip(wall, times.get("collect", [0.0] * steps))])
    print(f"\n== {device}, {batch} running: step {1e3 * statistics.median(wall):.3f} ms, head {head:.3f} ms")
    print("   " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        processor.process(engine.step(), time.monotonic())
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument(
        "--output-kind",
        choices=["delta", "final"],
        default="delta",
        help="delta: streamed, as bench_host_overhead.py; final: one output per request, as LLM.generate",
    )
    args = ap.parse_args()
    for b in args.batches:
        run(args.device, b, args.steps, args.top, args.output_kind)


if __name__ == "__main__":
    main()
