"""Where this node sits in a multi-node launch, found from flags or from the scheduler's environment.

shardserve starts one process per NODE; that process spawns the node's worker processes itself.
Node ``n`` of ``nnodes`` hosts global ranks ``[n * rpn, (n + 1) * rpn)`` with
``rpn = world_size // nnodes`` (TP innermost, so a TP group stays inside a node).

Explicit flags (``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port``) always win.
Without them the environment is read in this order; the innermost launcher comes first, because
its variables describe the process we are, while outer layers' variables are only inherited.
Scheduler-specific variables win over the generic ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/
``LOCAL_WORLD_SIZE``, which sbatch scripts and pod specs often export by hand with other meanings:

1. **torchrun** (``LOCAL_RANK`` + ``LOCAL_WORLD_SIZE`` with the elastic agent's own markers,
   ``TORCHELASTIC_RUN_ID`` or ``GROUP_RANK``, set for each of its children): one process per GPU,
   ``WORLD_SIZE``/``RANK`` count processes. ``nnodes = WORLD_SIZE // LOCAL_WORLD_SIZE``,
   ``node_rank = GROUP_RANK`` (else ``RANK // LOCAL_WORLD_SIZE``); only ``LOCAL_RANK == 0`` leads its node.
2. **Open MPI** (``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``): ranks placed by slot, so
   ``node_rank = RANK // LOCAL_SIZE``; the master comes from ``--master-addr`` or ``MASTER_ADDR``.
3. **Slurm** (``SLURM_PROCID`` + ``SLURM_NNODES``/``SLURM_NODEID``): the master is the first host
   of ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``/``SLURM_NODELIST`` unless ``MASTER_ADDR`` is
   set; with several tasks per node only ``SLURM_LOCALID == 0`` leads.
4. **Kubernetes LeaderWorkerSet** (``LWS_LEADER_ADDRESS``, ``LWS_GROUP_SIZE``,
   ``LWS_WORKER_INDEX``): one pod per node, the leader pod (index 0) is the head.
5. **Kubeflow PyTorchJob / RunAI ``submit-dist pytorch``**: one pod per node. ``PET_NNODES`` and
   ``PET_NODE_RANK`` are used when present (training-operator >= 1.7). Otherwise ``WORLD_SIZE``
   and ``RANK`` count PODS, not processes (RunAI documents this, see the RCP guide). Heuristic:
   ``MASTER_ADDR``, ``WORLD_SIZE`` and ``RANK`` are set, ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` are
   not (so no torchrun made them), and one of ``PET_*``, ``KUBEFLOW*``, ``RUNAI_*`` or
   ``KUBERNETES_SERVICE_HOST`` is present. ``RUNAI_*`` marks the source "runai".
6. **Generic per-process variables** (``LOCAL_RANK`` + ``LOCAL_WORLD_SIZE`` without any of the
   above): read with torchrun's meaning (``source="env"``).
7. Otherwise a single node (``source="single"``).

Everything here is a pure function of the mapping it is given; nothing reads ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

DEFAULT_MASTER_PORT = 29500
"""Rendezvous port for a multi-node launch when neither a flag nor the scheduler gives one."""

_SLURM_PORT_BASE = 15000
_SLURM_PORT_SPAN = 10000


@dataclass
class LaunchInfo:
    """This node's place in the launch."""

    nnodes: int
    """Nodes in the launch (one shardserve process each)."""
    node_rank: int
    """This node's index; 0 is the head that hosts the rendezvous and serves HTTP."""
    master_addr: str
    """Head node's address (IP or host name) that every node can reach."""
    master_port: int | None
    """TCP port of the rendezvous on the head; None lets a single node pick a free one."""
    source: str
    """Where the values came from: flags, torchrun, slurm, openmpi, kubeflow, runai, lws, env or single."""
    procs_per_node_hint: int | None = None
    """Processes the scheduler started per node when it started one per GPU (torchrun, Slurm, MPI)."""
    notes: list[str] = field(default_factory=list)
    """Human-readable remarks on how the values were derived."""
    is_node_leader: bool = True
    """False for the extra per-GPU processes a scheduler started; they must exit without acting."""
    local_rank: int = 0
    """This process's index among the processes the scheduler started on this node."""

    def global_ranks(self, world_size: int) -> range:
        """Global ranks hosted by this node: ``[node_rank * rpn, (node_rank + 1) * rpn)``.

        Raises:
            ValueError: ``world_size`` is not divisible by ``nnodes``.
        """
        rpn = ranks_per_node(world_size, self.nnodes)
        return range(self.node_rank * rpn, (self.node_rank + 1) * rpn)


