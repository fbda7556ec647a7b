"""Request and response bodies of the HTTP API, as pydantic v2 models.

Field names and shapes follow the OpenAI API reference (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, the error body) plus vLLM's sampling extras (``top_k``, ``min_p``, ...)
and SGLang's native ``/generate``. Range checks live in the field constraints so a bad value fails
validation with the field's name, which the server turns into HTTP 400 with ``param`` set. Every
number is bounded by what the engine can hold: integers by int32 (token counts, ``top_k``) or int64
(``seed``, as vLLM), floats must be finite. Which other fields are honoured, refused with 400 or
accepted as metadata is decided in :mod:`shardserve.entrypoints.openai.fields`.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from shardserve.sampling_params import SamplingParams

# Sampling knobs a request may leave out, filled from the model's generation_config.json.
DEFAULTABLE_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
MAX_LOGPROBS = SamplingParams.MAX_LOGPROBS
INT32_MAX = 2**31 - 1
"""Bound of token counts and ``top_k`` (the engine keeps them in int32 tensors and block tables)."""
INT64_MIN, INT64_MAX = SamplingParams.SEED_MIN, SamplingParams.SEED_MAX
LOGIT_BIAS_LIMIT = 100.0
"""OpenAI: each ``logit_bias`` value lies in [-100, 100]."""

TokenCount = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class InvalidRequestError(Exception):
    """A client error: the server answers HTTP 400 (or ``status``) in OpenAI's shape, naming the faulty field.

    Deliberately not a ``ValueError``: an unexpected ``ValueError`` from deeper code is a server bug (500).
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


# ----------------------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


# ----------------------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "shardserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    """vLLM extra: the context length (tokens)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -------------------------------------------------------------------------------------- requests


