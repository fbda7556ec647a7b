"""The engine freezes its start-up heap for the cyclic collector and gives it back at shutdown."""

from __future__ import annotations

import gc


def test_engine_freezes_the_startup_heap_and_unfreezes_it_at_shutdown(tiny_llama_dir):
    from shardserve import LLM, SamplingParams

    gc.unfreeze()
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", cpu_kv_cache_gib=0.01)
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the model's modules and tensors, the tokenizer, the engine's tables
        tracked_before = len(gc.get_objects())
        out = llm.generate([[5, 17, 200, 3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
        assert gc.get_freeze_count() <= frozen  # serving freezes nothing (frozen objects may still be freed)
        assert len(gc.get_objects()) < tracked_before + 5_000  # what serving made is collectable, not frozen
    finally:
        llm.shutdown()
    assert gc.get_freeze_count() == 0
