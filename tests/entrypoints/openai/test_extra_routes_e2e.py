"""The new routes on a real ``shardserve serve`` of the embedded SmolLM2-135M, driven by the ``openai`` client.

One server for the module; greedy decoding and small token budgets (the CI machine has 2 CPU cores).
"""

from __future__ import annotations

import httpx
import openai
import pytest
from procs import running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CHAT = [{"role": "user", "content": "What is 2+2? Reply with just the number."}]  # greedy: "2 + 2 = 4", then EOS


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("extra-routes") / "server.log"
    args = ["--device", "cpu", "--max-model-len", "512", "--log-level", "warning", "--served-model-name", "smol"]
    with running_server(args, log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_tokenize_detokenize_round_trip_text_and_chat(server_url):
    text = "Shardserve serves one model over many GPUs. Ünïcödé too!"
    tokens = httpx.post(server_url + "/tokenize", json={"model": "smol", "prompt": text}, timeout=60).json()
    assert tokens["count"] == len(tokens["tokens"]) > 5 and tokens["max_model_len"] == 512
    back = httpx.post(server_url + "/detokenize", json={"model": "smol", "tokens": tokens["tokens"]}, timeout=60)
    assert back.json()["prompt"] == text
    chat = httpx.post(server_url + "/tokenize", json={"messages": CHAT}, timeout=60).json()
    rendered = httpx.post(server_url + "/detokenize", json={"tokens": chat["tokens"]}, timeout=60).json()["prompt"]
    assert CHAT[0]["content"] in rendered and rendered.endswith("<|im_start|>assistant\n")
    # The chat path counts the same prompt tokens.
    usage = (
        openai.OpenAI(base_url=server_url + "/v1", api_key="none")
        .chat.completions.create(model="smol", messages=CHAT, max_tokens=1, temperature=0)
        .usage
    )
    assert usage.prompt_tokens == chat["count"]


def test_models_retrieve(client):
    card = client.models.retrieve("smol")
    assert card.id == "smol" and card.model_extra["max_model_len"] == 512
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_responses_text(client):
    response = client.responses.create(model="smol", input=CHAT[0]["content"], max_output_tokens=24, temperature=0)
    chat = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=24, temperature=0)
    assert response.output_text == chat.choices[0].message.content  # served by the chat path
    assert response.status == "completed" and response.usage.output_tokens == chat.usage.completion_tokens


def test_responses_stream_ends_with_completed(client):
    kwargs = dict(model="smol", input=CHAT[0]["content"], max_output_tokens=24, temperature=0)
    with client.responses.stream(**kwargs) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()  # raises unless response.completed arrived
    assert "".join(deltas) == final.output_text == client.responses.create(**kwargs).output_text


def test_info_and_probes(server_url):
    model = httpx.get(server_url + "/get_model_info", timeout=60).json()
    assert model["model_path"].endswith(".gguf") and model["model_type"] == "llama"
    info = httpx.get(server_url + "/get_server_info", timeout=60).json()
    assert info["engine_args"]["model"]["max_model_len"] == 512
    assert httpx.get(server_url + "/ping", timeout=60).status_code == 200
    assert httpx.get(server_url + "/health_generate", timeout=60).status_code == 200
    tokenizer = httpx.get(server_url + "/tokenizer_info", timeout=60).json()
    assert tokenizer["vocab_size"] == 49152 and tokenizer["eos_token"] == "<|im_end|>"
