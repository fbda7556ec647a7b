"""``shardserve doctor``: check a node, or every node of a planned launch, before ``serve``.

Each node gathers its facts (:class:`NodeFacts`: versions, GPUs, ``/dev/shm``, the model's
content hash, network interfaces, RDMA, a few listening ports of the ephemeral range) and the
checks over them are pure functions returning :class:`Check` rows, so tests call them directly.

With ``--nnodes > 1`` the nodes meet like ``serve`` does (:func:`node_rendezvous` on
``--master-port``, names any node that does not come), exchange facts, compare versions and model
hashes, connect to each other's sampled ports, and run one small all-reduce over every planned
rank (gloo on CPU, plus NCCL on CUDA) through a store on ``--master-port + 1`` (the port of
``serve``'s control store). The head (node 0) gathers every node's rows. Every wait is bounded by
``timeout_s`` per step. The cross-node part is in :mod:`shardserve.tools.doctor_cluster`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import random
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardserve.distributed.launch import LaunchInfo, check_topology

logger = logging.getLogger(__name__)

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
SHM_MIN_BYTES = 1 << 30
"""Below this /dev/shm size (bytes) the check warns: NCCL and torch workers share memory through it."""
HASH_CHUNK_BYTES = 1 << 20
GPU_FREE_MIN_FRACTION = 0.9
"""Free/total below this warns: ``serve`` sizes the KV cache for 0.9 of each GPU by default."""
PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORT_SAMPLES = 3
SMALL_PORT_RANGE = 1024


@dataclass
class Check:
    """One row of the report."""

    name: str
    status: str
    """PASS, WARN or FAIL."""
    detail: str
    fix: str = ""
    """What to do about a WARN or FAIL; empty for PASS."""
    node: int | None = None
    """Node rank the check is about; None for a check over the whole launch."""


@dataclass
class Plan:
    """The launch the checks are about."""

    launch: LaunchInfo
    tp: int = 1
    """TP ranks per stage, as ``serve -tp``."""
    pp: int = 1
    """Pipeline stages, as ``serve -pp`` (the CLI defaults to one per node)."""
    device: str = "auto"
    """auto (cuda when a GPU is visible), cuda or cpu: as ``serve --device``."""
    model: str | None = None
    """As ``serve``'s MODEL argument; None is the embedded model."""
    timeout_s: float = 60.0
    """Seconds each cross-node step may wait (reaching the head, rendezvous, all-reduce, gathering)."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def ranks_per_node(self) -> int:
        """TP x PP / nnodes (0 when it does not divide: the launch check then fails)."""
        return self.world_size // self.launch.nnodes if self.world_size % self.launch.nnodes == 0 else 0

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


@dataclass
class ModelFacts:
    """Where the model is on a node and a hash of its content."""

    path: str
    digest: str = ""
    """sha256 (hex) from :func:`model_digest`; empty when the model was not found."""
    size_bytes: int = 0
    error: str = ""
    """Why the model could not be found or read; empty when it was."""


@dataclass
class NodeFacts:
    """What one node reports about itself (JSON through the rendezvous)."""

    node_rank: int
    hostname: str
    python: str
    torch: str
    cuda: str | None
    """CUDA version torch was built for; None for a CPU build."""
    driver: str | None
    """NVIDIA driver version from nvidia-smi; None without it."""
    nccl: str | None
    gpus: list[dict[str, Any]]
    """Per visible GPU: index, name, free_bytes, total_bytes."""
    p2p: list[list[bool]]
    """``p2p[i][j]``: GPU i can access GPU j's memory directly."""
    shm_bytes: int | None
    """Size of /dev/shm (bytes); None when it is missing."""
    model: ModelFacts
    net_env: dict[str, str]
    """GLOO_/NCCL_ variables ``serve`` would set (from :func:`network_env`) merged over the user's."""
    net_notes: list[str]
    address: str
    """Local address of the route to the master; empty when there is no route."""
    route_error: str
    rdma: dict[str, str]
    """NCCL_IB_HCA / NCCL_IB_GID_INDEX from :func:`rdma_settings`; {} without RDMA."""
    port_range: list[int] | None
    """[low, high] of ip_local_port_range; None when unreadable."""
    sampled_ports: list[int] = field(default_factory=list)
    """Ephemeral ports this node listens on during the run, for the others to connect to."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeFacts:
        """Parse :meth:`to_dict` output (e.g. another node's, from the rendezvous).

        Raises:
            ValueError: ``d`` lacks a field.
        """
        try:
            return cls(**{**d, "model": ModelFacts(**d["model"])})
        except (KeyError, TypeError) as e:
            raise ValueError(f"not doctor node facts: {e}") from e


@dataclass
class DoctorReport:
    """Everything one run found; what ``--json`` prints."""

    node_rank: int
    nnodes: int
    tp: int
    pp: int
    nodes: dict[int, NodeFacts]
    """Facts of every node this node heard from (all of them on the head after a good run)."""
    checks: list[Check]

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "node_rank": self.node_rank,
            "nnodes": self.nnodes,
            "tp": self.tp,
            "pp": self.pp,
            "world_size": self.tp * self.pp,
            "nodes": {str(r): f.to_dict() for r, f in sorted(self.nodes.items())},
            "checks": [asdict(c) for c in self.checks],
        }


# ----------------------------------------------------------------------------- facts


def collect_facts(plan: Plan, env: dict[str, str] | None = None) -> NodeFacts:
    """This node's facts (no network traffic beyond a route lookup; ``sampled_ports`` left empty).

    Args:
        plan: the launch; its master address picks the network interface.
        env: environment to read user-set NCCL/gloo variables from (default ``os.environ``).
    """
    from shardserve.distributed.netconf import interface_for, network_env, rdma_settings

    env = dict(os.environ if env is None else env)
    net_env, notes = network_env(plan.launch.master_addr, env)
    try:
        address, route_error = interface_for(plan.launch.master_addr)[1], ""
    except OSError as e:
        address, route_error = "", str(e)
    cuda_ok = torch.cuda.is_available()
    return NodeFacts(
        node_rank=plan.launch.node_rank,
        hostname=socket.gethostname(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        driver=driver_version(),
        nccl=_nccl_version() if cuda_ok else None,
        gpus=_gpus() if cuda_ok else [],
        p2p=_p2p_matrix() if cuda_ok else [],
        shm_bytes=shm_size(),
        model=model_facts(plan.model),
        net_env={**{k: v for k, v in env.items() if k.startswith(("GLOO_", "NCCL_"))}, **net_env},
        net_notes=notes,
        address=address,
        route_error=route_error,
        rdma=rdma_settings(),
        port_range=list(r) if (r := ephemeral_port_range()) else None,
    )


def driver_version() -> str | None:
    """NVIDIA driver version from ``nvidia-smi`` (first GPU), None when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def _nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError):
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _gpus() -> list[dict[str, Any]]:
    out = []
    for i in range(torch.cuda.device_count()):
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free = total = 0  # e.g. a GPU in an exclusive compute mode held by another process
        out.append({"index": i, "name": torch.cuda.get_device_name(i), "free_bytes": free, "total_bytes": total})
    return out


