"""Tokenization, model/server info, probes and ``/v1/responses`` over the scripted fake engine.

The fake copies prompt tokens, so expected texts come from the tokenizer. Response bodies and stream events
are validated against the ``openai`` package's own types.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import FakeAsyncLLM
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from shardserve.config import ServerConfig
from shardserve.entrypoints.openai.api_server import ServerState

pytestmark = pytest.mark.timeout(120)
EVENT = TypeAdapter(ResponseStreamEvent)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture
def fake(smollm_tokenizer):
    return FakeAsyncLLM(smollm_tokenizer)


def start(serve_app, fake, **config):
    state = ServerState(engine=fake, served_model_names=["fake-model", "org/alias"], config=ServerConfig(**config))
    return serve_app(state)


@pytest.fixture
def server(fake, serve_app):
    return start(serve_app, fake)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=30, **kw)


def assert_error(resp: httpx.Response, status: int, param=None, words=()):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err


# ------------------------------------------------------------------------------- tokenization


def test_tokenize_prompt_matches_the_tokenizer(server, smollm_tokenizer):
    r = post(server, "/tokenize", {"prompt": "Hello world, hello!", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == smollm_tokenizer.encode("Hello world, hello!")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    assert body["token_strs"] == smollm_tokenizer.convert_ids_to_tokens(body["tokens"])
    assert post(server, "/tokenize", {"prompt": "x"}).json()["token_strs"] is None


def test_tokenize_chat_renders_the_template(server, smollm_tokenizer):
    body = post(server, "/tokenize", {"model": "fake-model", "messages": CHAT}).json()
    text = smollm_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert body["tokens"] == smollm_tokenizer.encode(text, add_special_tokens=False)
    assert smollm_tokenizer.decode(body["tokens"], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_tokenize_continue_final_message_leaves_it_open(server, smollm_tokenizer):
    messages = [*CHAT, {"role": "assistant", "content": "The colour is"}]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    ids = post(server, "/tokenize", body).json()["tokens"]
    assert smollm_tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\nThe colour is")


def test_tokenize_with_a_request_chat_template(server, smollm_tokenizer):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    ids = post(server, "/tokenize", {"messages": CHAT, "chat_template": template}).json()["tokens"]
    assert smollm_tokenizer.decode(ids) == "[system] Be brief.\n[user] Name a colour.\n"


def test_server_chat_template_and_default_kwargs_apply(fake, serve_app, smollm_tokenizer):
    template = "{{ greeting }}{% for m in messages %} {{ m.content }}{% endfor %}"
    srv = start(serve_app, fake, chat_template=template, default_chat_template_kwargs='{"greeting": "Hi"}')
    ids = post(srv, "/tokenize", {"messages": CHAT}).json()["tokens"]
    assert smollm_tokenizer.decode(ids) == "Hi Be brief. Name a colour."
    body = {"messages": CHAT, "chat_template_kwargs": {"greeting": "Yo"}}
    assert smollm_tokenizer.decode(post(srv, "/tokenize", body).json()["tokens"]).startswith("Yo ")


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({}, 400, ["exactly one of prompt or messages"]),
        ({"prompt": "a", "messages": CHAT}, 400, ["exactly one"]),
        ({"messages": CHAT, "continue_final_message": True}, 400, ["cannot both be true"]),
        (
            {
                "messages": CHAT,
                "add_generation_prompt": False,
                "continue_final_message": True,
                "chat_template": "{% for m in messages %}{{ m.role }}{% endfor %}",
            },
            400,
            ["final message"],
        ),
        ({"prompt": "a", "model": "nope"}, 404, ["nope"]),
        ({"prompt": "a", "nonsense": 1}, 400, ["nonsense"]),
        ({"messages": CHAT, "chat_template": "{% raise %}"}, 400, ["chat template"]),
    ],
)
def test_tokenize_errors(server, body, status, words):
    assert_error(post(server, "/tokenize", body), status, words=words)


def test_detokenize_round_trips_text_and_chat(server, smollm_tokenizer):
    ids = post(server, "/tokenize", {"prompt": "Ünïcödé text 123"}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": "Ünïcödé text 123"}
    chat_ids = post(server, "/tokenize", {"messages": CHAT}).json()["tokens"]
    text = post(server, "/detokenize", {"tokens": chat_ids, "model": "org/alias"}).json()["prompt"]
    assert text == smollm_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)


def test_detokenize_out_of_vocabulary_is_400(server):
    assert_error(post(server, "/detokenize", {"tokens": [1, 10**9]}), 400, param="tokens")
    assert_error(post(server, "/detokenize", {"tokens": [-1]}), 400, param="tokens")


def test_tokenizer_info(server, smollm_tokenizer):
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["vocab_size"] == smollm_tokenizer.vocab_size and info["model_max_length"] == 256
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == smollm_tokenizer.chat_template
    assert info["added_tokens_decoder"]["2"] == {"content": "<|im_end|>", "special": True}


# ------------------------------------------------------------------------------- models, info, probes


def test_models_retrieve(client):
    card = client.models.retrieve("fake-model")
    assert card.id == "fake-model" and card.object == "model"
    assert client.models.retrieve("org/alias").id == "org/alias"  # names with a slash
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("missing")
    assert info.value.body["code"] == "model_not_found"


def test_model_and_server_info(fake, serve_app):
    srv = start(serve_app, fake, api_key="s3cret", tool_call_parser="hermes")
    headers = {"Authorization": "Bearer s3cret"}
    model = httpx.get(srv.url + "/get_model_info", headers=headers, timeout=30).json()
    assert model["is_generation"] is True and model["max_model_len"] == 256
    info = httpx.get(srv.url + "/get_server_info", headers=headers, timeout=30)
    assert info.status_code == 200 and "s3cret" not in info.text
    body = info.json()
    assert body["server_args"]["tool_call_parser"] == "hermes" and body["server_args"]["api_key_set"] is True
    assert body["internal_states"][0]["num_running"] == 0 and body["version"]


@pytest.mark.parametrize("path", ["/tokenizer_info", "/get_model_info", "/get_server_info", "/v1/models/fake-model"])
def test_info_routes_need_the_api_key(fake, serve_app, path):
    srv = start(serve_app, fake, api_key="s3cret")
    assert httpx.get(srv.url + path, timeout=30).status_code == 401
    assert httpx.get(srv.url + path, headers={"Authorization": "Bearer s3cret"}, timeout=30).status_code == 200


def test_post_routes_need_the_api_key(fake, serve_app):
    srv = start(serve_app, fake, api_key="s3cret")
    for path, body in (
        ("/tokenize", {"prompt": "a"}),
        ("/detokenize", {"tokens": [1]}),
        ("/v1/responses", {"input": "a"}),
    ):
        assert post(srv, path, body).status_code == 401


def test_probes_are_public_and_follow_health(fake, serve_app):
    srv = start(serve_app, fake, api_key="s3cret")
    assert httpx.get(srv.url + "/ping", timeout=30).status_code == 200
    assert httpx.post(srv.url + "/ping", timeout=30).status_code == 200
    r = httpx.get(srv.url + "/health_generate", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert not fake.active  # the probe's request was closed


def test_probes_are_503_while_loading(fake, serve_app):
    srv = serve_app(ServerState(engine=None, served_model_names=["m"], config=ServerConfig(), load_engine=None))
    assert httpx.get(srv.url + "/ping", timeout=30).status_code == 503
    assert httpx.get(srv.url + "/health_generate", timeout=30).status_code == 503


def test_health_generate_is_503_when_generation_fails(fake, serve_app):
    srv = start(serve_app, fake)
    fake.dead = True
    assert httpx.get(srv.url + "/health_generate", timeout=30).status_code == 503


def test_root_path_serves_with_and_without_the_prefix(fake, serve_app):
    srv = start(serve_app, fake, root_path="/api/")
    assert httpx.get(srv.url + "/api/v1/models", timeout=30).status_code == 200
    assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 200
    client = openai.OpenAI(base_url=srv.url + "/api/v1", api_key="x", max_retries=0, timeout=30)
    assert client.models.retrieve("fake-model").id == "fake-model"
    assert "/api" in httpx.get(srv.url + "/api/openapi.json", timeout=30).text


def test_openapi_documents_the_new_bodies(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    for path in ("/tokenize", "/detokenize", "/v1/responses"):
        assert spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


# ------------------------------------------------------------------------------- /v1/responses


def test_responses_create_returns_the_text(client, fake, smollm_tokenizer):
    raw = client.responses.with_raw_response.create(model="fake-model", input="one two three four", max_output_tokens=5)
    Response.model_validate(raw.http_response.json())  # strictly, the server's own JSON
    r = raw.parse()
    prompt = smollm_tokenizer.apply_chat_template([{"role": "user", "content": "one two three four"}])
    ids = smollm_tokenizer.encode(prompt, add_special_tokens=False)
    assert r.output_text == smollm_tokenizer.decode(ids[:5])
    assert r.id.startswith("resp_") and r.object == "response" and r.store is False
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # the fake ends by length
    assert r.usage.input_tokens == len(ids) and r.usage.output_tokens == 5
    assert fake.seen_params[-1].max_tokens == 5


def test_responses_instructions_and_items_render_into_the_prompt(client, fake, smollm_tokenizer):
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    r = client.responses.create(model="fake-model", instructions="Be terse.", input=items, max_output_tokens=40,
                                temperature=0.5, extra_body={"ignore_eos": True})  # fmt: skip
    text = r.output_text  # ignore_eos: the fake copies past <|im_end|>
    assert "Be terse." in text and "Weather in Paris?" in text and "sunny" in text  # the fake echoes its prompt
    assert fake.seen_params[-1].temperature == 0.5


def test_responses_stream_events_are_consistent(client):
    kwargs = dict(model="fake-model", input="alpha beta gamma delta", max_output_tokens=6)
    full = client.responses.create(**kwargs).output_text
    with client.responses.stream(**kwargs) as stream:  # the SDK's accumulator checks every event
        events = list(stream)
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    assert events[-1].type == "response.incomplete"  # cut by max_output_tokens, as OpenAI reports it
    final = events[-1].response
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == full
    assert final.output_text == full and final.usage.output_tokens == 6


def test_responses_stream_raw_events_validate(server):
    body = {"model": "fake-model", "input": "alpha beta", "max_output_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=30) as resp:
        lines = [line for line in resp.iter_lines() if line]
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    parsed = [EVENT.validate_json(e) for e in events]
    assert names == [e.type for e in parsed]
    assert [e.type for e in parsed][:4] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": "a", "previous_response_id": "resp_1"}, "previous_response_id", ["stored"]),
        ({"input": "a", "store": True}, "store", ["store"]),
        ({"input": "a", "background": True}, "background", []),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input", ["only text"]),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input", ["item_reference"]),
        ({"input": "a", "tools": [{"type": "web_search"}]}, "tools", ["web_search"]),
        ({"input": "a", "include": ["reasoning.encrypted_content"]}, "include", []),
        ({"input": "a", "truncation": "auto"}, "truncation", []),
        ({"input": "a", "max_output_tokens": 0}, "max_output_tokens", []),
        ({"input": []}, "input", ["empty"]),
        ({"input": "a", "model": "nope"}, None, ["nope"]),
    ],
)
def test_responses_refusals(server, body, param, words):
    resp = post(server, "/v1/responses", body)
    assert_error(resp, 404 if body.get("model") == "nope" else 400, param=param, words=words)


def test_responses_store_false_is_fine(client):
    assert client.responses.create(model="fake-model", input="hi there", store=False, max_output_tokens=2).output_text