def ranks_per_node(world_size: int, nnodes: int) -> int:
    """Worker processes per node, ``world_size // nnodes``.

    Raises:
        ValueError: ``world_size`` is not a multiple of ``nnodes``.
    """
    if world_size % nnodes:
        raise ValueError(
            f"world size TP x PP = {world_size} is not divisible by {nnodes} nodes; "
            f"choose TP x PP as a multiple of the node count"
        )
    return world_size // nnodes


def nodes_origin(launch: LaunchInfo) -> str:
    """Where the node count came from, for messages: ``--nnodes 2`` or ``2 nodes (from torchrun)``."""
    if launch.source == "flags":
        return f"--nnodes {launch.nnodes}"
    return f"{launch.nnodes} node(s) (from {launch.source})"


def check_topology(launch: LaunchInfo, tensor_parallel_size: int, pipeline_parallel_size: int) -> list[str]:
    """Check that TP x PP fits the nodes with every TP group inside one node.

    Returns notes (e.g. the scheduler started more processes per node than shardserve uses).

    Raises:
        ValueError: the world size does not split evenly over the nodes, or a TP group would span
            two nodes (``ranks_per_node % tp != 0``); the message says where the node count came from.
    """
    world = tensor_parallel_size * pipeline_parallel_size
    if world % launch.nnodes:
        per_node = launch.procs_per_node_hint
        hint = f"e.g. -pp {launch.nnodes} (one stage per node)"
        if per_node:
            hint += f", or TP x PP = {per_node * launch.nnodes} to use the {per_node} processes per node started"
        raise ValueError(
            f"world size TP {tensor_parallel_size} x PP {pipeline_parallel_size} = {world} does not split over "
            f"{nodes_origin(launch)}: each node runs TP x PP / nodes workers, so TP x PP must be a multiple of "
            f"{launch.nnodes}; {hint}"
        )
    rpn = world // launch.nnodes
    if rpn % tensor_parallel_size:
        raise ValueError(
            f"TP {tensor_parallel_size} does not fit in {rpn} ranks per node "
            f"(TP {tensor_parallel_size} x PP {pipeline_parallel_size} over {launch.nnodes} nodes): "
            f"a TP group must stay inside a node; e.g. use --tensor-parallel-size {rpn} "
            f"--pipeline-parallel-size {world // rpn}"
        )
    notes = []
    hint = launch.procs_per_node_hint
    if hint is not None and hint != rpn:
        notes.append(
            f"the scheduler started {hint} processes per node but shardserve runs {rpn} workers per "
            f"node (TP x PP / nnodes); only local rank 0 launches them, the rest idle"
        )
    return notes


def discover_launch(
    env: Mapping[str, str],
    *,
    nnodes: int | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
) -> LaunchInfo:
    """Find nnodes, node rank and master from flags, else from the scheduler's environment.

    Args:
        env: environment variables (``os.environ`` in the CLI, a dict in tests).
        nnodes, node_rank, master_addr, master_port: explicit flags, None when not given.

    Raises:
        ValueError: contradictory or incomplete values (``node_rank >= nnodes``, a world size that
            is not a multiple of the processes per node, a multi-node launch without a master
            address, ...); the message names the variables and the flag that fixes it.
    """
    try:
        launch = _detect(env)
    except ValueError as exc:
        if nnodes is None:
            raise
        launch = _single(env)
        launch.notes.append(f"scheduler environment ignored since --nnodes was given: {exc}")
    launch = _apply_flags(launch, env, nnodes, node_rank, master_addr, master_port)
    _validate(launch)
    return launch


# --------------------------------------------------------------------------- detection


_TORCHELASTIC_MARKERS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK")
"""Set by torchrun's elastic agent for each child, and not by hand-written scripts."""


def _detect(env: Mapping[str, str]) -> LaunchInfo:
    for detector in (_from_torchrun, _from_openmpi, _from_slurm, _from_lws, _from_kubeflow, _from_local_vars):
        launch = detector(env)
        if launch is not None:
            return launch
    return _single(env)


def _single(env: Mapping[str, str]) -> LaunchInfo:
    notes = []
    world = env.get("WORLD_SIZE")
    if world is not None and world.strip() not in ("", "1") and "RANK" in env:
        notes.append(
            f"WORLD_SIZE={world} and RANK={env['RANK']} are set but nothing says whether they count "
            f"processes (torchrun) or nodes (Kubeflow/RunAI): ignored; pass --nnodes/--node-rank"
        )
    return LaunchInfo(
        nnodes=1,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=_int_or_none(env, "MASTER_PORT"),
        source="single",
        notes=notes,
    )


