"""Interconnect benchmark in the style of nccl-tests, on ``torch.distributed``.

Measures all_reduce, all_gather, reduce_scatter and sendrecv over a range of message sizes and
reports time, algorithm bandwidth (algbw) and bus bandwidth (busbw). Definitions follow
nccl-tests ``doc/PERFORMANCE.md`` (https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md):

* ``algbw = size / time`` where ``size`` is the total bytes of the operation (for all_gather the
  gathered output, for reduce_scatter the input, each rank holding ``size / n``);
* ``busbw = algbw * factor`` with factor ``2(n-1)/n`` for all_reduce, ``(n-1)/n`` for all_gather and
  reduce_scatter, and ``1`` for sendrecv, so that busbw compares to the hardware link speed
  whatever the number of ranks.

Groups: ``intra-node`` (the ranks of one node; every node runs its group at the same time) and,
with more than one node, ``inter-node`` (local rank 0 of each node) and ``world`` (all ranks).
sendrecv sends to the next member of the group and receives from the previous one (a ring, as in
nccl-tests), so with two members it is a bidirectional pair exchange.

:func:`run_netbench` is the per-rank benchmark on an initialised default process group;
:func:`launch_local` spawns N local processes that run it.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

logger = logging.getLogger(__name__)

OPS = ("all_reduce", "all_gather", "reduce_scatter", "sendrecv")
BUSBW_FACTORS: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "sendrecv": lambda n: 1.0,
}
"""busbw / algbw per operation for ``n`` ranks (nccl-tests PERFORMANCE.md)."""

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_MAX_BYTES_GPU = 1 * GiB
DEFAULT_MAX_BYTES_CPU = 64 * MiB
MAX_ITERS = 10_000
MAX_BYTES = 8 * GiB
_ELEMENT = torch.float32
_ELEMENT_BYTES = 4
JSON_VERSION = 1


@dataclass
class Result:
    """One row: an operation on a group at one message size."""

    op: str
    """all_reduce, all_gather, reduce_scatter or sendrecv."""
    group: str
    """intra-node, inter-node or world."""
    group_size: int
    """Ranks in the group (n)."""
    size_bytes: int
    """Total bytes of the operation as nccl-tests counts them."""
    time_us: float
    """Mean time of one operation (microseconds), slowest rank."""
    algbw_gb_s: float
    """size / time (GB/s, 1e9 bytes)."""
    busbw_gb_s: float
    """algbw times the bus factor of the op (GB/s)."""

    @classmethod
    def from_time(cls, op: str, group: str, n: int, size_bytes: int, seconds: float) -> Result:
        """Fill algbw and busbw from a measured time (seconds)."""
        algbw = size_bytes / seconds / 1e9 if seconds > 0 else float("inf")
        return cls(op, group, n, size_bytes, seconds * 1e6, algbw, algbw * BUSBW_FACTORS[op](n))


@dataclass
class NetbenchReport:
    """Everything one run measured; what ``--json`` writes."""

    backend: str
    device: str
    world_size: int
    nnodes: int
    node_of_rank: list[int]
    iters: int
    warmup: int
    results: list[Result]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = JSON_VERSION
        d["busbw_definition"] = "https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetbenchReport:
        """Parse what :meth:`to_dict` wrote.

        Raises:
            ValueError: the dict is not a netbench report.
        """
        try:
            results = [Result(**r) for r in d["results"]]
            return cls(
                backend=d["backend"],
                device=d["device"],
                world_size=int(d["world_size"]),
                nnodes=int(d["nnodes"]),
                node_of_rank=list(d["node_of_rank"]),
                iters=int(d["iters"]),
                warmup=int(d["warmup"]),
                results=results,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a shardserve netbench JSON: {e}") from e

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load_json(cls, path: str | Path) -> NetbenchReport:
        """Read a ``--json`` file. Raises ValueError on a malformed file."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def curve(self, op: str, group: str) -> list[Result]:
        """Rows of one op and group, by increasing size."""
        return sorted((r for r in self.results if r.op == op and r.group == group), key=lambda r: r.size_bytes)


def message_sizes(min_bytes: int = 8, max_bytes: int = GiB, factor: int = 2) -> list[int]:
    """Sizes ``min_bytes * factor**k`` up to ``max_bytes`` (bytes), as nccl-tests ``-b -e -f``.

    Raises:
        ValueError: bounds out of order, below one element, above 8 GiB, or factor < 2.
    """
    if factor < 2:
        raise ValueError(f"--factor must be >= 2, got {factor}")
    if min_bytes < _ELEMENT_BYTES or max_bytes < min_bytes:
        raise ValueError(f"need {_ELEMENT_BYTES} <= --min-bytes <= --max-bytes, got {min_bytes}, {max_bytes}")
    if max_bytes > MAX_BYTES:
        raise ValueError(f"--max-bytes above {MAX_BYTES} bytes is not supported, got {max_bytes}")
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


