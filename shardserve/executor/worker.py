"""A worker process: one rank of the TP x PP grid.

Workers are ranks ``0 .. TP x PP - 1`` of their own ``torch.distributed`` world (NCCL on CUDA, gloo on
CPU), which carries only the model's tensors (TP collectives, PP hidden states, sampled tokens). The
head is not part of it: it drives the ranks over the control channel (:mod:`shardserve.executor.channel`),
whose typed messages the worker reads from its node's shared-memory ring and answers on its reply
socket. Any exception that stops the worker is sent to the head as a :class:`WorkerError` first, so the
head can quote it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shardserve.config import EngineConfig
from shardserve.distributed import parallel_state as ps
from shardserve.engine.heap import freeze_startup_heap
from shardserve.executor import messages as m
from shardserve.executor.channel import RingSpec, WorkerChannel, read_addresses
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
    ring: RingSpec
    """The node's control ring (created by the head on its node, by the node's relay elsewhere)."""
    log_level: int = logging.INFO
    env: dict[str, str] | None = None
    """Variables to set before torch.distributed starts (NCCL_SOCKET_IFNAME, ...)."""
    reader_index: int | None = None
    """This rank's reader slot in its node's ring: its position among the node's ranks. None: ``local_rank``
    (worker processes); Ray actors on CPUs all have device index 0, so the Ray executor sets it."""

    def __post_init__(self) -> None:
        if self.reader_index is None:
            self.reader_index = self.local_rank


def open_store(host: str, port: int, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """The TCPStore of the launch: hosted by the head, joined by every worker process."""
    return dist.TCPStore(host, port, is_master=is_master, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def join_world(config: EngineConfig, rank: int, store: dist.Store, generation: int) -> None:
    """Join the ranks' world (TP x PP processes) of one restart generation."""
    dist.init_process_group(
        backend=device_backend(config, "cuda" if config.model.resolved_device() == "cuda" else "cpu"),
        store=dist.PrefixStore(f"shardserve/gen{generation}", store),
        rank=rank,
        world_size=config.parallel.world_size,
        timeout=timedelta(seconds=config.parallel.rendezvous_timeout),
    )


def device_backend(config: EngineConfig, device_type: str) -> str:
    backend = config.parallel.distributed_backend
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    return backend


def describe_exception(e: BaseException) -> str:
    """``Type: message`` and the innermost frames, for the head's error line."""
    frames = traceback.extract_tb(e.__traceback__)[-3:]
    where = "; ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in frames)
    return f"{type(e).__name__}: {e}" + (f" (at {where})" if where else "")