def _p2p_matrix() -> list[list[bool]]:
    n = torch.cuda.device_count()
    return [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(n)] for i in range(n)]


def shm_size(path: str = "/dev/shm") -> int | None:
    """Size of the tmpfs at ``path`` (bytes), None when it does not exist."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def ephemeral_port_range(path: Path = PORT_RANGE_FILE) -> tuple[int, int] | None:
    """(low, high) of the ports the kernel hands out for outgoing and ``bind(0)`` sockets, None if unreadable."""
    try:
        low, high = (int(x) for x in path.read_text().split()[:2])
    except (OSError, ValueError):
        return None
    return low, high


def model_digest(path: Path) -> tuple[str, int]:
    """Content hash and size of a model file or directory, independent of mtimes.

    A file hashes its size, first MiB and last MiB; a directory hashes its sorted file list with
    sizes (hidden entries skipped) and the bytes of its ``config.json``.

    Returns:
        (sha256 hex, total size in bytes).

    Raises:
        OSError: the path cannot be read.
    """
    h = hashlib.sha256()
    if path.is_file():
        size = path.stat().st_size
        h.update(f"file {size}\n".encode())
        with path.open("rb") as f:
            h.update(f.read(HASH_CHUNK_BYTES))
            if size > HASH_CHUNK_BYTES:
                f.seek(max(HASH_CHUNK_BYTES, size - HASH_CHUNK_BYTES))
                h.update(f.read(HASH_CHUNK_BYTES))
        return h.hexdigest(), size
    total = 0
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
    )
    for p in files:
        size = p.stat().st_size
        total += size
        h.update(f"{p.relative_to(path).as_posix()} {size}\n".encode())
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    return h.hexdigest(), total


def model_facts(model: str | None) -> ModelFacts:
    """Locate ``model`` as ``serve`` would (:func:`resolve_model`) and hash it; errors go in ``error``."""
    from shardserve.model_executor.loader.resolve import resolve_model

    shown = model if model is not None else "<embedded model>"
    try:
        source = resolve_model(model)
        digest, size = model_digest(source.path)
    except (ValueError, OSError) as e:
        return ModelFacts(path=shown, error=str(e))
    return ModelFacts(path=str(source.path), digest=digest, size_bytes=size)


class PortSample:
    """A few listening TCP sockets on random ports of the ephemeral range, kept open until :meth:`close`.

    The listen backlog completes the other nodes' connects without an accept loop.
    """

    def __init__(self, port_range: tuple[int, int] | None, count: int = PORT_SAMPLES, tries: int = 64):
        self.sockets: list[socket.socket] = []
        if port_range is None:
            return
        rng = random.Random()
        for _ in range(tries):
            if len(self.sockets) >= count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("", rng.randint(*port_range)))
                sock.listen(8)
            except OSError:  # taken: try another
                sock.close()
                continue
            self.sockets.append(sock)

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for s in self.sockets]

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets.clear()


# ----------------------------------------------------------------------------- checks on one node


def local_checks(facts: NodeFacts, plan: Plan) -> list[Check]:
    """Every check that needs only one node's facts, tagged with its node rank."""
    checks = [
        launch_check(plan),
        versions_check(facts),
        gpus_check(facts, plan),
        *gpu_memory_checks(facts, plan),
        shm_check(facts),
        model_check(facts),
        model_layout_check(plan),
        interface_check(facts, plan),
        rdma_check(facts, plan),
        port_range_check(facts),
    ]
    for c in checks:
        c.node = facts.node_rank
    return checks