@dataclass
class _Group:
    name: str
    ranks: list[int]
    handle: Any


def _build_groups(rank: int, node_of_rank: list[int], backend: str | None) -> list[_Group]:
    """Groups this benchmark measures; every rank creates every group (new_group is collective).

    For ``intra-node`` the returned group is the caller's own node.
    """
    world = len(node_of_rank)
    nodes = sorted(set(node_of_rank))
    groups: list[_Group] = []
    own_intra: _Group | None = None
    for node in nodes:
        ranks = [r for r in range(world) if node_of_rank[r] == node]
        handle = dist.new_group(ranks, backend=backend) if len(nodes) > 1 else None
        if node == node_of_rank[rank]:
            own_intra = _Group("intra-node", ranks, handle)
    assert own_intra is not None
    groups.append(own_intra)
    if len(nodes) > 1:
        leaders = [min(r for r in range(world) if node_of_rank[r] == node) for node in nodes]
        groups.append(_Group("inter-node", leaders, dist.new_group(leaders, backend=backend)))
        groups.append(_Group("world", list(range(world)), None))
    return groups


def real_size(op: str, n: int, size_bytes: int) -> int:
    """Bytes an op really moves for a requested size: whole elements, and for all_gather and
    reduce_scatter a multiple of ``n`` elements (nccl-tests rounds the same way); 0 means skip."""
    count = size_bytes // _ELEMENT_BYTES
    if op in ("all_gather", "reduce_scatter"):
        count = count // n * n
    return count * _ELEMENT_BYTES


