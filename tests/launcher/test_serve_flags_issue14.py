"""vLLM's chat/tool/reasoning/structured-output flags reach ``ServerConfig``; bad values exit 2 naming the flag."""

from __future__ import annotations

import json

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


def test_flags_reach_the_server_config(captured):
    args = ["serve", "--device", "cpu", "--root-path", "/proxy/", "--structured-outputs-config.backend", "xgrammar"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    server = captured["server"]
    assert server.root_path == "/proxy" and server.structured_outputs_backend == "xgrammar"


def test_flags_not_honoured_yet_are_refused_not_ignored(captured, tmp_path):
    from shardserve.cli import NOT_YET_WIRED

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    given = {"--chat-template": str(template), "--tool-call-parser": "hermes", "--reasoning-parser": "qwen3",
             "--generation-config": str(gen), "--max-logprobs": "-1", "--tokenizer": "some/tokenizer",
             "--default-chat-template-kwargs": '{"enable_thinking": false}'}  # fmt: skip
    for flag in NOT_YET_WIRED.values():
        extra = [flag] if flag == "--enable-auto-tool-choice" else [flag, given[flag]]
        if flag == "--enable-auto-tool-choice":
            extra += ["--tool-call-parser", "hermes"]
        result = CliRunner().invoke(app, ["serve", "--device", "cpu", *extra])
        assert result.exit_code == 2 and f"{flag} is not supported yet" in result.output, (flag, result.output)
    assert "server" not in captured


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
        (["--max-logprobs", "-5"], ["--max-logprobs"]),
        (["--root-path", "proxy"], ["--root-path"]),
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
    assert ServerConfig(generation_config="vllm").generation_config == "vllm"
    assert ServerConfig(structured_outputs_backend="auto").structured_outputs_backend == "auto"


def test_max_logprobs_is_wired_to_the_engine(captured):
    result = CliRunner().invoke(app, ["serve", "--device", "cpu", "--max-logprobs", "5"])
    assert result.exit_code == 0, result.output
    assert captured["config"].model.max_logprobs == 5 and captured["server"].max_logprobs == 5
