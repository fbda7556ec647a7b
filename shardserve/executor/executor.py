"""Executors: how the head reaches the model ranks.

``UniProcExecutor`` runs the single rank in the head process (TP = PP = 1).
``MultiprocExecutor`` spawns this node's worker processes and drives every rank of the launch
over the control world (see ``shardserve.executor.worker``). Steps are submitted and collected in
order; up to ``max_in_flight`` (= PP) steps may be in flight so that pipeline stages overlap.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shardserve.config import EngineConfig
from shardserve.distributed import parallel_state as ps
from shardserve.executor.messages import InitKVCache, ModelRunnerOutput, ProfileRequest, SchedulerOutput, Shutdown
from shardserve.executor.worker import WorkerArgs, head_rank, join_world, open_store, worker_main

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """A worker died or stopped answering; in-flight requests cannot finish."""


class Executor:
    """Interface shared by the executors."""

    max_in_flight: int = 1

    def determine_num_blocks(self) -> int:
        """KV blocks every rank can hold (the minimum over ranks)."""
        raise NotImplementedError

    def init_kv_cache(self, num_blocks: int) -> None:
        raise NotImplementedError

    def submit(self, step: SchedulerOutput) -> None:
        raise NotImplementedError

    def collect(self) -> ModelRunnerOutput:
        """Output of the oldest submitted step (blocks until it is ready)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


class UniProcExecutor(Executor):
    """The model runs in this process."""

    def __init__(self, config: EngineConfig, source):
        from shardserve.model_executor.model_runner import ModelRunner

        device = torch.device(config.model.resolved_device())
        ps.init_single_process(device)
        self.runner = ModelRunner(config, source, device)
        self._outputs: deque[ModelRunnerOutput] = deque()

    def determine_num_blocks(self) -> int:
        return self.runner.available_kv_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def submit(self, step: SchedulerOutput) -> None:
        self._outputs.append(self.runner.execute(step))

    def collect(self) -> ModelRunnerOutput:
        return self._outputs.popleft()

    def shutdown(self) -> None:
        ps.destroy_model_parallel()


@dataclass
class LocalWorkers:
    """Worker processes of one node."""

    processes: list[mp.Process] = field(default_factory=list)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def dead(self) -> list[tuple[int, int | None]]:
        """(pid, exit code) of the processes that have exited."""
        return [(p.pid, p.exitcode) for p in self.processes if not p.is_alive()]

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.processes:
            p.join(timeout)
        for p in self.processes:
            if p.is_alive():
                p.kill()
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
    workers = LocalWorkers()
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
    return workers


class MultiprocExecutor(Executor):
    """The head's side of a multi-process launch: it schedules, the workers compute."""

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
        self.max_in_flight = par.pipeline_parallel_size
        self.head = head_rank(config)
        self.output_rank = (par.pipeline_parallel_size - 1) * par.tensor_parallel_size
        self.store = open_store(store_host, store_port, True, par.rendezvous_timeout)
        self.workers = spawn_local_workers(config, 0, store_host, store_port, generation, env)
        logger.info("waiting for %d ranks to join the process group", par.world_size)
        join_world(config, self.head, self.store, generation)
        backend = "nccl" if config.model.resolved_device() == "cuda" else "gloo"
        if par.distributed_backend != "auto":
            backend = par.distributed_backend
        ps.initialize_model_parallel(
            par.tensor_parallel_size, par.pipeline_parallel_size, self.head, torch.device("cpu"), backend
        )
        self._in_flight = 0
        logger.info("all %d ranks joined", par.world_size)

    def _broadcast(self, obj) -> None:
        dist.broadcast_object_list([obj], src=self.head)

    def _recv(self, src: int):
        box = [None]
        try:
            dist.recv_object_list(box, src=src)
        except RuntimeError as e:
            raise EngineDeadError(f"rank {src} stopped answering: {e}") from e
        return box[0]

    def determine_num_blocks(self) -> int:
        self._broadcast(ProfileRequest())
        counts = [self._recv(r) for r in range(self.config.parallel.world_size)]
        logger.info("KV blocks per rank: %s; using the minimum", counts)
        return min(counts)

    def init_kv_cache(self, num_blocks: int) -> None:
        self._broadcast(InitKVCache(num_blocks))

    def submit(self, step: SchedulerOutput) -> None:
        self._broadcast(step)
        self._in_flight += 1

    def collect(self) -> ModelRunnerOutput:
        out = self._recv(self.output_rank)
        self._in_flight -= 1
        return out

    def shutdown(self) -> None:
        try:
            if self.workers.alive():
                self._broadcast(Shutdown())
        except RuntimeError:
            pass
        self.workers.stop()
        ps.destroy_model_parallel()
