"""Which request fields the server honours, which it refuses (400), and which are harmless metadata.

Nothing is silently ignored: a field the engine cannot honour yet is refused with 400
``"<field> is not supported"`` (``code: unsupported_parameter``) unless its value asks for nothing
(e.g. ``response_format: {"type": "text"}``, ``tool_choice: "none"``, ``logit_bias: {}``). The refusals
live in the ``UNSUPPORTED_*`` tables below; implementing a field means deleting its row and mapping it
in :mod:`shardserve.entrypoints.openai.protocol`. Unknown fields are accepted, as vLLM does, and logged
once per field name.

``/v1/chat/completions`` (OpenAI, then vLLM extras):

- honoured: ``messages``, ``model``, ``max_completion_tokens``, ``max_tokens``, ``n``, ``temperature``,
  ``top_p``, ``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty``, ``logprobs``, ``top_logprobs``,
  ``stream``, ``stream_options.include_usage``; vLLM: ``top_k``, ``min_p``, ``repetition_penalty``,
  ``ignore_eos``, ``stop_token_ids``, ``min_tokens``, ``skip_special_tokens``, ``add_generation_prompt``,
  ``add_special_tokens``, ``best_of`` equal to ``n``.
- refused: ``tools``, ``tool_choice``, ``functions``, ``function_call``, ``response_format`` (json_object,
  json_schema), ``logit_bias`` (validated first: token-id keys in the vocabulary, values in [-100, 100]),
  ``audio``, ``modalities`` other than text, ``prediction``, ``reasoning_effort``, ``verbosity``,
  ``web_search_options``, ``store: true``; vLLM: ``guided_json``, ``guided_regex``, ``guided_choice``,
  ``guided_grammar``, ``guided_decoding_backend``, ``guided_whitespace_pattern``, ``structural_tag``,
  ``structured_outputs``, ``continue_final_message``, ``echo``, ``best_of`` above ``n``,
  ``use_beam_search``, ``length_penalty``, ``include_stop_str_in_output``,
  ``spaces_between_special_tokens``, ``truncate_prompt_tokens``, ``prompt_logprobs``,
  ``allowed_token_ids``, ``bad_words``, ``documents``, ``chat_template``, ``chat_template_kwargs``,
  ``mm_processor_kwargs``, ``priority``, ``logits_processors``, ``return_tokens_as_token_ids``,
  ``return_token_ids``, ``cache_salt`` (prefix-cache isolation: ignoring it would share cached blocks
  between tenants), ``kv_transfer_params``, ``vllm_xargs``.
- metadata (accepted, no effect on the output): ``user``, ``metadata``, ``safety_identifier``,
  ``prompt_cache_key``, ``service_tier``, ``parallel_tool_calls`` (only means something with tools),
  ``request_id``.

``/v1/completions``: the same sampling fields plus ``prompt``, ``echo``, ``logprobs``; refused:
``suffix``, ``logit_bias``, ``response_format``, the ``guided_*`` family, ``structured_outputs``,
``prompt_embeds`` and the vLLM extras refused for chat; metadata: ``user``, ``request_id``.

``/generate`` (SGLang): honoured ``text``, ``input_ids``, ``stream``, ``rid`` and in ``sampling_params``
``max_new_tokens``, ``min_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``stop``, ``stop_token_ids``,
``ignore_eos``, ``skip_special_tokens``, ``n``, ``seed`` (or SGLang's ``sampling_seed``); refused:
``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``, ``token_ids_logprob``,
``return_text_in_logprobs``, ``return_hidden_states``, ``image_data``, ``audio_data``, ``video_data``,
``lora_path``, ``custom_logit_processor``, ``session_params`` and in ``sampling_params`` ``json_schema``,
``regex``, ``ebnf``, ``structural_tag``, ``logit_bias``, ``custom_params``, ``no_stop_trim``,
``spaces_between_special_tokens``; metadata: ``stream_interval`` (chunking), ``log_metrics``.
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
    "guided_json": _ABSENT,
    "guided_regex": _ABSENT,
    "guided_choice": _ABSENT,
    "guided_grammar": _ABSENT,
    "guided_decoding_backend": _ABSENT,
    "guided_whitespace_pattern": _ABSENT,
    "structural_tag": _ABSENT,
    "structured_outputs": _ABSENT,
    "response_format": neutral({"type": "text"}),
    "logit_bias": neutral({}),
    "best_of": _best_of_is_n,
    "use_beam_search": _OFF,
    "length_penalty": neutral(1.0, 1),
    "include_stop_str_in_output": _OFF,
    "spaces_between_special_tokens": _ABSENT,
    "truncate_prompt_tokens": _ABSENT,
    "prompt_logprobs": _ABSENT,
    "allowed_token_ids": _ABSENT,
    "bad_words": neutral([]),
    "priority": neutral(0),
    "logits_processors": _ABSENT,
    "return_tokens_as_token_ids": _OFF,
    "return_token_ids": _OFF,
    "cache_salt": _ABSENT,
    "kv_transfer_params": _ABSENT,
    "vllm_xargs": _ABSENT,
}

UNSUPPORTED_CHAT: dict[str, Neutral] = {
    "tools": neutral([]),
    "tool_choice": neutral("none"),
    "functions": neutral([]),
    "function_call": neutral("none"),
    "continue_final_message": _OFF,
    "echo": _OFF,
    "audio": _ABSENT,
    "modalities": neutral(["text"]),
    "prediction": _ABSENT,
    "reasoning_effort": _ABSENT,
    "verbosity": _ABSENT,
    "web_search_options": _ABSENT,
    "store": _OFF,
    "documents": _ABSENT,
    "chat_template": _ABSENT,
    "chat_template_kwargs": neutral({}),
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
    "json_schema": _ABSENT,
    "regex": _ABSENT,
    "ebnf": _ABSENT,
    "structural_tag": _ABSENT,
    "logit_bias": neutral({}),
    "custom_params": _ABSENT,
    "no_stop_trim": _OFF,
    "spaces_between_special_tokens": _ABSENT,
}
"""``/generate`` ``sampling_params`` fields refused until implemented."""

METADATA = frozenset(
    {"user", "metadata", "safety_identifier", "prompt_cache_key", "service_tier", "parallel_tool_calls",
     "request_id", "stream_interval", "log_metrics"}
)  # fmt: skip
"""Accepted and without effect on the output, by their definition (no log line)."""

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
        if name in known or name in METADATA or key in _logged_unknown:
            continue
        _logged_unknown.add(key)
        logger.warning("%s: ignoring the unknown request field %r (logged once per field name)", endpoint, key)
