"""Process groups for tensor and pipeline parallelism.

Ranks come from one grid, ``torch.arange(world_size).reshape(pp, tp)``, with TP innermost so that
a TP group is a run of consecutive ranks, which the launcher places on one node (vLLM's layout).
Each group keeps a device group (NCCL on CUDA, gloo on CPU) for tensors and a gloo group for
CPU control messages.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class CollectiveClock:
    """Host seconds this process spent inside collectives and point-to-point calls (benchmarks read it).

    On CUDA that is launch time (NCCL returns once the work is queued); on gloo it includes the transfer.
    """

    seconds = 0.0

    @classmethod
    def timed(cls, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - start

        return wrapper


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
        self._symm_buffer: torch.Tensor | None = None
        self._symm_group_name = ""
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

    ONE_SHOT_MAX_BYTES = 512 * 1024
    """Largest message the one-shot all-reduce takes; NCCL's ring/tree is better above (vLLM's cut-offs)."""

    def init_custom_all_reduce(self, dtype: torch.dtype) -> bool:
        """Set up a one-shot all-reduce over NVLink peer memory for small ``dtype`` messages (decode).

        Each rank reads every peer's buffer through symmetric memory (``torch.distributed._symmetric_memory``)
        and sums locally: one kernel, no NCCL launch, as vLLM's and SGLang's custom all-reduce do. NVLink
        multicast is not used. Returns False (NCCL stays in use) where symmetric memory is unavailable.
        Collective over the group: every member calls it.
        """
        if self.world_size == 1 or self.device.type != "cuda":
            return False
        try:
            import torch.distributed._symmetric_memory as symm_mem

            name = self.device_group.group_name
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(name)
            buf = symm_mem.empty(self.ONE_SHOT_MAX_BYTES // dtype.itemsize, dtype=dtype, device=self.device)
            symm_mem.rendezvous(buf, group=name)
            probe = torch.ones(8, dtype=dtype, device=self.device)
            out = torch.empty_like(probe)
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf[:8], probe, "sum", name, out)
            if not bool((out == self.world_size).all()):
                raise RuntimeError(f"one-shot all-reduce probe gave {out.tolist()}")
        except Exception as e:  # noqa: BLE001 - any failure means: keep NCCL
            logger.warning("custom all-reduce unavailable, using NCCL for every size: %s", e)
            return False
        self._symm_buffer, self._symm_group_name = buf, name
        logger.info("one-shot all-reduce over peer memory for messages up to %d KiB", self.ONE_SHOT_MAX_BYTES // 1024)
        return True

    @CollectiveClock.timed
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group; returns the sum (``x`` itself, reduced in place, on the NCCL/gloo path)."""
        if self.world_size == 1:
            return x
        buf = self._symm_buffer
        if buf is not None and x.dtype == buf.dtype and x.is_contiguous() and x.numel() <= buf.numel():
            out = torch.empty_like(x)
            view = buf[: x.numel()].view_as(x)
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(view, x, "sum", self._symm_group_name, out)
            return out
        dist.all_reduce(x, group=self.device_group)
        return x

    @CollectiveClock.timed
    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate each rank's ``x`` along ``dim`` in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    @CollectiveClock.timed
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast ``x`` in place from group rank ``src`` over the device group; returns ``x``."""
        if self.world_size > 1:
            dist.broadcast(x, src=self.ranks[src], group=self.device_group)
        return x

    @CollectiveClock.timed
    def all_reduce_min_cpu(self, value: float) -> float:
        """Minimum of a host number over the group (gloo control group)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return float(t.item())

    @CollectiveClock.timed
    def all_gather_cpu(self, value: float) -> list[float]:
        """Each member's host number, in group order (gloo control group)."""
        if self.world_size == 1:
            return [value]
        parts = [torch.zeros(1, dtype=torch.float64) for _ in range(self.world_size)]
        dist.all_gather(parts, torch.tensor([value], dtype=torch.float64), group=self.cpu_group)
        return [float(p.item()) for p in parts]

    @CollectiveClock.timed
    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send a tensor to global rank ``dst`` on the device group."""
        dist.send(x.contiguous(), dst=dst, group=self.device_group)

    @CollectiveClock.timed
    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        """Receive a tensor of known shape from global rank ``src`` on the device group."""
        x = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(x, src=src, group=self.device_group)
        return x

    @CollectiveClock.timed
    def isend(self, x: torch.Tensor, dst: int) -> dist.Work | None:
        """Start sending a tensor to global rank ``dst`` on the device group; keep ``x`` alive until the work is done.

        On NCCL the current stream does not wait for the transfer (the host never blocks on it).
        """
        return dist.isend(x.contiguous(), dst=dst, group=self.device_group)

    @CollectiveClock.timed
    def irecv(self, x: torch.Tensor, src: int) -> dist.Work | None:
        """Start receiving into ``x`` from global rank ``src``; ``wait()`` the work before reading ``x``.

        On NCCL ``wait()`` only makes the current stream wait (the host goes on); on gloo it blocks.
        """
        return dist.irecv(x, src=src, group=self.device_group)


@dataclass
class _State:
    world: GroupCoordinator
    tp: GroupCoordinator
    pp: GroupCoordinator
    token: GroupCoordinator | None = None
    """Output rank <-> first-stage TP rank 0 (PP > 1 only): the sampled tokens the first stage embeds next."""


_STATE: _State | None = None


def initialize_model_parallel(
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    rank: int,
    device: torch.device,
    backend: str | None = None,
) -> None:
    """Create the world, TP, PP and token groups for this rank of the ``(pp, tp)`` grid.

    ``torch.distributed`` must already be initialised (world = the TP x PP ranks) when the world size
    exceeds one. ``dist.new_group`` is collective: every rank builds every group, in the same order.
    With PP > 1 a two-rank token group joins the output rank (last stage, TP rank 0) and global rank 0
    (first stage, TP rank 0): the first stage receives each step's sampled tokens on it, on a
    communicator of its own so that it never queues behind the stages' hidden-state transfers.
    """
    global _STATE
    grid = rank_grid(tensor_parallel_size, pipeline_parallel_size)
    world_group = _make_group(list(range(grid.numel())), rank, device, backend)
    tp = pp = None
    for ranks in (row.tolist() for row in grid):
        group = _make_group(ranks, rank, device, backend)
        tp = group if rank in ranks else tp
    for ranks in (col.tolist() for col in grid.t()):
        group = _make_group(ranks, rank, device, backend)
        pp = group if rank in ranks else pp
    token = None
    if pipeline_parallel_size > 1:
        token = _make_group([0, int(grid[-1, 0])], rank, device, backend)
    _STATE = _State(world=world_group, tp=tp, pp=pp, token=token)
    logger.info(
        "rank %d: tp rank %d/%d, pp stage %d/%d", rank, tp.rank_in_group, tp.world_size,
        pp.rank_in_group, pp.world_size,
    )  # fmt: skip


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


def get_token_group() -> GroupCoordinator | None:
    """The output rank <-> first-stage group (None with PP = 1 or on ranks outside it)."""
    return _state().token


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
