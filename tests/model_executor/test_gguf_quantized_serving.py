"""The embedded SmolLM2-135M Q4_1 served with its weights kept in GGUF blocks (``--quantization gguf``).

On the CPU a kept-quantized layer dequantizes its blocks with ``gguf.quants.dequantize`` at each step (the
Triton kernels are checked on small shapes in ``test_gguf_kernels.py`` and, through a whole tiny model, in
``test_gguf_layers.py``); the values are then the ones the dequantize-at-load path holds, so greedy tokens
must be equal, while what the engine holds, reads per rank and slices over TP/PP is the raw blocks.
"""

from __future__ import annotations

import pytest

from shardserve import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = [list(range(1000 + 37 * i, 1000 + 37 * i + 32)) for i in range(3)]  # three prompts of 32 tokens
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_PARAMS = SamplingParams(temperature=0.0, max_tokens=8)


def _run(tp: int = 1, pp: int = 1, prompts: bool = True, **kw):
    """``(greedy token ids per prompt or None, chat answer, weight bytes held by rank 0 or None)``."""
    llm = LLM(None, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype="float32", num_kv_blocks=64, **kw)
    try:
        runner = getattr(llm.engine.executor, "runner", None)
        held = runner.model.weight_bytes if runner is not None else None
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)] if prompts else None
        return tokens, llm.chat(CHAT, CHAT_PARAMS)[0].outputs[0], held
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def quantized():
    return _run(quantization="gguf")


def test_greedy_tokens_equal_dequantized_path(quantized):
    want, want_chat, held_dense = _run()
    got, got_chat, held_blocks = quantized
    assert [len(t) for t in want] == [8, 8, 8] and got == want
    assert got_chat.token_ids == want_chat.token_ids and "Paris" in got_chat.text
    assert len({t for toks in want for t in toks}) > 6  # not degenerate
    assert held_blocks < held_dense / 4  # Q4_1/Q8_0 blocks against fp32 (5.4x less)


@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2)])
def test_tp_and_pp_on_blocks_answer_as_one_process(quantized, tp, pp):
    _, single, _ = quantized
    _, parallel, _ = _run(tp, pp, prompts=False, quantization="gguf")
    assert parallel.token_ids == single.token_ids
