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
    """Validated here (token ids, [-100, 100]); refused as not supported in :mod:`.fields`."""
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
        self, defaults: dict[str, Any], prompt_len: int, max_model_len: int, prompt_noun: str = "prompt"
    ) -> SamplingParams:
        """Map onto engine sampling parameters.

        Args:
            defaults: the model's generation defaults; used for knobs the request leaves out.
            prompt_len: prompt tokens.
            max_model_len: context length (tokens).
            prompt_noun: "prompt" or "messages", for the context-length message.

        Raises:
            InvalidRequestError: prompt plus output budget exceed the context, or a value is out of range.
        """
        max_tokens = self.requested_max_tokens()
        if max_tokens is None:
            max_tokens = defaults.get("max_tokens") or defaults.get("max_new_tokens")
        max_tokens = check_context_length(prompt_len, max_tokens, max_model_len, prompt_noun)
        knobs = {name: getattr(self, name) for name in DEFAULTABLE_FIELDS}
        return build_sampling_params(
            knobs,
            defaults,
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


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    """OpenAI's and vLLM's default is 16 tokens; ``null`` runs to the end of the context."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
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


class ChatMessage(_Body):
    """One message of the conversation; ``content`` is a string or a list of text parts."""

    role: str
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def to_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it, with text parts joined by newlines (like vLLM).

        Raises:
            InvalidRequestError: a content part is not text.
        """
        message: dict[str, Any] = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        message["role"] = self.role
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


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
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
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, validation_alias=AliasChoices("seed", "sampling_seed"))
    """``sampling_seed`` is SGLang's name."""

    _check_logit_bias = field_validator("logit_bias")(check_logit_bias)

    @model_validator(mode="after")
    def _check_counts(self) -> GenerateSamplingParams:
        check_min_tokens(self.min_new_tokens, self.max_new_tokens, "min_new_tokens", "max_new_tokens")
        return self

    def to_sampling_params(self, defaults: dict[str, Any], prompt_len: int, max_model_len: int) -> SamplingParams:
        """Map onto engine sampling parameters (see :meth:`_SamplingRequest.to_sampling_params`)."""
        max_tokens = check_context_length(prompt_len, self.max_new_tokens, max_model_len, "prompt")
        knobs = {name: getattr(self, name) for name in DEFAULTABLE_FIELDS}
        return build_sampling_params(
            knobs,
            defaults,
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


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(_Choice):
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]


class DeltaMessage(BaseModel):
    """Chunk delta; fields left None are omitted from the JSON like OpenAI does."""

    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(_Choice):
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionStreamResponse(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionStreamChoice]
