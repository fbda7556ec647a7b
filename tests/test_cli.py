"""``shardserve serve`` refuses a layout the model cannot take before any process starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from shardserve.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_serve_tp2_on_the_embedded_model_fails_fast_naming_heads_and_sizes(tmp_path):
    """Exits non-zero within 5 s. The 5 s are CPU seconds of the process (interpreter, imports, reading the GGUF
    header); its wall time is bounded loosely, as other jobs may share the machine's cores."""
    err = tmp_path / "stderr"
    start = time.monotonic()
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "shardserve", "serve", "-tp", "2", "--device", "cpu"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=f)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    wall, cpu = time.monotonic() - start, usage.ru_utime + usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = err.read_text()
    assert proc.returncode != 0, text
    assert "9 attention heads" in text and "1, 3, 9" in text and "work: 1, 3" in text, text
    assert "rank" not in text.lower(), text  # no worker was started or reported on
    assert cpu < 5 and wall < 30, f"{cpu:.1f} s of CPU, {wall:.1f} s of wall time"


def test_bad_layouts_never_reach_the_launcher(monkeypatch):
    launched = []
    monkeypatch.setattr("shardserve.launcher.run_node", lambda *a: launched.append(a) or 0)
    for args in (["-tp", "2"], ["-pp", "31"], ["-pp", "2", "--pp-layer-partition", "10,10"], ["./nope.gguf"]):
        result = CliRunner().invoke(app, ["serve", "--device", "cpu", *args])
        assert result.exit_code == 2 and "error:" in result.output, (args, result.output)
    assert launched == []
    assert CliRunner().invoke(app, ["serve", "--device", "cpu", "-tp", "3"]).exit_code == 0
    assert len(launched) == 1 and launched[0][0].parallel.tensor_parallel_size == 3
