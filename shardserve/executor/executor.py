"""Executors: how the head reaches the model ranks.

``UniProcExecutor`` runs the single rank in the head process (TP = PP = 1). ``MultiprocExecutor`` spawns
this node's worker processes and drives every rank of the launch over the control channel
(:mod:`shardserve.executor.channel`). Steps are submitted and collected in order; up to
``max_in_flight`` may be in flight: PP of them so that the stages overlap, plus one with async
scheduling, so that the head schedules step N+1 while step N runs.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from shardserve.config import EngineConfig
from shardserve.distributed import parallel_state as ps
from shardserve.distributed.shm_ring import RingTimeoutError
from shardserve.executor import messages as m
from shardserve.executor.channel import HeadChannel, RingSpec, publish_addresses
from shardserve.executor.rank_info import RankInfo, describe_rank, read_rank_info
from shardserve.executor.supervisor import (
    GENERATION_KEY,
    EngineDeadError,
    WorkerFailure,
    read_failure_reports,
    root_causes,
)
from shardserve.executor.worker import WorkerArgs, open_store, worker_main

logger = logging.getLogger(__name__)

RANK_INFO_TIMEOUT_S = 5.0
"""Seconds a status request waits to connect to the launch's store."""

__all__ = ["EngineDeadError", "Executor", "LocalWorkers", "MultiprocExecutor", "UniProcExecutor", "spawn_local_workers"]


def max_steps_in_flight(config: EngineConfig) -> int:
    """Steps the head keeps going: one per pipeline stage, and one more with async scheduling.

    This is the one place that turns ``--async-scheduling`` on or off for every executor.
    """
    return config.parallel.pipeline_parallel_size + (1 if config.scheduler.async_scheduling else 0)


