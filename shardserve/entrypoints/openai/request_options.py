"""What a request asks of the engine beyond plain sampling, mapped onto :class:`SamplingParams` fields.

Every endpoint maps the same way: a structured-output constraint (``response_format``, ``structured_outputs``,
``guided_*``, SGLang's ``regex`` / ``json_schema`` / ``ebnf``, or the grammar of a forced tool choice),
``logit_bias``, ``bad_words``, ``allowed_token_ids`` and ``prompt_logprobs``. A field is handed to the engine
only when the request asks for something (so requests without it cost nothing), and when the engine has no
such sampling field the request is refused with 400 ``unsupported_parameter`` rather than served without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from shardserve.entrypoints.openai.protocol import InvalidRequestError
from shardserve.sampling_params import SamplingParams
from shardserve.structured_output import InvalidStructuredOutputError, StructuredOutputSpec

STRUCTURED_OUTPUT_FIELD = "structured_outputs"
"""The SamplingParams field that carries a :class:`StructuredOutputSpec` (vLLM's name)."""
REASONING_END_FIELD = "reasoning_end_ids"
"""The SamplingParams field with the ``</think>`` token ids after which the grammar starts."""


def engine_field(name: str, value: Any, param: str) -> dict[str, Any]:
    """``{name: value}`` for :class:`SamplingParams`, refused when the engine has no such field.

    Raises:
        InvalidRequestError: 400 ``unsupported_parameter`` naming ``param``.
    """
    if name not in {f.name for f in dataclasses.fields(SamplingParams)}:
        raise InvalidRequestError(f"{param} is not supported by this server yet", param=param,
                                  code="unsupported_parameter")  # fmt: skip
    return {name: value}


def request_error(exc: InvalidStructuredOutputError) -> InvalidRequestError:
    """The 400 of an invalid constraint or tool definition (``code: invalid_structured_output``)."""
    return InvalidRequestError(exc.message, param=exc.param, code=exc.code)


def structured_output_fields(
    spec: StructuredOutputSpec | None, reasoning_end_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """The engine fields of a constraint; ``reasoning_end_ids`` (``</think>``) delays it past the reasoning.

    Raises:
        InvalidRequestError: the engine cannot enforce constraints (400 naming the request field).
    """
    if spec is None:
        return {}
    fields = engine_field(STRUCTURED_OUTPUT_FIELD, spec, spec.param or STRUCTURED_OUTPUT_FIELD)
    if reasoning_end_ids:
        fields |= engine_field(REASONING_END_FIELD, list(reasoning_end_ids), spec.param or STRUCTURED_OUTPUT_FIELD)
    return fields


def sampling_fields(body: Any, prefix: str = "", prompt_logprobs: int | None = None) -> dict[str, Any]:
    """``logit_bias`` (keys as ints), ``bad_words``, ``allowed_token_ids`` and ``prompt_logprobs`` of a body
    (a chat/completion request or /generate's ``sampling_params``), those that ask for something.

    Raises:
        InvalidRequestError: the engine has no such field, or ``allowed_token_ids`` is empty.
    """
    fields: dict[str, Any] = {}
    bias = getattr(body, "logit_bias", None)
    if bias:
        fields |= engine_field("logit_bias", {int(k): float(v) for k, v in bias.items()}, f"{prefix}logit_bias")
    words = getattr(body, "bad_words", None)
    if words:
        fields |= engine_field("bad_words", list(words), f"{prefix}bad_words")
    allowed = getattr(body, "allowed_token_ids", None)
    if allowed is not None:
        if not allowed:
            raise InvalidRequestError("allowed_token_ids must not be empty", param=f"{prefix}allowed_token_ids")
        fields |= engine_field("allowed_token_ids", list(allowed), f"{prefix}allowed_token_ids")
    if prompt_logprobs is not None:
        fields |= engine_field("prompt_logprobs", prompt_logprobs, f"{prefix}prompt_logprobs")
    return fields


def logprobs_count(requested: int | None, max_logprobs: int, vocab_size: int | None, param: str) -> int | None:
    """Alternatives per token for the engine: ``-1`` is the whole vocabulary, capped by ``--max-logprobs``.

    Args:
        requested: the request's value (None: no logprobs).
        max_logprobs: ``--max-logprobs`` (-1: no cap).
        vocab_size: the vocabulary, for ``-1`` without a cap.

    Raises:
        InvalidRequestError: more than ``--max-logprobs`` asked for explicitly.
    """
    if requested is None:
        return None
    if requested == -1:
        return max_logprobs if max_logprobs != -1 else vocab_size
    if max_logprobs != -1 and requested > max_logprobs:
        raise InvalidRequestError(
            f"{param} is {requested}, more than this server returns ({max_logprobs}, --max-logprobs)", param=param
        )
    return requested
