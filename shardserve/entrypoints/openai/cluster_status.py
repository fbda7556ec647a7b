"""The body of ``GET /cluster/status``: layout, ranks, KV cache, requests and throughput of the launch.

Per-rank facts come from the executor (:meth:`Executor.rank_info`): workers report them through the
launch's store when the model is loaded and again when the KV cache is allocated, so their memory
figures are as of the last report (``reported_at``); the head's own figures are measured per request.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict
from typing import Any

from shardserve.engine.throughput import DEFAULT_WINDOW_S
from shardserve.executor.rank_info import host_memory_bytes, process_rss_bytes

STATUS_VERSION = 1


def build_cluster_status(engine: Any, model_name: str) -> dict[str, Any]:
    """JSON-ready status of the launch behind ``engine`` (an :class:`AsyncLLM`).

    Blocking (reads the store): call it from a worker thread, not the event loop.

    Returns:
        ``{"version", "time", "model", "layout": {tp, pp, nnodes, world_size, ranks_per_node},
        "head": {host, pid, rss_bytes, host_memory_bytes}, "ranks": [RankInfo fields...],
        "kv_cache": {total_blocks, used_blocks, usage, block_size}, "requests": {running, waiting},
        "throughput": {prompt_tokens_per_s, generation_tokens_per_s, window_s}}``; sizes in bytes.
    """
    par = engine.config.parallel
    stats = engine.stats()
    executor = getattr(getattr(engine, "engine", None), "executor", None)
    ranks = executor.rank_info() if executor is not None else []
    window = getattr(getattr(engine, "throughput", None), "window_s", DEFAULT_WINDOW_S)
    # With the Ray backend the nodes are the Ray nodes the ranks landed on (one shardserve process started them).
    nnodes = max(par.nnodes, len({r.node_rank for r in ranks}))
    return {
        "version": STATUS_VERSION,
        "time": time.time(),
        "model": model_name,
        "layout": {
            "tp": par.tensor_parallel_size,
            "pp": par.pipeline_parallel_size,
            "nnodes": nnodes,
            "world_size": par.world_size,
            "ranks_per_node": par.world_size // nnodes if par.world_size % nnodes == 0 else par.ranks_per_node,
        },
        "head": {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "rss_bytes": process_rss_bytes(),
            "host_memory_bytes": host_memory_bytes(),
        },
        "ranks": [asdict(r) for r in ranks],
        "kv_cache": {
            "total_blocks": stats.num_total_blocks,
            "used_blocks": stats.num_total_blocks - stats.num_free_blocks,
            "usage": stats.kv_cache_usage,
            "block_size": engine.config.cache.block_size,
        },
        "requests": {"running": stats.num_running, "waiting": stats.num_waiting},
        "throughput": {
            "prompt_tokens_per_s": stats.prompt_tokens_per_s,
            "generation_tokens_per_s": stats.generation_tokens_per_s,
            "window_s": window,
        },
    }
