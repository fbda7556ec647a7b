"""The control channel between the head and the ranks: one class per side, typed messages both ways.

Head -> ranks: the head encodes each message once (:mod:`shardserve.executor.messages`) and writes it
into a shared-memory ring (:class:`~shardserve.distributed.shm_ring.ShmRingBuffer`) that every rank of
the head's node reads; for every other node it sends the same bytes over one TCP stream (a pyzmq PUSH
socket) to that node's :class:`NodeRelay`, which writes them into the node's own ring. Ranks -> head:
each rank has a PUSH socket connected to the head's one PULL socket (replies, failures, errors).

The addresses of a generation live in the launch's TCPStore under ``shardserve/gen{g}/channel``
(JSON), so headless nodes and late workers find them; a ring's name and shape travel with the worker's
arguments from the process that created it, which exists before the worker starts. Nothing received is
unpickled: frames that do not decode as a message of the expected kind raise
:class:`~shardserve.executor.messages.MalformedMessageError`.

With the Ray backend (:mod:`shardserve.executor.ray_executor`) the head has no ring of its own: every Ray
node that holds ranks, the head's included, gets a stream, and a relay actor on that node creates the ring
and returns its :class:`RingSpec` to the head (a Ray call's result); the head starts the node's rank actors
only after that, with the spec in their ``WorkerArgs``. So on both paths a rank attaches to a ring that
already exists: no retry, no name chosen in advance, no ring key in the store.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from shardserve.distributed.shm_ring import POLL_S, RingTimeoutError, ShmRingBuffer
from shardserve.executor import messages as m

logger = logging.getLogger(__name__)

REPLY_PORT_OFFSET = 2
"""With a fixed ``--master-port`` P the head listens for replies on P + 2 and for node n's stream on P + 2 + n."""


def channel_key(generation: int) -> str:
    """Store key holding the channel addresses of ``generation`` (JSON)."""
    return f"shardserve/gen{generation}/channel"


@dataclass(frozen=True)
class RingSpec:
    """What a reader needs to attach to a ring."""

    name: str
    num_readers: int
    num_slots: int
    slot_bytes: int

    @classmethod
    def of(cls, ring: ShmRingBuffer) -> RingSpec:
        return cls(ring.name, *ring.shape)


@dataclass(frozen=True)
class ChannelAddresses:
    """Where the head listens: replies from every rank, and one stream per remote node."""

    replies: str
    """``tcp://host:port`` of the head's PULL socket."""
    nodes: dict[int, str]
    """Node rank -> ``tcp://host:port`` of the head's PUSH socket feeding that node's relay."""

    def to_json(self) -> str:
        return json.dumps({"replies": self.replies, "nodes": {str(k): v for k, v in self.nodes.items()}})

    @classmethod
    def from_json(cls, text: str | bytes) -> ChannelAddresses:
        d = json.loads(text)
        return cls(replies=str(d["replies"]), nodes={int(k): str(v) for k, v in d["nodes"].items()})


def _bind(sock: zmq.Socket, host: str, port: int | None) -> str:
    if port is None:
        port = sock.bind_to_random_port(f"tcp://{host}")
    else:
        sock.bind(f"tcp://{host}:{port}")
    return f"tcp://{host}:{port}"


