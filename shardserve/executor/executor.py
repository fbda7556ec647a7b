"""Executors: how the head reaches the model ranks.

``UniProcExecutor`` runs the single rank in the head process (TP = PP = 1).
``MultiprocExecutor`` spawns this node's worker processes and drives every rank of the launch
over the control world (see ``shardserve.executor.worker``). Steps are submitted and collected in
order; up to ``max_in_flight`` steps may be in flight: PP of them so that pipeline stages overlap, or
with PP = 1 two (async scheduling), so that the head schedules step N+1 while step N runs.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from shardserve.config import EngineConfig
from shardserve.distributed import parallel_state as ps
from shardserve.executor.messages import (
    FlushOutputs,
    InitKVCache,
    ModelRunnerOutput,
    ProfileRequest,
    SchedulerOutput,
    Shutdown,
)
from shardserve.executor.rank_info import RankInfo, describe_rank, read_rank_info
from shardserve.executor.supervisor import (
    GENERATION_KEY,
    EngineDeadError,
    IOThread,
    WorkerFailure,
    read_failure_reports,
    root_causes,
)
from shardserve.executor.worker import (
    WorkerArgs,
    async_scheduling_enabled,
    head_rank,
    join_world,
    open_store,
    worker_main,
)

if TYPE_CHECKING:
    from shardserve.model_executor.model_runner import PendingOutput

logger = logging.getLogger(__name__)

RANK_INFO_TIMEOUT_S = 5.0
"""Seconds a status request waits to connect to the launch's store."""

__all__ = ["EngineDeadError", "Executor", "LocalWorkers", "MultiprocExecutor", "UniProcExecutor", "spawn_local_workers"]


class Executor:
    """Interface shared by the executors."""

    max_in_flight: int = 1
    supports_async_scheduling: bool = False
    """Whether steps may carry placeholder inputs that the rank fills from its previous sample."""

    def determine_num_blocks(self) -> int:
        """KV blocks every rank can hold (the minimum over ranks)."""
        raise NotImplementedError

    def init_kv_cache(self, num_blocks: int) -> None:
        raise NotImplementedError

    def submit(self, step: SchedulerOutput) -> None:
        raise NotImplementedError

    def collect(self) -> ModelRunnerOutput:
        """Output of the oldest submitted step (blocks until it is ready).

        Raises:
            EngineDeadError: a rank died, or the step took longer than ``--watchdog-timeout``.
        """
        raise NotImplementedError

    def check_health(self) -> None:
        """Raise :class:`EngineDeadError` if a rank is known to be dead (cheap; called while idle)."""

    def restart(self) -> None:
        """Replace every rank with a fresh process (a new generation); the KV cache must be set up again.

        Raises:
            EngineDeadError: the executor cannot restart, or the new generation failed too.
        """
        raise EngineDeadError(f"{type(self).__name__} cannot restart its model ranks")

    def shutdown(self) -> None:
        pass

    def rank_info(self) -> list[RankInfo]:
        """Each rank's place and resource use as last reported, by rank (see :mod:`shardserve.executor.rank_info`)."""
        return []


class UniProcExecutor(Executor):
    """The model runs in this process."""

    def __init__(self, config: EngineConfig, source):
        from shardserve.model_executor.model_runner import ModelRunner

        device = torch.device(config.model.resolved_device())
        ps.init_single_process(device)
        self.runner = ModelRunner(config, source, device)
        self._outputs: deque[PendingOutput | ModelRunnerOutput | None] = deque()
        # Async scheduling: step N+1 is prepared and launched while step N runs on the device.
        self.supports_async_scheduling = config.scheduler.async_scheduling
        self.max_in_flight = 2 if self.supports_async_scheduling else 1

    def determine_num_blocks(self) -> int:
        return self.runner.available_kv_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def submit(self, step: SchedulerOutput) -> None:
        self._outputs.append(self.runner.execute_async(step))

    def collect(self) -> ModelRunnerOutput:
        out = self._outputs.popleft()
        return out.result() if hasattr(out, "result") else out  # PendingOutput

    def shutdown(self) -> None:
        ps.destroy_model_parallel()

    def rank_info(self) -> list[RankInfo]:
        """The one rank, measured now."""
        return [describe_rank(self.runner, 0, 1)]