def launch_check(plan: Plan) -> Check:
    """TP x PP over the nodes with every TP group inside a node (:func:`check_topology`)."""
    la = plan.launch
    where = (
        f"node {la.node_rank} of {la.nnodes} ({la.source}), master {la.master_addr}:{la.master_port or '<free port>'}"
    )
    try:
        notes = check_topology(la, plan.tp, plan.pp)
    except ValueError as e:
        return Check(
            "launch", FAIL, f"TP {plan.tp} x PP {plan.pp}: {e}", "pass -tp/-pp that fit the nodes (see detail)"
        )
    notes = [*la.notes, *notes]
    detail = f"{where}; TP {plan.tp} x PP {plan.pp}, {plan.ranks_per_node} rank(s) per node"
    loopback = [n for n in notes if "loopback" in n]
    if loopback:
        return Check(
            "launch",
            WARN,
            f"{detail}; {loopback[0]}",
            "give --master-addr an address of node 0 that the other nodes reach",
        )
    return Check("launch", PASS, "; ".join([detail, *notes]))


def versions_check(f: NodeFacts) -> Check:
    detail = (f"Python {f.python}, torch {f.torch}, CUDA {f.cuda or 'n/a'}, driver {f.driver or 'n/a'}, "
              f"NCCL {f.nccl or 'n/a'}")  # fmt: skip
    if f.cuda and f.driver is None and f.gpus:
        return Check(
            "versions", WARN, detail + "; nvidia-smi not found", "install the NVIDIA driver utilities (nvidia-smi)"
        )
    return Check("versions", PASS, detail)


def gpus_check(f: NodeFacts, plan: Plan) -> Check:
    need, have = plan.ranks_per_node, len(f.gpus)
    device = plan.device
    if device == "cpu":
        return Check("GPUs", PASS, f"--device cpu: {need} rank(s) on CPU ({have} GPU(s) visible)")
    if have == 0:
        fix = ("install the NVIDIA driver and a CUDA build of torch; in a container pass the GPUs (--gpus all); "
               "check CUDA_VISIBLE_DEVICES")  # fmt: skip
        status = FAIL if device == "cuda" else WARN
        return Check("GPUs", status, f"no CUDA GPU visible (torch {f.torch}): the {need} rank(s) would run on CPU", fix)
    names = ", ".join(sorted({g["name"] for g in f.gpus}))
    if have < need:
        return Check("GPUs", FAIL, f"{have} GPU(s) visible ({names}) but this node runs {need} rank(s)",
                     "check CUDA_VISIBLE_DEVICES, or lower -tp/-pp, or add nodes (--nnodes)")  # fmt: skip
    return Check("GPUs", PASS, f"{have} GPU(s) visible ({names}) for {need} rank(s)")