class _Body(BaseModel):
    """Request bodies: unknown fields kept (see :mod:`.fields`), NaN and infinities refused."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = False
    """Send a last chunk with ``usage`` and empty ``choices`` before ``[DONE]``."""
    continuous_usage_stats: bool | None = False
    """vLLM: every chunk carries the ``usage`` so far too (with ``include_usage``)."""


def check_logit_bias(bias: dict[str, float] | None) -> dict[str, float] | None:
    """OpenAI's rules: keys are token ids written as decimal strings, values lie in [-100, 100].

    Raises:
        ValueError: a key that is not a token id, or a value out of range (pydantic names the field).
    """
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) > INT32_MAX:
            raise ValueError(f"keys must be token ids (strings of digits), got {key!r}")
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise ValueError(f"values must be in [-100, 100], got {value} for token {key}")
    return bias


class _SamplingRequest(_Body):
    """Fields shared by the completion and chat requests (OpenAI names plus vLLM extras)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (decimal string) -> bias in [-100, 100] added to its logit; ids checked against the vocabulary."""
    response_format: dict[str, Any] | None = None
    """OpenAI: ``{"type": "text" | "json_object" | "json_schema", ...}`` (see :mod:`shardserve.structured_output`)."""
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    """Checked against the vocabulary by the server (:func:`.fields.check_fields`)."""
    min_tokens: TokenCount = 0
    skip_special_tokens: bool = True
    add_special_tokens: bool | None = None
    """vLLM: add the tokenizer's special tokens (BOS) to the prompt; default True for completions, False for chat."""
    structured_outputs: dict[str, Any] | None = None
    """vLLM: ``{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`` (older names: ``guided_*``)."""
    bad_words: list[str] | None = None
    """vLLM: words that are never generated (each as the tokens it encodes to, with and without a leading space)."""
    allowed_token_ids: list[TokenId] | None = None
    """vLLM: the only tokens that may be generated."""
    prompt_logprobs: int | None = Field(None, ge=-1, le=INT32_MAX)
    """vLLM: logprobs of each prompt token and this many alternatives (-1: the whole vocabulary)."""
    return_token_ids: bool = False
    """vLLM: the prompt's and each choice's token ids in the response."""
    return_tokens_as_token_ids: bool = False
    """vLLM: logprob tokens written as ``token_id:N`` (for tokens that are not valid UTF-8 alone)."""

    _check_logit_bias = field_validator("logit_bias")(check_logit_bias)

    @model_validator(mode="after")
    def _check_stream_options(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if isinstance(self.stop, list) and not all(self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.stop == "":
            self.stop = None
        check_min_tokens(self.min_tokens, self.requested_max_tokens())
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        """The output budget the client asked for, None when left to the context."""
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        """Top alternatives per token to return, None for no logprobs."""
        return None

    def to_sampling_params(
        self,
        defaults: dict[str, Any],
        prompt_len: int,
        max_model_len: int,
        prompt_noun: str = "prompt",
        extra: dict[str, Any] | None = None,
    ) -> SamplingParams:
        """Map onto engine sampling parameters.

        Args:
            defaults: the model's generation defaults; used for knobs the request leaves out.
            prompt_len: prompt tokens.
            max_model_len: context length (tokens).
            prompt_noun: "prompt" or "messages", for the context-length message.
            extra: engine fields the server worked out (structured output, logit bias, ...; see
                :mod:`.request_options`), passed on as they are.

        Raises:
            InvalidRequestError: prompt plus output budget exceed the context, or a value is out of range.
        """
        max_tokens = self.requested_max_tokens()
        if max_tokens is None:
            max_tokens = defaults.get("max_tokens") or defaults.get("max_new_tokens")
        max_tokens = check_context_length(prompt_len, max_tokens, max_model_len, prompt_noun)
        knobs = {name: getattr(self, name) for name in DEFAULTABLE_FIELDS}
        fixed = dict(
            n=self.n,
            max_tokens=max_tokens,
            stop=self.stop,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop_token_ids=self.stop_token_ids or [],
            min_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=self.num_logprobs(),
        )
        return build_sampling_params(knobs, defaults, **{**fixed, **(extra or {})})


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    """OpenAI's and vLLM's default is 16 tokens; ``null`` runs to the end of the context."""
    logprobs: int | None = Field(None, ge=-1, le=INT32_MAX)
    """Alternatives per token (-1: the whole vocabulary); capped by ``--max-logprobs`` (checked by the server)."""
    echo: bool = False

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] for p in self.prompt)):
            raise ValueError("prompt must not be empty")
        return self

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextContentPart(_Body):
    type: str
    text: str | None = None


class MessageFunction(_Body):
    name: str
    arguments: str | dict[str, Any] | None = None
    """JSON text (OpenAI's form) or an object."""


