"""Two shardserve nodes (PP=2): on loopback, and in two network namespaces joined by veth."""

import json
import signal
import subprocess
import sys
import time

import pytest
from procs import netns_available, veth_namespaces, wait_healthy

from shardserve.distributed.rendezvous import free_port

PROMPT = [1, 520, 3327, 314, 4649, 3135]
COMMON = [
    "-pp",
    "2",
    "--nnodes",
    "2",
    "--dtype",
    "float32",
    "--device",
    "cpu",
    "--num-kv-blocks",
    "64",
    "--max-model-len",
    "256",
    "--rendezvous-timeout",
    "120",
    "--log-level",
    "info",
]


def serve_cmd(model, node_rank, master, master_port, http_port, host="127.0.0.1"):
    return [
        sys.executable,
        "-m",
        "shardserve",
        "serve",
        str(model),
        *COMMON,
        "--node-rank",
        str(node_rank),
        "--master-addr",
        master,
        "--master-port",
        str(master_port),
        "--host",
        host,
        "--port",
        str(http_port),
    ]


@pytest.fixture(scope="module")
def expected_tokens(tiny_llama_dir):
    from shardserve import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    try:
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    finally:
        llm.shutdown()
    return out[0].outputs[0].text


def stop_all(procs, timeout=30):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_two_launches_on_loopback(tiny_llama_dir, expected_tokens):
    import openai

    mport, hport = free_port(), free_port()
    head = subprocess.Popen(serve_cmd(tiny_llama_dir, 0, "127.0.0.1", mport, hport))
    node = subprocess.Popen(serve_cmd(tiny_llama_dir, 1, "127.0.0.1", mport, hport))
    try:
        wait_healthy(f"http://127.0.0.1:{hport}", [head, node])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{hport}/v1", api_key="x", timeout=60)
        out = client.completions.create(
            model=str(tiny_llama_dir), prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.choices[0].text == expected_tokens
    finally:
        stop_all([head])
        # The headless node must not outlive the head (no orphaned workers).
        node.wait(timeout=60)
        stop_all([node])


@pytest.mark.slow
def test_head_without_second_node_fails_naming_it(tiny_llama_dir):
    cmd = serve_cmd(tiny_llama_dir, 0, "127.0.0.1", free_port(), free_port())
    cmd[cmd.index("--rendezvous-timeout") + 1] = "5"
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - start < 90
    assert "node rank(s) 1" in done.stderr


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")
def test_two_nodes_in_network_namespaces(tiny_llama_dir, expected_tokens):
    procs = []
    with veth_namespaces("ss", "10.79.0") as (ns, addrs, veth):
        try:
            mport, hport = 29611, 8711
            for rank, n in enumerate(ns):
                cmd = [
                    "ip",
                    "netns",
                    "exec",
                    n,
                    *serve_cmd(
                        tiny_llama_dir, rank, addrs[0], mport, hport, host=addrs[0] if rank == 0 else "127.0.0.1"
                    ),
                ]
                procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
            client = (
                "import json,sys,time,openai\n"
                f"c=openai.OpenAI(base_url='http://{addrs[0]}:{hport}/v1',api_key='x',timeout=60,max_retries=0)\n"
                "deadline=time.monotonic()+240\n"
                "while True:\n"
                "    try:\n"
                f"        o=c.completions.create(model='{tiny_llama_dir}',prompt={PROMPT},max_tokens=12,"
                "temperature=0,extra_body={'ignore_eos':True}); break\n"
                "    except Exception:\n"
                "        if time.monotonic()>deadline: raise\n"
                "        time.sleep(2)\n"
                "print(json.dumps(o.choices[0].text))\n"
            )
            done = subprocess.run(
                ["ip", "netns", "exec", ns[0], sys.executable, "-c", client],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-2000:]
            assert json.loads(done.stdout.strip().splitlines()[-1]) == expected_tokens
        finally:
            stop_all(procs)
            logs = [p.stderr.read() if p.stderr else "" for p in procs]
    # The node in the second namespace used the veth, not loopback, to reach the head.
    assert f"={veth[1]}" in logs[1] or veth[1] in logs[1]
