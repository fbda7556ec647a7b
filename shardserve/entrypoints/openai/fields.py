"""Which request fields the server honours, which it refuses (400), and which are harmless metadata.

Nothing is silently ignored: a field the engine cannot honour yet is refused with 400
``"<field> is not supported"`` (``code: unsupported_parameter``) unless its value asks for nothing
(e.g. ``response_format: {"type": "text"}``, ``tool_choice: "none"``, ``logit_bias: {}``). The refusals
live in the ``UNSUPPORTED_*`` tables below; implementing a field means deleting its row and mapping it
in :mod:`shardserve.entrypoints.openai.protocol`. Unknown fields are accepted, as vLLM does, and logged
once per field name.

``/v1/chat/completions`` (OpenAI, then vLLM extras):

- honoured: ``messages`` (``tool_calls`` and ``tool_call_id`` included), ``model``, ``max_completion_tokens``,
  ``max_tokens``, ``n``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``presence_penalty``,
  ``frequency_penalty``, ``logprobs``, ``top_logprobs`` (-1 too), ``logit_bias``, ``tools``, ``tool_choice``,
  ``parallel_tool_calls``, ``functions``, ``function_call``, ``response_format``, ``stream``,
  ``stream_options.include_usage`` / ``continuous_usage_stats``; vLLM: ``top_k``, ``min_p``,
  ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``min_tokens``, ``skip_special_tokens``,
  ``add_generation_prompt``, ``continue_final_message``, ``echo``, ``add_special_tokens``, ``chat_template``,
  ``chat_template_kwargs``, ``include_reasoning``, ``structured_outputs``, ``guided_json``, ``guided_regex``,
  ``guided_choice``, ``guided_grammar``, ``guided_decoding_backend`` (xgrammar), ``bad_words``,
  ``allowed_token_ids``, ``prompt_logprobs``, ``return_token_ids``, ``return_tokens_as_token_ids``,
  ``best_of`` equal to ``n``. The fields the engine enforces (constraints, ``logit_bias``, ``bad_words``,
  ``allowed_token_ids``, ``prompt_logprobs``) are refused by :mod:`.request_options` when the engine has no
  such sampling field.
- refused: ``audio``, ``modalities`` other than text, ``prediction``, ``reasoning_effort``, ``verbosity``,
  ``web_search_options``, ``store: true``; vLLM: ``structural_tag``, ``best_of`` above ``n``,
  ``use_beam_search``, ``length_penalty``, ``include_stop_str_in_output``, ``spaces_between_special_tokens``,
  ``truncate_prompt_tokens``, ``documents``, ``mm_processor_kwargs``, ``priority``, ``logits_processors``,
  ``cache_salt`` (prefix-cache isolation: ignoring it would share cached blocks between tenants),
  ``kv_transfer_params``, ``vllm_xargs``.
- metadata (accepted, no effect on the output): ``user``, ``metadata``, ``safety_identifier``,
  ``prompt_cache_key``, ``service_tier``, ``request_id``.

``/v1/completions``: the same sampling fields plus ``prompt``, ``echo`` (with ``logprobs`` too), ``logprobs``;
refused: ``suffix``, ``prompt_embeds`` and the vLLM extras refused for chat; metadata: ``user``, ``request_id``.

``/generate`` (SGLang): honoured ``text``, ``input_ids``, ``stream``, ``rid`` and in ``sampling_params``
``max_new_tokens``, ``min_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``stop``, ``stop_token_ids``,
``ignore_eos``, ``skip_special_tokens``, ``n``, ``seed`` (or SGLang's ``sampling_seed``), ``json_schema``,
``regex``, ``ebnf``, ``logit_bias``; refused: ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``,
``token_ids_logprob``, ``return_text_in_logprobs``, ``return_hidden_states``, ``image_data``, ``audio_data``,
``video_data``, ``lora_path``, ``custom_logit_processor``, ``session_params`` and in ``sampling_params``
``structural_tag``, ``custom_params``, ``no_stop_trim``, ``spaces_between_special_tokens``; metadata:
``stream_interval`` (chunking), ``log_metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel

from shardserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    InvalidRequestError,
)

logger = logging.getLogger(__name__)

Neutral = Callable[[Any, BaseModel], bool]
"""Whether a field's value asks for nothing (then it is honoured trivially); gets the value and the body."""


def neutral(*values: Any) -> Neutral:
    """Neutral when the value is None or equals one of ``values``."""
    return lambda value, _: value is None or any(value == v and type(value) is type(v) for v in values)


_ABSENT = neutral()
_OFF = neutral(False)


def _best_of_is_n(value: Any, body: BaseModel) -> bool:
    return value is None or value == getattr(body, "n", 1)


_VLLM_EXTRAS: dict[str, Neutral] = {
    "structural_tag": _ABSENT,
    "best_of": _best_of_is_n,
    "use_beam_search": _OFF,
    "length_penalty": neutral(1.0, 1),
    "include_stop_str_in_output": _OFF,
    "spaces_between_special_tokens": _ABSENT,
    "truncate_prompt_tokens": _ABSENT,
    "priority": neutral(0),
    "logits_processors": _ABSENT,
    "cache_salt": _ABSENT,
    "kv_transfer_params": _ABSENT,
    "vllm_xargs": _ABSENT,
}

UNSUPPORTED_CHAT: dict[str, Neutral] = {
    "audio": _ABSENT,
    "modalities": neutral(["text"]),
    "prediction": _ABSENT,
    "reasoning_effort": _ABSENT,
    "verbosity": _ABSENT,
    "web_search_options": _ABSENT,
    "store": _OFF,
    "documents": _ABSENT,
    "mm_processor_kwargs": _ABSENT,
    **_VLLM_EXTRAS,
}
"""Chat fields refused until implemented (field -> which values ask for nothing)."""

