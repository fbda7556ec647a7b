"""netbench on gloo with local processes: rows, busbw/algbw ratios, JSON and PNG output."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from shardserve.cli import app
from shardserve.tools.netbench import (
    OPS,
    LocalLaunch,
    NetbenchReport,
    Result,
    interpolate_busbw,
    launch_local,
    message_sizes,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_message_sizes():
    assert message_sizes(8, 64 * 1024) == [8 * 2**k for k in range(14)]
    assert message_sizes(8, 100, 4) == [8, 32]
    with pytest.raises(ValueError):
        message_sizes(8, 4)
    with pytest.raises(ValueError):
        message_sizes(8, 64, 1)


def test_interpolation_is_linear_in_log_size():
    rows = [Result.from_time("all_reduce", "intra-node", 2, s, s / (bw * 1e9)) for s, bw in ((1024, 1.0), (4096, 3.0))]
    assert rows[0].busbw_gb_s == pytest.approx(1.0)  # factor 2(n-1)/n = 1 at n = 2
    assert interpolate_busbw(rows, 2048) == pytest.approx(2.0)
    assert interpolate_busbw(rows, 8) == pytest.approx(1.0)
    assert interpolate_busbw(rows, 1 << 30) == pytest.approx(3.0)


@pytest.mark.slow
def test_cli_four_gloo_processes(tmp_path):
    json_path, png_path = tmp_path / "nb.json", tmp_path / "nb.png"
    args = [
        "netbench",
        "--nproc",
        "4",
        "--device",
        "cpu",
        "--min-bytes",
        "8",
        "--max-bytes",
        "64KiB",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--json",
        str(json_path),
        "--plot",
        str(png_path),
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for op in OPS:
        assert op in result.output
    report = NetbenchReport.load_json(json_path)
    assert report.backend == "gloo" and report.world_size == 4
    assert json.loads(json_path.read_text())["busbw_definition"].endswith("PERFORMANCE.md")
    n = 4
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n, "sendrecv": 1.0}
    for op in OPS:
        rows = report.curve(op, "intra-node")
        assert rows, op
        # 8 B is 2 floats: too few to split over 4 ranks for all_gather/reduce_scatter (nccl-tests skips it too)
        assert rows[0].size_bytes == (8 if op in ("all_reduce", "sendrecv") else 16)
        assert rows[-1].size_bytes == 64 * 1024
        for r in rows:
            assert r.group_size == n and r.time_us > 0
            assert r.algbw_gb_s == pytest.approx(r.size_bytes / (r.time_us * 1e-6) / 1e9)
            assert r.busbw_gb_s / r.algbw_gb_s == pytest.approx(factor[op])
    png = png_path.read_bytes()
    assert len(png) > 1000 and png.startswith(PNG_MAGIC)


@pytest.mark.slow
def test_intra_and_inter_node_groups():
    """Four processes as two pretend nodes: groups of the node's 2 ranks, of the 2 node leaders, and all 4."""
    launch = LocalLaunch(
        nproc=4, device="cpu", sizes=(64, 4096), ops=("all_reduce", "sendrecv"), iters=2, warmup=1, simulated_nodes=2
    )
    assert launch.node_of_rank() == [0, 0, 1, 1]
    report = launch_local(launch)
    sizes = {(r.group, r.op): [] for r in report.results}
    for r in report.results:
        sizes[(r.group, r.op)].append(r.size_bytes)
        assert r.group_size == {"intra-node": 2, "inter-node": 2, "world": 4}[r.group]
    assert set(sizes) == {(g, op) for g in ("intra-node", "inter-node", "world") for op in ("all_reduce", "sendrecv")}
    assert all(v == [64, 4096] for v in sizes.values())
    assert report.nnodes == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="nproc"):
        launch_local(LocalLaunch(nproc=1, device="cpu", sizes=(8,)))
    with pytest.raises(ValueError, match="simulated-nodes"):
        LocalLaunch(nproc=3, simulated_nodes=2).node_of_rank()
    with pytest.raises(ValueError, match="unknown ops"):
        launch_local(LocalLaunch(nproc=2, device="cpu", sizes=(8,), ops=("broadcast",)))
