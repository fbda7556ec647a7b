"""Chat templates rendered in the sandbox, checked against transformers' apply_chat_template."""

from __future__ import annotations

import pytest

from shardserve.transformers_utils.chat_template import compile_chat_template, render_chat_template
from shardserve.transformers_utils.tokenizer import Tokenizer

pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr, ahoy!"},
        {"role": "user", "content": "Où est le trésor? 宝物 😀"},
    ],
]

# Exercises tojson, namespace, loop controls, filters, raise_exception and the tools/bos variables.
RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='', turns=0) %}
{%- for m in messages %}
  {%- if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif %}
  {%- if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
  {%- set ns.turns = ns.turns + 1 %}
<{{ m['role'] | upper }} n={{ ns.turns }}>{{ m['content'] | trim }}</{{ m['role'] }}>
{% endfor %}
{%- if tools %}TOOLS {{ tools | tojson }}
{% endif %}
{%- if ns.system %}SYSTEM {{ {'text': ns.system, 'html': '<b>&</b>'} | tojson(indent=2) }}
{% endif %}
{%- if add_generation_prompt %}<ASSISTANT>{% endif %}"""

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather <now>", "parameters": WEATHER_PARAMETERS},
    }
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_model_template_matches_transformers(tokenizer: Tokenizer, hf_tokenizer, messages) -> None:
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    reference = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == reference
    assert ours.endswith("<|im_start|>assistant\n")


def test_no_generation_prompt_matches_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    messages = CONVERSATIONS[2]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert ours == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_rich_template_matches_transformers(tokenizer: Tokenizer, hf_tokenizer, messages, tools) -> None:
    reference = hf_tokenizer.apply_chat_template(
        messages, chat_template=RICH_TEMPLATE, tools=tools, tokenize=False, add_generation_prompt=True
    )
    ours = render_chat_template(
        RICH_TEMPLATE,
        messages,
        add_generation_prompt=True,
        tools=tools,
        special_tokens={"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token},
    )
    assert ours == reference
    assert ours.startswith(tokenizer.bos_token)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{% set x = [] %}{{ x.append(1) }}",
        "{% set ns = namespace() %}{% set ns._secret = 1 %}{{ ns }}",
    ],
)
def test_sandbox_refuses_python_internals(template: str) -> None:
    with pytest.raises(ValueError, match="chat template"):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_sandbox_leaks_nothing_through_a_bare_dunder() -> None:
    # A single unsafe attribute renders as undefined (empty), like transformers; nothing of the globals leaks.
    assert render_chat_template("{{ raise_exception.__globals__ }}", [{"role": "user", "content": "hi"}]) == ""


def test_raise_exception_gives_template_message() -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with user!') }}"
        "{% endif %}ok"
    )
    assert render_chat_template(template, [{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(ValueError, match="Conversations must start with user!"):
        render_chat_template(template, [{"role": "assistant", "content": "hi"}])


def test_syntax_error_and_missing_template(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="compile"):
        render_chat_template("{% for m in messages %}", [])
    bare = Tokenizer(tokenizer.backend, bos_token=None, eos_token=None, add_bos_token=False)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_compiled_once_per_template() -> None:
    assert compile_chat_template(RICH_TEMPLATE) is compile_chat_template(RICH_TEMPLATE)


def test_extra_kwargs_and_strftime_reach_template() -> None:
    template = "{{ enable_thinking }} {{ strftime_now('%Y') | length }} {% generation %}g{% endgeneration %}"
    assert render_chat_template(template, [], enable_thinking=False) == "False 4 g"