UNSUPPORTED_COMPLETION: dict[str, Neutral] = {
    "suffix": neutral(""),
    "prompt_embeds": _ABSENT,
    **_VLLM_EXTRAS,
}
"""Completion fields refused until implemented."""

UNSUPPORTED_GENERATE: dict[str, Neutral] = {
    "return_logprob": _OFF,
    "logprob_start_len": _ABSENT,
    "top_logprobs_num": _ABSENT,
    "token_ids_logprob": _ABSENT,
    "return_text_in_logprobs": _OFF,
    "return_hidden_states": _OFF,
    "image_data": _ABSENT,
    "audio_data": _ABSENT,
    "video_data": _ABSENT,
    "lora_path": _ABSENT,
    "custom_logit_processor": _ABSENT,
    "session_params": _ABSENT,
}
"""``/generate`` top-level fields refused until implemented."""

UNSUPPORTED_GENERATE_SAMPLING: dict[str, Neutral] = {
    "structural_tag": _ABSENT,
    "custom_params": _ABSENT,
    "no_stop_trim": _OFF,
    "spaces_between_special_tokens": _ABSENT,
}
"""``/generate`` ``sampling_params`` fields refused until implemented."""

METADATA = frozenset(
    {"user", "metadata", "safety_identifier", "prompt_cache_key", "service_tier", "request_id",
     "stream_interval", "log_metrics"}
)  # fmt: skip
"""Accepted and without effect on the output, by their definition (no log line)."""

GUIDED_FIELDS = frozenset(
    {"guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_json_object",
     "guided_decoding_backend", "guided_whitespace_pattern"}
)  # fmt: skip
"""vLLM's older constraint names, read from the extra fields by
:func:`shardserve.structured_output.from_guided_fields` (honoured, so not logged as unknown)."""

_logged_unknown: set[str] = set()
"""Unknown field names already logged (``sampling_params.x`` for /generate's nested ones)."""


def check_fields(body: BaseModel, vocab_size: int | None) -> None:
    """Refuse what the server cannot honour in a parsed request body; log unknown fields once per name.

    Order: token ids in ``stop_token_ids`` and ``logit_bias`` are checked against the vocabulary
    (their format and ranges were checked by the protocol models), then the ``UNSUPPORTED_*`` table
    of the endpoint applies.

    Args:
        body: a :class:`CompletionRequest`, :class:`ChatCompletionRequest` or :class:`GenerateRequest`.
        vocab_size: token ids must be below it; None skips the vocabulary check.

    Raises:
        InvalidRequestError: a token id outside the vocabulary, or a field that is not supported (400).
    """
    if isinstance(body, GenerateRequest):
        _check_vocabulary(body.sampling_params, vocab_size, "sampling_params.")
        _refuse(body, UNSUPPORTED_GENERATE, "/generate")
        _refuse(body.sampling_params, UNSUPPORTED_GENERATE_SAMPLING, "/generate", "sampling_params.")
        return
    _check_vocabulary(body, vocab_size)
    if isinstance(body, ChatCompletionRequest):
        _refuse(body, UNSUPPORTED_CHAT, "/v1/chat/completions")
    elif isinstance(body, CompletionRequest):
        _refuse(body, UNSUPPORTED_COMPLETION, "/v1/completions")


def _check_vocabulary(body: BaseModel, vocab_size: int | None, prefix: str = "") -> None:
    if vocab_size is None:
        return
    for token_id in getattr(body, "stop_token_ids", None) or []:
        if token_id >= vocab_size:
            raise InvalidRequestError(
                f"{prefix}stop_token_ids: token id {token_id} is outside the vocabulary [0, {vocab_size})",
                param=f"{prefix}stop_token_ids",
            )
    for token_id in getattr(body, "allowed_token_ids", None) or []:
        if token_id >= vocab_size:
            raise InvalidRequestError(
                f"{prefix}allowed_token_ids: token id {token_id} is outside the vocabulary [0, {vocab_size})",
                param=f"{prefix}allowed_token_ids",
            )
    for key in getattr(body, "logit_bias", None) or {}:
        if int(key) >= vocab_size:
            raise InvalidRequestError(
                f"{prefix}logit_bias: key {key} is not a token id of the vocabulary [0, {vocab_size})",
                param=f"{prefix}logit_bias",
            )


def field_value(body: BaseModel, name: str) -> Any:
    """A declared field's value, else the extra field's (None when absent)."""
    if name in type(body).model_fields:
        return getattr(body, name)
    return (body.model_extra or {}).get(name)


def _refuse(body: BaseModel, table: dict[str, Neutral], endpoint: str, prefix: str = "") -> None:
    for name, is_neutral in table.items():
        if not is_neutral(field_value(body, name), body):
            raise InvalidRequestError(
                f"{prefix}{name} is not supported by this server yet",
                param=f"{prefix}{name}",
                code="unsupported_parameter",
            )
    _log_unknown(body.model_extra or {}, set(table), endpoint, prefix)


def _log_unknown(extras: Iterable[str], known: set[str], endpoint: str, prefix: str) -> None:
    for name in extras:
        key = prefix + name
        if name in known or name in METADATA or name in GUIDED_FIELDS or key in _logged_unknown:
            continue
        _logged_unknown.add(key)
        logger.warning("%s: ignoring the unknown request field %r (logged once per field name)", endpoint, key)
