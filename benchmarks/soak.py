"""Soak: offer about twice the measured capacity for N seconds; nothing may hang and nothing may be lost.

    python benchmarks/soak.py MODEL [--seconds 180] [--overload 2.0] [--max-queue-len 16] [-- extra serve flags]

Starts ``shardserve serve MODEL`` on a free port with a bounded queue, measures its capacity (completed
requests/s with a closed loop of clients), then sends an open-loop Poisson stream of requests at
``overload`` x capacity (half of them streamed). Every request must either complete (200, and a stream
ends with ``[DONE]``) or be refused (429/503); a client timeout counts as a hang and any other outcome
as lost. The server's RSS (the server and its worker processes) is printed at start and end.
Exits 1 when the invariant ``sent == completed + refused`` breaks or anything hung.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["The capital of France is", "Write a haiku about rain.", "def fibonacci(n):", "Once upon a time"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its children (bytes), from /proc."""
    total = 0
    pids = [pid] + [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(int(p.name)) == pid]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "shardserve", "serve", *([args.model] if args.model else []), "--port", str(port),
           "--device", "cpu", "--max-queue-len", str(args.max_queue_len), "--max-num-seqs", str(args.max_num_seqs),
           "--log-level", "warning", *args.serve_args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(args.server_log, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {args.server_log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become healthy in 300 s")


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int, timeout: float) -> str:
    """Outcome of one request: completed, refused, hung (client timeout) or lost (anything else)."""
    stream = i % 2 == 1
    body = {"prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            if not stream:
                r = await client.post("/v1/completions", json=body)
                if r.status_code == 200:
                    return "completed" if r.json()["choices"][0]["finish_reason"] == "length" else "lost"
                return "refused" if r.status_code in (429, 503) else f"lost:{r.status_code}"
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return "refused" if r.status_code in (429, 503) else f"lost:{r.status_code}"
                last = [line async for line in r.aiter_lines() if line.startswith("data: ")][-2:]
                ok = len(last) == 2 and last[1] == "data: [DONE]" and '"finish_reason":"length"' in last[0]
                return "completed" if ok else "lost:stream"
    except TimeoutError:
        return "hung"
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        return f"lost:{type(e).__name__}"


async def measure_capacity(url: str, args: argparse.Namespace) -> float:
    """Completed requests/s of a closed loop of 2 x ``max_num_seqs`` clients (a full batch and a short queue)."""
    clients = 2 * args.max_num_seqs
    done = 0
    stop_at = time.monotonic() + args.warmup
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:

        async def loop(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < stop_at:
                outcome = await one_request(client, i, args.max_tokens, args.client_timeout)
                done += outcome == "completed"  # not `done += await ...`: that reads `done` before the await
                i += clients

        start = time.monotonic()
        await asyncio.gather(*(loop(k) for k in range(clients)))
    return done / (time.monotonic() - start)


async def soak(url: str, rate: float, args: argparse.Namespace, pid: int) -> collections.Counter:
    """Poisson arrivals at ``rate`` requests/s for ``--seconds``; returns the outcome counts."""
    outcomes: collections.Counter = collections.Counter()
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        tasks: list[asyncio.Task] = []
        start = time.monotonic()
        next_report = start + 10
        i = 0
        while time.monotonic() - start < args.seconds:
            task = asyncio.create_task(one_request(client, i, args.max_tokens, args.client_timeout))
            task.add_done_callback(lambda t: outcomes.update([t.result()]))
            tasks.append(task)
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
            if time.monotonic() >= next_report:
                next_report += 10
                print(f"  t={time.monotonic() - start:5.0f} s  sent {i}  {dict(outcomes)}  "
                      f"rss {rss_bytes(pid) / 2**20:.0f} MiB", flush=True)  # fmt: skip
        await asyncio.gather(*tasks)
    outcomes["sent"] = i
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="model path (default: the embedded SmolLM2)")
    parser.add_argument("--seconds", type=float, default=180.0, help="length of the overload phase")
    parser.add_argument("--overload", type=float, default=2.0, help="offered load / measured capacity")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of the capacity measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-queue-len", type=int, default=16)
    parser.add_argument("--client-timeout", type=float, default=120.0, help="seconds before a request counts as hung")
    parser.add_argument("--server-log", default="soak-server.log")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # extra `shardserve serve` flags after --
    args = parser.parse_args(argv[:split])
    args.serve_args = argv[split + 1 :]
    port = free_port()
    proc = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        capacity = asyncio.run(measure_capacity(url, args))
        rss_start = rss_bytes(proc.pid)
        rate = args.overload * capacity
        print(
            f"capacity {capacity:.2f} req/s ({args.max_tokens} tokens each); offering {rate:.2f} req/s "
            f"({args.overload:.1f}x) for {args.seconds:.0f} s; server RSS {rss_start / 2**20:.0f} MiB",
            flush=True,
        )
        start = time.monotonic()
        out = asyncio.run(soak(url, rate, args, proc.pid))
        elapsed = time.monotonic() - start
        rss_end = rss_bytes(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
    lost = sum(v for k, v in out.items() if k.startswith("lost"))
    goodput = out["completed"] / elapsed
    print(
        f"sent {out['sent']}  completed {out['completed']}  refused {out['refused']}  hung {out['hung']}  "
        f"lost {lost} { ({k: v for k, v in out.items() if k.startswith('lost')}) }"
    )
    print(
        f"goodput {goodput:.2f} req/s = {goodput / capacity:.2f}x capacity; "
        f"refused {out['refused'] / max(out['sent'], 1):.0%} of requests"
    )
    print(
        f"server RSS start {rss_start / 2**20:.0f} MiB, end {rss_end / 2**20:.0f} MiB "
        f"({(rss_end - rss_start) / 2**20:+.0f} MiB); exit code after SIGTERM: {code}"
    )
    ok = out["sent"] == out["completed"] + out["refused"] and out["hung"] == 0 and code == 0
    print("PASS" if ok else "FAIL: every request must complete or be refused, none may hang")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