class Executor:
    """Interface shared by the executors."""

    max_in_flight: int = 1
    async_scheduling: bool = False
    """Whether steps may be scheduled before the previous step's sample is back (the ranks fill it in)."""
    weight_bytes_per_rank: tuple[int, ...] = ()
    """Bytes each rank's weights take on its device, by rank (set by :meth:`determine_num_blocks`)."""

    def determine_num_blocks(self) -> int:
        """KV blocks every rank can hold (the minimum over ranks)."""
        raise NotImplementedError

    def init_kv_cache(self, num_blocks: int, max_model_len: int) -> None:
        raise NotImplementedError

    def submit(self, step: m.Step) -> None:
        raise NotImplementedError

    def send_grammar_bitmask(self, bitmask: m.GrammarBitmask) -> None:
        """Deliver the bitmask a submitted step with ``grammar`` set waits for before it samples."""
        raise NotImplementedError

    def collect(self) -> m.StepOutput:
        """Output of the oldest submitted step (blocks until it is ready).

        Raises:
            EngineDeadError: a rank died, or the step took longer than ``--watchdog-timeout``.
        """
        raise NotImplementedError

    def take_failures(self) -> list[m.RequestFailure]:
        """Requests that ranks other than the output rank reported failed since the last call."""
        return []

    def check_health(self) -> None:
        """Raise :class:`EngineDeadError` if a rank is known to be dead (cheap; called while idle)."""

    def restart(self) -> None:
        """Replace every rank with a fresh process (a new generation); the KV cache must be set up again.

        Raises:
            EngineDeadError: the executor cannot restart, or the new generation failed too.
        """
        raise EngineDeadError(f"{type(self).__name__} cannot restart its model ranks")

    def worker_stats(self) -> list[m.WorkerStats]:
        """Each rank's host timings so far (benchmarks)."""
        return []

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
        self._pending: deque = deque()
        self._queued: deque[m.Step] = deque()
        """Steps submitted while a grammar step waits for its bitmask: they run after it, as on a rank."""
        self.async_scheduling = config.scheduler.async_scheduling
        self.max_in_flight = max_steps_in_flight(config)

    def determine_num_blocks(self) -> int:
        self.weight_bytes_per_rank = (self.runner.model.weight_allocated_bytes,)
        return self.runner.available_kv_blocks()

    def init_kv_cache(self, num_blocks: int, max_model_len: int) -> None:
        self.runner.init_kv_cache(num_blocks, max_model_len)

    def submit(self, step: m.Step) -> None:
        if self.runner.awaiting is not None:
            self._queued.append(step)
            return
        self._pending.append(self.runner.execute(step))

    def send_grammar_bitmask(self, bitmask: m.GrammarBitmask) -> None:
        index = next(i for i, p in enumerate(self._pending) if p is self.runner.awaiting)
        self._pending[index] = self.runner.sample_with_bitmask(bitmask)
        while self._queued and self.runner.awaiting is None:
            self._pending.append(self.runner.execute(self._queued.popleft()))

    def collect(self) -> m.StepOutput:
        if self._pending and self._pending[0] is self.runner.awaiting:
            raise RuntimeError(f"step {self.runner.awaiting.step_id} is collected before its grammar bitmask was sent")
        return self._pending.popleft().result()

    def worker_stats(self) -> list[m.WorkerStats]:
        t = self.runner.times
        return [m.WorkerStats(0, t.num_steps, 0.0, t.prepare_s, t.forward_s, ps.CollectiveClock.seconds,
                              t.sample_s, 0.0)]  # fmt: skip

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
    ring: RingSpec,
    env: dict[str, str] | None = None,
) -> LocalWorkers:
    """Start the worker processes of ``node_rank``: global ranks ``[node_rank * rpn, (node_rank + 1) * rpn)``.

    Raises:
        ValueError: the node has fewer GPUs than ranks.
    """
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
            ring=ring,
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

    Every wait on the channel is bounded and checks liveness every ``POLL_S``: the head's own worker
    processes, and the failure reports other nodes leave in the store; a step's output that takes longer
    than ``--watchdog-timeout`` marks the group as stalled. :meth:`restart` starts a new generation of
    every rank (headless nodes follow the store key).
    """

    REMOTE_CHECK_S = 0.5
    """How often the store is asked for failure reports of other nodes (seconds)."""
    DIAGNOSE_S = 2.0
    """How long to look for a root cause elsewhere when the failures seen are only knock-on exits (seconds)."""

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
        self.async_scheduling = config.scheduler.async_scheduling
        self.max_in_flight = max_steps_in_flight(config)
        self.output_rank = (par.pipeline_parallel_size - 1) * par.tensor_parallel_size
        self.store_host, self.store_port, self.env = store_host, store_port, env
        self.generation = generation
        self.store = open_store(store_host, store_port, True, par.rendezvous_timeout)
        self.store.set(GENERATION_KEY, str(generation))
        # A client of its own for failure reports, so that a status request never waits behind the engine.
        self._reports = open_store(store_host, store_port, False, par.rendezvous_timeout) if par.nnodes > 1 else None
        self._next_remote_check = 0.0
        self.channel: HeadChannel | None = None
        self._start()

    # -- generations ---------------------------------------------------------------------------
    def _start(self) -> None:
        par = self.config.parallel
        self._steps: deque[int] = deque()
        self._outputs: dict[int, m.StepOutput] = {}
        self._failures: list[m.RequestFailure] = []
        self._errors: dict[int, str] = {}
        self._broken = False
        self.workers = LocalWorkers()
        try:
            self.workers = self._launch()
            logger.info("generation %d: waiting for %d ranks to connect", self.generation, par.world_size)
            hosts = self._gather(m.Hello, "waiting for the ranks to connect", par.rendezvous_timeout)
        except BaseException:
            self._teardown()
            raise
        logger.info("generation %d: all %d ranks connected (%s)", self.generation, par.world_size,
                    ", ".join(sorted({h.host for h in hosts})))  # fmt: skip

    def _launch(self) -> LocalWorkers:
        """Open this generation's channel (``self.channel``), publish its addresses and start the ranks.

        Here: the head node's worker processes read the local ring, every other node gets a stream that its
        launcher's relay feeds into its ring. Returns the workers for supervision (``alive``, ``failures``,
        ``kill``, ``stop``); what it started before raising, it stops (the channel is closed by the caller).
        """
        par = self.config.parallel
        base_port = par.master_port if par.nnodes > 1 else None
        self.channel = HeadChannel(par.master_addr, par.ranks_per_node, list(range(1, par.nnodes)), base_port)
        publish_addresses(self.store, self.generation, self.channel.addresses)
        return spawn_local_workers(
            self.config, 0, self.store_host, self.store_port, self.generation, self.channel.ring_spec, self.env
        )

    def _node_of(self, rank: int) -> int:
        """The node that runs ``rank`` (named in error messages)."""
        return rank // self.config.parallel.ranks_per_node

    def restart(self) -> None:
        old = self.generation
        self.generation += 1
        # Bump the key first: headless nodes kill their workers and start the new generation.
        self.store.set(GENERATION_KEY, str(self.generation))
        self._teardown()
        logger.warning("restarting every rank: generation %d -> %d", old, self.generation)
        self._start()

    def _teardown(self) -> None:
        self._broken = True
        self.workers.kill()
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    # -- liveness ------------------------------------------------------------------------------
    def _failures_now(self) -> list[WorkerFailure]:
        failures = self.workers.failures()
        if self._reports is not None and time.monotonic() >= self._next_remote_check:
            self._next_remote_check = time.monotonic() + self.REMOTE_CHECK_S
            failures += read_failure_reports(self._reports, self.generation, self.config.parallel.nnodes)
        return failures

    def _check(self, doing: str) -> None:
        """Raise :class:`EngineDeadError` naming the failed rank (and its error) if any rank is gone."""
        failures = self._failures_now()
        if not failures:
            return
        self._broken = True
        if self.config.parallel.nnodes > 1:
            failures = self._wait_for_root_cause(failures)
        self._drain_errors()
        raise self._dead_error(failures, doing)

    def _wait_for_root_cause(self, failures: list[WorkerFailure]) -> list[WorkerFailure]:
        """Ranks that exited with an error after losing a peer are knock-on failures: give the other nodes'
        reports ``DIAGNOSE_S`` to name a rank that was killed or stopped answering."""
        seen = {(f.rank, f.pid): f for f in failures}
        deadline = time.monotonic() + self.DIAGNOSE_S
        while time.monotonic() < deadline and all(f.exitcode is not None and f.exitcode >= 0 for f in seen.values()):
            time.sleep(0.1)
            self._next_remote_check = 0.0
            seen.update({(f.rank, f.pid): f for f in self._failures_now()})
        return list(seen.values())

    def _drain_errors(self) -> None:
        """Take the WorkerErrors already sent (a dying rank sends its error just before it exits)."""
        deadline = time.monotonic() + 0.3
        while self.channel is not None and time.monotonic() < deadline:
            try:
                msg = self.channel.recv(timeout=0.05, check=lambda: None)
            except RingTimeoutError:
                continue
            self._file(msg)

    def _dead_error(self, failures: list[WorkerFailure], doing: str) -> EngineDeadError:
        ordered = root_causes(failures)

        def describe(f: WorkerFailure) -> str:
            error = self._errors.get(f.rank)
            return f.describe() + (f": {error}" if error else "")

        msg = f"{describe(ordered[0])} while the head was {doing} (generation {self.generation})"
        if len(ordered) > 1:
            msg += "; also " + ", ".join(describe(f) for f in ordered[1:])
        logger.error("worker failure: %s", msg)
        return EngineDeadError(msg)

    def check_health(self) -> None:
        if self._broken:
            raise EngineDeadError(f"generation {self.generation} is broken")
        self._check("idle")

    # -- messages ------------------------------------------------------------------------------
    def _file(self, msg: m.RankMessage) -> m.RankMessage | None:
        """Keep what does not answer the current wait (outputs of later steps, failures, errors)."""
        if isinstance(msg, m.StepOutput):
            self._outputs[msg.step_id] = msg
            return None
        if isinstance(msg, m.RequestFailed):
            self._failures += msg.failures
            return None
        if isinstance(msg, m.WorkerError):
            self._errors[msg.rank] = msg.message
            return None
        return msg

    def _wait(self, doing: str, timeout: float | None, done, take=None) -> None:
        """Receive replies until ``done()``, handing the ones :meth:`_file` does not keep to ``take``.

        Raises:
            EngineDeadError: a rank sent a WorkerError or died, or nothing came for ``timeout`` seconds.
        """
        start = time.monotonic()
        while not done():
            if self._errors:
                self._fail_on_worker_error(doing)
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
            try:
                msg = self.channel.recv(left, lambda: self._check(doing))
            except RingTimeoutError:
                self._broken = True
                text = (
                    f"generation {self.generation}: no progress for {timeout:.0f} s while {doing} (--watchdog-timeout)"
                )
                logger.error("%s", text)
                raise EngineDeadError(text) from None
            rest = self._file(msg)
            if rest is not None and take is not None:
                take(rest)

    def _fail_on_worker_error(self, doing: str) -> None:
        """A rank sent its error: raise once its process is seen gone, so that the root-cause rules apply (a rank
        that lost a peer errors first, but the peer killed on another node is the cause).

        Raises:
            EngineDeadError: always; naming the failed ranks with their errors.
        """
        self._broken = True
        deadline = time.monotonic() + self.DIAGNOSE_S
        while time.monotonic() < deadline:
            self._check(doing)  # raises with the ranks ordered by likely cause once any process is gone
            time.sleep(0.1)
        rank, error = next(iter(self._errors.items()))
        raise EngineDeadError(f"rank {rank} failed while the head was {doing} (generation {self.generation}): {error}")

    def _gather(self, kind: type, doing: str, timeout: float | None) -> list:
        """One message of ``kind`` from every rank, by rank."""
        got: dict[int, object] = {}

        def take(msg) -> None:
            if isinstance(msg, kind):
                got[msg.rank] = msg

        self._wait(doing, timeout, lambda: len(got) == self.config.parallel.world_size, take)
        return [got[r] for r in sorted(got)]

    def _send(self, message: m.HeadMessage, doing: str) -> None:
        timeout = self.config.parallel.watchdog_timeout
        try:
            self.channel.send(message, timeout, lambda: self._check(doing))
        except RingTimeoutError:
            self._broken = True
            raise EngineDeadError(f"generation {self.generation}: the ranks read nothing for {timeout:.0f} s "
                                  f"while the head was {doing} (--watchdog-timeout)") from None  # fmt: skip

    def determine_num_blocks(self) -> int:
        self._send(m.ProfileRequest(), "asking for the KV-cache capacity")
        # Workers load the model before they answer: liveness is checked, but no deadline is set.
        capacities = self._gather(m.KVCapacity, "waiting for the ranks to load the model", None)
        counts = [c.num_blocks for c in capacities]
        self.weight_bytes_per_rank = tuple(c.weight_bytes for c in capacities)
        logger.info("KV blocks per rank: %s; using the minimum", counts)
        return min(counts)

    def init_kv_cache(self, num_blocks: int, max_model_len: int) -> None:
        self._send(m.InitKVCache(num_blocks, max_model_len), "allocating the KV cache")
        self._gather(m.Ready, "waiting for the ranks to allocate the KV cache", None)

    def submit(self, step: m.Step) -> None:
        self._send(step, f"sending step {step.step_id}")
        self._steps.append(step.step_id)

    def send_grammar_bitmask(self, bitmask: m.GrammarBitmask) -> None:
        self._send(bitmask, f"sending the grammar bitmask of step {bitmask.step_id}")

    def collect(self) -> m.StepOutput:
        step_id = self._steps[0]
        if self.async_scheduling and len(self._steps) == 1 and step_id not in self._outputs:
            self._send(m.FlushOutputs(), f"asking for step {step_id}")  # no later step released it
        doing = f"waiting for step {step_id} from rank {self.output_rank} (node {self._node_of(self.output_rank)})"
        self._wait(doing, self.config.parallel.watchdog_timeout, lambda: step_id in self._outputs)
        self._steps.popleft()
        return self._outputs.pop(step_id)

    def take_failures(self) -> list[m.RequestFailure]:
        failures, self._failures = self._failures, []
        return failures

    def worker_stats(self) -> list[m.WorkerStats]:
        self._send(m.StatsRequest(), "asking for worker stats")
        return self._gather(m.WorkerStats, "waiting for worker stats", self.config.parallel.watchdog_timeout)

    def rank_info(self) -> list[RankInfo]:
        """What the workers of the current generation last wrote to the store (a client of its own,
        so that a status request never waits behind a blocking store call of the engine)."""
        store = open_store(self.store_host, self.store_port, False, RANK_INFO_TIMEOUT_S)
        return read_rank_info(store, self.generation, self.config.parallel.world_size)

    def shutdown(self) -> None:
        """Ask the ranks to leave (or kill them if the group is broken), then reap them: no orphan is left."""
        if not self._broken and self.workers.alive() and self.channel is not None:
            with contextlib.suppress(EngineDeadError):
                self._send(m.Shutdown(), "shutting down")
        if self._broken:
            self.workers.kill()
        self.workers.stop(timeout=10)
        if self.channel is not None:
            self.channel.close()
            self.channel = None