def gpu_memory_checks(f: NodeFacts, plan: Plan) -> list[Check]:
    """Free memory of the GPUs the node's ranks would use, and P2P between them (nothing on CPU)."""
    if not f.gpus or plan.device == "cpu":
        return []
    used = f.gpus[: max(1, plan.ranks_per_node)]
    gib = 1 << 30
    parts = [f"GPU {g['index']} {g['free_bytes'] / gib:.1f}/{g['total_bytes'] / gib:.1f} GiB free" for g in used]
    busy = [g["index"] for g in used if g["total_bytes"] and g["free_bytes"] < GPU_FREE_MIN_FRACTION * g["total_bytes"]]
    mem = Check("GPU memory", PASS, ", ".join(parts))
    if busy:
        mem = Check("GPU memory", WARN, ", ".join(parts),
                    f"GPU(s) {busy} are partly used by another process (nvidia-smi): stop it or lower "
                    "--gpu-memory-utilization")  # fmt: skip
    idx = [g["index"] for g in used]
    missing = [(i, j) for i in idx for j in idx if i < j and not (f.p2p[i][j] and f.p2p[j][i])]
    if len(idx) < 2:
        p2p = Check("GPU peer access", PASS, "one GPU per node: no peer traffic")
    elif missing:
        p2p = Check("GPU peer access", WARN,
                    f"no peer-to-peer access between GPU pairs {missing}: NCCL copies through host memory",
                    "enable P2P (PCIe ACS/IOMMU settings, VM passthrough), or keep TP within GPUs that have "
                    "NVLink")  # fmt: skip
    else:
        p2p = Check("GPU peer access", PASS, f"peer-to-peer access between all of GPUs {idx}")
    return [mem, p2p]


def shm_check(f: NodeFacts) -> Check:
    if f.shm_bytes is None:
        return Check("/dev/shm", WARN, "/dev/shm is missing", "mount a tmpfs at /dev/shm (docker run --shm-size=16g)")
    size = f"{f.shm_bytes / (1 << 30):.2f} GiB"
    if f.shm_bytes < SHM_MIN_BYTES:
        return Check("/dev/shm", WARN, f"{size}, below 1 GiB: NCCL and worker processes share memory through it",
                     "docker run --shm-size=16g (Kubernetes: an emptyDir with medium Memory on /dev/shm), "
                     "or mount -o remount,size=16g /dev/shm")  # fmt: skip
    return Check("/dev/shm", PASS, size)


def model_check(f: NodeFacts) -> Check:
    m = f.model
    if m.error:
        return Check("model", FAIL, f"model {m.path} on node {f.node_rank} ({f.hostname}): {m.error}",
                     "copy the model to the same path on every node (or use shared storage), or pass the right "
                     "MODEL path")  # fmt: skip
    return Check("model", PASS, f"{m.path} ({m.size_bytes / 1e6:.1f} MB, sha256 {m.digest[:12]})")


def model_layout_check(plan: Plan) -> Check:
    """TP x PP against the model's shape, as ``serve`` checks it (:func:`check_parallel_layout`)."""
    from shardserve.config import check_parallel_layout
    from shardserve.model_executor.loader.resolve import resolve_model

    try:
        source = resolve_model(plan.model)
    except ValueError as e:
        return Check("model layout", FAIL, f"cannot read the model's shape: {e}", "see the model check")
    try:
        check_parallel_layout(source.arch, plan.tp, plan.pp, model=source.name)
    except ValueError as e:
        return Check("model layout", FAIL, str(e), "pass -tp/-pp sizes that work for the model (see detail)")
    a = source.arch
    return Check("model layout", PASS, f"TP {plan.tp} x PP {plan.pp} fits {source.name} ({a.num_attention_heads} "
                 f"attention heads, {a.num_key_value_heads} KV heads, {a.num_hidden_layers} layers)")  # fmt: skip


