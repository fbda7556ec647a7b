"""interface_for inside a real network namespace joined to another by a veth pair (needs root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 not installed"
    if os.geteuid() != 0:
        return "needs root for ip netns"
    probe = f"ssprobe{uuid.uuid4().hex[:6]}"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"`ip netns add` fails here: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture(scope="module")
def veth_pair():
    """Namespaces ns1/ns2 joined by a veth pair: 10.77.0.1/24 in ns1, 10.77.0.2/24 in ns2."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    ns1, ns2, veth1, veth2 = f"ss1{tag}", f"ss2{tag}", f"vs1{tag}", f"vs2{tag}"
    try:
        _ip("netns", "add", ns1)
        _ip("netns", "add", ns2)
        _ip("link", "add", veth1, "type", "veth", "peer", "name", veth2)
        _ip("link", "set", veth1, "netns", ns1)
        _ip("link", "set", veth2, "netns", ns2)
        for ns, dev, addr in ((ns1, veth1, "10.77.0.1/24"), (ns2, veth2, "10.77.0.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ns1, veth1, ns2, veth2
    finally:
        for ns in (ns1, ns2):  # deleting a namespace removes its end of the veth pair too
            _ip("netns", "del", ns, check=False)


def _in_ns(ns: str, code: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-c", code]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _interface_in(ns: str, addr: str, no_iproute2: bool = False) -> list[str]:
    patch = "netconf._run_ip = lambda *a: None;" if no_iproute2 else ""
    code = f"from shardserve.distributed import netconf;{patch}print(*netconf.interface_for({addr!r}))"
    done = subprocess.run(_in_ns(ns, code), capture_output=True, text=True, timeout=60, env=_env(), check=True)
    return done.stdout.split()


def test_route_to_peer_names_the_veth(veth_pair):
    ns1, veth1, _, _ = veth_pair
    assert _interface_in(ns1, "10.77.0.2") == [veth1, "10.77.0.1"]


def test_own_address_names_the_veth_not_lo(veth_pair):
    # The head looking up its own MASTER_ADDR.
    ns1, veth1, _, _ = veth_pair
    assert _interface_in(ns1, "10.77.0.1") == [veth1, "10.77.0.1"]


def test_fallback_without_iproute2_names_the_veth(veth_pair):
    ns1, veth1, _, _ = veth_pair
    assert _interface_in(ns1, "10.77.0.2", no_iproute2=True) == [veth1, "10.77.0.1"]


NODE = """
import json
from shardserve.distributed.netconf import network_env
from shardserve.distributed.rendezvous import node_info, node_rendezvous
net, _ = network_env("10.77.0.1", {{}})
table = node_rendezvous("10.77.0.1", 29611, 2, {rank}, 30.0, node_info({rank}, [{rank}], net=net))
print(json.dumps(table))
"""


@pytest.mark.slow
def test_two_namespaces_rendezvous_over_the_veth(veth_pair):
    # Two "nodes" that only share the veth link: each finds its interface toward the head and they meet.
    ns1, veth1, ns2, veth2 = veth_pair
    procs = [
        subprocess.Popen(_in_ns(ns, NODE.format(rank=rank)), stdout=subprocess.PIPE, text=True, env=_env())
        for ns, rank in ((ns2, 1), (ns1, 0))
    ]
    try:
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    tables = [json.loads(out) for out in outs]
    assert tables[0] == tables[1]
    assert tables[0]["0"]["net"]["GLOO_SOCKET_IFNAME"] == veth1  # the head's own address -> its veth
    assert tables[0]["1"]["net"]["NCCL_SOCKET_IFNAME"] == "=" + veth2
