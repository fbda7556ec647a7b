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


def run_node(config: EngineConfig, server: ServerConfig, launch: LaunchInfo) -> int:
    """Run this node until the launch ends; returns the process exit code."""
    from shardserve.distributed.netconf import network_env
    from shardserve.distributed.rendezvous import RendezvousError, node_info, node_rendezvous

    par = config.parallel
    if par.distributed_executor_backend == "ray":
        from shardserve.executor.ray_utils import connect

        try:  # the head's store and control traffic use its address in the Ray cluster
            par.master_addr = connect()
        except ValueError as e:
            logger.error("launch failed: %s", e)
            return 1
    net_env, notes = network_env(par.master_addr, os.environ)
    if not launch.is_node_leader:
        logger.info(
            "local rank %d: node %d is driven by its local rank 0; nothing to do", launch.local_rank, launch.node_rank
        )
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
                par.master_addr,
                par.master_port,
                par.nnodes,
                par.node_rank,
                par.rendezvous_timeout,
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
    """Run this node's workers for every generation the head starts; returns the exit code.

    A worker that dies is reported to the head through the store (the head then restarts every rank);
    a new generation number in the store means: kill the workers and start them again. The node exits
    0 when its workers leave cleanly (the head shut the launch down) and 1 when the head is gone.
    """
    from shardserve.executor.supervisor import read_generation
    from shardserve.executor.worker import open_store

    par = config.parallel
    rpn = par.ranks_per_node
    first = par.node_rank * rpn
    logger.info(
        "node %d is headless: it runs ranks %d..%d; HTTP is served by the head at %s",
        par.node_rank,
        first,
        first + rpn - 1,
        par.master_addr,
    )
    try:
        store = open_store(par.master_addr, par.master_port + 1, False, par.rendezvous_timeout)
        generation = read_generation(store)
    except RuntimeError as e:
        logger.error("cannot reach the head's store at %s:%d: %s", par.master_addr, par.master_port + 1, e)
        return 1
    while True:
        code, generation = _run_generation(config, store, generation)
        if code is not None:
            return code


def _run_generation(config: EngineConfig, store, generation: int) -> tuple[int | None, int]:
    """Start and watch one generation of this node's workers, fed by this node's control relay.

    Returns ``(exit code, generation)``, or ``(None, next generation)`` when the head restarts the group.
    """
    from shardserve.executor.channel import NodeRelay, read_addresses
    from shardserve.executor.executor import spawn_local_workers
    from shardserve.executor.supervisor import read_generation, report_failures

    par = config.parallel
    try:
        addresses = read_addresses(store, generation)
    except RuntimeError as e:
        logger.error("node %d: no control channel for generation %d from the head: %s", par.node_rank, generation, e)
        return 1, generation
    relay = NodeRelay(addresses.nodes[par.node_rank], par.ranks_per_node)
    workers = spawn_local_workers(
        config, par.node_rank, par.master_addr, par.master_port + 1, generation, relay.ring_spec
    )
    reported_at = None
    try:
        while True:
            time.sleep(0.5)
            exited = workers.failures()
            if len(exited) == len(workers.processes) and all(f.exitcode == 0 for f in exited):
                logger.info("node %d: workers exited cleanly", par.node_rank)
                return 0, generation
            try:
                current = read_generation(store)
            except RuntimeError as e:
                logger.error("node %d: lost the head's store (%s); the head is gone, stopping", par.node_rank, e)
                workers.stop(timeout=5)
                return (0 if all(code == 0 for _, code in workers.dead()) else 1), generation
            if current != generation:
                logger.warning("node %d: the head started generation %d; restarting this node's ranks",
                               par.node_rank, current)  # fmt: skip
                return None, current
            failed = [f for f in exited if f.exitcode != 0]
            if relay.error is not None and reported_at is None:
                logger.error("node %d: the control relay failed: %s", par.node_rank, relay.error)
                workers.kill()
                failed = failed or workers.failures()
            if failed and reported_at is None:
                report_failures(store, generation, par.node_rank, failed)
                logger.error("node %d: %s; reported to the head, waiting for it to restart the group",
                             par.node_rank, "; ".join(f.describe() for f in failed))  # fmt: skip
                reported_at = time.monotonic()
                workers.kill()
            if reported_at is not None and time.monotonic() - reported_at > par.rendezvous_timeout:
                logger.error("node %d: the head did not restart the group in %.0f s; exiting",
                             par.node_rank, par.rendezvous_timeout)  # fmt: skip
                return 1, generation
    except KeyboardInterrupt:  # Ctrl-C on this node: stop it, as asked
        return 0, generation
    finally:
        workers.kill()
        relay.close()