def interface_check(f: NodeFacts, plan: Plan) -> Check:
    master = plan.launch.master_addr
    if f.route_error:
        return Check("network interface", FAIL, f"no route to master {master}: {f.route_error}",
                     f"check that --master-addr {master} resolves and is routed from this node "
                     f"(ip route get {master})")  # fmt: skip
    gloo = f.net_env.get("GLOO_SOCKET_IFNAME", "?")
    nccl = f.net_env.get("NCCL_SOCKET_IFNAME", "?")
    return Check(
        "network interface", PASS, f"gloo {gloo}, NCCL {nccl}; local address {f.address} toward master {master}"
    )


def rdma_check(f: NodeFacts, plan: Plan) -> Check:
    if f.rdma:
        gid = f.rdma.get("NCCL_IB_GID_INDEX")
        kind = f", RoCE v2 GID index {gid}" if gid else " (InfiniBand)"
        return Check("RDMA", PASS, f"NCCL_IB_HCA={f.rdma.get('NCCL_IB_HCA')}{kind}")
    if plan.launch.nnodes > 1 and plan.resolved_device() == "cuda" and f.gpus:
        return Check("RDMA", WARN, "no active RDMA port: NCCL uses TCP sockets between nodes (slow for PP/TP traffic)",
                     "install the RDMA drivers (rdma-core, MOFED) and expose /dev/infiniband to the "
                     "container")  # fmt: skip
    return Check("RDMA", PASS, "none (not needed here)")


def port_range_check(f: NodeFacts) -> Check:
    if f.port_range is None:
        return Check("ephemeral port range", WARN, f"cannot read {PORT_RANGE_FILE}", "check /proc is mounted")
    low, high = f.port_range
    detail = f"{low}-{high} ({high - low + 1} ports): gloo and NCCL listen on random ports in it"
    if high - low + 1 < SMALL_PORT_RANGE:
        return Check(
            "ephemeral port range", WARN, detail, "widen net.ipv4.ip_local_port_range (sysctl) to a few thousand ports"
        )
    return Check("ephemeral port range", PASS, detail)


# ----------------------------------------------------------------------------- checks over nodes


_MUST_MATCH = ("torch", "cuda", "nccl")
_SHOULD_MATCH = ("python", "driver")


def versions_match_check(table: dict[int, NodeFacts]) -> Check:
    """torch, CUDA and NCCL must be equal on every node (pickled messages, NCCL wire protocol); Python and driver
    should be."""
    if len(table) < 2:
        return Check("versions match", PASS, "one node")
    fields = {name: {r: getattr(f, name) for r, f in table.items()} for name in _MUST_MATCH + _SHOULD_MATCH}
    differ = {name: vals for name, vals in fields.items() if len(set(vals.values())) > 1}
    if not differ:
        f = next(iter(table.values()))
        same = f"torch {f.torch}, Python {f.python}, CUDA {f.cuda or 'n/a'}, NCCL {f.nccl or 'n/a'}"
        return Check("versions match", PASS, f"same on {len(table)} nodes: {same}")
    detail = "; ".join(
        f"{name}: " + ", ".join(f"node {r} {v}" for r, v in sorted(vals.items())) for name, vals in differ.items()
    )
    status = FAIL if any(name in _MUST_MATCH for name in differ) else WARN
    return Check("versions match", status, detail, "install the same versions on every node (the same container image)")


def model_match_check(table: dict[int, NodeFacts]) -> Check:
    """The model is found on every node with the same content hash."""
    missing = sorted(r for r, f in table.items() if f.model.error)
    if missing:
        error = table[missing[0]].model.error
        return Check("model on every node", FAIL, f"model missing on node(s) {missing}: {error}",
                     "copy the model to the same path on every node (or use shared storage)")  # fmt: skip
    digests = {r: f.model.digest for r, f in table.items()}
    if len(set(digests.values())) > 1:
        detail = ", ".join(f"node {r} {d[:12]}" for r, d in sorted(digests.items()))
        return Check("model on every node", FAIL, f"the model differs between nodes: {detail}",
                     "copy the same model files to every node (rsync -a --checksum)")  # fmt: skip
    return Check("model on every node", PASS, f"same content hash on {len(table)} node(s)")
