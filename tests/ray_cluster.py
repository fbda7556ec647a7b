"""A real two-node Ray cluster for the Ray backend tests, started and stopped by the test.

With root and ``ip netns`` (CI): the head (``ray start --head``) in one network namespace and the second
node in another, joined by a veth pair (``procs.veth_namespaces``); drivers (``shardserve serve``, client
scripts) run in the head's namespace. Elsewhere: two ``ray start`` on loopback, at 127.0.0.2 and 127.0.0.3 (Ray
replaces 127.0.0.1 by the host's outward address, but keeps the rest of 127/8), every port that Ray would
otherwise take at a fixed number given a free one.

Each ``ray start --block`` runs in its own session; teardown signals those sessions, then kills by pid any
process left that carries this cluster's marker variable (Ray's worker processes inherit it). Nothing else is
touched (never ``ray stop``, which stops every Ray cluster on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from procs import REPO, netns_available, veth_namespaces

from shardserve.distributed.rendezvous import free_port

MARKER = "SHARDSERVE_TEST_RAY_CLUSTER"
START_TIMEOUT_S = 90.0


@dataclass
class RayCluster:
    """A running test cluster."""

    address: str
    """GCS address for ``ray.init`` / ``RAY_ADDRESS``."""
    node_ips: list[str]
    """Head first."""
    netns: str | None
    """Namespace that drivers run in (the head's); None on loopback."""
    env: dict[str, str]
    """Environment for drivers: this checkout on PYTHONPATH, RAY_ADDRESS, usage stats off."""
    procs: list[subprocess.Popen] = field(default_factory=list)
    node_namespaces: list[str | None] = field(default_factory=list)

    def command(self, argv: list[str], netns: str | None = None) -> list[str]:
        """``argv`` run in the drivers' namespace (or ``netns``)."""
        ns = netns or self.netns
        return ["ip", "netns", "exec", ns, *argv] if ns else argv

    def popen(self, argv: list[str], log: Path) -> subprocess.Popen:
        """Start a driver process (e.g. ``shardserve serve``), output into ``log``, in its own session."""
        with open(log, "ab") as f:
            return subprocess.Popen(self.command(argv), env=self.env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip

    def python(self, code: str, *args: str, timeout: float = 180) -> dict:
        """Run ``code`` as a driver script; the JSON object its last stdout line holds (see :meth:`run_json`)."""
        return self.run_json([sys.executable, "-c", code, *args], timeout)

    def run_json(self, argv: list[str], timeout: float = 180) -> dict:
        """Run ``argv`` as a driver; returns the JSON object its last stdout line holds.

        Raises:
            AssertionError: it failed, timed out (it is killed) or printed no JSON; its output is quoted.
        """
        proc = subprocess.Popen(self.command(argv), env=self.env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            out, err = proc.communicate()
            raise AssertionError(f"driver timed out after {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
        lines = [line for line in out.splitlines() if line.startswith("{")]
        tail = f"{out[-2000:]}\n{err[-3000:]}"
        assert proc.returncode == 0 and lines, f"driver failed ({proc.returncode}):\n{tail}"
        return json.loads(lines[-1])


def _killpg(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _ray_start(
    cluster_dir: Path, temp_dir: Path, name: str, args: list[str], env: dict[str, str], netns: str | None
) -> subprocess.Popen:
    argv = ["ray", "start", "--block", "--disable-usage-stats", "--num-gpus", "0", "--object-store-memory",
            str(80 * 1024 * 1024), "--temp-dir", str(temp_dir / name), *args]  # fmt: skip
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    log = open(cluster_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _marked_pids(marker: str) -> list[int]:
    """Pids whose environment holds ``MARKER=marker`` (this cluster's processes, Ray workers included)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


WAIT_NODES = r"""
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({"nodes": [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
                            for n in alive]}))
"""


@contextlib.contextmanager
def ray_cluster(
    cluster_dir: Path, cpus: tuple[int, int] = (2, 1), use_netns: bool | None = None
) -> Iterator[RayCluster]:
    """Start a head and one more node with ``cpus`` CPUs each; yield the cluster once both are alive.

    Raises:
        AssertionError: the cluster did not come up within :data:`START_TIMEOUT_S` (the logs are quoted).
    """
    use_netns = netns_available() if use_netns is None else use_netns
    cluster_dir.mkdir(parents=True, exist_ok=True)
    marker = uuid.uuid4().hex
    # Ray's session directory holds AF_UNIX sockets (paths of at most 107 bytes): keep it short.
    temp_dir = Path(tempfile.mkdtemp(prefix="ssray-", dir="/tmp"))
    base_env = {**os.environ, MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    with contextlib.ExitStack() as stack:
        if use_netns:
            ns, addrs, _ = stack.enter_context(veth_namespaces("ry", "10.231.5"))
            port = 6380
            head_args = ["--head", "--node-ip-address", addrs[0], "--port", str(port), "--include-dashboard=false"]
            node_args = ["--address", f"{addrs[0]}:{port}", "--node-ip-address", addrs[1]]
            namespaces = [ns[0], ns[1]]
        else:
            # Ray replaces 127.0.0.1 by the host's outward address; other loopback addresses it keeps.
            addrs, port = ["127.0.0.2", "127.0.0.3"], free_port()
            head_args = ["--head", "--node-ip-address", addrs[0], "--port", str(port), "--include-dashboard=false",
                         "--ray-client-server-port", str(free_port())]  # fmt: skip
            node_args = ["--address", f"{addrs[0]}:{port}", "--node-ip-address", addrs[1]]
            namespaces = [None, None]
        address = f"{addrs[0]}:{port}"
        cluster = RayCluster(address, addrs, namespaces[0], {**base_env, "RAY_ADDRESS": address},
                             node_namespaces=namespaces)  # fmt: skip
        try:
            # The dashboard agent would listen on 52365 on every node: a free port each instead.
            head_args += ["--num-cpus", str(cpus[0]), "--dashboard-agent-listen-port", str(free_port())]
            node_args += ["--num-cpus", str(cpus[1]), "--dashboard-agent-listen-port", str(free_port())]
            cluster.procs.append(_ray_start(cluster_dir, temp_dir, "head", head_args, base_env, namespaces[0]))
            cluster.procs.append(_ray_start(cluster_dir, temp_dir, "node", node_args, base_env, namespaces[1]))
            for proc in cluster.procs:
                time.sleep(1)
                assert proc.poll() is None, "ray start exited:\n" + _logs(cluster_dir)
            found = cluster.python(WAIT_NODES, address, "2", str(START_TIMEOUT_S), timeout=START_TIMEOUT_S + 30)
            ips = sorted(n["ip"] for n in found["nodes"])
            assert len(found["nodes"]) == 2, f"Ray nodes alive: {found}\n" + _logs(cluster_dir)
            assert ips == sorted(addrs), found
            yield cluster
        finally:
            _stop(cluster, marker)
            shutil.rmtree(temp_dir, ignore_errors=True)


STOP_GRACE_S = 3.0
"""Seconds the ``ray start`` sessions get to stop after SIGTERM before they are killed: a throwaway cluster needs
no orderly shutdown (``ray start --block`` often takes 20 s or more to exit), only that nothing is left."""


def _stop(cluster: RayCluster, marker: str, grace: float = STOP_GRACE_S) -> None:
    for proc in reversed(cluster.procs):  # the node first, then the head
        _killpg(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in cluster.procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
    for proc in cluster.procs:
        _killpg(proc)  # what is left of each session
        proc.wait(10)
    # Ray's worker processes leave the session; they exit once their raylet is gone, or are killed here.
    deadline = time.monotonic() + 10
    while _marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _marked_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _logs(cluster_dir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(cluster_dir.glob("*.log"))
    )