@dataclass
class LocalWorkers:
    """Worker processes of one node, in local-rank order."""

    processes: list[mp.Process] = field(default_factory=list)
    node_rank: int = 0
    first_rank: int = 0
    """Global rank of the first process."""

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def dead(self) -> list[tuple[int, int | None]]:
        """(pid, exit code) of the processes that have exited."""
        return [(p.pid, p.exitcode) for p in self.processes if not p.is_alive()]

    def failures(self) -> list[WorkerFailure]:
        """The processes that have exited, with their ranks."""
        return [
            WorkerFailure(self.first_rank + i, self.node_rank, p.pid, p.exitcode)
            for i, p in enumerate(self.processes)
            if not p.is_alive()
        ]

    def stop(self, timeout: float = 10.0) -> None:
        """Wait up to ``timeout`` s for the processes to exit, then kill the rest."""
        deadline = time.monotonic() + timeout
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """SIGKILL every process still running and reap them all (no zombies)."""
        for p in self.processes:
            if p.is_alive():
                p.kill()
        for p in self.processes:
            p.join(5)


def spawn_local_workers(
    config: EngineConfig,
    node_rank: int,
    store_host: str,
    store_port: int,
    generation: int,
    env: dict[str, str] | None = None,
) -> LocalWorkers:
    """Start the worker processes of ``node_rank``: global ranks ``[node_rank * rpn, (node_rank + 1) * rpn)``."""
    rpn = config.parallel.ranks_per_node
    device_type = config.model.resolved_device()
    if device_type == "cuda" and torch.cuda.device_count() < rpn:
        raise ValueError(
            f"node {node_rank} needs {rpn} GPUs (TP x PP / nnodes) but sees {torch.cuda.device_count()}; "
            "check CUDA_VISIBLE_DEVICES or lower --tensor-parallel-size"
        )
    ctx = mp.get_context("spawn")
    workers = LocalWorkers(node_rank=node_rank, first_rank=node_rank * rpn)
    for local_rank in range(rpn):
        args = WorkerArgs(
            config=config,
            rank=node_rank * rpn + local_rank,
            local_rank=local_rank,
            store_host=store_host,
            store_port=store_port,
            generation=generation,
            device_type=device_type,
            log_level=logging.getLogger().getEffectiveLevel(),
            env=env,
        )
        p = ctx.Process(target=worker_main, args=(args,), name=f"shardserve-rank{args.rank}", daemon=True)
        p.start()
        workers.processes.append(p)
    logger.info("generation %d: node %d started ranks %s (pids %s)", generation, node_rank,
                [workers.first_rank + i for i in range(rpn)], [p.pid for p in workers.processes])  # fmt: skip
    return workers


