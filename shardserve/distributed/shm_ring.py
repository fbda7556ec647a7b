"""A single-writer, multi-reader ring buffer in shared memory (vLLM's ``shm_broadcast`` MessageQueue idea).

The head writes each control message once; every rank on the node reads it from the same memory, so a
step costs one copy in and one copy out per rank, with no system call on the fast path. Layout of the
segment: ``num_slots`` slot headers (one "written" byte, then one "read" byte per reader), then
``num_slots`` data slots of ``slot_bytes``. A slot's data starts with its chunk length (uint32) and a
last-chunk flag; a message larger than one slot spills over consecutive slots and is joined by the
reader, so any size fits (one larger than the whole ring streams through it as readers keep up).

Protocol per slot (vLLM's): the writer waits until every reader has read the slot, clears "written",
copies the data, clears the read flags, then sets "written"; reader ``r`` waits until "written" is set
and its own read flag is clear, copies the data out, then sets its flag. Stores happen in that order
(x86-64 keeps store order; a lock acquire/release serves as the fence elsewhere).

Waits spin with ``sched_yield`` for ``spin_s`` seconds (2 ms where the node has cores to spare, 50 us
where every core has a process), then sleep with a growing pause (to ``max_sleep_s``), so an idle rank
costs almost no CPU while a busy one answers within microseconds.
Every wait takes a ``timeout`` and a ``check`` callable called every ``POLL_S`` (liveness: it raises to
give up, e.g. when a reader process died).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing import shared_memory

import numpy as np

POLL_S = 0.2
"""How often a waiting side calls its liveness check (seconds)."""
_CHUNK_HEADER = struct.Struct("<IB")  # payload bytes in this slot, 1 if it is the message's last chunk
_FENCE = threading.Lock()


def _fence() -> None:
    # Acquire/release of a lock is a full memory barrier on every platform CPython runs on.
    with _FENCE:
        pass


class RingTimeoutError(TimeoutError):
    """A ring wait passed its timeout."""


class ShmRingBuffer:
    """One writer, ``num_readers`` readers, fixed slots in POSIX shared memory.

    Create with :meth:`create` (the writer's process owns and unlinks the segment) and open with
    :meth:`attach` (a reader, by ``name`` and ``reader_index``).

    Args:
        num_readers: readers that must each read every message.
        num_slots: slots in the ring.
        slot_bytes: bytes of one slot including its 5-byte chunk header.
    """

    def __init__(self, shm: shared_memory.SharedMemory, num_readers: int, num_slots: int, slot_bytes: int,
                 owner: bool, reader_index: int | None = None):  # fmt: skip
        self.shm = shm
        self.num_readers, self.num_slots, self.slot_bytes = num_readers, num_slots, slot_bytes
        self.owner = owner
        self.reader_index = reader_index
        self._header_bytes = num_slots * (1 + num_readers)
        self._flags = np.frombuffer(shm.buf, dtype=np.uint8, count=self._header_bytes).reshape(
            num_slots, 1 + num_readers
        )
        self._data = shm.buf[self._header_bytes : self._header_bytes + num_slots * slot_bytes]
        self._pos = 0
        """Next slot this side writes (writer) or reads (reader), as a running count."""
        # Spin only where the node has a core to spare for it: with as many processes as cores (a CPU
        # launch), a spinning reader takes the CPU from the rank or the head that would end its wait.
        spare_cores = (os.cpu_count() or 1) > num_readers + 1
        self.spin_s = 2e-3 if spare_cores else 5e-5
        self.max_sleep_s = 1e-3

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def create(cls, num_readers: int, num_slots: int = 16, slot_bytes: int = 1 << 16) -> ShmRingBuffer:
        """A new ring (the writer's side), named ``shardserve-<uuid>``.

        Raises:
            ValueError: no reader, fewer than 2 slots, or a slot too small for its header.
        """
        if num_readers < 1 or num_slots < 2 or slot_bytes <= _CHUNK_HEADER.size:
            raise ValueError(f"bad ring shape: {num_readers} readers, {num_slots} slots of {slot_bytes} bytes")
        size = num_slots * (1 + num_readers) + num_slots * slot_bytes
        shm = shared_memory.SharedMemory(name=f"shardserve-{uuid.uuid4().hex[:16]}", create=True, size=size)
        shm.buf[: num_slots * (1 + num_readers)] = bytes(num_slots * (1 + num_readers))
        ring = cls(shm, num_readers, num_slots, slot_bytes, owner=True)
        ring._flags[:, 1:] = 1  # every slot starts "read by all": free for the writer
        return ring

    @classmethod
    def attach(cls, name: str, num_readers: int, num_slots: int, slot_bytes: int, reader_index: int) -> ShmRingBuffer:
        """Open an existing ring as reader ``reader_index``.

        Raises:
            FileNotFoundError: no segment of that name (the writer is gone).
            ValueError: ``reader_index`` out of range.
        """
        if not 0 <= reader_index < num_readers:
            raise ValueError(f"reader index {reader_index} out of range for {num_readers} readers")
        # Python < 3.13 registers an attached segment with the resource tracker too. A spawned reader shares
        # its parent's tracker, where the name is registered already (a set: no change); unregistering here
        # would drop the owner's registration, which is what cleans the segment up if the owner crashes.
        extra = {"track": False} if sys.version_info >= (3, 13) else {}
        shm = shared_memory.SharedMemory(name=name, create=False, **extra)
        return cls(shm, num_readers, num_slots, slot_bytes, owner=False, reader_index=reader_index)

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(num_readers, num_slots, slot_bytes)``: what a reader needs besides the name."""
        return self.num_readers, self.num_slots, self.slot_bytes

    def close(self) -> None:
        """Detach; the owner also unlinks the segment."""
        self._flags = None  # type: ignore[assignment] - release the buffer exports before closing
        self._data.release()
        with contextlib.suppress(BufferError):  # a caller still holds a view; the mapping goes with the process
            self.shm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()

    # -- waiting ---------------------------------------------------------------------------------
    def _wait(self, ready: Callable[[], bool], timeout: float | None, check: Callable[[], None] | None) -> None:
        if ready():
            return
        start = time.monotonic()
        next_check = start + POLL_S
        deadline = None if timeout is None else start + timeout
        sleep = 0.0
        while not ready():
            now = time.monotonic()
            if now - start < self.spin_s:
                os.sched_yield()
            else:
                sleep = min(self.max_sleep_s, max(2e-5, sleep * 2))
                time.sleep(sleep)
            if now >= next_check:
                next_check = now + POLL_S
                if check is not None:
                    check()
            if deadline is not None and now > deadline:
                raise RingTimeoutError(f"ring {self.name}: no progress for {timeout:.1f} s")

    # -- writer ----------------------------------------------------------------------------------
    def write(
        self, data: bytes | memoryview, timeout: float | None = None, check: Callable[[], None] | None = None
    ) -> None:
        """Publish one message to every reader (waits for free slots).

        Raises:
            RingTimeoutError: a slot stayed unread for ``timeout`` seconds; whatever ``check`` raises.
        """
        view = memoryview(data)
        cap = self.slot_bytes - _CHUNK_HEADER.size
        offset = 0
        while True:
            chunk = view[offset : offset + cap]
            offset += len(chunk)
            last = offset >= len(view)
            slot = self._pos % self.num_slots
            flags = self._flags[slot]
            self._wait(lambda f=flags: bool(f[1:].all()), timeout, check)
            flags[0] = 0
            _fence()
            base = slot * self.slot_bytes
            _CHUNK_HEADER.pack_into(self._data, base, len(chunk), last)
            self._data[base + _CHUNK_HEADER.size : base + _CHUNK_HEADER.size + len(chunk)] = chunk
            _fence()
            flags[1:] = 0
            _fence()
            flags[0] = 1
            self._pos += 1
            if last:
                return

    # -- reader ----------------------------------------------------------------------------------
    def read(self, timeout: float | None = None, check: Callable[[], None] | None = None) -> bytes:
        """The next message (waits for it).

        Raises:
            RingTimeoutError: nothing arrived for ``timeout`` seconds; whatever ``check`` raises.
        """
        r = 1 + self.reader_index
        parts = []
        while True:
            slot = self._pos % self.num_slots
            flags = self._flags[slot]
            self._wait(lambda f=flags: f[0] == 1 and f[r] == 0, timeout, check)
            _fence()
            base = slot * self.slot_bytes
            size, last = _CHUNK_HEADER.unpack_from(self._data, base)
            if size > self.slot_bytes - _CHUNK_HEADER.size:
                raise ValueError(f"ring {self.name}: corrupt chunk header ({size} bytes)")
            start = base + _CHUNK_HEADER.size
            parts.append(bytes(self._data[start : start + size]))
            _fence()
            flags[r] = 1
            self._pos += 1
            if last:
                return parts[0] if len(parts) == 1 else b"".join(parts)