def _from_torchrun(env: Mapping[str, str]) -> LaunchInfo | None:
    if not any(k in env for k in _TORCHELASTIC_MARKERS):
        return None
    return _from_local_vars(env, "torchrun")


def _from_local_vars(env: Mapping[str, str], source: str = "env") -> LaunchInfo | None:
    """``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/``WORLD_SIZE``/``RANK`` with torchrun's meaning (per process)."""
    if "LOCAL_RANK" not in env or "LOCAL_WORLD_SIZE" not in env:
        return None
    world = _int(env, "WORLD_SIZE")
    local_size = _int(env, "LOCAL_WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK")
    rank = _int(env, "RANK")
    if local_size < 1 or world % local_size:
        raise ValueError(
            f"{source}: WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_size}; "
            f"start the same --nproc-per-node on every node"
        )
    notes = [f"{source}: {world} processes, {local_size} per node -> {world // local_size} node(s)"]
    if source == "env":
        notes.append("LOCAL_RANK/LOCAL_WORLD_SIZE/WORLD_SIZE/RANK read as torchrun writes them (per process)")
    node_rank = rank // local_size
    if "GROUP_RANK" in env:
        group_rank = _int(env, "GROUP_RANK")
        if group_rank != node_rank:
            notes.append(f"{source}: GROUP_RANK={group_rank} used (RANK // LOCAL_WORLD_SIZE = {node_rank})")
        node_rank = group_rank
    port = _int_or_none(env, "MASTER_PORT")
    if port is not None and env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        # The elastic agent's own TCPStore listens on MASTER_PORT for the whole run.
        notes.append(f"torchrun's agent store holds MASTER_PORT={port}: rendezvous on {port + 1}")
        port += 1
    return _per_process(world // local_size, node_rank, env.get("MASTER_ADDR", "127.0.0.1"), port, source, notes,
                        local_rank, local_size, f"LOCAL_RANK={local_rank}")  # fmt: skip


def _per_process(
    nnodes: int, node_rank: int, master_addr: str, master_port: int | None, source: str, notes: list[str],
    local_rank: int, local_size: int, local_name: str,
) -> LaunchInfo:  # fmt: skip
    """A launch whose scheduler started ``local_size`` processes per node: only local rank 0 leads its node."""
    if local_rank != 0:
        label = {"openmpi": "Open MPI", "slurm": "Slurm"}.get(source, source)
        notes.append(f"{label}: {local_name} is not the node leader; local rank 0 launches this node")
    return LaunchInfo(
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        source=source,
        procs_per_node_hint=local_size if local_size > 1 else None,
        notes=notes,
        is_node_leader=local_rank == 0,
        local_rank=local_rank,
    )