def _tcp_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class HeadChannel:
    """The head's side: broadcast to every rank, receive their replies.

    Args:
        host: address the ranks reach the head at (``--master-addr``).
        num_local_ranks: ranks on the head's node (readers of the local ring; 0 for none).
        remote_nodes: node ranks of the other nodes that hold ranks.
        base_port: fixed port base (``--master-port``) or None for free ports.
        ring_slots, ring_slot_bytes: shape of the local ring.
    """

    def __init__(
        self,
        host: str,
        num_local_ranks: int,
        remote_nodes: list[int],
        base_port: int | None = None,
        ring_slots: int = 16,
        ring_slot_bytes: int = 1 << 16,
    ):
        self.ctx = zmq.Context()
        host = _tcp_host(host)
        self.replies = self.ctx.socket(zmq.PULL)
        self.replies.setsockopt(zmq.LINGER, 0)
        self.replies.setsockopt(zmq.RCVHWM, 0)
        reply_port = None if base_port is None else base_port + REPLY_PORT_OFFSET
        self.addresses_nodes: dict[int, str] = {}
        self.streams: dict[int, zmq.Socket] = {}
        try:
            replies_addr = _bind(self.replies, host, reply_port)
            for node in remote_nodes:
                sock = self.ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 0)  # never drop: a full queue is a stalled node, seen by liveness checks
                port = None if base_port is None else base_port + REPLY_PORT_OFFSET + node
                self.addresses_nodes[node] = _bind(sock, host, port)
                self.streams[node] = sock
        except zmq.ZMQError:
            self.close()
            raise
        self.addresses = ChannelAddresses(replies_addr, dict(self.addresses_nodes))
        self.ring = ShmRingBuffer.create(num_local_ranks, ring_slots, ring_slot_bytes) if num_local_ranks else None
        self._poller = zmq.Poller()
        self._poller.register(self.replies, zmq.POLLIN)
        self.num_sent_bytes = 0

    @property
    def ring_spec(self) -> RingSpec | None:
        return RingSpec.of(self.ring) if self.ring is not None else None

    def send(self, message: m.HeadMessage, timeout: float | None, check: Callable[[], None]) -> None:
        """Deliver one message to every rank (written once; waits while a ring is full).

        Raises:
            RingTimeoutError: the local ring stayed full for ``timeout`` seconds; whatever ``check`` raises.
        """
        data = m.encode(message)
        self.num_sent_bytes += len(data)
        if self.ring is not None:
            self.ring.write(data, timeout, check)
        for sock in self.streams.values():
            sock.send(data, copy=len(data) < 65536)

    def recv(self, timeout: float | None, check: Callable[[], None]) -> m.RankMessage:
        """The next reply of any rank; ``check()`` runs every ``POLL_S`` seconds while waiting.

        Malformed frames are logged and dropped.

        Raises:
            RingTimeoutError: nothing arrived for ``timeout`` seconds; whatever ``check`` raises.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                data = self.replies.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                data = None
            if data is not None:
                try:
                    return m.decode_reply(data)
                except m.MalformedMessageError as e:
                    logger.error("%s (%d bytes); dropped", e, len(data))
                    continue
            wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            if self._poller.poll(int(wait * 1000)):
                continue
            check()
            if deadline is not None and time.monotonic() >= deadline:
                raise RingTimeoutError(f"no reply from the ranks for {timeout:.1f} s")

    def close(self) -> None:
        if getattr(self, "ring", None) is not None:
            self.ring.close()
            self.ring = None
        for sock in [getattr(self, "replies", None), *getattr(self, "streams", {}).values()]:
            if sock is not None:
                sock.close(linger=0)
        self.ctx.term()


class WorkerChannel:
    """A rank's side: read the head's messages from its node's ring, send replies to the head.

    Args:
        ring: the node's ring (created by the head on its own node, by the :class:`NodeRelay` elsewhere).
        reader_index: this rank's reader slot in that ring (its position among the node's ranks).
        replies: the head's reply address.
    """

    def __init__(self, ring: RingSpec, reader_index: int, replies: str):
        self.ring = ShmRingBuffer.attach(ring.name, ring.num_readers, ring.num_slots, ring.slot_bytes, reader_index)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 2000)  # a WorkerError sent just before exiting must get out
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.connect(replies)

    def recv(self, timeout: float | None = None, check: Callable[[], None] | None = None) -> m.HeadMessage:
        """The next message from the head.

        Raises:
            MalformedMessageError: the bytes are not a head message.
            RingTimeoutError: nothing arrived within ``timeout``.
        """
        return m.decode_step_message(self.ring.read(timeout, check))

    def send(self, message: m.RankMessage) -> None:
        self.sock.send(m.encode(message))

    def close(self) -> None:
        self.ring.close()
        self.sock.close()
        self.ctx.term()


class NodeRelay:
    """Feeds one node's ring from the head's TCP stream for that node (runs on a daemon thread).

    It runs in a headless node's launcher (``mp``) or in a relay actor on a Ray node (``ray``).

    Args:
        address: the head's stream for this node (``ChannelAddresses.nodes[node_rank]``).
        num_readers: ranks on this node.
    """

    def __init__(self, address: str, num_readers: int, ring_slots: int = 16, ring_slot_bytes: int = 1 << 16):
        self.ring = ShmRingBuffer.create(num_readers, ring_slots, ring_slot_bytes)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(address)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shardserve-relay", daemon=True)
        self._thread.start()

    @property
    def ring_spec(self) -> RingSpec:
        return RingSpec.of(self.ring)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(int(POLL_S * 1000)):
                    continue
                data = self.sock.recv(copy=False)

                def stopping() -> None:
                    if self._stop.is_set():
                        raise RingTimeoutError("relay stopped")

                self.ring.write(data.buffer, None, stopping)
        except RingTimeoutError:
            pass
        except Exception as e:
            self.error = e
            logger.exception("control relay failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close(linger=0)
        self.ctx.term()
        self.ring.close()


def publish_addresses(store, generation: int, addresses: ChannelAddresses) -> None:
    store.set(channel_key(generation), addresses.to_json())


def read_addresses(store, generation: int) -> ChannelAddresses:
    """The channel addresses of ``generation`` (waits for the key up to the store's timeout)."""
    return ChannelAddresses.from_json(store.get(channel_key(generation)))
