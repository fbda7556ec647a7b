"""End to end: a real ``shardserve serve`` process on the embedded SmolLM2-135M, driven by the ``openai`` client.

The server is conftest's session-wide ``server_url`` (started through the CLI, ``--max-model-len 512``
so the long-prompt case is cheap). Token budgets are small: the CI machine has 2 CPU cores.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from conftest import MAX_MODEL_LEN, TIMEOUT
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def gauges(server_url: str) -> dict[str, float]:
    text = httpx.get(server_url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_health_and_models(server_url, client):
    assert httpx.get(server_url + "/health", timeout=30).status_code == 200
    models = httpx.get(server_url + "/v1/models", timeout=30).json()
    assert models["object"] == "list" and len(models["data"]) == 1
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert client.models.list().data[0].id == models["data"][0]["id"]


def test_weight_loading_progress_is_in_the_server_log(live_server):
    log = live_server.log.read_text()  # not a terminal: log lines instead of a progress bar
    assert "loading SmolLM2-135M-Instruct: 272 tensors" in log, log[-3000:]


def test_chat_knows_the_capital_of_france(client, model):
    r = client.chat.completions.create(model=model, messages=CAPITAL, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_joins_to_greedy_text_with_usage(client, model):
    kw = dict(model=model, messages=CAPITAL, temperature=0, max_tokens=12)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == full.choices[0].message.content
    assert content[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_joins_to_greedy_text(client, model):
    kw = dict(model=model, prompt="The three primary colors are", temperature=0, max_tokens=10)
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == full and full


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_n_choices_end_once_and_join_to_the_non_streamed_texts(client, model, endpoint):
    """n=3 under a fixed seed: each streamed choice gets exactly one chunk with a finish_reason, and the
    chunks of each choice join to that choice's non-streamed text (a choice that finished early used to
    get its final chunk again at the end)."""
    if endpoint == "completions":
        kw = dict(model=model, prompt="Once upon a time, in a", n=3, seed=7, max_tokens=12, temperature=0.9)
        full = {c.index: c.text for c in client.completions.create(**kw).choices}
        chunks = [(c.index, c.text, c.finish_reason) for ch in client.completions.create(stream=True, **kw)
                  for c in ch.choices]  # fmt: skip
    else:
        kw = dict(model=model, messages=CAPITAL, n=3, seed=7, max_tokens=12, temperature=0.9)
        full = {c.index: c.message.content for c in client.chat.completions.create(**kw).choices}
        chunks = [(c.index, c.delta.content or "", c.finish_reason) for ch in client.chat.completions.create(
            stream=True, **kw) for c in ch.choices]  # fmt: skip
    assert sorted(full) == [0, 1, 2]
    for index in range(3):
        mine = [c for c in chunks if c[0] == index]
        assert sum(reason is not None for _, _, reason in mine) == 1
        assert mine[-1][2] is not None  # the finishing chunk is the choice's last
        assert "".join(text for _, text, _ in mine) == full[index]
    assert len(set(full.values())) > 1  # sampled, not three copies of one text


def test_n_and_logprobs_shapes(client, model):
    chat = client.chat.completions.create(model=model, messages=CAPITAL, n=2, max_tokens=4, temperature=0.8,
                                          logprobs=True, top_logprobs=3, seed=1)  # fmt: skip
    assert [c.index for c in chat.choices] == [0, 1]
    for choice in chat.choices:
        content = choice.logprobs.content
        assert 1 <= len(content) <= 4 and all(len(t.top_logprobs) == 3 for t in content)
        assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in content)
        assert all(t.logprob <= t.top_logprobs[0].logprob + 1e-4 for t in content)
    comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == comp.choices[0].text
    # Greedy: the chosen token is the most likely one.
    assert all(
        max(top.values()) == pytest.approx(tok_lp, abs=1e-4) for top, tok_lp in zip(lp.top_logprobs, lp.token_logprobs)
    )


def test_errors(server_url, client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hello " * 600, max_tokens=10)
    message = err.value.body["message"] if isinstance(err.value.body, dict) else str(err.value)
    assert str(MAX_MODEL_LEN) in message and "in the prompt" in message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CAPITAL, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=CAPITAL, max_tokens=2, temperature=-1)
    assert err.value.body["param"] == "temperature"
    bad = httpx.post(server_url + "/v1/chat/completions", content=b'{"messages": [', timeout=30)
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


def test_generate_and_metrics(server_url):
    r = httpx.post(server_url + "/generate", json={"text": "The sky is", "sampling_params": {"max_new_tokens": 4,
                   "temperature": 0}}, timeout=TIMEOUT)  # fmt: skip
    out = r.json()
    assert r.status_code == 200 and out["text"] and out["meta_info"]["completion_tokens"] <= 4
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    text = httpx.get(server_url + "/metrics", timeout=30).text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_count"):  # fmt: skip
        assert f"shardserve:{name}" in text


def wait_idle(server_url: str, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(server_url)
        idle = g["shardserve:num_requests_running"] == 0 and g["shardserve:kv_cache_usage_perc"] == 0
        if idle or time.monotonic() > deadline:
            return g
        time.sleep(0.2)


def test_concurrent_streams_then_disconnects_free_the_kv_cache(server_url, model):
    async def one_stream(aclient: openai.AsyncOpenAI, i: int) -> str:
        stream = await aclient.completions.create(model=model, prompt=f"Story number {i}:", max_tokens=16, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def many() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server_url + "/v1", api_key="none", max_retries=0, timeout=300)
        return await asyncio.wait_for(asyncio.gather(*(one_stream(aclient, i) for i in range(32))), 400)

    texts = asyncio.run(many())
    assert len(texts) == 32 and all(texts)
    g = wait_idle(server_url)
    assert g["shardserve:num_requests_running"] == 0 and g["shardserve:kv_cache_usage_perc"] == 0

    async def leave_early(http: httpx.AsyncClient, i: int) -> int:
        body = {"model": model, "prompt": f"Count to a thousand, {i}:", "max_tokens": 400, "stream": True}
        got = 0
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                got += line.startswith("data: {")
                if got == 2:
                    break
        return got

    async def disconnects() -> list[int]:
        async with httpx.AsyncClient(base_url=server_url, timeout=TIMEOUT) as http:
            return await asyncio.wait_for(asyncio.gather(*(leave_early(http, i) for i in range(8))), 300)

    before = gauges(server_url)
    assert asyncio.run(disconnects()) == [2] * 8
    g = wait_idle(server_url, timeout=10.0)
    assert g["shardserve:num_requests_running"] == 0 and g["shardserve:kv_cache_usage_perc"] == 0
    # The 8 requests stopped far short of 400 tokens each.
    generated = g["shardserve:generation_tokens_total"] - before["shardserve:generation_tokens_total"]
    assert generated < 8 * 400 / 2


def test_stream_chunks_are_sse_framed(server_url, model):
    body = {"model": model, "messages": CAPITAL, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", server_url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as resp:
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[0][len("data: ") :])["choices"][0]["delta"]["role"] == "assistant"
