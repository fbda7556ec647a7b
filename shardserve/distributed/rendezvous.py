"""Node-level rendezvous with a deadline, on ``torch.distributed.TCPStore``.

Before any worker starts, the one shardserve process of each node checks in with the head
(node 0), so that a node that never comes (wrong address, firewall, a typo in ``--node-rank``)
is reported by rank within a bounded time instead of hanging inside NCCL.

Store keys (under ``shardserve/``)::

    join/<r>   counter: > 1 means two nodes claimed node rank r
    node/<r>   JSON of node r's info
    table      JSON {rank: info} of every node, written by the head once all joined
    error      text: the head gave up; the other nodes raise it too
    done       counter: nodes that read the table (the head keeps the store up until all did)

Everything polls with short sleeps against one deadline; no call blocks past it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_PREFIX = "shardserve/"
_POLL_S = 0.05
_PROGRESS_EVERY_S = 10.0
_ACK_GRACE_S = 5.0
_STORE_ERRORS = (RuntimeError, OSError)  # dist.DistError subclasses RuntimeError


class RendezvousError(RuntimeError):
    """The nodes could not agree on the launch (duplicate rank, mismatched node count, lost head)."""


class RendezvousTimeout(RendezvousError):
    """Not every node joined before the deadline; the message names the missing node ranks or the head."""


def free_port() -> int:
    """A TCP port that is free on this host now (it may be taken again before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def node_info(node_rank: int, global_ranks: Sequence[int], **extra: Any) -> dict[str, Any]:
    """What a node tells the others about itself: host name, its global ranks, versions.

    ``extra`` (e.g. ``address=..., devices=[...]``) is merged in; it must be JSON-serialisable.
    """
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "node_rank": node_rank,
        "ranks": list(global_ranks),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    info.update(extra)
    return info


def node_rendezvous(
    master_addr: str,
    master_port: int,
    nnodes: int,
    node_rank: int,
    timeout_s: float,
    info: dict[str, Any],
) -> dict[int, dict[str, Any]]:
    """Meet every node at the head and return each node's info.

    The head (``node_rank == 0``) hosts a ``TCPStore`` on ``master_port`` and waits until all
    ``nnodes`` nodes have published their info, then publishes the full table. Other nodes retry
    connecting to the head until the deadline, publish, and wait for the table. The head closes
    the store when it returns, so ``master_port`` is free again afterwards.

    Args:
        master_addr: head address reachable from every node.
        master_port: TCP port of the store on the head.
        nnodes: nodes in the launch; ``nnodes == 1`` returns at once without a store.
        node_rank: this node's rank, ``0 <= node_rank < nnodes``.
        timeout_s: seconds from now until every node must have joined.
        info: this node's info (JSON-serialisable), e.g. from :func:`node_info`.

    Returns:
        ``{node_rank: info}`` for every node (same on every node).

    Raises:
        ValueError: ``node_rank`` outside ``[0, nnodes)`` or a bad timeout.
        RendezvousTimeout: the head: some nodes did not join in time (names them); another node:
            the head could not be reached, or did not publish the table in time.
        RendezvousError: duplicate node rank, different ``nnodes`` across nodes, port in use,
            or the connection to the head was lost.
    """
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node rank {node_rank} out of range for {nnodes} node(s)")
    if timeout_s <= 0:
        raise ValueError(f"rendezvous timeout must be > 0 s, got {timeout_s}")
    record = {**info, "node_rank": node_rank, "nnodes": nnodes}
    if nnodes == 1:
        return {0: record}
    deadline = time.monotonic() + timeout_s
    where = f"{master_addr}:{master_port}"
    if node_rank == 0:
        return _run_head(master_addr, master_port, nnodes, record, deadline, timeout_s, where)
    return _run_node(master_addr, master_port, node_rank, record, deadline, timeout_s, where)


# --------------------------------------------------------------------------- head


def _run_head(
    addr: str, port: int, nnodes: int, record: dict, deadline: float, timeout_s: float, where: str
) -> dict[int, dict]:
    try:
        store = dist.TCPStore(addr, port, None, True, timedelta(seconds=max(timeout_s, 1.0)), wait_for_workers=False)
    except _STORE_ERRORS as exc:
        raise RendezvousError(
            f"head could not listen on {where}: {exc}; pick a free port with --master-port and check "
            f"that {addr} is an address of this node"
        ) from exc
    try:
        _publish(store, 0, record)
        _wait_for_nodes(store, nnodes, deadline, timeout_s, where)
        table = {r: json.loads(store.get(_key(f"node/{r}"))) for r in range(nnodes)}
        _check_consistent(store, table, nnodes)
        store.set(_key("table"), json.dumps(table))
        _wait_for_acks(store, nnodes - 1, max(deadline, time.monotonic() + _ACK_GRACE_S))
        logger.info("rendezvous at %s: all %d nodes joined", where, nnodes)
        return table
    finally:
        del store


def _wait_for_nodes(store: dist.TCPStore, nnodes: int, deadline: float, timeout_s: float, where: str) -> None:
    missing = set(range(1, nnodes))
    next_progress = time.monotonic() + _PROGRESS_EVERY_S
    while True:
        for r in sorted(missing):
            if store.check([_key(f"node/{r}")]):
                missing.discard(r)
                logger.info("rendezvous: node rank %d joined (%d of %d)", r, nnodes - len(missing), nnodes)
        if not missing:
            return
        now = time.monotonic()
        if now >= deadline:
            msg = (
                f"node rank(s) {_ranks(missing)} of {nnodes} did not join within {timeout_s:g} s at {where}; "
                f"check that those nodes were started with --nnodes {nnodes}, that they reach {where} "
                f"(firewall, --master-addr) and raise --rendezvous-timeout if they start slowly"
            )
            store.set(_key("error"), msg)
            raise RendezvousTimeout(msg)
        if now >= next_progress:
            logger.info("rendezvous at %s: waiting for node rank(s) %s", where, _ranks(missing))
            next_progress = now + _PROGRESS_EVERY_S
        time.sleep(_POLL_S)


def _check_consistent(store: dist.TCPStore, table: dict[int, dict], nnodes: int) -> None:
    wrong = {r: rec.get("nnodes") for r, rec in table.items() if rec.get("nnodes") != nnodes}
    if wrong:
        detail = ", ".join(f"node rank {r} ({table[r].get('hostname', '?')}) has {n}" for r, n in sorted(wrong.items()))
        msg = f"nodes disagree on the node count: the head has --nnodes {nnodes}, {detail}"
        store.set(_key("error"), msg)
        raise RendezvousError(msg)
    versions = {rec.get("torch") for rec in table.values()}
    if len(versions) > 1:
        logger.warning("rendezvous: nodes run different torch versions %s", sorted(map(str, versions)))


def _wait_for_acks(store: dist.TCPStore, expected: int, until: float) -> None:
    # Keep the store up until every node has read the table; bounded, since all have joined.
    while store.add(_key("done"), 0) < expected:
        if time.monotonic() >= until:
            logger.warning("rendezvous: not every node confirmed reading the node table; closing the store")
            return
        time.sleep(_POLL_S)


# --------------------------------------------------------------------------- other nodes


def _run_node(
    addr: str, port: int, node_rank: int, record: dict, deadline: float, timeout_s: float, where: str
) -> dict[int, dict]:
    store = _connect(addr, port, deadline, timeout_s, where)
    try:
        _publish(store, node_rank, record)
        while not store.check([_key("table")]):
            if store.check([_key("error")]):
                raise RendezvousError(f"the head at {where} gave up: {store.get(_key('error')).decode()}")
            if time.monotonic() >= deadline:
                raise RendezvousTimeout(
                    f"node rank {node_rank} joined the head at {where} but the other nodes did not all "
                    f"join within {timeout_s:g} s (see the head's log for the missing ranks)"
                )
            time.sleep(_POLL_S)
        table = {int(r): rec for r, rec in json.loads(store.get(_key("table"))).items()}
        store.add(_key("done"), 1)
        return table
    except _STORE_ERRORS as exc:
        if isinstance(exc, RendezvousError):
            raise
        raise RendezvousError(f"lost the connection to the head at {where}: {exc}") from exc
    finally:
        del store


def _connect(addr: str, port: int, deadline: float, timeout_s: float, where: str) -> dist.TCPStore:
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RendezvousTimeout(
                f"could not reach the head at {where} within {timeout_s:g} s ({last}); check that node 0 "
                f"is running, that --master-addr/--master-port point at it and that the port is open"
            )
        try:
            # Probe with a plain socket first: TCPStore's own retry loop can sleep past our deadline.
            socket.create_connection((addr, port), timeout=min(remaining, 1.0)).close()
            return dist.TCPStore(addr, port, None, False, timedelta(seconds=max(remaining, 1.0)))
        except _STORE_ERRORS as exc:  # refused / DNS not ready yet: the head may still be starting
            last = exc
            time.sleep(min(_POLL_S * 4, max(deadline - time.monotonic(), 0)))


# --------------------------------------------------------------------------- helpers


def _publish(store: dist.TCPStore, node_rank: int, record: dict) -> None:
    claims = store.add(_key(f"join/{node_rank}"), 1)
    if claims > 1:
        first = store.get(_key(f"node/{node_rank}")) if store.check([_key(f"node/{node_rank}")]) else b"{}"
        host = json.loads(first).get("hostname", "another node")
        raise RendezvousError(
            f"node rank {node_rank} was already taken by {host}; give every node a distinct --node-rank"
        )
    store.set(_key(f"node/{node_rank}"), json.dumps(record))


def _key(name: str) -> str:
    return _PREFIX + name


def _ranks(ranks: Iterable[int]) -> str:
    return ", ".join(str(r) for r in sorted(ranks))
