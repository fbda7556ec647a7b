"""Both ends of the control channel as separate programs, for the network-namespace test.

``python channel_peer.py head HOST PORT N``: a head with no local rank and one remote node; sends N steps
(one of them larger than the relay's whole ring), waits for each step's output, prints a JSON summary.
``python channel_peer.py node HOST PORT``: node 1's relay and one rank that answers every step with the
number of its new requests, until Shutdown.
"""

from __future__ import annotations

import json
import sys
import time

from shardserve.executor import messages as m
from shardserve.executor.channel import REPLY_PORT_OFFSET, HeadChannel, NodeRelay, WorkerChannel


def big_step(step_id: int, num_requests: int, prompt_len: int) -> m.Step:
    new = [
        m.NewRequest(f"r{step_id}-{i}", i, m.i32(range(prompt_len)), b"", m.SamplingOptions(), m.i32([0]), 0)
        for i in range(num_requests)
    ]
    return m.Step(step_id, new_requests=new)


def head(host: str, port: int, n: int) -> None:
    channel = HeadChannel(host, 0, [1], base_port=port)
    start = time.monotonic()
    deadline = start + 60

    def check() -> None:
        if time.monotonic() > deadline:
            raise TimeoutError("the node did not answer in 60 s")

    hello = channel.recv(60, check)
    answers = []
    for step_id in range(n):
        step = big_step(step_id, 1 + step_id % 3, 300_000 if step_id == n // 2 else 10)
        channel.send(step, 60, check)
        reply = channel.recv(60, check)
        answers.append([reply.step_id, m.as_i32(reply.sampled).tolist()])
    channel.send(m.Shutdown(), 60, check)
    print(json.dumps({"hello": hello.rank, "answers": answers, "seconds": time.monotonic() - start}))
    channel.close()


def node(host: str, port: int) -> None:
    relay = NodeRelay(f"tcp://{host}:{port + REPLY_PORT_OFFSET + 1}", 1, ring_slots=4, ring_slot_bytes=4096)
    channel = WorkerChannel(relay.ring_spec, 0, f"tcp://{host}:{port + REPLY_PORT_OFFSET}")
    channel.send(m.Hello(0, 0, "node1"))
    while True:
        msg = channel.recv(timeout=60)
        if isinstance(msg, m.Shutdown):
            break
        channel.send(m.StepOutput(msg.step_id, sampled=m.i32([len(msg.new_requests)])))
    channel.close()
    relay.close()


if __name__ == "__main__":
    if sys.argv[1] == "head":
        head(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        node(sys.argv[2], int(sys.argv[3]))
