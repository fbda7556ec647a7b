"""Structured outputs: JSON schema, JSON object, regex, choice and grammar constraints enforced with xgrammar.

Request side (:mod:`.spec`): each API dialect parses into one :class:`StructuredOutputSpec`; invalid input
raises :class:`InvalidStructuredOutputError` (HTTP 400). Engine side (:mod:`.manager`): one
:class:`StructuredOutputManager` per engine compiles specs against the tokenizer (cached), gives each output
sequence a :class:`GrammarMatcher`, fills the batch token bitmask on a background thread and
:func:`apply_bitmask` masks the logits on the device.

Integration (what the engine calls, and when)
---------------------------------------------
The engine does this in :class:`shardserve.engine.grammar.GrammarCoordinator` (head: compile, matchers,
fills, the hold of steps behind an unsent bitmask) and ``ModelRunner.sample_with_bitmask`` (ranks), with
:class:`shardserve.executor.messages.GrammarBitmask` on the control channel; the spec rides on
``SamplingParams.structured_outputs`` and ``reasoning_end_ids``.

1. API layer, per request: ``spec = from_openai_request(body)`` (chat/completions: ``response_format``,
   ``structured_outputs``, ``guided_*``) or ``from_sglang_sampling_params(sampling_params)``; a tool choice
   of ``required`` or a named function gives a spec through ``tool_parsers.tool_choice_spec``. Errors are
   400s before the engine sees the request. The spec rides on the request's sampling parameters (a frozen,
   picklable dataclass; it is also the compiled-grammar cache key).
2. Engine start, in the process where sampled token ids arrive (the head):
   ``manager = StructuredOutputManager(tokenizer, vocab_size=arch.vocab_size)`` (0.1-0.5 s for a 50k-150k
   vocabulary). ``vocab_size`` is the logits width; padded rows past the tokenizer are never allowed.
3. Request admission: ``manager.compile_async(spec)``; keep the request waiting (not scheduled) until the
   future is done, as vLLM's WAITING_FOR_FSM (a large schema compiles in 10-500 ms; a cache hit is instant).
   Then ``manager.matcher(spec, reasoning_end_ids)`` for each output sequence (``n > 1``: n matchers,
   n bitmask rows). ``reasoning_end_ids`` (the ``</think>`` token ids) when a reasoning parser is on, so the
   grammar starts after the reasoning section.
4. Every step, once step N's sampled ids are on the host: ``matcher.accept_token(id)`` for each grammar
   sequence in step N, before anything else touches the matchers. ``False`` means the token broke the
   grammar (only possible if the mask was not applied): finish the request. ``is_terminated()`` means a stop
   token completed the grammar: finish it (even under ``ignore_eos``, since nothing else may follow).
5. Then ``future = manager.submit_fill(rows)`` for the step N+1 batch, ``rows`` in the sampler's row order
   with ``None`` for rows without a grammar. It returns None when no row has one: then skip steps 6-7,
   so requests without a grammar cost nothing. With async scheduling the step N+1 forward is already
   running on the device, so the fill (tens of microseconds per row, C++ threads) overlaps it. The engine,
   which needs the bitmask at once, calls ``manager.fill_packed(rows)`` on its own thread instead: the
   same fill, packed as the ranks' message, without the wake-up of a Python thread.
6. Output rank, after the LM head and before penalties, ``logit_bias``, temperature and top-k/p:
   ``gb = future.result(); apply_bitmask(logits, gb.bitmask, gb.rows)`` (``-inf`` survives the later
   processing; reported logprobs are those of the masked distribution, as in vLLM). If the output rank is
   another process (TP rank 0 of the last PP stage in worker processes), send it ``gb.rows`` and
   ``gb.bitmask[gb.rows]`` (``4 * ceil(V / 32)`` bytes a row: 16 KB for a 128k vocabulary) as plain
   tensors, separately from the step message so the forward does not wait for the fill (vLLM splits
   ``execute_model`` / ``sample_tokens`` for the same reason), and scatter the rows back before applying.
   Nothing on this path may wait for the device: the bitmask goes up from pinned memory without blocking
   (a pageable copy synchronizes the stream, so the host would launch the sample and the next step only
   after this step's forward, leaving the device idle for that host work).
   With PP, batches in flight hold disjoint requests, so each batch's fill depends only on its own
   previous step.
7. Do not call ``accept_token`` on a matcher while its fill is pending (it raises): accept step N+1's
   tokens after sampling, i.e. after ``future.result()``. Two bitmask buffers alternate, so a bitmask
   stays valid until the fill after next (the host has read step N's sample before filling N+2).
8. Preemption by recompute keeps the matchers as they are (do not re-accept recomputed tokens);
   speculative decoding and stop strings that trim output call ``matcher.rollback(n)``.
9. ``min_tokens``: do not ban the stop tokens in a row whose matcher ``is_completed()``, or the row has no
   allowed token left.
"""

from typing import Any

from shardserve.structured_output.spec import (
    InvalidStructuredOutputError,
    StructuredOutputSpec,
    from_guided_fields,
    from_openai_request,
    from_response_format,
    from_sglang_sampling_params,
    from_structured_outputs,
)

_MANAGER_NAMES = ("GrammarBitmask", "GrammarMatcher", "StructuredOutputManager", "apply_bitmask",
                  "build_tokenizer_info")  # fmt: skip


def __getattr__(name: str) -> Any:
    # The engine side imports xgrammar and torch (about a second); request parsing does not need them.
    if name in _MANAGER_NAMES:
        from shardserve.structured_output import manager

        return getattr(manager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GrammarBitmask",
    "GrammarMatcher",
    "InvalidStructuredOutputError",
    "StructuredOutputManager",
    "StructuredOutputSpec",
    "apply_bitmask",
    "build_tokenizer_info",
    "from_guided_fields",
    "from_openai_request",
    "from_response_format",
    "from_sglang_sampling_params",
    "from_structured_outputs",
]
