"""``shardserve status --url http://HEAD:PORT``: the launch as the head sees it, rendered like ``ray status``.

Reads ``GET /cluster/status`` (see :mod:`shardserve.entrypoints.openai.cluster_status`). This module
is CLI layer: it prints.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import httpx
import typer
from rich.console import Console

from shardserve.tools.netbench import format_size

DEFAULT_TIMEOUT_S = 10.0


class StatusError(RuntimeError):
    """The server could not be reached or did not answer with a status."""


def fetch_status(url: str, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """GET ``{url}/cluster/status``.

    Args:
        url: the head's base URL, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is dropped).
        api_key: bearer token when the server was started with ``--api-key``.
        timeout_s: seconds for connecting and for the answer.

    Raises:
        StatusError: connection failure, or a non-200 answer (the server's error message is quoted).
    """
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(base + "/cluster/status", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise StatusError(f"cannot reach {base}: {e}; is `shardserve serve` running there?") from e
    if resp.status_code != 200:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        hint = " (pass --api-key)" if resp.status_code == 401 else ""
        raise StatusError(f"{base}/cluster/status answered {resp.status_code}: {message}{hint}")
    return resp.json()


def _size(n: float) -> str:
    return format_size(n, ".1f")


def _rank_line(r: dict[str, Any]) -> str:
    kind = "GPU" if r["memory_kind"] == "gpu" else "RSS"
    mem = f"{_size(r['memory_used_bytes'])}/{_size(r['memory_total_bytes'])} {kind}"
    return (
        f"rank {r['rank']}  pid {r['pid']}  {r['device']}  tp {r['tp_rank']}/{r['tp_size']}  "
        f"pp {r['pp_rank']}/{r['pp_size']}  layers [{r['layer_start']}, {r['layer_end']})  "
        f"KV {r['num_kv_blocks']} blocks  mem {mem}"
    )


def render_status(console: Console, s: dict[str, Any], url: str = "") -> None:
    """Print ``s`` (from :func:`fetch_status`) as sections: Nodes, Usage, Requests, Throughput."""
    lay, kv, req, tp = s["layout"], s["kv_cache"], s["requests"], s["throughput"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.get("time", time.time())))
    console.rule(f"[bold]shardserve status[/] {url} ({stamp})")
    console.print(f"model {s['model']}: TP {lay['tp']} x PP {lay['pp']} = {lay['world_size']} rank(s) "
                  f"on {lay['nnodes']} node(s), {lay['ranks_per_node']} per node")  # fmt: skip
    console.print("[bold]Nodes[/]")
    by_node: dict[int, list[dict[str, Any]]] = {}
    for r in s["ranks"]:
        by_node.setdefault(r["node_rank"], []).append(r)
    head = s["head"]
    on_ray = any(r.get("node_id") for r in s["ranks"])  # the head may be on a node without ranks
    if on_ray:
        console.print(f" [dim]head: HTTP + scheduler on {head['host']}, pid {head['pid']}; ranks are Ray actors[/]")
    for node in sorted(set(range(lay["nnodes"])) | set(by_node)):
        ranks = by_node.get(node, [])
        host = ranks[0]["host"] if ranks else (head["host"] if node == 0 else "?")
        if ranks and ranks[0].get("node_id"):
            host += f", Ray node {ranks[0]['node_id'][:8]} at {ranks[0]['node_ip']}"
        role = f"  [dim]head: HTTP + scheduler, pid {head['pid']}[/]" if node == 0 and not on_ray else ""
        console.print(f" node {node} ({host}){role}")
        for r in ranks:
            console.print(f"   {_rank_line(r)}", highlight=False)
    missing = sorted(set(range(lay["world_size"])) - {r["rank"] for r in s["ranks"]})
    if missing:
        console.print(f"   [yellow]no report yet from rank(s) {', '.join(map(str, missing))}[/]")
    console.print("[bold]Usage[/]")
    console.print(f" {kv['used_blocks']}/{kv['total_blocks']} KV blocks ({kv['usage'] * 100:.1f}%), "
                  f"{kv['block_size']} tokens per block")  # fmt: skip
    for kind, label in (("gpu", "GPU memory"), ("rss", "host memory (RSS)")):
        ranks = [r for r in s["ranks"] if r["memory_kind"] == kind]
        if ranks:
            used = sum(r["memory_used_bytes"] for r in ranks)
            console.print(f" {_size(used)} {label} over {len(ranks)} rank(s)")
    console.print(f" head process {_size(head['rss_bytes'])} RSS of {_size(head['host_memory_bytes'])}")
    console.print("[bold]Requests[/]")
    console.print(f" {req['running']} running, {req['waiting']} waiting")
    console.print(f"[bold]Throughput[/] (last {tp['window_s']:g} s)")
    console.print(
        f" prompt {tp['prompt_tokens_per_s']:.1f} tokens/s, generation {tp['generation_tokens_per_s']:.1f} tokens/s"
    )


def status_command(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Base URL of the head node's server."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer token, if the server has --api-key."),
    json_out: bool = typer.Option(False, "--json", help="Print the raw status JSON."),
    timeout: float = typer.Option(DEFAULT_TIMEOUT_S, help="Seconds to wait for the server."),
) -> None:
    """Show the serving launch: nodes, ranks and their layers, KV cache use, requests and throughput."""
    try:
        status = fetch_status(url, api_key, timeout)
    except StatusError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if json_out:
        typer.echo(json.dumps(status, indent=2))
        return
    render_status(Console(), status, url)
