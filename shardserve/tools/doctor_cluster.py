"""The run of ``shardserve doctor``: local checks, then (with several nodes) meet, probe, all-reduce, gather.

Order on every node, each step bounded by ``plan.timeout_s`` seconds:

1. facts and local checks (:mod:`shardserve.tools.doctor`);
2. the master port: the head checks it can listen on ``--master-port`` and ``--master-port + 1``,
   the others connect to ``--master-port``;
3. :func:`node_rendezvous` on ``--master-port`` with the facts (a node that does not come is
   named); versions and the model hash are compared;
4. a control store on ``--master-port + 1`` (hosted by the head, as ``serve``'s is); each node
   connects to the other nodes' sampled ephemeral ports, then runs one all-reduce over every planned
   rank: one thread per local rank, each with its own gloo (and on CUDA, NCCL) process group, so
   that no global ``torch.distributed`` state is touched;
5. each node publishes its rows; the head gathers them, naming a node that does not report.

Store keys (under ``shardserve/doctor/``): ``arrive/<rank>`` when a rank starts its all-reduce
(a rank without it is named), ``rows/<node>`` JSON of a node's checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist

from shardserve.tools.doctor import (
    FAIL,
    PASS,
    Check,
    DoctorReport,
    NodeFacts,
    Plan,
    PortSample,
    collect_facts,
    local_checks,
    model_match_check,
    versions_match_check,
)

_PREFIX = "shardserve/doctor/"
_POLL_S = 0.1
_CONNECT_TIMEOUT_S = 2.0

StoreFactory = Callable[[], dist.Store]


def run_doctor(plan: Plan, env: dict[str, str] | None = None) -> DoctorReport:
    """Run every check for this node of ``plan``; on the head, gather every node's rows.

    Never raises for a failed check: failures are FAIL rows. Bounded: each cross-node step waits
    at most ``plan.timeout_s`` seconds.

    Args:
        plan: the launch, as ``serve`` would run it.
        env: environment for user-set NCCL/gloo variables (default ``os.environ``).
    """
    facts = collect_facts(plan, env)
    checks = local_checks(facts, plan)
    if plan.launch.nnodes == 1:
        return _run_single(plan, facts, checks)
    return _run_multi(plan, facts, checks)


def _report(plan: Plan, nodes: dict[int, NodeFacts], checks: list[Check]) -> DoctorReport:
    return DoctorReport(plan.launch.node_rank, plan.launch.nnodes, plan.tp, plan.pp, nodes, checks)


def _run_single(plan: Plan, facts: NodeFacts, checks: list[Check]) -> DoctorReport:
    checks.append(_tag(master_port_check(plan), 0))
    if plan.ranks_per_node:
        store = dist.HashStore()  # thread-safe, in-process: every rank is a thread here
        checks.append(_tag(all_reduce_check(lambda: store, plan, facts), 0))
    return _report(plan, {0: facts}, checks)


def _run_multi(plan: Plan, facts: NodeFacts, checks: list[Check]) -> DoctorReport:
    from shardserve.distributed.rendezvous import RendezvousError, node_info, node_rendezvous

    la = plan.launch
    me = la.node_rank
    sample = PortSample(tuple(facts.port_range) if facts.port_range else None)
    facts.sampled_ports = sample.ports
    try:
        master = _tag(master_port_check(plan), me)
        checks.append(master)
        if master.status == FAIL:
            return _report(plan, {me: facts}, checks)
        ranks = range(me * plan.ranks_per_node, (me + 1) * plan.ranks_per_node)
        try:
            raw = node_rendezvous(la.master_addr, la.master_port, la.nnodes, me, plan.timeout_s,
                                  node_info(me, ranks, doctor=facts.to_dict()))  # fmt: skip
        except RendezvousError as e:
            fix = (f"start `shardserve doctor` on every node with --nnodes {la.nnodes} --master-addr "
                   f"{la.master_addr} --master-port {la.master_port} and a distinct --node-rank; raise --timeout "
                   "if nodes start slowly")  # fmt: skip
            checks.append(Check("all nodes joined", FAIL, str(e), fix))
            return _report(plan, {me: facts}, checks)
        table = {int(r): NodeFacts.from_dict(info["doctor"]) for r, info in raw.items()}
        hosts = ", ".join(f"node {r} {f.hostname} ({f.address})" for r, f in sorted(table.items()))
        cluster = [Check("all nodes joined", PASS, hosts), versions_match_check(table), model_match_check(table)]
        checks.append(probe_ports_check(table, me))
        try:
            store = _control_store(plan)
        except (RuntimeError, OSError) as e:
            checks.append(Check("all-reduce", FAIL, f"no control store on {la.master_addr}:{la.master_port + 1}: {e}",
                                f"open TCP port {la.master_port + 1} on node 0 to the other nodes", me))  # fmt: skip
            return _report(plan, table, checks + cluster)
        if plan.ranks_per_node:
            checks.append(_tag(all_reduce_check(lambda: _store_client(plan), plan, facts), me))
        others = _exchange_rows(store, plan, checks)
        return _report(plan, table, checks + cluster + others)
    finally:
        sample.close()


def _tag(check: Check, node: int) -> Check:
    check.node = node
    return check


# ----------------------------------------------------------------------------- master port


def master_port_check(plan: Plan) -> Check:
    """The head can listen on the master port (and the next one); another node can connect to it.

    A non-head node retries for ``plan.timeout_s`` seconds, since the head may start later.
    """
    la = plan.launch
    if la.master_port is None:
        return Check("master port", PASS, "single node: serve picks a free port")
    ports = (la.master_port, la.master_port + 1)
    if la.node_rank == 0:
        busy = {p: err for p in ports if (err := _bind_error(p))}
        if busy:
            detail = "; ".join(f"cannot listen on port {p}: {err}" for p, err in busy.items())
            return Check("master port", FAIL, detail,
                         f"stop what holds it (ss -ltnp 'sport = :{min(busy)}') or pass another --master-port "
                         "on every node")  # fmt: skip
        return Check("master port", PASS, f"head can listen on {ports[0]} (rendezvous) and {ports[1]} (control store)")
    where = f"{la.master_addr}:{la.master_port}"
    start = time.monotonic()
    error = _wait_reachable(la.master_addr, la.master_port, start + plan.timeout_s)
    if error:
        return Check("master port", FAIL, f"could not reach the head at {where} within {plan.timeout_s:g} s: {error}",
                     f"start node 0 (--node-rank 0) with the same --master-port; check --master-addr and that TCP "
                     f"ports {ports[0]} and {ports[1]} are open from this node (firewall, security group)")  # fmt: skip
    return Check("master port", PASS, f"reached the head at {where} after {time.monotonic() - start:.1f} s")


def _bind_error(port: int) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does
        try:
            sock.bind(("", port))
        except OSError as e:
            return str(e)
    return None


def _wait_reachable(addr: str, port: int, deadline: float) -> str | None:
    """None once a TCP connect to ``addr:port`` succeeds; the last error at ``deadline``."""
    last = "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return last
        try:
            socket.create_connection((addr, port), timeout=min(remaining, 1.0)).close()
            return None
        except OSError as e:
            last = str(e) or type(e).__name__
        time.sleep(min(_POLL_S * 2, max(0.0, deadline - time.monotonic())))


# ----------------------------------------------------------------------------- ports and store


def probe_ports_check(table: dict[int, NodeFacts], me: int, timeout_s: float = _CONNECT_TIMEOUT_S) -> Check:
    """Connect from node ``me`` to every other node's sampled ephemeral ports (gloo and NCCL listen there)."""
    reached, failed = 0, []
    for r, f in sorted(table.items()):
        if r == me:
            continue
        for port in f.sampled_ports:
            try:
                socket.create_connection((f.address, port), timeout=timeout_s).close()
                reached += 1
            except OSError as e:
                failed.append(f"node {r} {f.address}:{port} ({e})")
    if failed:
        return Check("ephemeral ports reachable", FAIL, f"node {me} could not connect to " + ", ".join(failed),
                     "allow TCP between the nodes on the whole ephemeral range "
                     "(cat /proc/sys/net/ipv4/ip_local_port_range): gloo and NCCL listen on random ports in it",
                     me)  # fmt: skip
    return Check(
        "ephemeral ports reachable",
        PASS,
        f"node {me} connected to {reached} sampled port(s) of the other nodes",
        node=me,
    )