class MessageToolCall(_Body):
    """``tool_calls[]`` of an assistant message sent back in the next turn."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunction


class ChatMessage(_Body):
    """One message of the conversation; ``content`` is a string or a list of text parts.

    An assistant message may carry ``tool_calls`` (and a legacy ``function_call``), a ``tool`` message its
    ``tool_call_id``; other keys (``reasoning_content``, ...) pass to the template as they are.
    """

    role: str
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def to_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it, with text parts joined by newlines (like vLLM).

        Tool-call ``arguments`` become objects, as transformers' templates expect (``arguments | tojson``),
        the way vLLM hands them over.

        Raises:
            InvalidRequestError: a content part is not text, or tool-call arguments are not a JSON object.
        """
        message: dict[str, Any] = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        message["role"] = self.role
        if self.tool_calls is not None:
            message["tool_calls"] = [_template_tool_call(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(
                        f"content part of type {part.type!r} is not supported; only text parts are",
                        param="messages",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        message["content"] = content if content is not None else ""
        if self.name is not None:
            message["name"] = self.name
        return message


def _template_tool_call(call: MessageToolCall) -> dict[str, Any]:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise InvalidRequestError(
                f"tool call {call.function.name!r}: arguments are not valid JSON: {exc}", param="messages"
            ) from None
    out = call.model_dump(exclude_none=True)
    out["function"] = {**out["function"], "arguments": arguments if arguments is not None else {}}
    return out


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=-1, le=INT32_MAX)
    """Alternatives per token (-1: the whole vocabulary); capped by ``--max-logprobs`` (checked by the server)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    """vLLM: leave the last (assistant) message open so the model continues it (``add_generation_prompt`` false)."""
    echo: bool = False
    """vLLM: start the answer with the last message's content when it is the assistant's."""
    chat_template: str | None = None
    """vLLM: a template used instead of the server's."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM: extra template variables (over ``--default-chat-template-kwargs``)."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI: ``[{"type": "function", "function": {"name", "description", "parameters"}}]``."""
    tool_choice: str | dict[str, Any] | None = None
    """``none``, ``auto`` (the default with tools), ``required`` or ``{"type": "function", "function": {"name"}}``."""
    parallel_tool_calls: bool | None = None
    """False: at most one call per answer."""
    functions: list[dict[str, Any]] | None = None
    """OpenAI's deprecated form of ``tools``; answered in its own shape (``message.function_call``)."""
    function_call: str | dict[str, Any] | None = None
    """OpenAI's deprecated form of ``tool_choice``: ``none``, ``auto`` or ``{"name": ...}``."""
    include_reasoning: bool = True
    """vLLM: with ``--reasoning-parser``, return the reasoning (``reasoning`` / ``reasoning_content``)."""

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tools is not None and self.functions is not None:
            raise ValueError("give tools or the deprecated functions, not both")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class GenerateSamplingParams(_Body):
    """SGLang ``sampling_params`` of ``/generate`` (its names: ``max_new_tokens``, ``min_new_tokens``)."""

    max_new_tokens: int | None = Field(128, ge=1, le=INT32_MAX)
    min_new_tokens: TokenCount = 0
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = Field(1, ge=1, le=128)
    json_schema: str | dict[str, Any] | None = None
    """SGLang: the output is JSON valid for this schema (JSON text or an object)."""
    regex: str | None = None
    """SGLang: the output matches this regular expression."""
    ebnf: str | None = None
    """SGLang: the output follows this EBNF grammar (root rule ``root``)."""
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, validation_alias=AliasChoices("seed", "sampling_seed"))
    """``sampling_seed`` is SGLang's name."""

    _check_logit_bias = field_validator("logit_bias")(check_logit_bias)

    @model_validator(mode="after")
    def _check_counts(self) -> GenerateSamplingParams:
        check_min_tokens(self.min_new_tokens, self.max_new_tokens, "min_new_tokens", "max_new_tokens")
        return self

    def to_sampling_params(
        self, defaults: dict[str, Any], prompt_len: int, max_model_len: int, extra: dict[str, Any] | None = None
    ) -> SamplingParams:
        """Map onto engine sampling parameters (see :meth:`_SamplingRequest.to_sampling_params`)."""
        max_tokens = check_context_length(prompt_len, self.max_new_tokens, max_model_len, "prompt")
        knobs = {name: getattr(self, name) for name in DEFAULTABLE_FIELDS}
        fixed = dict(
            n=self.n,
            max_tokens=max_tokens,
            stop=self.stop,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop_token_ids=self.stop_token_ids or [],
            min_tokens=self.min_new_tokens,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=None,
        )
        return build_sampling_params(knobs, defaults, **{**fixed, **(extra or {})})


class GenerateRequest(_Body):
    """SGLang native ``POST /generate``: ``text`` or ``input_ids``, one prompt or a batch."""

    text: str | list[str] | None = None
    input_ids: list[TokenId] | list[list[TokenId]] | None = None
    sampling_params: GenerateSamplingParams = Field(default_factory=GenerateSamplingParams)
    stream: bool = False
    rid: str | None = None

    @model_validator(mode="after")
    def _check_prompt(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        prompt = self.text if self.text is not None else self.input_ids
        if isinstance(prompt, list) and (not prompt or any(p == [] for p in prompt)):
            raise ValueError("the prompt must not be empty")
        return self

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)  # type: ignore[index]

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        if self.text is not None:
            return [self.text] if isinstance(self.text, str) else list(self.text)
        return list(self.input_ids) if self.is_batch else [self.input_ids]  # type: ignore[list-item,arg-type]


# --------------------------------------------------------------------------- request -> sampling


def check_min_tokens(
    min_tokens: int, max_tokens: int | None, min_name: str = "min_tokens", max_name: str = "max_tokens"
) -> None:
    """vLLM's rule: ``min_tokens <= max_tokens``.

    Raises:
        ValueError: ``min_tokens`` exceeds ``max_tokens``.
    """
    if max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(f"{min_name} ({min_tokens}) must not exceed {max_name} ({max_tokens})")


def check_context_length(prompt_len: int, max_tokens: int | None, max_model_len: int, prompt_noun: str) -> int:
    """The output budget in tokens, checked against the context length.

    Returns ``max_tokens``, or the room left in the context when it is None.

    Raises:
        InvalidRequestError: ``prompt_len + max_tokens > max_model_len`` or the prompt fills the context.
    """
    room = max_model_len - prompt_len
    wanted = max_tokens if max_tokens is not None else 1
    if wanted > room:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + wanted} tokens ({prompt_len} in the {prompt_noun}, {wanted} in the completion). "
            f"Please reduce the length of the {prompt_noun} or completion.",
            param="max_tokens" if max_tokens is not None and prompt_len < max_model_len else prompt_noun,
            code="context_length_exceeded",
        )
    return max_tokens if max_tokens is not None else room


