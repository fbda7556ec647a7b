"""Pick the executor for a launch."""

from __future__ import annotations

from shardserve.config import EngineConfig
from shardserve.executor.executor import Executor, MultiprocExecutor, UniProcExecutor


def make_executor(config: EngineConfig, source, env: dict[str, str] | None = None, generation: int = 0) -> Executor:
    """In-process for one rank on one node; worker processes otherwise.

    The control store listens on ``master_port + 1`` (``master_port`` is the node rendezvous);
    on a single node with no port given, a free port is taken.
    """
    par = config.parallel
    if par.world_size == 1 and par.nnodes == 1:
        return UniProcExecutor(config, source)
    from shardserve.distributed.rendezvous import free_port

    port = par.master_port + 1 if par.master_port else free_port()
    return MultiprocExecutor(config, par.master_addr, port, generation=generation, env=env)