def _control_store(plan: Plan) -> dist.Store:
    la = plan.launch
    return dist.TCPStore(la.master_addr, la.master_port + 1, None, la.node_rank == 0,
                         timedelta(seconds=plan.timeout_s), wait_for_workers=False)  # fmt: skip


def _store_client(plan: Plan) -> dist.Store:
    # One client per thread: a TCPStore object blocks other threads while one waits on a key.
    la = plan.launch
    return dist.TCPStore(la.master_addr, la.master_port + 1, None, False, timedelta(seconds=plan.timeout_s))


def _exchange_rows(store: dist.Store, plan: Plan, own: list[Check]) -> list[Check]:
    """Publish this node's rows; the head returns the other nodes' rows (FAIL for a node that never reports)."""
    la = plan.launch
    store.set(_PREFIX + f"rows/{la.node_rank}", json.dumps([asdict(c) for c in own]))
    if la.node_rank != 0:
        return []
    deadline = time.monotonic() + plan.timeout_s
    rows: list[Check] = []
    missing = set(range(1, la.nnodes))
    while missing and time.monotonic() < deadline:
        for r in sorted(missing):
            if store.check([_PREFIX + f"rows/{r}"]):
                rows += [Check(**c) for c in json.loads(store.get(_PREFIX + f"rows/{r}"))]
                missing.discard(r)
        time.sleep(_POLL_S if missing else 0)
    for r in sorted(missing):
        rows.append(Check("node report", FAIL, f"node {r} did not report its checks within {plan.timeout_s:g} s",
                          f"see the output of `shardserve doctor` on node {r}", r))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- all-reduce


def all_reduce_check(store_factory: StoreFactory, plan: Plan, facts: NodeFacts) -> Check:
    """Sum ``rank + 1`` over every planned rank; this node runs its ranks as threads.

    gloo on CPU tensors always; NCCL too when the plan runs on CUDA and the node has a GPU per rank.
    Each thread gets its own store from ``store_factory`` and its own process group (no global
    ``torch.distributed`` state). A rank that never arrived or did not finish is named.

    Returns:
        PASS with the time (ms) of the slowest local rank, or FAIL naming the ranks that did not answer.
    """
    node, rpn, world = facts.node_rank, plan.ranks_per_node, plan.world_size
    backends = ["gloo"]
    if plan.resolved_device() == "cuda" and len(facts.gpus) >= rpn:
        backends.append("nccl")
    results: dict[int, str | float] = {}
    with _env(facts.net_env):
        threads = [
            threading.Thread(
                target=_rank_all_reduce,
                name=f"doctor-rank{node * rpn + i}",
                daemon=True,
                args=(store_factory, node * rpn + i, i, world, backends, plan.timeout_s, results),
            )  # fmt: skip
            for i in range(rpn)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + plan.timeout_s + 5.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    mine = range(node * rpn, (node + 1) * rpn)
    errors = {r: v for r, v in results.items() if isinstance(v, str)}
    unfinished = [r for r in mine if r not in results]
    what = " + ".join(b for b in backends) + f" all-reduce over {world} rank(s)"
    if not errors and not unfinished:
        slowest = max(float(v) for v in results.values())
        local = f"rank {mine.start}" if len(mine) == 1 else f"ranks {mine.start}..{mine.stop - 1}"
        return Check("all-reduce", PASS, f"{what}: the sum is right on {local} of this node, {slowest * 1e3:.0f} ms")
    silent = _silent_ranks(store_factory, world)
    detail = f"{what} failed on node {node}"
    if silent:
        detail += f"; rank(s) {silent} did not answer (node(s) {sorted({r // rpn for r in silent})})"
    if unfinished:
        detail += f"; local rank(s) {unfinished} still waiting after {plan.timeout_s:g} s"
    if errors:
        detail += "; " + "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items()))
    return Check("all-reduce", FAIL, detail,
                 "check the interface in 'network interface' on every node (set GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME "
                 "if it is wrong) and that the ephemeral ports are open between nodes")  # fmt: skip


def _rank_all_reduce(store_factory: StoreFactory, rank: int, local: int, world: int, backends: list[str],
                     timeout_s: float, results: dict[int, str | float]) -> None:  # fmt: skip
    try:
        store = store_factory()
        store.set(_PREFIX + f"arrive/{rank}", socket.gethostname())
        start = time.perf_counter()
        for backend in backends:
            pg_store = dist.PrefixStore(_PREFIX + backend, store)
            _all_reduce_once(backend, pg_store, rank, local, world, timeout_s)
        results[rank] = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - reported as a FAIL row
        results[rank] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _all_reduce_once(backend: str, store: dist.Store, rank: int, local: int, world: int, timeout_s: float) -> None:
    """One all-reduce of ``rank + 1``; raises RuntimeError when the sum is not ``world (world + 1) / 2``."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(local)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, world, opts)
        x = torch.full((1,), float(rank + 1), device=f"cuda:{local}")
    else:
        pg = dist.ProcessGroupGloo(store, rank, world, timeout)
        x = torch.full((1,), float(rank + 1))
    pg.allreduce([x]).wait()
    got = x.item()  # waits for the device too
    if backend == "nccl" and hasattr(pg, "shutdown"):
        pg.shutdown()  # frees the communicator now (torch warns at exit about one never shut down)
    expected = world * (world + 1) / 2
    if got != expected:
        raise RuntimeError(f"{backend} all-reduce gave {got}, expected {expected}")


def _silent_ranks(store_factory: StoreFactory, world: int) -> list[int]:
    """Ranks that never checked in for the all-reduce."""
    try:
        store = store_factory()
        return [r for r in range(world) if not store.check([_PREFIX + f"arrive/{r}"])]
    except Exception:  # noqa: BLE001 - the store itself is gone: nothing more to say
        return []


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set the variables the process groups read (GLOO_SOCKET_IFNAME, NCCL_*) for the block, then restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