def _watch_parent(rank: int) -> None:
    """Name the process ``shardserve-r{rank}``, exit when its launcher is gone, ignore SIGINT/SIGTERM.

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
    fmt = f"%(asctime)s rank{args.rank} %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level, format=fmt)
    store = open_store(args.store_host, args.store_port, False, args.config.parallel.rendezvous_timeout)
    addresses = read_addresses(store, args.generation)
    channel = WorkerChannel(args.ring, args.reader_index, addresses.replies)
    channel.send(m.Hello(args.rank, os.getpid(), socket.gethostname()))
    try:
        if args.device_type == "cuda":
            torch.cuda.set_device(args.local_rank)
            device = torch.device("cuda", args.local_rank)
        else:
            device = torch.device("cpu")
        if args.config.parallel.world_size > 1:
            join_world(args.config, args.rank, store, args.generation)
        ps.initialize_model_parallel(
            args.config.parallel.tensor_parallel_size,
            args.config.parallel.pipeline_parallel_size,
            args.rank,
            device,
            backend=device_backend(args.config, args.device_type),
        )
        worker = Worker(args.config, device, args.rank, channel)
        ranks_per_node = args.config.parallel.ranks_per_node
        worker.on_status = lambda: publish_rank_info(  # for GET /cluster/status
            store, args.generation, describe_rank(worker.runner, args.rank, ranks_per_node)
        )
        worker.on_status()
        freeze_startup_heap()  # the model and the rank's tables: out of the cyclic collector's scans
        worker.loop()
    except BaseException as e:
        logger.exception("rank %d failed", args.rank)
        channel.send(m.WorkerError(args.rank, describe_exception(e)))
        raise
    finally:
        channel.close()
        ps.destroy_model_parallel()


class Worker:
    """Receives the head's messages and answers them.

    Args:
        channel: anything with ``recv() -> HeadMessage`` and ``send(RankMessage)`` (tests pass a fake).
    """

    on_status: Callable[[], None] = staticmethod(lambda: None)
    """Called after the model is loaded and after the KV cache is allocated (publishes the rank's status)."""

    def __init__(self, config: EngineConfig, device: torch.device, rank: int, channel, runner=None):
        self.config = config
        self.rank = rank
        self.channel = channel
        if runner is None:
            from shardserve.model_executor.loader.resolve import resolve_model
            from shardserve.model_executor.model_runner import ModelRunner

            source = resolve_model(config.model.model, config.model.hf_overrides)
            runner = ModelRunner(config, source, device, rank)
        self.runner = runner
        self.async_outputs = config.scheduler.async_scheduling
        self.recv_s = self.send_s = 0.0
        self._inbox: deque = deque()
        """Messages read while waiting for a grammar bitmask, handled next in order."""

    def _recv(self) -> m.HeadMessage:
        if self._inbox:
            return self._inbox.popleft()
        start = time.perf_counter()
        msg = self.channel.recv()
        self.recv_s += time.perf_counter() - start
        return msg

    def _wait_for_bitmask(self, step_id: int) -> m.GrammarBitmask | None:
        """The head's bitmask for ``step_id``; other messages that come first are kept for later.

        Returns None when a :class:`Shutdown` comes instead (the head stopped before sending it).
        """
        for i, msg in enumerate(self._inbox):
            if isinstance(msg, m.GrammarBitmask) and msg.step_id == step_id:
                del self._inbox[i]
                return msg
        while True:
            start = time.perf_counter()
            msg = self.channel.recv()
            self.recv_s += time.perf_counter() - start
            if isinstance(msg, m.GrammarBitmask) and msg.step_id == step_id:
                return msg
            self._inbox.append(msg)
            if isinstance(msg, m.Shutdown):
                return None

    def _send(self, message: m.RankMessage) -> None:
        start = time.perf_counter()
        self.channel.send(message)
        self.send_s += time.perf_counter() - start

    def loop(self) -> None:
        """Answer messages until :class:`Shutdown`.

        Raises:
            MalformedMessageError: a message that is not a valid head message (the rank stops).
        """
        held: deque = deque()  # output rank, async scheduling: results launched but not yet sent
        runner = self.runner
        while True:
            msg = self._recv()
            if isinstance(msg, m.Step):
                pending = runner.execute(msg)
                if pending is not None and pending is runner.awaiting:  # a grammar step: sample after its bitmask
                    while held:  # the head needs the earlier results before it can fill this bitmask
                        self._send(held.popleft().result())
                    bitmask = self._wait_for_bitmask(msg.step_id)
                    if bitmask is None:
                        continue  # Shutdown is next in the inbox
                    pending = runner.sample_with_bitmask(bitmask)
                if pending is None:
                    if runner.failures:
                        self._send(m.RequestFailed(self.rank, msg.step_id, runner.failures))
                    continue
                held.append(pending)
                limit = 1 if self.async_outputs else 0
                while len(held) > limit:  # step N+1 is launched: N's tokens travel while it runs
                    self._send(held.popleft().result())
            elif isinstance(msg, m.FlushOutputs):
                while held:
                    self._send(held.popleft().result())
            elif isinstance(msg, m.ProfileRequest):
                self._send(m.KVCapacity(self.rank, runner.available_kv_blocks(), runner.model.weight_allocated_bytes))
            elif isinstance(msg, m.InitKVCache):
                runner.init_kv_cache(msg.num_blocks, msg.max_model_len)
                self.on_status()
                self._send(m.Ready(self.rank))
            elif isinstance(msg, m.StatsRequest):
                self._send(self.stats())
            elif isinstance(msg, m.Shutdown):
                return

    def stats(self) -> m.WorkerStats:
        t = self.runner.times
        return m.WorkerStats(
            self.rank, t.num_steps, self.recv_s, t.prepare_s, t.forward_s, ps.CollectiveClock.seconds, t.sample_s,
            self.send_s,
        )  # fmt: skip
