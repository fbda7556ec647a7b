"""``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` in vLLM's shapes.

``/tokenize`` takes a ``prompt`` (BOS added by default) or chat ``messages`` (rendered with the chat
template; no extra special tokens by default, as the template writes them) and answers
``{"count", "max_model_len", "tokens", "token_strs"}``; ``/detokenize`` takes ``tokens`` and answers
``{"prompt"}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shardserve.entrypoints.openai.chat_render import render_chat
from shardserve.entrypoints.openai.protocol import ChatMessage
from shardserve.entrypoints.openai.serving import ServingContext


class TokenizeRequest(BaseModel):
    """vLLM's ``TokenizeCompletionRequest`` (``prompt``) or ``TokenizeChatRequest`` (``messages``)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    """Add BOS/EOS as the tokenizer does; default true for ``prompt``, false for ``messages``."""
    return_token_strs: bool | None = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.continue_final_message and self.add_generation_prompt and self.messages is not None:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def tokenize(ctx: ServingContext, body: TokenizeRequest) -> TokenizeResponse:
    """Token ids of a prompt or a rendered conversation.

    Raises:
        InvalidRequestError: unknown model (404), a chat template error or a non-text content part (400).
    """
    ctx.check_model(body.model)
    tokenizer = ctx.engine.tokenizer
    if body.messages is not None:
        text = render_chat(
            tokenizer,
            [m.to_template_dict() for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tools=body.tools,
            chat_template=body.chat_template or ctx.config.chat_template_text,
            chat_template_kwargs=body.chat_template_kwargs,
            default_chat_template_kwargs=ctx.config.default_chat_template_kwargs,  # type: ignore[arg-type]
        )
        add_special = bool(body.add_special_tokens)
    else:
        text = body.prompt  # type: ignore[assignment]
        add_special = body.add_special_tokens is not False
    ids = list(tokenizer.encode(text, add_special_tokens=add_special))
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=ctx.engine.max_model_len, tokens=ids, token_strs=strs)


def detokenize(ctx: ServingContext, body: DetokenizeRequest) -> DetokenizeResponse:
    """The text of token ids (special tokens written out, as vLLM's ``/detokenize`` does).

    Raises:
        InvalidRequestError: unknown model (404) or a token id outside the vocabulary (400).
    """
    ctx.check_model(body.model)
    ids = ctx.tokenize(body.tokens, param="tokens")
    return DetokenizeResponse(prompt=ctx.engine.tokenizer.decode(ids, skip_special_tokens=False))


def tokenizer_info(ctx: ServingContext) -> dict[str, Any]:
    """The tokenizer's configuration, in the keys of a Hugging Face ``tokenizer_config.json``."""
    tok = ctx.engine.tokenizer
    backend = tok.backend
    added = backend.get_added_tokens_decoder()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "vocab_size": tok.vocab_size,
        "model_max_length": ctx.engine.max_model_len,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "unk_token": tok.unk_token,
        "pad_token": tok.pad_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "eos_token_ids": sorted(tok.eos_token_ids),
        "add_bos_token": tok.add_bos_token,
        "chat_template": ctx.config.chat_template_text or tok.chat_template,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "special": t.special} for i, t in sorted(added.items())
        },
    }
