"""``shardserve serve`` refuses a layout the model cannot take before any process starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from shardserve.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_serve_tp2_on_the_embedded_model_fails_fast_naming_heads_and_sizes():
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "shardserve", "serve", "-tp", "2", "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    elapsed = time.monotonic() - start
    assert done.returncode != 0, done.stderr
    assert "9 attention heads" in done.stderr and "1, 3, 9" in done.stderr and "work: 1, 3" in done.stderr
    assert "rank" not in done.stderr.lower(), done.stderr  # no worker was started or reported on
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_bad_layouts_never_reach_the_launcher(monkeypatch):
    launched = []
    monkeypatch.setattr("shardserve.launcher.run_node", lambda *a: launched.append(a) or 0)
    for args in (["-tp", "2"], ["-pp", "31"], ["-pp", "2", "--pp-layer-partition", "10,10"], ["./nope.gguf"]):
        result = CliRunner().invoke(app, ["serve", "--device", "cpu", *args])
        assert result.exit_code == 2 and "error:" in result.output, (args, result.output)
    assert launched == []
    assert CliRunner().invoke(app, ["serve", "--device", "cpu", "-tp", "3"]).exit_code == 0
    assert len(launched) == 1 and launched[0][0].parallel.tensor_parallel_size == 3
