"""One node's part of a launch: the head serves HTTP, other nodes run their workers headless.

Order of a launch: discover the node's place (flags or scheduler env), set the network variables,
meet every node at the head within ``--rendezvous-timeout`` (a missing node ends the launch with
the missing node ranks named), then start the workers and, on the head, the engine and the server.
"""

from __future__ import annotations

import logging
import os
import time

from shardserve.config import EngineConfig, ServerConfig
from shardserve.distributed.launch import LaunchInfo

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29500


def describe(config: EngineConfig, launch: LaunchInfo) -> str:
    """What ``--dry-run`` prints: the discovered launch and the network settings it would use."""
    from shardserve.distributed.dry_run import describe_launch
    from shardserve.distributed.netconf import network_env

    par = config.parallel
    net_env, notes = network_env(par.master_addr, os.environ)
    return describe_launch(launch, par.tensor_parallel_size, par.pipeline_parallel_size, net_env, notes)


def run_node(config: EngineConfig, server: ServerConfig, launch: LaunchInfo) -> int:
    """Run this node until the launch ends; returns the process exit code."""
    from shardserve.distributed.netconf import network_env
    from shardserve.distributed.rendezvous import RendezvousError, node_info, node_rendezvous

    par = config.parallel
    net_env, notes = network_env(par.master_addr, os.environ)
    if not launch.is_node_leader:
        logger.info("local rank %d: node %d is driven by its local rank 0; nothing to do", launch.local_rank, launch.node_rank)
        return 0
    for line in notes:
        logger.info("network: %s", line)
    os.environ.update(net_env)  # inherited by the worker processes
    if par.nnodes > 1:
        if par.master_port is None:
            par.master_port = DEFAULT_PORT
        ranks = launch.global_ranks(par.world_size)
        try:
            node_rendezvous(
                par.master_addr, par.master_port, par.nnodes, par.node_rank, par.rendezvous_timeout,
                node_info(par.node_rank, ranks),
            )
        except RendezvousError as e:
            logger.error("launch failed: %s", e)
            return 1
        logger.info("all %d nodes joined at %s:%d", par.nnodes, par.master_addr, par.master_port)
    if par.node_rank > 0:
        return run_headless(config)
    return run_head(config, server)


def run_head(config: EngineConfig, server: ServerConfig) -> int:
    from shardserve.engine.async_llm import AsyncLLM
    from shardserve.entrypoints.openai.api_server import run_server

    return run_server(server, lambda: AsyncLLM(config), server.served_model_name) or 0


def run_headless(config: EngineConfig) -> int:
    """Start this node's workers and wait; exit non-zero if any of them fails."""
    from shardserve.executor.executor import spawn_local_workers

    par = config.parallel
    rpn = par.ranks_per_node
    first = par.node_rank * rpn
    logger.info(
        "node %d is headless: it runs ranks %d..%d; HTTP is served by the head at %s",
        par.node_rank, first, first + rpn - 1, par.master_addr,
    )
    workers = spawn_local_workers(config, par.node_rank, par.master_addr, par.master_port + 1, generation=0)
    try:
        while workers.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        workers.stop(timeout=5)
    failed = [(pid, code) for pid, code in workers.dead() if code not in (0, None)]
    if failed:
        logger.error("workers exited with errors (pid, exit code): %s", failed)
        return 1
    return 0
