"""Structured outputs in the engine: JSON schema, regex and choice constraints honoured through LLM.generate
and AsyncLLM (streaming), with async scheduling on and off, n > 1, and requests without a grammar unaffected;
TP=2 and PP=2 worker processes give one process's tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import jsonschema
import pytest

from shardserve import LLM, SamplingParams
from shardserve.config import SchedulerConfig
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.request import Request
from shardserve.engine.scheduler import Scheduler
from shardserve.structured_output import from_structured_outputs

SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
REGEX = "[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", "maybe"]
PROMPTS = [[1, 520, 3327], [1, 17, 99], [5, 6, 7], [8, 9, 10, 11]]


def spec(**kw):
    return from_structured_outputs(kw)


def batch_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=spec(json=SCHEMA)),
        SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=spec(regex=REGEX)),
        SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=20, structured_outputs=spec(choice=CHOICES)),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),  # no grammar
    ]


def check(outs) -> None:
    """Every constrained completion ends by its grammar and matches it."""
    doc = outs[0].outputs[0]
    assert doc.finish_reason == "stop"
    jsonschema.validate(json.loads(doc.text), SCHEMA)
    assert re.fullmatch(REGEX, outs[1].outputs[0].text) and outs[1].outputs[0].finish_reason == "stop"
    assert len(outs[2].outputs) == 3 and all(c.text in CHOICES and c.finish_reason == "stop" for c in outs[2].outputs)


def make_llm(model, **kw) -> LLM:
    return LLM(str(model), dtype="float32", num_kv_blocks=128, block_size=8, max_num_batched_tokens=64, **kw)


@pytest.fixture(scope="module")
def plain_tokens(tiny_llama_dir):
    """The request without a grammar, alone."""
    llm = make_llm(tiny_llama_dir)
    try:
        return llm.generate([PROMPTS[3]], batch_params()[3])[0].outputs[0].token_ids
    finally:
        llm.shutdown()


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_constraints_are_honoured_and_a_plain_request_is_unaffected(tiny_llama_dir, plain_tokens, async_scheduling):
    llm = make_llm(tiny_llama_dir, async_scheduling=async_scheduling)
    try:
        outs = llm.generate(PROMPTS, batch_params())
        assert llm.engine.block_manager.usage == 0.0
        assert not llm.engine.grammar._steps and not llm.engine._held
    finally:
        llm.shutdown()
    check(outs)
    assert outs[3].outputs[0].token_ids == plain_tokens
    choices = {c.text for c in outs[2].outputs}
    assert choices <= set(CHOICES)


def test_conflicting_constraints_end_the_request_without_a_token_outside_the_grammar(tiny_llama_dir):
    """allowed_token_ids that leave the grammar nothing: the token drawn from an all -inf row is rejected by the
    matcher, taken back out, and the request ends as ``stop`` instead of breaking the grammar."""
    llm = make_llm(tiny_llama_dir)
    try:
        yes = llm.tokenizer.encode("yes", add_special_tokens=False)
        unrelated = [t for t in range(100, 200) if t not in yes][:3]
        params = SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=spec(choice=["yes"]),
                                allowed_token_ids=unrelated)  # fmt: skip
        out = llm.generate([PROMPTS[0]], params)[0].outputs[0]
        # min_tokens: the stop tokens stay allowed once the grammar is complete, else nothing would be left.
        params = SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=spec(choice=["yes"]), min_tokens=8)
        done = llm.generate([PROMPTS[0]], params)[0].outputs[0]
    finally:
        llm.shutdown()
    assert out.finish_reason == "stop" and out.token_ids == []
    assert done.text == "yes" and done.finish_reason == "stop"


def test_a_request_waits_in_the_queue_while_its_grammar_compiles():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32), BlockManager(32, 4), 64)
    compiling = Request("g", [1, 2, 3], SamplingParams(), 4)
    compiling.waiting_for_grammar = True
    plain = Request("p", [4, 5], SamplingParams(), 4)
    s.add_request(compiling)
    s.add_request(plain)
    step = s.schedule()
    assert [r.request_id for r in step.scheduled] == ["p"] and list(s.waiting) == [compiling]
    compiling.waiting_for_grammar = False
    assert [r.request_id for r in s.schedule().scheduled] == ["g"]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_async_llm_streams_constrained_outputs(tiny_llama_dir, async_scheduling):
    from shardserve.config import CacheConfig, EngineConfig, ModelConfig
    from shardserve.engine.async_llm import AsyncLLM

    config = EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu"),
        cache=CacheConfig(block_size=8, num_kv_blocks=128),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, async_scheduling=async_scheduling),
    )
    engine = AsyncLLM(config)

    async def stream(i: int, params: SamplingParams) -> dict[int, str]:
        texts: dict[int, list[str]] = {}
        async for out in engine.generate(PROMPTS[i], params, f"r{i}"):
            for c in out.outputs:
                texts.setdefault(c.index, []).append(c.delta_text)
        return {k: "".join(v) for k, v in texts.items()}

    async def main():
        params = batch_params()
        return await asyncio.gather(*(stream(i, p) for i, p in enumerate(params[:3])))

    try:
        doc, regex, choices = asyncio.run(main())
    finally:
        engine.shutdown()
    jsonschema.validate(json.loads(doc[0]), SCHEMA)
    assert re.fullmatch(REGEX, regex[0])
    assert sorted(choices) == [0, 1, 2] and set(choices.values()) <= set(CHOICES)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_grammar_outputs_equal_one_process(tiny_llama_dir, tp, pp):
    """Greedy + grammar: TP=2 (the output rank applies the bitmask, the other rank waits for it before the
    token broadcast) and PP=2 (the last stage applies it) give one process's tokens, async scheduling on;
    prompt logprobs (every last-stage TP rank runs the LM head for them) match too."""
    greedy = [p for p in batch_params() if p.temperature == 0.0]
    greedy[1] = dataclasses.replace(greedy[1], prompt_logprobs=2)
    prompts = [PROMPTS[0], list(range(300, 340)), PROMPTS[3]]

    def run(tp_size, pp_size):
        llm = make_llm(tiny_llama_dir, tensor_parallel_size=tp_size, pipeline_parallel_size=pp_size)
        try:
            outs = llm.generate(prompts, greedy)
        finally:
            llm.shutdown()
        return [o.outputs[0].token_ids for o in outs], outs[1].prompt_logprobs

    want, want_prompt = run(1, 1)
    got, got_prompt = run(tp, pp)
    assert got == want and all(want)
    assert len(got_prompt) == len(prompts[1]) == len(want_prompt)
    for a, b in zip(want_prompt[1:], got_prompt[1:]):
        assert a.keys() == b.keys()
        assert all(b[t].logprob == pytest.approx(a[t].logprob, abs=1e-4) for t in a)
