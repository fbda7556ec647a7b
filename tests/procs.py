"""Helpers for tests that run ``shardserve serve`` processes: start, wait, stream, find and kill ranks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from shardserve.distributed.rendezvous import free_port

REPO = Path(__file__).resolve().parents[1]
PROMPT = [1, 520, 3327, 314, 4649, 3135]
TINY = [
    "--dtype",
    "float32",
    "--device",
    "cpu",
    "--num-kv-blocks",
    "64",
    "--max-model-len",
    "256",
    "--log-level",
    "info",
]


def serve(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m shardserve serve ARGS`` from the repository root, stdout and stderr into ``log``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "shardserve", "serve", *args], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT)  # fmt: skip


def wait_healthy(url: str, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a server process exited early with {p.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not become healthy in {timeout} s")


@contextlib.contextmanager
def running_server(args: list[str], log: Path, timeout: float = 240) -> Iterator[str]:
    """Start ``shardserve serve ARGS --port P``, wait for /health, yield its URL, stop it on exit."""
    port = free_port()
    proc = serve([*args, "--port", str(port)], log)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, [proc], timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{log.read_text()[-3000:]}") from None
        yield url
    finally:
        stop([proc])


def stop(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL what is left after ``timeout`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def child_pid(parent: int, name: str) -> int | None:
    """Pid of ``parent``'s child whose process name (``/proc/PID/comm``) is ``name``, e.g. ``shardserve-r1``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Name", "").strip() == name and int(fields.get("PPid", "0")) == parent:
            return int(entry.name)
    return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_pid(parent: int, name: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = child_pid(parent, name)
        if pid is not None:
            return pid
        time.sleep(0.2)
    raise AssertionError(f"no child {name} of {parent}")


def complete(url: str, max_tokens: int = 12, timeout: float = 60) -> str:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


class Stream(threading.Thread):
    """A long streaming completion read on a thread; ``events`` holds ``(arrival time, data)`` pairs."""

    def __init__(self, url: str, max_tokens: int = 240):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list[tuple[float, str]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.events.append((time.monotonic(), line[len("data: ") :]))
        except httpx.HTTPError as e:
            self.error = e

    def wait_tokens(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < n:
            assert time.monotonic() < deadline and self.is_alive(), "the stream did not start"
            time.sleep(0.02)

    def error_event(self) -> tuple[float, dict]:
        """The final ``{"error": ...}`` event and when it arrived; asserts ``[DONE]`` follows it."""
        assert self.error is None, self.error
        assert self.events and self.events[-1][1] == "[DONE]", self.events[-3:]
        when, data = self.events[-2]
        body = json.loads(data)
        assert "error" in body, data
        return when, body["error"]


def watch_health(url: str, timeout: float) -> tuple[bool, float | None]:
    """Poll /health: (saw a 503, seconds until it answered 200 again after that), bounded by ``timeout``."""
    start = time.monotonic()
    saw_503 = False
    while time.monotonic() - start < timeout:
        try:
            code = httpx.get(url + "/health", timeout=2).status_code
        except httpx.HTTPError:
            code = None
        saw_503 = saw_503 or code == 503
        if saw_503 and code == 200:
            return True, time.monotonic() - start
        time.sleep(0.2)
    return saw_503, None


def kill_rank_mid_stream(url: str, launcher_pid: int, rank: int = 1) -> dict:
    """Kill ``rank`` (a child of ``launcher_pid``) during a stream; what the client saw, as JSON-ready data.

    Keys: ``error_after`` (seconds from the kill to the stream's error event), ``error`` (its body),
    ``saw_503`` and ``back_after`` (see :func:`watch_health`), ``same_text`` (a greedy completion after the
    restart equals the one before), ``victim`` (the pid killed).
    """
    wait_healthy(url, [])
    expected = complete(url)
    stream = Stream(url)
    stream.start()
    stream.wait_tokens(3)
    victim = wait_pid(launcher_pid, f"shardserve-r{rank}")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    saw_503, back_after = watch_health(url, timeout=60)
    stream.join(10)
    when, error = stream.error_event()
    return {"error_after": when - killed_at, "error": error, "saw_503": saw_503, "back_after": back_after,
            "same_text": complete(url) == expected, "victim": victim}  # fmt: skip


def netns_available() -> bool:
    """Root and a working ``ip netns`` (CI runs as root; elsewhere the network-namespace tests skip)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"ssprobe{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


@contextlib.contextmanager
def veth_namespaces(prefix: str, subnet: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    """Two network namespaces joined by a veth pair: two test hosts for multi-node runs.

    Yields ``(namespaces, addresses, veth names)``, host ``i`` at ``{subnet}.{i + 1}/24`` on ``veth[i]``
    with loopback up. Both namespaces (and with them the veth pair) are deleted on exit.
    """
    tag = uuid.uuid4().hex[:5]
    ns = [f"{prefix}A{tag}", f"{prefix}B{tag}"]
    addrs = [f"{subnet}.1", f"{subnet}.2"]
    veth = [f"v{prefix}A{tag}"[:15], f"v{prefix}B{tag}"[:15]]

    def sh(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, timeout=20)

    try:
        for n in ns:
            sh("ip", "netns", "add", n)
        sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, a in zip(ns, veth, addrs):
            sh("ip", "link", "set", v, "netns", n)
            sh("ip", "-n", n, "addr", "add", f"{a}/24", "dev", v)
            sh("ip", "-n", n, "link", "set", v, "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
        yield ns, addrs, veth
    finally:
        for n in ns:  # deleting a namespace removes its end of the veth pair too
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=20)