def build_sampling_params(knobs: dict[str, Any], defaults: dict[str, Any], **fixed: Any) -> SamplingParams:
    """A :class:`SamplingParams` from request knobs, the model's defaults for knobs left None, and ``fixed``.

    Raises:
        InvalidRequestError: SamplingParams rejects a value (``param`` is the field it names).
    """
    kwargs = dict(fixed)
    for name, value in knobs.items():
        if value is None:
            value = defaults.get(name)
        if value is not None:
            kwargs[name] = value
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = [kwargs["stop"]]
    kwargs["stop"] = kwargs.get("stop") or []
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise InvalidRequestError(message, param=message.split(" ", 1)[0]) from exc


# ------------------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists over the generated tokens."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class _Choice(BaseModel):
    """What every choice carries: its index and, once it ended, why (vLLM's ``stop_reason`` too)."""

    index: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _Response(BaseModel):
    """What every completion object carries besides its ``object`` and ``choices``."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class PromptLogprob(BaseModel):
    """vLLM's entry of ``prompt_logprobs``: one candidate token at one prompt position."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]
"""vLLM's ``prompt_logprobs``: per prompt token (None for the first), token id (as a string) -> its logprob."""


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    """vLLM ``return_token_ids``: the prompt's tokens (first chunk of a stream)."""
    token_ids: list[int] | None = None
    """vLLM ``return_token_ids``: this choice's generated tokens (the new ones in a stream chunk)."""


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    """``tool_calls[].function`` (and the legacy ``function_call``): ``arguments`` is JSON text."""

    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    """The answer; ``reasoning`` and ``reasoning_content`` (the same text: vLLM's and SGLang/DeepSeek's names) are
    set with ``--reasoning-parser``, ``tool_calls`` when the model called tools, ``function_call`` for requests
    that used the deprecated ``functions``."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    function_call: ResponseFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_extras(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in ("role", "content")}


class ChatCompletionChoice(_Choice):
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None
    """vLLM ``return_token_ids``: this choice's generated tokens."""


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    """vLLM ``return_token_ids``: the rendered prompt's tokens."""


class DeltaFunction(BaseModel):
    """A chunk's legacy ``delta.function_call``: the name once, then ``arguments`` pieces."""

    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaMessage(BaseModel):
    """Chunk delta; fields left None are omitted from the JSON like OpenAI does. ``tool_calls`` entries are
    :class:`~shardserve.entrypoints.openai.tool_parsers.DeltaToolCall` dumps (``index``, then ``id``/``type``/
    ``function.name`` once, then ``function.arguments`` pieces)."""

    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: DeltaFunction | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(_Choice):
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionStreamChoice]
    prompt_token_ids: list[int] | None = None
