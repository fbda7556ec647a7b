"""What each rank tells the head about itself, for ``GET /cluster/status``.

Workers write a :class:`RankInfo` as JSON into the launch's TCPStore (the one every worker already
joins, see ``worker.open_store``) under ``shardserve/gen{generation}/rankinfo/{rank}``: once when the
model is loaded and again when the KV cache is allocated. Memory is therefore as of the last report
(it changes little after the KV cache is allocated), not live; the single-process executor reports
its one rank live on every request.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from shardserve.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class RankInfo:
    """One rank's place in the grid and its resource use."""

    rank: int
    """Global rank on the TP x PP grid."""
    node_rank: int
    host: str
    pid: int
    device: str
    """e.g. ``cuda:0`` or ``cpu``."""
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    layer_start: int
    """First decoder layer of this rank's pipeline stage."""
    layer_end: int
    """One past the last decoder layer (layers ``[layer_start, layer_end)``)."""
    num_kv_blocks: int
    """KV blocks allocated on this rank (0 before the KV cache exists)."""
    memory_used_bytes: int
    """GPU memory allocated by torch (CUDA), or the process's resident set size (CPU)."""
    memory_total_bytes: int
    """The GPU's total memory (CUDA), or the host's physical memory (CPU)."""
    memory_kind: str
    """``gpu`` or ``rss``: what ``memory_used_bytes`` measures."""
    reported_at: float
    """Unix time (seconds) of the report."""
    node_id: str = ""
    """Ray node id of the rank's actor (``--distributed-executor-backend ray``); empty with ``mp``."""
    node_ip: str = ""
    """Address of the rank's Ray node; empty with ``mp``."""


def describe_rank(runner: ModelRunner, rank: int, ranks_per_node: int) -> RankInfo:
    """This process's :class:`RankInfo`, with memory use measured now."""
    used, total, kind = memory_use(runner.device)
    start, end = runner.layer_range
    return RankInfo(
        rank=rank,
        node_rank=rank // max(1, ranks_per_node),
        host=socket.gethostname(),
        pid=os.getpid(),
        device=str(runner.device),
        tp_rank=runner.tp.rank_in_group,
        tp_size=runner.tp.world_size,
        pp_rank=runner.pp.rank_in_group,
        pp_size=runner.pp.world_size,
        layer_start=start,
        layer_end=end,
        num_kv_blocks=runner.num_blocks,
        memory_used_bytes=used,
        memory_total_bytes=total,
        memory_kind=kind,
        reported_at=time.time(),
    )


def memory_use(device: torch.device) -> tuple[int, int, str]:
    """(used bytes, total bytes, kind): torch's allocation on a CUDA device, else this process's RSS and host memory."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.get_device_properties(device).total_memory, "gpu"
    return process_rss_bytes(), host_memory_bytes(), "rss"


def process_rss_bytes() -> int:
    """Resident set size of this process (bytes), from /proc/self/statm; 0 where it is unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def host_memory_bytes() -> int:
    """Physical memory of the host (bytes); 0 where it is unavailable."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def rank_info_key(generation: int, rank: int) -> str:
    return f"shardserve/gen{generation}/rankinfo/{rank}"


def publish_rank_info(store: dist.Store, generation: int, info: RankInfo) -> None:
    """Write ``info`` to the store; a failure is logged, not raised (status must not stop a worker)."""
    try:
        store.set(rank_info_key(generation, info.rank), json.dumps(asdict(info)))
    except (RuntimeError, OSError) as e:
        logger.warning("rank %d: could not publish its status: %s", info.rank, e)


def read_rank_info(store: dist.Store, generation: int, world_size: int) -> list[RankInfo]:
    """The reports present in the store, by rank; ranks that have not reported yet are left out."""
    infos = []
    for rank in range(world_size):
        key = rank_info_key(generation, rank)
        if store.check([key]):
            infos.append(RankInfo(**json.loads(store.get(key))))
    return infos