def _from_openmpi(env: Mapping[str, str]) -> LaunchInfo | None:
    if "OMPI_COMM_WORLD_RANK" not in env or "OMPI_COMM_WORLD_SIZE" not in env:
        return None
    rank = _int(env, "OMPI_COMM_WORLD_RANK")
    size = _int(env, "OMPI_COMM_WORLD_SIZE")
    local_rank = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    local_size = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))
    if local_size < 1 or size % local_size:
        raise ValueError(
            f"Open MPI: OMPI_COMM_WORLD_SIZE={size} is not a multiple of OMPI_COMM_WORLD_LOCAL_SIZE="
            f"{local_size}; start the same number of processes on every node (mpirun --map-by "
            f"ppr:1:node starts one per node)"
        )
    nnodes = size // local_size
    notes = [f"Open MPI: {size} processes, {local_size} per node -> {nnodes} node(s), ranks mapped by slot"]
    return _per_process(nnodes, rank // local_size, env.get("MASTER_ADDR", ""), _int_or_none(env, "MASTER_PORT"),
                        "openmpi", notes, local_rank, local_size, f"local rank {local_rank}")  # fmt: skip


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo | None:
    if "SLURM_PROCID" not in env or "SLURM_NODEID" not in env:
        return None
    nnodes = _first_int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    ntasks = _first_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if nnodes is None:
        raise ValueError("Slurm: SLURM_NODEID is set but not SLURM_NNODES; run under srun or pass --nnodes")
    tasks_per_node = _slurm_tasks_per_node(env, nnodes, ntasks)
    local_rank = int(env.get("SLURM_LOCALID", "0"))
    notes = [f"Slurm: {nnodes} node(s), node id {env['SLURM_NODEID']}"]
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        notes.append(
            "Slurm: no SLURM_STEP_ID, this looks like the batch script itself; start one process per "
            "node with `srun --ntasks-per-node=1 shardserve serve ...`"
        )
    master = env.get("MASTER_ADDR")
    if master:
        notes.append(f"Slurm: master {master} from MASTER_ADDR")
    else:
        nodelist = _first_str(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if nodelist is None:
            raise ValueError("Slurm: no SLURM_NODELIST to find the head node; pass --master-addr")
        master = first_host(nodelist)
        notes.append(f"Slurm: master {master} = first host of {nodelist}")
    port = _int_or_none(env, "MASTER_PORT")
    if port is None and "SLURM_JOB_ID" in env and nnodes > 1:
        # Same on every node of the job, different for two jobs sharing a node.
        port = _SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % _SLURM_PORT_SPAN
        notes.append(f"Slurm: port {port} derived from SLURM_JOB_ID={env['SLURM_JOB_ID']}")
    return _per_process(nnodes, _int(env, "SLURM_NODEID"), master, port, "slurm", notes, local_rank, tasks_per_node,
                        f"SLURM_LOCALID={local_rank}")  # fmt: skip


def _slurm_tasks_per_node(env: Mapping[str, str], nnodes: int, ntasks: int | None) -> int:
    # SLURM_NTASKS_PER_NODE is only set when requested; SLURM_TASKS_PER_NODE reads like "4(x2),3".
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    spec = _first_str(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if spec:
        counts = {int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", spec)}
        if len(counts) > 1:
            raise ValueError(
                f"Slurm: uneven tasks per node ({spec}); use srun --ntasks-per-node=1 (one shardserve per node)"
            )
        return counts.pop()
    if ntasks is not None and ntasks % nnodes == 0:
        return ntasks // nnodes
    return 1


def _from_lws(env: Mapping[str, str]) -> LaunchInfo | None:
    if "LWS_LEADER_ADDRESS" not in env or "LWS_GROUP_SIZE" not in env:
        return None
    nnodes = _int(env, "LWS_GROUP_SIZE")
    node_rank = int(env.get("LWS_WORKER_INDEX", "0"))
    notes = [f"LeaderWorkerSet: group of {nnodes} pod(s), worker index {node_rank}, leader {env['LWS_LEADER_ADDRESS']}"]
    return LaunchInfo(
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=env["LWS_LEADER_ADDRESS"],
        master_port=_int_or_none(env, "MASTER_PORT"),
        source="lws",
        notes=notes,
    )


_K8S_MARKERS = ("PET_", "KUBEFLOW", "RUNAI_")


def _from_kubeflow(env: Mapping[str, str]) -> LaunchInfo | None:
    if "LOCAL_RANK" in env or "LOCAL_WORLD_SIZE" in env:
        return None
    if not any(k.startswith(_K8S_MARKERS) for k in env) and "KUBERNETES_SERVICE_HOST" not in env:
        return None
    master = env.get("MASTER_ADDR") or env.get("PET_MASTER_ADDR")
    source = "runai" if any(k.startswith("RUNAI_") for k in env) else "kubeflow"
    if "PET_NNODES" in env and "PET_NODE_RANK" in env:
        nnodes = _pet_nnodes(env["PET_NNODES"])
        node_rank = _int(env, "PET_NODE_RANK")
        notes = [f"{source}: PET_NNODES={env['PET_NNODES']}, PET_NODE_RANK={node_rank} (one pod per node)"]
    elif "WORLD_SIZE" in env and "RANK" in env:
        nnodes, node_rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
        notes = [f"WORLD_SIZE={nnodes} counts pods ({'RunAI' if source == 'runai' else 'Kubeflow'}): {nnodes} nodes"]
    else:
        return None
    if not master:
        return None
    if "PET_NPROC_PER_NODE" in env:
        notes.append(f"PET_NPROC_PER_NODE={env['PET_NPROC_PER_NODE']} not used: shardserve spawns its own workers")
    port = _int_or_none(env, "MASTER_PORT") or _int_or_none(env, "PET_MASTER_PORT")
    return LaunchInfo(
        nnodes=nnodes, node_rank=node_rank, master_addr=master, master_port=port, source=source, notes=notes
    )


def _pet_nnodes(value: str) -> int:
    # Elastic jobs write a range "min:max"; shardserve needs a fixed node count.
    lo, _, hi = value.partition(":")
    if hi and lo != hi:
        raise ValueError(f"PET_NNODES={value} is an elastic range; shardserve needs a fixed node count (--nnodes)")
    return int(lo)


# --------------------------------------------------------------------------- flags and checks


def _apply_flags(
    launch: LaunchInfo,
    env: Mapping[str, str],
    nnodes: int | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
) -> LaunchInfo:
    detected = launch.source != "single"
    for name, flag in (
        ("nnodes", nnodes),
        ("node_rank", node_rank),
        ("master_addr", master_addr),
        ("master_port", master_port),
    ):
        if flag is None:
            continue
        old = getattr(launch, name)
        if detected and old != flag:
            launch.notes.append(f"--{name.replace('_', '-')} {flag} overrides {old} from {launch.source}")
        setattr(launch, name, flag)
    if nnodes is not None:
        launch.source = "flags"
        if node_rank is None and not detected and nnodes > 1:
            raise ValueError(f"--nnodes {nnodes} needs --node-rank (0 on the head node, 1..{nnodes - 1} on the others)")
    if launch.nnodes > 1 and (not launch.master_addr or (not detected and master_addr is None)):
        # A single-node default of 127.0.0.1 would be wrong for the other nodes.
        launch.master_addr = env.get("MASTER_ADDR", "")
    if launch.nnodes > 1 and launch.master_port is None:
        launch.master_port = _int_or_none(env, "MASTER_PORT")
    if launch.nnodes > 1 and launch.master_port is None:
        launch.master_port = DEFAULT_MASTER_PORT
        launch.notes.append(f"no rendezvous port given: using {DEFAULT_MASTER_PORT} (--master-port)")
    if launch.nnodes == 1 and not launch.master_addr:
        launch.master_addr = "127.0.0.1"
    return launch


def _validate(launch: LaunchInfo) -> None:
    where = f"(from {launch.source})"
    if launch.nnodes < 1:
        raise ValueError(f"nnodes must be >= 1, got {launch.nnodes} {where}")
    if not 0 <= launch.node_rank < launch.nnodes:
        raise ValueError(
            f"node rank {launch.node_rank} is out of range for {launch.nnodes} node(s) {where}; "
            f"node ranks run 0..{launch.nnodes - 1}: fix --node-rank or --nnodes"
        )
    if launch.nnodes > 1 and not launch.master_addr:
        raise ValueError(
            f"{launch.nnodes} nodes but no head address {where}: pass --master-addr (an address of "
            f"node 0 that every node can reach) or set MASTER_ADDR"
        )
    if launch.master_port is not None and not 0 < launch.master_port < 65536:
        raise ValueError(f"master port {launch.master_port} is not a TCP port (1..65535) {where}")
    if launch.nnodes > 1 and _is_loopback(launch.master_addr):
        launch.notes.append(
            f"master {launch.master_addr} is a loopback address: only works when every node runs on this host"
        )


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- Slurm host lists


def expand_hostlist(hostlist: str) -> Iterator[str]:
    """Expand a Slurm host list, e.g. ``"gpu[01-02,07],cpu1"`` -> gpu01, gpu02, gpu07, cpu1.

    Zero padding follows the range start (``[08-10]`` -> 08, 09, 10). Several bracket groups in
    one name expand as a product (``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2), like
    ``scontrol show hostnames``.

    Raises:
        ValueError: unbalanced brackets or a malformed range.
    """
    for item in _split_top_level(hostlist):
        yield from _expand_item(item)


def first_host(hostlist: str) -> str:
    """First host of a Slurm host list (the head node), e.g. ``"gpu[01-04,07]"`` -> ``"gpu01"``."""
    for host in expand_hostlist(hostlist):
        return host
    raise ValueError(f"empty Slurm host list {hostlist!r}")


def _split_top_level(hostlist: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"malformed Slurm host list {hostlist!r}")
        if ch == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in Slurm host list {hostlist!r}")
    items.append(hostlist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str) -> Iterator[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        yield item
        return
    head, tail = item[: match.start()], item[match.end() :]
    for part in match.group(1).split(","):
        for value in _expand_range(part.strip(), item):
            yield from _expand_item(head + value + tail)


def _expand_range(part: str, item: str) -> list[str]:
    lo, sep, hi = part.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise ValueError(f"malformed range {part!r} in Slurm host list {item!r}")
    if not sep:
        return [lo]
    width = len(lo)
    return [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]


# --------------------------------------------------------------------------- parsing helpers


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise ValueError(f"{name} is not set") from None
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def _int_or_none(env: Mapping[str, str], name: str) -> int | None:
    return _int(env, name) if env.get(name, "").strip() else None


def _first_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            return _int(env, name)
    return None


def _first_str(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        if env.get(name, "").strip():
            return env[name].strip()
    return None