def _make_op(op: str, group: _Group, rank: int, size_bytes: int, device: torch.device) -> Callable[[], None]:
    """A closure running one ``op`` of ``real_size(op, n, size_bytes)`` bytes on ``group``."""
    n = len(group.ranks)
    count = real_size(op, n, size_bytes) // _ELEMENT_BYTES
    pg = group.handle
    if op == "all_reduce":
        buf = torch.ones(count, dtype=_ELEMENT, device=device)
        return lambda: dist.all_reduce(buf, group=pg)
    if op == "all_gather":
        inp = torch.ones(count // n, dtype=_ELEMENT, device=device)
        out = torch.empty(count, dtype=_ELEMENT, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: gather(out, inp, group=pg)
    if op == "reduce_scatter":
        inp = torch.ones(count, dtype=_ELEMENT, device=device)
        out = torch.empty(count // n, dtype=_ELEMENT, device=device)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: scatter(out, inp, group=pg)
    if op == "sendrecv":
        me = group.ranks.index(rank)
        nxt, prv = group.ranks[(me + 1) % n], group.ranks[(me - 1) % n]
        send = torch.ones(count, dtype=_ELEMENT, device=device)
        recv = torch.empty(count, dtype=_ELEMENT, device=device)

        def sendrecv() -> None:
            p2p = [dist.P2POp(dist.isend, send, nxt, group=pg), dist.P2POp(dist.irecv, recv, prv, group=pg)]
            for work in dist.batch_isend_irecv(p2p):
                work.wait()

        return sendrecv
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_op(fn: Callable[[], None] | None, iters: int, warmup: int, device: torch.device, control: Any) -> float:
    """Mean seconds per call of ``fn`` (0.0 on ranks outside the group), barrier-aligned over the world."""
    if fn is not None:
        for _ in range(warmup):
            fn()
        _sync(device)
    dist.barrier(group=control)
    start = time.perf_counter()
    if fn is not None:
        for _ in range(iters):
            fn()
        _sync(device)
    return (time.perf_counter() - start) / iters if fn is not None else 0.0


def _max_over_world(seconds: float, control: Any) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control)
    return float(t.item())


def run_netbench(
    rank: int,
    world_size: int,
    device: torch.device | str,
    sizes: list[int],
    ops: list[str] | tuple[str, ...],
    iters: int,
    warmup: int,
    node_of_rank: list[int],
) -> list[Result]:
    """Benchmark ``ops`` at each of ``sizes`` on this rank; call on every rank of the default group.

    Args:
        rank: global rank of the caller.
        world_size: ranks in the default process group.
        device: device of the buffers (cuda for NCCL, cpu for gloo).
        sizes: message sizes (bytes), e.g. from :func:`message_sizes`.
        ops: subset of :data:`OPS`.
        iters: timed iterations per point (1..10000).
        warmup: untimed iterations before each point (0..10000).
        node_of_rank: node index of every global rank (length ``world_size``).

    Returns:
        One :class:`Result` per (group, op, size), identical on every rank; time is the slowest
        rank's mean per operation.

    Raises:
        ValueError: bad arguments, or the default group is not initialised to ``world_size``.
    """
    device = torch.device(device)
    _check_args(world_size, sizes, ops, iters, warmup, node_of_rank)
    if not dist.is_initialized() or dist.get_world_size() != world_size:
        raise ValueError(f"run_netbench needs an initialised default process group of {world_size} ranks")
    backend = dist.get_backend()
    control = dist.new_group(list(range(world_size)), backend="gloo") if backend != "gloo" else None
    results: list[Result] = []
    for group in _build_groups(rank, node_of_rank, backend):
        n = len(group.ranks)
        if n < 2:
            continue
        for op in ops:
            for size in sizes:
                moved = real_size(op, n, size)
                if moved == 0:
                    continue
                fn = _make_op(op, group, rank, size, device) if rank in group.ranks else None
                seconds = _max_over_world(_time_op(fn, iters, warmup, device, control), control)
                results.append(Result.from_time(op, group.name, n, moved, seconds))
                if rank == 0:
                    logger.debug("%s %s n=%d %d B %.1f us", group.name, op, n, moved, seconds * 1e6)
    return results


def _check_args(world_size: int, sizes: list[int], ops: Any, iters: int, warmup: int, node_of_rank: list[int]) -> None:
    bad_ops = [op for op in ops if op not in OPS]
    if bad_ops:
        raise ValueError(f"unknown ops {bad_ops}; choose from {', '.join(OPS)}")
    if not 1 <= iters <= MAX_ITERS or not 0 <= warmup <= MAX_ITERS:
        raise ValueError(f"--iters must be in 1..{MAX_ITERS} and --warmup in 0..{MAX_ITERS}")
    if len(node_of_rank) != world_size:
        raise ValueError(f"node_of_rank has {len(node_of_rank)} entries for world size {world_size}")
    if not sizes or min(sizes) < _ELEMENT_BYTES or max(sizes) > MAX_BYTES:
        raise ValueError(f"sizes must be non-empty, in {_ELEMENT_BYTES}..{MAX_BYTES} bytes")


# ----------------------------------------------------------------------------- local launcher


@dataclass
class LocalLaunch:
    """Arguments of a local (single-machine) benchmark run."""

    nproc: int
    device: str = "auto"
    """auto (cuda when there are >= nproc GPUs), cuda or cpu."""
    sizes: tuple[int, ...] = ()
    ops: tuple[str, ...] = OPS
    iters: int = 20
    warmup: int = 5
    simulated_nodes: int = 1
    """Split the processes into this many pretend nodes (to exercise inter-node groups)."""
    init_timeout_s: float = 60.0
    """Seconds to wait for the process group to form (and for any one collective)."""
    run_timeout_s: float = 1800.0
    """Seconds before the whole run is abandoned."""

    def resolved_device(self) -> str:
        """cuda or cpu.

        Raises:
            ValueError: cuda asked for but fewer GPUs than processes.
        """
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.device == "auto":
            return "cuda" if gpus >= self.nproc else "cpu"
        if self.device == "cuda" and gpus < self.nproc:
            raise ValueError(f"--device cuda needs {self.nproc} GPUs, found {gpus}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        return self.device

    def node_of_rank(self) -> list[int]:
        """Consecutive ranks share a node, as the multi-node launcher places them.

        Raises:
            ValueError: nproc not divisible by simulated_nodes.
        """
        if self.nproc < 1 or self.simulated_nodes < 1 or self.nproc % self.simulated_nodes:
            raise ValueError(
                f"--nproc {self.nproc} must be a positive multiple of --simulated-nodes {self.simulated_nodes}"
            )
        per_node = self.nproc // self.simulated_nodes
        return [r // per_node for r in range(self.nproc)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_worker(rank: int, launch: LocalLaunch, device_type: str, port: int, out_path: str) -> None:
    """Entry point of one spawned process: init the group, run, rank 0 writes the rows to ``out_path``."""
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # as DataLoader workers do after fork; gloo has its own threads
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=launch.nproc,
        timeout=timedelta(seconds=launch.init_timeout_s),
    )
    try:
        results = run_netbench(
            rank,
            launch.nproc,
            device,
            list(launch.sizes),
            launch.ops,
            launch.iters,
            launch.warmup,
            launch.node_of_rank(),
        )
        if rank == 0:
            Path(out_path).write_text(json.dumps([asdict(r) for r in results]))
    finally:
        dist.destroy_process_group()


def launch_local(launch: LocalLaunch) -> NetbenchReport:
    """Spawn ``launch.nproc`` processes on this machine and benchmark among them.

    gloo on CPU, NCCL on CUDA (one GPU per process); rendezvous on ``tcp://127.0.0.1:<free port>``.
    CPU workers are forked (seconds faster than importing torch again); CUDA workers are spawned,
    since CUDA cannot be used in a forked child.

    Raises:
        ValueError: bad arguments (see :class:`LocalLaunch`).
        RuntimeError: a worker failed or the run exceeded ``run_timeout_s``.
    """
    if launch.nproc < 2:
        raise ValueError(f"--nproc must be >= 2 to measure a collective, got {launch.nproc}")
    device_type = launch.resolved_device()
    node_of_rank = launch.node_of_rank()
    _check_args(launch.nproc, list(launch.sizes), launch.ops, launch.iters, launch.warmup, node_of_rank)
    with tempfile.TemporaryDirectory(prefix="shardserve-netbench-") as tmp:
        out_path = Path(tmp) / "results.json"
        context = mp.start_processes(
            _local_worker,
            args=(launch, device_type, free_port(), str(out_path)),
            nprocs=launch.nproc,
            join=False,
            start_method="spawn" if device_type == "cuda" or "fork" not in mp.get_all_start_methods() else "fork",
        )
        _join(context, launch.run_timeout_s)
        if not out_path.exists():
            raise RuntimeError("netbench workers exited without results")
        results = [Result(**r) for r in json.loads(out_path.read_text())]
    return NetbenchReport(
        backend="nccl" if device_type == "cuda" else "gloo",
        device=device_type,
        world_size=launch.nproc,
        nnodes=launch.simulated_nodes,
        node_of_rank=node_of_rank,
        iters=launch.iters,
        warmup=launch.warmup,
        results=results,
    )


def _join(context: Any, timeout_s: float) -> None:
    """Wait for every spawned worker; kill them all on failure or after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise RuntimeError(f"netbench did not finish within {timeout_s:.0f} s")
    except ProcessException as e:
        raise RuntimeError(f"a netbench worker failed: {e}") from e
    finally:
        for p in context.processes:
            if p.is_alive():
                p.terminate()


# ----------------------------------------------------------------------------- output


def save_plot(report: NetbenchReport, path: str | Path) -> None:
    """Bus bandwidth (GB/s) against message size (bytes, log2 axis), one line per op and group.

    Raises:
        ImportError: matplotlib is not installed (``pip install shardserve[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups = sorted({r.group for r in report.results})
    for group in groups:
        for op in OPS:
            rows = report.curve(op, group)
            if rows:
                ax.plot(
                    [r.size_bytes for r in rows],
                    [r.busbw_gb_s for r in rows],
                    marker=".",
                    label=f"{op} ({group}, n={rows[0].group_size})",
                )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(
        f"shardserve netbench: {report.backend} on {report.device}, {report.world_size} ranks, {report.nnodes} node(s)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_size(n: float, spec: str = ".4g") -> str:
    """Bytes as 8 B, 64 KiB, 1 GiB; ``spec`` formats the number of KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:{spec}} {unit}"
        n /= 1024
    return f"{n:{spec}} GiB"


def interpolate_busbw(rows: list[Result], size_bytes: float) -> float:
    """busbw (GB/s) at ``size_bytes``, linear in log2(size) between measured points, clamped at the ends.

    Raises:
        ValueError: ``rows`` is empty.
    """
    if not rows:
        raise ValueError("no measured points to interpolate")
    rows = sorted(rows, key=lambda r: r.size_bytes)
    if size_bytes <= rows[0].size_bytes:
        return rows[0].busbw_gb_s
    for lo, hi in zip(rows, rows[1:]):
        if size_bytes <= hi.size_bytes:
            w = (math.log2(size_bytes) - math.log2(lo.size_bytes)) / (
                math.log2(hi.size_bytes) - math.log2(lo.size_bytes)
            )
            return lo.busbw_gb_s + w * (hi.busbw_gb_s - lo.busbw_gb_s)
    return rows[-1].busbw_gb_s
