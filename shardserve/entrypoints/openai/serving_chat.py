"""``POST /v1/chat/completions``: the chat template turns messages into a prompt, then as completions.

Streaming follows OpenAI: each choice's first chunk carries ``role: "assistant"``, content arrives
as ``delta.content``, the chunk that ends a choice has its ``finish_reason``, an optional usage
chunk with empty ``choices`` follows, then ``data: [DONE]``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response

from shardserve.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChoiceLogprobs,
    DeltaMessage,
    InvalidRequestError,
    TokenLogprob,
    TopLogprob,
)
from shardserve.entrypoints.openai.serving import (
    SSE_DONE,
    ServingContext,
    UsageCounter,
    merge_streams,
    prime,
    sse,
    stream_error_event,
    streaming_response,
)
from shardserve.entrypoints.openai.serving_completion import MISSING_LOGPROB, usage_of
from shardserve.outputs import CompletionOutput, Logprob, RequestOutput


def chat_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int, piece: Callable[[int], str]
) -> ChoiceLogprobs:
    """Chat-format logprobs: per token its text, logprob, UTF-8 bytes and the ``num_top`` best alternatives.

    Args:
        token_ids: the tokens, in order.
        logprobs: per token, the sampled token and the top alternatives (``Logprob.rank`` 1 = best).
        num_top: alternatives per position (the request's ``top_logprobs``).
        piece: the text of a token id, for a token the engine did not decode.
    """
    content = []
    for token_id, candidates in zip(token_ids, logprobs):
        entry = candidates.get(token_id)
        token = entry.decoded_token if entry is not None else piece(token_id)
        ranked = sorted(candidates.values(), key=lambda lp: lp.rank)[:num_top]
        content.append(
            TokenLogprob(
                token=token,
                logprob=entry.logprob if entry is not None else MISSING_LOGPROB,
                bytes=list(token.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=lp.decoded_token, logprob=lp.logprob, bytes=list(lp.decoded_token.encode("utf-8")))
                    for lp in ranked
                ],
            )
        )
    return ChoiceLogprobs(content=content)


class ChatServer:
    """Handles chat completion requests against one engine."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def render_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """Token ids of the conversation rendered by the model's chat template.

        Raises:
            InvalidRequestError: the template rejects the conversation or a content part is not text.
        """
        tokenizer = self.ctx.engine.tokenizer
        messages = [m.to_template_dict() for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        except ValueError as exc:
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
        # The template writes any BOS itself, so by default (as vLLM) the tokenizer adds none.
        return self.ctx.tokenize(text, add_special_tokens=bool(body.add_special_tokens), param="messages")

    async def create(self, body: ChatCompletionRequest, raw: Request) -> Response | ChatCompletionResponse:
        """Run a chat request; a ``StreamingResponse`` of SSE chunks when ``stream`` is set.

        Raises:
            InvalidRequestError: unknown model (404), bad parameters, template errors or too long a prompt (400).
            EngineOverloadedError, EngineDeadError: from the engine.
        """
        ctx = self.ctx
        model = ctx.check_model(body.model)
        engine = ctx.engine
        prompt_ids = self.render_prompt(body)
        params = body.to_sampling_params(engine.generation_defaults, len(prompt_ids), engine.max_model_len, "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        merged = await prime(merge_streams([ctx.generate(prompt_ids, params, request_id, stream=body.stream)]))
        if body.stream:
            return streaming_response(self._stream(body, model, request_id, merged))
        final: RequestOutput | None = None
        async for _, output in merged:
            if output.finished:
                final = output
        if final is None:
            raise RuntimeError(f"engine stream of {request_id} ended without a finished output")
        choices = [
            ChatCompletionChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self._logprobs(body, c, full=True),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in sorted(final.outputs, key=lambda c: c.index)
        ]
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of([final]))

    def _logprobs(self, body: ChatCompletionRequest, c: CompletionOutput, full: bool) -> ChoiceLogprobs | None:
        if not body.logprobs:
            return None
        token_ids = c.token_ids if full else c.delta_token_ids
        logprobs = (c.logprobs if full else c.delta_logprobs) or []
        return chat_logprobs(token_ids, logprobs, body.top_logprobs or 0, self.ctx.engine.tokenizer.id_to_piece_text)

    async def _stream(
        self, body: ChatCompletionRequest, model: str, request_id: str, merged: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChatCompletionStreamChoice], **extra: object) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, model=model, choices=choices, **extra))

        usage = UsageCounter()
        try:
            for j in range(body.n):
                role = DeltaMessage(role="assistant", content="")
                yield chunk([ChatCompletionStreamChoice(index=j, delta=role)])
            async for _, output in merged:
                usage.observe(0, output)
                for c in output.outputs:
                    if not (c.delta_text or c.finished or (body.logprobs and c.delta_token_ids)):
                        continue
                    choice = ChatCompletionStreamChoice(
                        index=c.index,
                        delta=DeltaMessage(content=c.delta_text),
                        logprobs=self._logprobs(body, c, full=False),
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                    yield chunk([choice])
            if body.include_usage:
                yield chunk([], usage=usage.usage())
        except Exception as exc:  # noqa: BLE001 - headers are out; report in-band like vLLM
            yield stream_error_event(exc)
        finally:
            await merged.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE
