"""Logprobs in the API's shapes: chat (``logprobs.content``), legacy completions, and vLLM's ``prompt_logprobs``.

The engine gives, per position, ``{token_id: Logprob}`` with the sampled (or prompt) token and the top
alternatives (``rank`` 1 = best). With vLLM's ``return_tokens_as_token_ids`` every token is written
``token_id:N`` instead of its text, so tokens that are not valid UTF-8 alone stay distinguishable.
"""

from __future__ import annotations

from collections.abc import Callable

from shardserve.entrypoints.openai.protocol import (
    ChoiceLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
)
from shardserve.outputs import Logprob

MISSING_LOGPROB = -9999.0  # vLLM's stand-in when the engine did not return the sampled token's logprob


class TokenText:
    """How a token is written: its text (the engine's decoded piece, else the tokenizer's) or ``token_id:N``."""

    def __init__(self, piece: Callable[[int], str], as_ids: bool = False) -> None:
        self.piece = piece
        self.as_ids = as_ids

    def __call__(self, token_id: int, entry: Logprob | None = None) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        return entry.decoded_token if entry is not None else self.piece(token_id)


def _ranked(candidates: dict[int, Logprob], num_top: int) -> list[tuple[int, Logprob]]:
    return sorted(candidates.items(), key=lambda kv: kv[1].rank)[:num_top]


def chat_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int, text: TokenText
) -> ChoiceLogprobs:
    """Chat-format logprobs: per token its text, logprob, UTF-8 bytes and the ``num_top`` best alternatives.

    Args:
        token_ids: the tokens, in order.
        logprobs: per token, the sampled token and the top alternatives.
        num_top: alternatives per position (the request's ``top_logprobs``, -1 resolved).
        text: how tokens are written.
    """
    content = []
    for token_id, candidates in zip(token_ids, logprobs):
        entry = candidates.get(token_id)
        token = text(token_id, entry)
        top = []
        for tid, lp in _ranked(candidates, num_top):
            alt = text(tid, lp)
            top.append(TopLogprob(token=alt, logprob=lp.logprob, bytes=list(alt.encode("utf-8"))))
        logprob = entry.logprob if entry is not None else MISSING_LOGPROB
        content.append(TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")), top_logprobs=top))
    return ChoiceLogprobs(content=content)


def completion_logprobs(
    token_ids: list[int],
    logprobs: list[dict[int, Logprob] | None],
    num_top: int,
    text_offset: int,
    text: TokenText,
) -> CompletionLogprobs:
    """Legacy completions logprobs for some tokens (an echoed prompt's first token has None: no logprob).

    Args:
        token_ids: the tokens, in order.
        logprobs: per token, the token and the top alternatives; None where there is none.
        num_top: alternatives per position (the request's ``logprobs``); the token itself is always listed too.
        text_offset: characters of text before the first token (the echoed prompt, earlier chunks).
        text: how tokens are written.
    """
    result = CompletionLogprobs()
    for token_id, candidates in zip(token_ids, logprobs):
        entry = candidates.get(token_id) if candidates is not None else None
        token = text(token_id, entry)
        result.tokens.append(token)
        result.text_offset.append(text_offset)
        text_offset += len(token)
        if candidates is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(entry.logprob if entry is not None else MISSING_LOGPROB)
        top = {text(tid, lp): lp.logprob for tid, lp in _ranked(candidates, num_top)}
        top.setdefault(token, result.token_logprobs[-1])  # type: ignore[arg-type]
        result.top_logprobs.append(top)
    return result


def prompt_logprobs_json(prompt_logprobs: list[dict[int, Logprob] | None] | None, text: TokenText) -> PromptLogprobs:
    """vLLM's ``prompt_logprobs``: per prompt token, ``{"<token id>": {"logprob", "rank", "decoded_token"}}``."""

    def entry(token_id: int, lp: Logprob) -> PromptLogprob:
        return PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=text(token_id, lp))

    return [
        None if position is None else {str(tid): entry(tid, lp) for tid, lp in position.items()}
        for position in prompt_logprobs or []
    ]
