"""The control channel: the shared-memory ring, the typed codec, the TCP relay to another node."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procs import netns_available, veth_namespaces

from shardserve.distributed.shm_ring import RingTimeoutError, ShmRingBuffer
from shardserve.executor import messages as m
from shardserve.executor.channel import HeadChannel, RingSpec, WorkerChannel

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def read_all(ring: ShmRingBuffer, reader: int, count: int, out: list) -> threading.Thread:
    mirror = ShmRingBuffer.attach(ring.name, *ring.shape, reader_index=reader)

    def run() -> None:
        for _ in range(count):
            out.append(mirror.read(timeout=20))
        mirror.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_ring_wraps_around_many_times_in_order_for_every_reader():
    ring = ShmRingBuffer.create(num_readers=2, num_slots=4, slot_bytes=64)
    try:
        got = [[], []]
        threads = [read_all(ring, r, 200, got[r]) for r in range(2)]
        sent = [f"message {i}".encode() * (1 + i % 3) for i in range(200)]
        for data in sent:
            ring.write(data, timeout=20)
        for t in threads:
            t.join(30)
        assert got[0] == sent and got[1] == sent
    finally:
        ring.close()


def test_message_larger_than_a_slot_and_than_the_whole_ring():
    ring = ShmRingBuffer.create(num_readers=1, num_slots=4, slot_bytes=1024)
    try:
        got = []
        t = read_all(ring, 0, 3, got)
        big = os.urandom(1 << 20)  # 1 MiB through a 4 KiB ring: it streams as the reader keeps up
        for data in (b"x" * 1019, big, b""):  # exactly one slot's payload, many rings, empty
            ring.write(data, timeout=20)
        t.join(30)
        assert got == [b"x" * 1019, big, b""]
    finally:
        ring.close()


def _read_one_and_die(name: str, shape: tuple) -> None:
    ShmRingBuffer.attach(name, *shape, reader_index=0).read(timeout=20)
    os._exit(3)


def test_writer_notices_a_reader_that_died_instead_of_hanging():
    ring = ShmRingBuffer.create(num_readers=1, num_slots=2, slot_bytes=64)
    proc = mp.get_context("spawn").Process(target=_read_one_and_die, args=(ring.name, ring.shape))
    proc.start()
    try:
        ring.write(b"first", timeout=20)
        proc.join(30)
        assert proc.exitcode == 3

        def check() -> None:
            if not proc.is_alive():
                raise RuntimeError("reader process died")

        start = time.monotonic()
        with pytest.raises(RuntimeError, match="reader process died"):
            for i in range(10):  # the ring fills: the writer waits, and its liveness check gives up
                ring.write(b"more %d" % i, timeout=20, check=check)
        assert time.monotonic() - start < 5
        with pytest.raises(RingTimeoutError):
            ring.write(b"stuck", timeout=0.3)
    finally:
        ring.close()


def test_steps_round_trip_through_the_codec_with_arrays_as_bytes():
    step = m.Step(7, new_requests=[m.NewRequest("a", 3, m.i32([1, 2, 3]), b"", m.SamplingOptions(seed=2**63 - 1),
                                                m.i32([5]), 0)],  # fmt: skip
                  rows=m.i32([3]), num_new_tokens=m.i32([3]), sample=bytes([1]))  # fmt: skip
    back = m.decode_step_message(m.encode(step))
    assert back == step and m.as_i32(back.new_requests[0].prompt_token_ids).tolist() == [1, 2, 3]
    reply = m.StepOutput(7, sampled=m.i32([42]), failures=[m.RequestFailure("a", 3, "boom")])
    assert m.decode_reply(m.encode(reply)) == reply
    with pytest.raises(m.MalformedMessageError):
        m.decode_step_message(m.encode(reply))  # a reply is not a head message
    with pytest.raises(m.MalformedMessageError):
        m.as_i32(b"abc")


class _Exploit:
    """Unpickling this would create a file: the proof that a pickle ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_on_the_channel_is_rejected_as_malformed_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(str(marker)))
    head = HeadChannel("127.0.0.1", 1, [])
    rank = WorkerChannel(head.ring_spec, 0, head.addresses.replies)
    try:
        head.ring.write(payload, timeout=5)  # forged bytes where a step belongs
        with pytest.raises(m.MalformedMessageError):
            rank.recv(timeout=5)
        rank.sock.send(payload)  # and where a reply belongs: dropped, then the next real reply comes through
        rank.send(m.Ready(0))
        assert head.recv(5, lambda: None) == m.Ready(0)
        assert not marker.exists()
    finally:
        rank.close()
        head.close()


def test_worker_channel_reads_what_the_head_sends_and_answers():
    head = HeadChannel("127.0.0.1", 2, [])
    ranks = [WorkerChannel(head.ring_spec, i, head.addresses.replies) for i in range(2)]
    try:
        head.send(m.InitKVCache(12, 256), 5, lambda: None)
        for i, rank in enumerate(ranks):
            assert rank.recv(timeout=5) == m.InitKVCache(12, 256)
            rank.send(m.KVCapacity(i, 10 + i))
        got = sorted([head.recv(5, lambda: None), head.recv(5, lambda: None)], key=lambda r: r.rank)
        assert got == [m.KVCapacity(0, 10), m.KVCapacity(1, 11)]
        assert isinstance(head.ring_spec, RingSpec)
    finally:
        for rank in ranks:
            rank.close()
        head.close()


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")
def test_a_remote_node_over_tcp_between_network_namespaces():
    """The head in one namespace, node 1's relay and rank in another, joined only by a veth pair."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}"}
    with veth_namespaces("ch", "10.211.7") as (ns, addrs, _):
        port = 29811
        peer = str(HERE / "channel_peer.py")
        node = subprocess.Popen(["ip", "netns", "exec", ns[1], sys.executable, peer, "node", addrs[0], str(port)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            cmd = ["ip", "netns", "exec", ns[0], sys.executable, peer, "head", addrs[0], str(port), "9"]
            head = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            assert head.returncode == 0, head.stderr[-3000:]
            summary = json.loads(head.stdout.strip().splitlines()[-1])
            assert summary["hello"] == 0
            assert summary["answers"] == [[i, [1 + i % 3]] for i in range(9)]
            assert node.wait(30) == 0
        finally:
            if node.poll() is None:
                node.kill()
