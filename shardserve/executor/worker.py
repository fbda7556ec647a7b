"""A worker process: one rank of the TP x PP grid.

The head (scheduler + HTTP) joins ``torch.distributed`` as one extra rank, ``world_size`` = TP x PP,
with no device; workers are ranks ``0 .. TP x PP - 1`` on the rank grid. Control messages travel on
the default gloo group (head broadcasts each step; the output rank sends results to the head);
tensors travel on the TP and PP device groups (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shardserve.config import EngineConfig
from shardserve.distributed import parallel_state as ps
from shardserve.executor.messages import FlushOutputs, InitKVCache, ProfileRequest, SchedulerOutput, Shutdown
from shardserve.executor.rank_info import describe_rank, publish_rank_info

logger = logging.getLogger(__name__)


@dataclass
class WorkerArgs:
    """Everything a worker process needs to join the launch."""

    config: EngineConfig
    rank: int
    """Global rank on the grid (0 .. TP x PP - 1)."""
    local_rank: int
    """Index of this worker's device on its node."""
    store_host: str
    store_port: int
    generation: int
    """Restart generation: each (re)start forms a fresh process group under its own store prefix."""
    device_type: str
    """cuda or cpu."""
    log_level: int = logging.INFO
    env: dict[str, str] | None = None
    """Variables to set before torch.distributed starts (NCCL_SOCKET_IFNAME, ...)."""


def head_rank(config: EngineConfig) -> int:
    """Global rank of the head in the control world (one past the last worker)."""
    return config.parallel.world_size


def open_store(host: str, port: int, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """The TCPStore of the launch: hosted by the head, joined by every worker process."""
    return dist.TCPStore(host, port, is_master=is_master, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def join_world(config: EngineConfig, rank: int, store: dist.TCPStore, generation: int) -> None:
    """Join the control world (workers + head, gloo) of one restart generation."""
    dist.init_process_group(
        backend="gloo",
        store=dist.PrefixStore(f"shardserve/gen{generation}", store),
        rank=rank,
        world_size=config.parallel.world_size + 1,
        timeout=timedelta(seconds=config.parallel.rendezvous_timeout),
    )


def async_scheduling_enabled(config: EngineConfig) -> bool:
    """Whether a multi-process launch schedules step N+1 while N runs: asked for, and PP = 1 (the first
    stage could not fill the next step's inputs from a sample taken on the last)."""
    return config.scheduler.async_scheduling and config.parallel.pipeline_parallel_size == 1


def _result(out):
    """A step's :class:`ModelRunnerOutput`, waiting for its tokens if they are still being copied."""
    return out.result() if hasattr(out, "result") else out


def device_backend(config: EngineConfig, device_type: str) -> str:
    backend = config.parallel.distributed_backend
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    return backend


def _watch_parent(rank: int) -> None:
    """Name the process ``shardserve-r{rank}`` (as ``ps`` shows it), exit when its launcher is gone, ignore SIGINT/SIGTERM.

    A launcher killed with SIGKILL cannot stop its children; the orphan notices that it was re-parented.
    (PR_SET_PDEATHSIG would fire when the spawning *thread* ends, which the head's loader thread does.)
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        logger.error("rank %d: the launcher process (pid %d) is gone; exiting", rank, parent)
        os._exit(1)

    threading.Thread(target=watch, name="shardserve-parent-watch", daemon=True).start()
    # Ctrl-C and systemd reach the whole process group: the launcher decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/comm", "w") as f:
                f.write(f"shardserve-r{rank}"[:15])
        except OSError:
            pass


def worker_main(args: WorkerArgs) -> None:
    """Entry point of a worker process."""
    _watch_parent(args.rank)
    os.environ.update(args.env or {})
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s rank{args.rank} %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.config.parallel.ranks_per_node)))
    if args.device_type == "cuda":
        torch.cuda.set_device(args.local_rank)
        device = torch.device("cuda", args.local_rank)
    else:
        device = torch.device("cpu")
    store = open_store(args.store_host, args.store_port, False, args.config.parallel.rendezvous_timeout)
    join_world(args.config, args.rank, store, args.generation)
    try:
        ps.initialize_model_parallel(
            args.config.parallel.tensor_parallel_size,
            args.config.parallel.pipeline_parallel_size,
            args.rank,
            device,
            backend=device_backend(args.config, args.device_type),
        )
        worker = Worker(args.config, device)
        worker.on_status = lambda: publish_rank_info(  # for GET /cluster/status
            store, args.generation, describe_rank(worker.runner, args.rank, args.config.parallel.ranks_per_node)
        )
        worker.on_status()
        worker.loop()
    finally:
        ps.destroy_model_parallel()


class Worker:
    """Receives the head's messages and answers them."""

    on_status: Callable[[], None] = staticmethod(lambda: None)
    """Called after the model is loaded and after the KV cache is allocated (publishes the rank's status)."""

    def __init__(self, config: EngineConfig, device: torch.device):
        from shardserve.model_executor.loader.resolve import resolve_model
        from shardserve.model_executor.model_runner import ModelRunner

        self.config = config
        self.head = head_rank(config)
        source = resolve_model(config.model.model, config.model.hf_overrides)
        self.runner = ModelRunner(config, source, device)
        self.async_outputs = async_scheduling_enabled(config)

    def _recv(self):
        box = [None]
        dist.broadcast_object_list(box, src=self.head)
        return box[0]

    def _send(self, obj) -> None:
        dist.send_object_list([obj], dst=self.head)

    def loop(self) -> None:
        held = deque()  # async scheduling: results launched but not yet sent (output rank only)
        while True:
            msg = self._recv()
            if isinstance(msg, SchedulerOutput):
                if not self.async_outputs:
                    out = self.runner.execute(msg)
                    if out is not None:
                        self._send(out)
                    continue
                out = self.runner.execute_async(msg)
                if out is not None:
                    held.append(out)
                while len(held) > 1:  # step N+1 is launched: N's tokens travel while it runs
                    self._send(_result(held.popleft()))
            elif isinstance(msg, FlushOutputs):
                while held:
                    self._send(_result(held.popleft()))
            elif isinstance(msg, ProfileRequest):
                self._send(self.runner.available_kv_blocks())
            elif isinstance(msg, InitKVCache):
                self.runner.init_kv_cache(msg.num_blocks)
                self.on_status()
            elif isinstance(msg, Shutdown):
                return
            else:
                raise TypeError(f"unknown control message {type(msg).__name__}")
