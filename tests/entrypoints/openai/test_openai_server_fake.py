"""The HTTP layer over a scripted fake engine: response shapes, SSE framing, error mapping, disconnects.

The fake copies prompt tokens, so expected texts come from the tokenizer, not from the server code.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from conftest import FakeAsyncLLM
from prometheus_client.parser import text_string_to_metric_families

from shardserve.config import ServerConfig
from shardserve.entrypoints.openai.api_server import ServerState

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fake(smollm_tokenizer):
    return FakeAsyncLLM(smollm_tokenizer)


@pytest.fixture
def server(fake, serve_app):
    return serve_app(ServerState(engine=fake, served_model_names=["fake-model", "alias"], config=ServerConfig()))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)


def copied_text(tokenizer, prompt_ids, n_tokens, shift=0):
    return tokenizer.decode([prompt_ids[(k + shift) % len(prompt_ids)] for k in range(n_tokens)])


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def assert_openai_error(resp: httpx.Response, status: int, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def test_completion_prompt_list_times_n(client, smollm_tokenizer):
    prompts = ["one two three four", "alpha beta gamma"]
    r = client.completions.create(model="alias", prompt=prompts, n=2, max_tokens=5)
    assert r.id.startswith("cmpl-") and r.model == "fake-model"
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        ids = smollm_tokenizer.encode(prompts[c.index // 2])
        assert c.text == copied_text(smollm_tokenizer, ids, 5, shift=c.index % 2)
        assert c.finish_reason == "length"
    prompt_tokens = sum(len(smollm_tokenizer.encode(p)) for p in prompts)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 20)
    assert r.usage.total_tokens == prompt_tokens + 20


def test_completion_stream_joins_to_text_with_usage(client):
    kw = dict(model="fake-model", prompt="The quick brown fox jumps", max_tokens=6)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_completion_echo_and_logprobs(client, smollm_tokenizer):
    r = client.completions.create(model="fake-model", prompt="hello world", max_tokens=3, echo=True)
    assert r.choices[0].text.startswith("hello world")
    streamed = client.completions.create(model="fake-model", prompt="hello world", max_tokens=3, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    r = client.completions.create(model="fake-model", prompt="hello world", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_chat_stream_role_first_finish_and_done(server, smollm_tokenizer):
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 3}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in chunks)
    for j in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == j]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] == "length"
        assert sum(len(ch["logprobs"]["content"]) for ch in mine[1:]) == 4
        assert all(len(t["top_logprobs"]) == 3 for ch in mine[1:] for t in ch["logprobs"]["content"])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_chat_non_stream_matches_stream(client):
    kw = dict(model="fake-model", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8)
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens_details.cached_tokens == 0
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert streamed == full.choices[0].message.content


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "temperature": -1},
            400,
            "temperature",
        ),
        ("/v1/chat/completions", {"messages": "nope"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/completions", {"prompt": [999999999], "max_tokens": 3}, 400, None),
        ("/generate", {"text": "x", "sampling_params": {"top_p": 2}}, 400, "sampling_params"),
    ],
)
def test_bad_requests_answer_in_openai_shape(server, path, body, status, param):
    assert_openai_error(httpx.post(server.url + path, json=body, timeout=30), status, param)


def test_malformed_json_body_limit_and_routes(server):
    url = server.url + "/v1/chat/completions"
    assert_openai_error(httpx.post(url, content=b"{not json", timeout=30), 400, code="invalid_json")
    assert_openai_error(httpx.post(url, content=b"[1, 2]", timeout=30), 400)
    assert_openai_error(httpx.get(url, timeout=30), 405)
    assert_openai_error(httpx.get(server.url + "/v1/nothing", timeout=30), 404)


def test_unexpected_errors_are_500_with_an_error_id_and_keep_the_connection(server, fake, caplog):
    with httpx.Client(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=1)) as http:
        for bug in (ValueError("a ValueError from deep inside is a bug, not a client error"), RecursionError()):
            fake.bug = bug
            with caplog.at_level("ERROR", logger="shardserve.entrypoints.openai.api_server"):
                bad = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert_openai_error(bad, 500, code="internal_error")
            error_id = bad.json()["error"]["message"].split("error id ")[1].split(";")[0]
            assert any(error_id in r.getMessage() and r.exc_info[1] is bug for r in caplog.records)
            fake.bug = None
            good = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert good.status_code == 200
            port = [r.extensions["network_stream"].get_extra_info("client_addr")[1] for r in (bad, good)]
            assert port[0] == port[1], "the 500 closed the keep-alive connection"


def test_too_long_prompt_gives_both_counts(client, fake, smollm_tokenizer):
    prompt = "word " * 300
    n_prompt = len(smollm_tokenizer.encode(prompt))
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="fake-model", prompt=prompt, max_tokens=10)
    assert str(fake.max_model_len) in err.value.message and str(n_prompt) in err.value.message


def test_overloaded_dead_and_loading(server, fake, serve_app):
    fake.overloaded = True
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1
    fake.overloaded, fake.dead, fake.errored = False, True, True  # AsyncLLM refuses new requests once errored
    assert_openai_error(httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=30), 503)
    assert httpx.get(server.url + "/health", timeout=30).status_code == 503
    loading = serve_app(ServerState(engine=None, served_model_names=["m"], config=ServerConfig()))
    health = httpx.get(loading.url + "/health", timeout=30)
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert_openai_error(httpx.get(loading.url + "/v1/models", timeout=30), 503)


def test_body_limit_and_api_key(fake, serve_app):
    cfg = ServerConfig(max_request_body_bytes=2000, api_key="sekret")
    srv = serve_app(ServerState(engine=fake, served_model_names=["fake-model"], config=cfg))
    body = {"prompt": "x" * 5000, "max_tokens": 2}
    headers = {"Authorization": "Bearer sekret"}
    assert_openai_error(httpx.post(srv.url + "/v1/completions", json=body, headers=headers, timeout=30), 413)
    assert_openai_error(httpx.get(srv.url + "/v1/models", timeout=30), 401, code="invalid_api_key")
    assert httpx.get(srv.url + "/v1/models", headers=headers, timeout=30).status_code == 200


def test_request_timeout_aborts(fake, serve_app):
    fake.step_s = 0.05
    srv = serve_app(
        ServerState(engine=fake, served_model_names=["fake-model"], config=ServerConfig(request_timeout=0.3))
    )
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "a b c", "max_tokens": 100}, timeout=30)
    assert_openai_error(r, 504, code="request_timeout")
    assert len(fake.aborted) == 1 and not fake.active


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_disconnect_mid_stream_aborts_engine_request(server, fake):
    fake.step_s = 0.02
    body = {"prompt": "one two three", "max_tokens": 200, "stream": True}
    for path in ("/v1/completions", "/generate"):
        if path == "/generate":
            body = {"text": "one two three", "sampling_params": {"max_new_tokens": 200}, "stream": True}
        with httpx.stream("POST", server.url + path, json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: {") for line in got)
        assert wait_until(lambda: not fake.active), "engine stream still open after the client left"
    assert len(fake.aborted) == 2


def test_disconnect_while_waiting_non_streaming(server, fake):
    fake.step_s = 0.02
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "a b", "max_tokens": 200}, timeout=0.5)
    assert wait_until(lambda: not fake.active) and len(fake.aborted) == 1


def test_models_generate_metrics_version(server, fake, smollm_tokenizer):
    models = httpx.get(server.url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["fake-model", "alias"]
    assert models["data"][0]["max_model_len"] == fake.max_model_len and models["object"] == "list"
    ids = smollm_tokenizer.encode("tea and cake")
    gen = httpx.post(
        server.url + "/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 4}}, timeout=30
    )
    out = gen.json()
    assert out["text"] == copied_text(smollm_tokenizer, ids, 4)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert (out["meta_info"]["prompt_tokens"], out["meta_info"]["completion_tokens"]) == (len(ids), 4)
    batch = httpx.post(
        server.url + "/generate", json={"text": ["a", "b"], "sampling_params": {"max_new_tokens": 2}}, timeout=30
    )
    assert len(batch.json()) == 2
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=30).text)}
    assert families["shardserve:generation_tokens"].samples[0].value == 4 + 2 * 2
    assert families["shardserve:prompt_tokens"].samples[0].value == len(ids) + 2
    ttft = [s for s in families["shardserve:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft[0].value == 3
    success = {s.labels["finished_reason"]: s.value for s in families["shardserve:request_success"].samples
               if s.name.endswith("_total")}  # fmt: skip
    assert success == {"length": 3}
    assert httpx.get(server.url + "/version", timeout=30).json()["version"]
