"""shardserve status against a live PP=2 CPU server on the tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from procs import TINY, running_server
from typer.testing import CliRunner

from shardserve.cli import app
from shardserve.engine.throughput import TokenThroughput

REPO = Path(__file__).resolve().parents[2]
API_KEY = "status-test-key"


def test_throughput_window_counts_and_forgets_old_tokens():
    now = [100.0]
    meter = TokenThroughput(window_s=10.0, clock=lambda: now[0])
    now[0] = 110.0
    meter.add(20, 1)  # a step that computed 20 prompt tokens and sampled one
    meter.add(0, 1)
    assert meter.rates() == pytest.approx((20 / 10, 2 / 10))
    now[0] = 121.0
    assert meter.rates() == (0.0, 0.0)


def test_engine_counts_computed_prompt_tokens_not_prefix_cache_hits(tiny_llama_dir):
    from shardserve import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=32, block_size=4)
    try:
        prompt = list(range(100, 112))
        params = SamplingParams(temperature=0.0, max_tokens=1)
        llm.generate([prompt], params)
        second = llm.generate([prompt], params)[0]
        events = list(llm.engine.throughput._events)
    finally:
        llm.shutdown()
    assert second.num_cached_tokens == 8  # two full blocks of 4; the last token is always computed
    assert sum(e[1] for e in events) == 12 + (12 - 8)
    assert sum(e[2] for e in events) == 2


@pytest.fixture(scope="module")
def pp2_server(tiny_llama_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("status-server") / "server.log"
    with running_server([str(tiny_llama_dir), "-pp", "2", *TINY[:-1], "warning", "--api-key", API_KEY], log) as url:
        yield url, str(tiny_llama_dir)


@pytest.mark.slow
def test_status_lists_both_pipeline_ranks(pp2_server):
    url, model = pp2_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, timeout=60, max_retries=0)
    out = client.completions.create(model=model, prompt=[1, 520, 3327], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert out.usage.completion_tokens == 8
    runner = CliRunner()

    denied = runner.invoke(app, ["status", "--url", url, "--json"])
    assert denied.exit_code == 1 and "401" in denied.output

    result = runner.invoke(app, ["status", "--url", url, "--api-key", API_KEY, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["layout"] == {"tp": 1, "pp": 2, "nnodes": 1, "world_size": 2, "ranks_per_node": 2}
    ranks = sorted(status["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["pp_rank"] for r in ranks] == [0, 1]
    assert [(r["layer_start"], r["layer_end"]) for r in ranks] == [(0, 2), (2, 4)]  # 4 layers over 2 stages
    assert all(r["num_kv_blocks"] == 64 and r["memory_kind"] == "rss" and r["memory_used_bytes"] > 0 for r in ranks)
    assert len({r["pid"] for r in ranks}) == 2
    kv = status["kv_cache"]
    assert kv["total_blocks"] == 64 and 0 <= kv["used_blocks"] <= 64 and kv["block_size"] == 16
    assert status["requests"] == {"running": 0, "waiting": 0}
    assert status["throughput"]["generation_tokens_per_s"] > 0  # the 8 tokens above, inside the window

    rendered = runner.invoke(
        app, ["status", "--url", url, "--api-key", API_KEY], catch_exceptions=False, terminal_width=200
    )
    assert rendered.exit_code == 0, rendered.output
    text = rendered.stdout
    for line in ("rank 0", "rank 1", "layers [0, 2)", "layers [2, 4)", "KV blocks", "Nodes", "Requests", "Throughput"):
        assert line in text, text
