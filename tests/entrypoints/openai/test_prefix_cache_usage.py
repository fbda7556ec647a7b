"""Prefix caching seen from the API: ``usage.prompt_tokens_details.cached_tokens`` and the
``shardserve:prefix_cache_*`` counters, on a live CPU server with the tiny random Llama (block size 16)."""

from __future__ import annotations

import httpx
import pytest
from procs import TINY, running_server
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BLOCK_SIZE = 16
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server_url(tiny_llama_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("prefix-cache-server") / "server.log"
    with running_server([str(tiny_llama_dir), *TINY[:-1], "warning", "--block-size", str(BLOCK_SIZE)], log) as url:
        yield url


def counters(server_url: str) -> dict[str, float]:
    text = httpx.get(server_url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _check_second_hit(first, second) -> None:
    """The repeat reused whole blocks of the first's prompt and computed at least its last token."""
    assert first.prompt_tokens == second.prompt_tokens >= 3 * BLOCK_SIZE
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = second.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.prompt_tokens and cached % BLOCK_SIZE == 0, cached
    assert cached >= (second.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE - BLOCK_SIZE  # all but the tail


def test_completions_report_cached_tokens_and_metrics(server_url, client, model):
    prompt = "A cached prefix: the quick brown fox jumps over the lazy dog near the river bank. " * 6
    before = counters(server_url)
    first = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)
    second = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)
    assert 80 <= first.usage.prompt_tokens <= 200  # about 100 tokens
    _check_second_hit(first.usage, second.usage)
    assert second.choices[0].text == first.choices[0].text  # greedy, and the cached KV gives the same logits

    after = counters(server_url)
    hits = after["shardserve:prefix_cache_hits_total"] - before.get("shardserve:prefix_cache_hits_total", 0)
    queries = after["shardserve:prefix_cache_queries_total"] - before.get("shardserve:prefix_cache_queries_total", 0)
    assert hits == second.usage.prompt_tokens_details.cached_tokens
    assert queries == first.usage.prompt_tokens + second.usage.prompt_tokens

    stream = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    usage = chunks[-1].usage
    assert (
        usage is not None
        and usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens_details.cached_tokens
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first.choices[0].text


def test_chat_reports_cached_tokens(client, model):
    messages = [{"role": "user", "content": "Chat prefix test, repeated words make a long prompt. " * 8}]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0)
    second = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0)
    _check_second_hit(first.usage, second.usage)
    assert second.choices[0].message.content == first.choices[0].message.content
