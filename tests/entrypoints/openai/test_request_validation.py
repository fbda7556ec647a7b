"""Bad requests against the live server (embedded model): 400 in OpenAI's shape, the engine keeps serving,
the keep-alive connection survives, and no field is silently ignored.

Every refusal is answered before the engine sees the request, so these tests cost no generation except
the few 200s that prove the server still answers.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import TIMEOUT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIG_SEED = 1180591620717411303424  # 2**70: past torch's manual_seed range
HI = [{"role": "user", "content": "Hi"}]
VOCAB = 49152  # SmolLM2's vocabulary
BODIES = {
    "/v1/completions": lambda **kw: {"prompt": "Hi", "max_tokens": 2, **kw},
    "/v1/chat/completions": lambda **kw: {"messages": HI, "max_tokens": 2, **kw},
    "/generate": lambda **kw: {"text": "Hi", "sampling_params": {"max_new_tokens": 2, **kw}},
}


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def local_port(resp: httpx.Response) -> int:
    """The client-side port of the connection that carried ``resp`` (same port: same connection)."""
    return resp.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.fixture
def http(server_url):
    with httpx.Client(base_url=server_url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=1)) as c:
        yield c


def test_big_seed_is_400_on_every_endpoint_and_the_engine_goes_on(server_url, client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Hi", max_tokens=2, seed=BIG_SEED)
    assert err.value.body["param"] == "seed" and "seed" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=HI, max_tokens=2, seed=BIG_SEED)
    assert err.value.body["param"] == "seed"
    body = {"text": "Hi", "sampling_params": {"max_new_tokens": 2, "seed": BIG_SEED}}
    assert_error(httpx.post(server_url + "/generate", json=body, timeout=TIMEOUT), 400, "sampling_params")
    # int64 is the range: its ends are taken, one past them is not; with n completions, seed + n - 1 must fit.
    assert_error(httpx.post(server_url + "/v1/completions", json=BODIES["/v1/completions"](seed=-(2**63) - 1)), 400,
                 "seed")  # fmt: skip
    assert_error(httpx.post(server_url + "/v1/completions", json=BODIES["/v1/completions"](seed=2**63 - 1, n=2)),
                 400, "seed")  # fmt: skip
    edge = client.completions.create(model=model, prompt="Hi", max_tokens=2, seed=2**63 - 1, temperature=1.0)
    assert edge.usage.completion_tokens >= 1
    # The server is alive and answers the next request.
    r = client.chat.completions.create(model=model, messages=HI, max_tokens=4, seed=7)
    assert r.choices[0].message.content and httpx.get(server_url + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", 2**31), ("top_k", 2**40), ("n", 129), ("stop_token_ids", [2**40]), ("stop_token_ids", [VOCAB]),
     ("stop_token_ids", [-1]), ("min_tokens", 2**31), ("min_tokens", 5)],
)  # fmt: skip
def test_int_fields_are_bounded(http, path, field, value):
    if path == "/generate":
        field = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}.get(field, field)
    err = assert_error(http.post(path, json=BODIES[path](**{field: value})), 400)
    assert field in err["message"], err  # min_tokens 5 > max_tokens 2 names both


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "top_p", "presence_penalty"])
def test_floats_must_be_finite(http, path, raw, field):
    text = json.dumps(BODIES[path](**{field: "@"})).replace('"@"', raw.decode())
    err = assert_error(http.post(path, content=text, headers={"content-type": "application/json"}), 400)
    assert field in err["message"], err


MALFORMED = {
    "lone surrogate": ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\ud800y"}]}'),
    "arrays 100000 deep": ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "messages 5000 deep": (
        "/v1/chat/completions",
        b'{"messages": ' + b'[{"role": "user", "content": ' * 5000 + b'"x"' + b"}]" * 5000 + b"}",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_are_400_and_the_connection_survives(http, case):
    path, body = MALFORMED[case]
    bad = http.post(path, content=body, headers={"content-type": "application/json"})
    assert_error(bad, 400, code="invalid_json")
    assert bad.headers.get("connection") != "close"
    good = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert good.status_code == 200, good.text
    assert local_port(good) == local_port(bad), "the keep-alive connection was dropped"


UNSUPPORTED = [
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
    ("/v1/chat/completions", "reasoning_effort", "high"),
    ("/v1/chat/completions", "structural_tag", {"structures": []}),
    ("/v1/chat/completions", "documents", [{"text": "x"}]),
    ("/v1/chat/completions", "store", True),
    ("/v1/chat/completions", "cache_salt", "tenant-a"),
    ("/v1/chat/completions", "use_beam_search", True),
    ("/v1/completions", "suffix", "and so on"),
    ("/v1/completions", "best_of", 3),
    ("/v1/completions", "include_stop_str_in_output", True),
    ("/generate", "return_logprob", True),
]


@pytest.mark.parametrize("path, field, value", UNSUPPORTED, ids=lambda x: str(x)[:30])
def test_fields_that_are_not_honoured_are_refused(http, path, field, value):
    body = BODIES[path]() if path != "/generate" else {**BODIES[path](), field: value}
    if path != "/generate":
        body[field] = value
    err = assert_error(http.post(path, json=body), 400, field, "unsupported_parameter")
    assert "not supported" in err["message"]


@pytest.mark.parametrize("field", ["structural_tag", "custom_params", "no_stop_trim"])
def test_generate_sampling_fields_that_are_not_honoured_are_refused(http, field):
    value = True if field == "no_stop_trim" else {"x": 1}
    err = assert_error(http.post("/generate", json=BODIES["/generate"](**{field: value})), 400,
                       f"sampling_params.{field}", "unsupported_parameter")  # fmt: skip
    assert "not supported" in err["message"]


def test_refusals_through_the_openai_client(client, model):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as err:  # tool_choice "auto" needs the server's flags (as vLLM)
        client.chat.completions.create(model=model, messages=HI, max_tokens=2, tools=tools)
    assert err.value.body["param"] == "tool_choice" and "--enable-auto-tool-choice" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=HI, max_tokens=2, reasoning_effort="low")
    assert err.value.body["code"] == "unsupported_parameter" and err.value.body["param"] == "reasoning_effort"


@pytest.mark.parametrize(
    "bias, reason",
    [({"abc": 1}, "token ids"), ({"-5": 1}, "token ids"), ({"5": 101}, "[-100, 100]"), ({"5": -100.5}, "[-100, 100]"),
     ({str(VOCAB): 1}, "vocabulary")],
)  # fmt: skip
def test_logit_bias_out_of_range_is_400(http, bias, reason):
    err = assert_error(http.post("/v1/chat/completions", json=BODIES["/v1/chat/completions"](logit_bias=bias)), 400)
    assert reason in err["message"] and err["param"] == "logit_bias"


def test_neutral_values_and_metadata_are_accepted(client, model):
    r = client.chat.completions.create(
        model=model, messages=HI, max_tokens=2, response_format={"type": "text"}, tool_choice="none",
        logit_bias={}, user="u-1", metadata={"k": "v"}, store=False, parallel_tool_calls=False,
    )  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length")
    c = client.completions.create(model=model, prompt="Hi", max_tokens=2, best_of=1, extra_body={"priority": 0})
    assert c.usage.completion_tokens >= 1


def test_completions_default_to_16_tokens(client, model):
    r = client.completions.create(model=model, prompt="Once upon a time", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_unknown_fields_are_logged_once_per_name(live_server, http):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/completions"):
        assert http.post(path, json=BODIES[path](frobnicate_level=3)).status_code == 200
    log = live_server.log.read_text()
    assert log.count("unknown request field 'frobnicate_level'") == 1, log[-2000:]