class MultiprocExecutor(Executor):
    """The head's side of a multi-process launch: it schedules, the workers compute.

    Every gloo call runs on an :class:`IOThread` and is waited for in slices with liveness checks;
    a step's output that takes longer than ``--watchdog-timeout`` marks the group as stalled.
    :meth:`restart` starts a new generation of every rank (headless nodes follow the store key).
    """

    REMOTE_CHECK_S = 0.5
    """How often the store is asked for failure reports of other nodes (seconds)."""
    DIAGNOSE_S = 2.0
    """How long to look for the root cause after a gloo call failed (seconds)."""

    def __init__(
        self,
        config: EngineConfig,
        store_host: str,
        store_port: int,
        generation: int = 0,
        env: dict[str, str] | None = None,
    ):
        self.config = config
        par = config.parallel
        # PP: one step per stage in flight. PP = 1: async scheduling, step N+1 is sent while N runs.
        self.supports_async_scheduling = async_scheduling_enabled(config)
        self.max_in_flight = 2 if self.supports_async_scheduling else par.pipeline_parallel_size
        self.head = head_rank(config)
        self.output_rank = (par.pipeline_parallel_size - 1) * par.tensor_parallel_size
        self.store_host, self.store_port, self.env = store_host, store_port, env
        self.generation = generation
        self.store = open_store(store_host, store_port, True, par.rendezvous_timeout)
        self.store.set(GENERATION_KEY, str(generation))
        # A client of its own for failure reports: a store call blocked in the join must not hold up the checks.
        self._reports = open_store(store_host, store_port, False, par.rendezvous_timeout) if par.nnodes > 1 else None
        self._next_remote_check = 0.0
        self._start()

    # -- generations ---------------------------------------------------------------------------
    def _start(self) -> None:
        par = self.config.parallel
        self._steps: deque[int] = deque()
        self._broken = False
        self.workers = self._spawn_workers()
        self._io = IOThread(f"shardserve-gloo-gen{self.generation}")
        logger.info("generation %d: waiting for %d ranks to join the process group", self.generation, par.world_size)
        backend = "nccl" if self.config.model.resolved_device() == "cuda" else "gloo"
        if par.distributed_backend != "auto":
            backend = par.distributed_backend

        def join() -> None:
            join_world(self.config, self.head, self.store, self.generation)
            ps.initialize_model_parallel(
                par.tensor_parallel_size, par.pipeline_parallel_size, self.head, torch.device("cpu"), backend
            )

        self._call(join, "joining the process group", par.rendezvous_timeout)
        logger.info("generation %d: all %d ranks joined", self.generation, par.world_size)

    def _spawn_workers(self) -> LocalWorkers:
        """Start this generation's ranks: the head node's worker processes (the Ray executor starts actors)."""
        return spawn_local_workers(self.config, 0, self.store_host, self.store_port, self.generation, self.env)

    def restart(self) -> None:
        old = self.generation
        self.generation += 1
        # Bump the key first: headless nodes kill their workers, which unblocks any gloo call still pending.
        self.store.set(GENERATION_KEY, str(self.generation))
        self._teardown()
        logger.warning("restarting every rank: generation %d -> %d", old, self.generation)
        self._start()

    def _teardown(self) -> None:
        self._broken = True
        self.workers.kill()
        if not self._io.stop(timeout=10):
            logger.warning("a gloo call of generation %d is still blocked; abandoning its thread", self.generation - 1)
        try:
            ps.destroy_model_parallel()
        except Exception:
            logger.debug("destroy_process_group failed", exc_info=True)

    # -- bounded calls -------------------------------------------------------------------------
    def _call(self, fn, doing: str, timeout: float | None):
        """Run a gloo call with a bound and liveness checks; failures become :class:`EngineDeadError`."""

        def stalled() -> EngineDeadError:
            self._broken = True
            msg = f"generation {self.generation}: no progress for {timeout:.0f} s while {doing} (--watchdog-timeout)"
            logger.error("%s", msg)
            return EngineDeadError(msg)

        try:
            return self._io.call(fn, timeout, lambda: self._check(doing), stalled)
        except EngineDeadError:
            raise
        except Exception as e:  # gloo raises RuntimeError subclasses when a peer goes away
            self._broken = True
            raise self._diagnose(doing, e) from e

    def _failures(self) -> list[WorkerFailure]:
        failures = self.workers.failures()
        if self._reports is not None and time.monotonic() >= self._next_remote_check:
            self._next_remote_check = time.monotonic() + self.REMOTE_CHECK_S
            failures += read_failure_reports(self._reports, self.generation, self.config.parallel.nnodes)
        return failures

    def _check(self, doing: str) -> None:
        failures = self._failures()
        if failures:
            self._broken = True
            raise self._dead_error(failures, doing)

    def _diagnose(self, doing: str, cause: BaseException) -> EngineDeadError:
        """Name the rank that failed: wait briefly for a dead process or a node's report."""
        deadline = time.monotonic() + self.DIAGNOSE_S
        while time.monotonic() < deadline:
            self._next_remote_check = 0.0
            failures = self._failures()
            if failures:
                return self._dead_error(failures, doing)
            time.sleep(0.1)
        msg = f"generation {self.generation}: the control group failed while {doing}: {cause}"
        logger.error("%s", msg)
        return EngineDeadError(msg)

    def _dead_error(self, failures: list[WorkerFailure], doing: str) -> EngineDeadError:
        ordered = root_causes(failures)
        msg = f"{ordered[0].describe()} while the head was {doing} (generation {self.generation})"
        if len(ordered) > 1:
            msg += "; also " + ", ".join(f.describe() for f in ordered[1:])
        logger.error("worker failure: %s", msg)
        return EngineDeadError(msg)

    def check_health(self) -> None:
        if self._broken:
            raise EngineDeadError(f"generation {self.generation} is broken")
        self._check("idle")

    # -- messages ------------------------------------------------------------------------------
    def _broadcast(self, obj) -> None:
        dist.broadcast_object_list([obj], src=self.head)

    def _recv(self, src: int):
        box = [None]
        dist.recv_object_list(box, src=src)
        return box[0]

    def determine_num_blocks(self) -> int:
        world = self.config.parallel.world_size

        def profile() -> list[int]:
            self._broadcast(ProfileRequest())
            return [self._recv(r) for r in range(world)]

        # Workers load the model before they answer: liveness is checked, but no deadline is set.
        counts = self._call(profile, "waiting for the ranks to load the model and size the KV cache", None)
        logger.info("KV blocks per rank: %s; using the minimum", counts)
        return min(counts)

    def init_kv_cache(self, num_blocks: int) -> None:
        self._call(lambda: self._broadcast(InitKVCache(num_blocks)), "allocating the KV cache",
                   self.config.parallel.watchdog_timeout)  # fmt: skip

    def submit(self, step: SchedulerOutput) -> None:
        self._call(lambda: self._broadcast(step), f"sending step {step.step_id}", self.config.parallel.watchdog_timeout)
        self._steps.append(step.step_id)

    def collect(self) -> ModelRunnerOutput:
        step_id = self._steps[0]
        if self.supports_async_scheduling and len(self._steps) == 1:  # no later step released it
            self._call(lambda: self._broadcast(FlushOutputs()), f"asking for step {step_id}",
                       self.config.parallel.watchdog_timeout)  # fmt: skip
        doing = f"waiting for step {step_id} from rank {self.output_rank} (node {self._node_of(self.output_rank)})"
        out = self._call(lambda: self._recv(self.output_rank), doing, self.config.parallel.watchdog_timeout)
        self._steps.popleft()
        return out

    def _node_of(self, rank: int) -> int:
        return rank // self.config.parallel.ranks_per_node

    def rank_info(self) -> list[RankInfo]:
        """What the workers of the current generation last wrote to the store (a client of its own,
        so that a status request never waits behind a blocking store call of the engine)."""
        store = open_store(self.store_host, self.store_port, False, RANK_INFO_TIMEOUT_S)
        return read_rank_info(store, self.generation, self.config.parallel.world_size)

    def shutdown(self) -> None:
        if not self._broken and self.workers.alive():
            try:
                self._call(lambda: self._broadcast(Shutdown()), "shutting down", 10.0)
            except EngineDeadError:
                pass
        self.workers.stop(timeout=10)
        self._io.stop(timeout=1)
        try:
            ps.destroy_model_parallel()
        except Exception:
            logger.debug("destroy_process_group failed", exc_info=True)
