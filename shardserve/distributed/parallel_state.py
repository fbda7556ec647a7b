"""Process groups for tensor and pipeline parallelism.

Ranks come from one grid, ``torch.arange(world_size).reshape(pp, tp)``, with TP innermost so that
a TP group is a run of consecutive ranks, which the launcher places on one node (vLLM's layout).
Each group keeps a device group (NCCL on CUDA, gloo on CPU) for tensors and a gloo group for
CPU control messages.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def rank_grid(tensor_parallel_size: int, pipeline_parallel_size: int) -> torch.Tensor:
    """Global ranks laid out as ``(pp, tp)``: row p is the TP group of stage p."""
    return torch.arange(tensor_parallel_size * pipeline_parallel_size).reshape(
        pipeline_parallel_size, tensor_parallel_size
    )


class GroupCoordinator:
    """One process group seen from one rank: collectives on tensors and on Python objects.

    With a group of size 1 every collective is the identity, so layers run unchanged in a single
    process without ``torch.distributed`` being initialised.
    """

    def __init__(self, ranks: list[int], rank: int, device: torch.device, backend: str | None):
        self.ranks = ranks
        self.rank = rank
        self.rank_in_group = ranks.index(rank)
        self.world_size = len(ranks)
        self.device = device
        self.device_group = None
        self.cpu_group = None
        if self.world_size > 1:
            self.device_group = dist.new_group(ranks, backend=backend)
            self.cpu_group = dist.new_group(ranks, backend="gloo")

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> int:
        """Global rank of the next member (wrapping)."""
        return self.ranks[(self.rank_in_group + 1) % self.world_size]

    @property
    def prev_rank(self) -> int:
        """Global rank of the previous member (wrapping)."""
        return self.ranks[(self.rank_in_group - 1) % self.world_size]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place; returns ``x``."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate each rank's ``x`` along ``dim`` in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send a tensor to global rank ``dst`` on the device group."""
        dist.send(x.contiguous(), dst=dst, group=self.device_group)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        """Receive a tensor of known shape from global rank ``src`` on the device group."""
        x = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(x, src=src, group=self.device_group)
        return x

    def send_object(self, obj: Any, dst: int) -> None:
        """Pickle ``obj`` and send it to global rank ``dst`` over the gloo group."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst=dst, group=self.cpu_group)
        dist.send(data, dst=dst, group=self.cpu_group)

    def recv_object(self, src: int) -> Any:
        """Receive an object sent with :meth:`send_object` from global rank ``src``."""
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=src, group=self.cpu_group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, src=src, group=self.cpu_group)
        return pickle.loads(data.numpy().tobytes())

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Broadcast a picklable object from group rank ``src`` over the gloo group."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]


@dataclass
class _State:
    world: GroupCoordinator
    tp: GroupCoordinator
    pp: GroupCoordinator


_STATE: _State | None = None


def initialize_model_parallel(
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    rank: int,
    device: torch.device,
    backend: str | None = None,
) -> None:
    """Create the world, TP and PP groups for this rank.

    ``torch.distributed`` must already be initialised when the world size exceeds one.
    ``dist.new_group`` is collective: every rank builds every group, in the same order; the head
    (a rank outside the grid) calls this too and keeps no group.
    """
    global _STATE
    grid = rank_grid(tensor_parallel_size, pipeline_parallel_size)
    world = list(range(grid.numel()))
    world_group = _make_group(world, rank, device, backend)
    tp = pp = None
    for ranks in (row.tolist() for row in grid):
        group = _make_group(ranks, rank, device, backend)
        tp = group if rank in ranks else tp
    for ranks in (col.tolist() for col in grid.t()):
        group = _make_group(ranks, rank, device, backend)
        pp = group if rank in ranks else pp
    if rank not in world:  # the head: it took part in creating the groups, and holds none
        return
    _STATE = _State(world=world_group, tp=tp, pp=pp)
    logger.info(
        "rank %d: tp rank %d/%d, pp stage %d/%d", rank, tp.rank_in_group, tp.world_size,
        pp.rank_in_group, pp.world_size,
    )


def _make_group(ranks: list[int], rank: int, device: torch.device, backend: str | None) -> GroupCoordinator | None:
    # Groups of size > 1 are created on every rank (collective); only members keep a coordinator.
    if len(ranks) > 1 and rank not in ranks:
        dist.new_group(ranks, backend=backend)
        dist.new_group(ranks, backend="gloo")
        return None
    if rank not in ranks:
        return None
    return GroupCoordinator(ranks, rank, device, backend)


def init_single_process(device: torch.device) -> None:
    """Groups of size one, for a run without ``torch.distributed``."""
    initialize_model_parallel(1, 1, 0, device)


def model_parallel_is_initialized() -> bool:
    return _STATE is not None


def _state() -> _State:
    if _STATE is None:
        raise RuntimeError("model parallel groups are not initialised; call initialize_model_parallel first")
    return _STATE


def get_world_group() -> GroupCoordinator:
    return _state().world


def get_tp_group() -> GroupCoordinator:
    return _state().tp


def get_pp_group() -> GroupCoordinator:
    return _state().pp


def destroy_model_parallel() -> None:
    """Forget the groups and tear down ``torch.distributed`` if it was initialised."""
    global _STATE
    _STATE = None
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed_environment(
    world_size: int,
    rank: int,
    init_method: str,
    backend: str,
    timeout_s: float,
) -> None:
    """``dist.init_process_group`` with a bounded rendezvous."""
    if world_size == 1 or dist.is_initialized():
        return
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        world_size=world_size,
        rank=rank,
        timeout=timedelta(seconds=timeout_s),
    )
