"""Pick the executor for a launch."""

from __future__ import annotations

from shardserve.config import EngineConfig
from shardserve.executor.executor import Executor, MultiprocExecutor, UniProcExecutor


def make_executor(config: EngineConfig, source, env: dict[str, str] | None = None, generation: int = 0) -> Executor:
    """In-process for one rank on one node; worker processes otherwise; Ray actors with the ray backend.

    The control store listens on ``master_port + 1`` (``master_port`` is the node rendezvous);
    on a single node with no port given, a free port is taken.
    """
    par = config.parallel
    ray = par.distributed_executor_backend == "ray"  # every rank a Ray actor, TP = PP = 1 included
    if par.world_size == 1 and par.nnodes == 1 and not ray:
        return UniProcExecutor(config, source)
    from shardserve.distributed.rendezvous import free_port

    port = par.master_port + 1 if par.master_port else free_port()
    if ray:
        from shardserve.executor.ray_executor import RayExecutor

        return RayExecutor(config, port, generation=generation, env=env)
    return MultiprocExecutor(config, par.master_addr, port, generation=generation, env=env)
