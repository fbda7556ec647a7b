"""``POST /v1/chat/completions``: the chat template turns messages into a prompt, then as completions.

Streaming follows OpenAI: each choice's first chunk carries ``role: "assistant"``, content arrives
as ``delta.content`` (reasoning as ``delta.reasoning`` / ``delta.reasoning_content``, tool calls as
``delta.tool_calls``), the chunk that ends a choice has its ``finish_reason``, an optional usage
chunk with empty ``choices`` follows, then ``data: [DONE]``. Tools, constraints and reasoning are worked
out by :mod:`.chat_plan` and read back by :mod:`.chat_output`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from shardserve.entrypoints.openai.chat_output import ChoiceReader
from shardserve.entrypoints.openai.chat_plan import ChatPlan, plan_chat
from shardserve.entrypoints.openai.chat_render import render_chat
from shardserve.entrypoints.openai.logprobs import TokenText, chat_logprobs, prompt_logprobs_json
from shardserve.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChoiceLogprobs,
    DeltaMessage,
)
from shardserve.entrypoints.openai.request_options import logprobs_count, sampling_fields
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
from shardserve.entrypoints.openai.serving_completion import usage_of
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import SamplingParams


@dataclass
class _Prepared:
    """A chat request ready for the engine."""

    plan: ChatPlan
    prompt_text: str
    prompt_ids: list[int]
    num_top: int | None
    """Alternatives per token in ``logprobs`` (None: no logprobs)."""
    echo: str
    """The text the answer starts with (``echo``), or ""."""
    text: TokenText


class ChatServer:
    """Handles chat completion requests against one engine."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def render_prompt(self, body: ChatCompletionRequest, plan: ChatPlan | None = None) -> tuple[str, list[int]]:
        """The conversation rendered by the chat template (the request's, ``--chat-template`` or the model's),
        with the tools and template variables: its text and token ids.

        Raises:
            InvalidRequestError: the template rejects the conversation, a content part is not text, or
                ``continue_final_message`` cannot be honoured.
        """
        config = self.ctx.config
        text = render_chat(
            self.ctx.engine.tokenizer,
            [m.to_template_dict() for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tools=plan.tools if plan is not None else None,
            chat_template=body.chat_template or config.chat_template_text,
            chat_template_kwargs=body.chat_template_kwargs,
            default_chat_template_kwargs=config.default_chat_template_kwargs,  # type: ignore[arg-type]
        )
        # The template writes any BOS itself, so by default (as vLLM) the tokenizer adds none.
        return text, self.ctx.tokenize(text, add_special_tokens=bool(body.add_special_tokens), param="messages")

    def prepare(self, body: ChatCompletionRequest) -> tuple[_Prepared, SamplingParams]:
        """Plan, render and map a request onto sampling parameters (no engine call).

        Raises:
            InvalidRequestError: anything the request asks that is invalid or cannot be honoured.
        """
        ctx, engine = self.ctx, self.ctx.engine
        plan = plan_chat(body, ctx.config)
        prompt_text, prompt_ids = self.render_prompt(body, plan)
        max_logprobs, vocab = ctx.config.max_logprobs, ctx.vocab_size
        num_top = logprobs_count(body.top_logprobs or 0, max_logprobs, vocab, "top_logprobs") if body.logprobs else None
        prompt_logprobs = logprobs_count(body.prompt_logprobs, max_logprobs, vocab, "prompt_logprobs")
        extra = {"logprobs": num_top, **plan.engine_fields(engine.tokenizer, prompt_text)}
        extra |= sampling_fields(body, prompt_logprobs=prompt_logprobs)
        if plan.needs_special_tokens(engine.tokenizer):
            extra["skip_special_tokens"] = False  # the parser reads markers that are special tokens
        params = body.to_sampling_params(ctx.generation_defaults, len(prompt_ids), engine.max_model_len, "messages",
                                         extra)  # fmt: skip
        last = body.messages[-1].to_template_dict()
        echo = last["content"] if body.echo and last.get("role") == "assistant" else ""
        text = TokenText(engine.tokenizer.id_to_piece_text, body.return_tokens_as_token_ids)
        return _Prepared(plan, prompt_text, prompt_ids, num_top, echo, text), params

    def _reader(self, body: ChatCompletionRequest, prep: _Prepared) -> ChoiceReader:
        tokenizer = self.ctx.engine.tokenizer
        plan = prep.plan
        return ChoiceReader(plan.reasoning_parser(tokenizer), plan.tool_parser(tokenizer), body.include_reasoning,
                            plan.parallel, plan.legacy, prep.echo)  # fmt: skip

    async def create(self, body: ChatCompletionRequest, raw: Request) -> Response | ChatCompletionResponse:
        """Run a chat request; a ``StreamingResponse`` of SSE chunks when ``stream`` is set.

        Raises:
            InvalidRequestError: unknown model (404), bad parameters, template errors or too long a prompt (400).
            EngineOverloadedError, EngineDeadError: from the engine.
        """
        ctx = self.ctx
        model = ctx.check_model(body.model)
        prep, params = self.prepare(body)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = ctx.generate(prep.prompt_ids, params, request_id, stream=body.stream)
        merged = await prime(merge_streams([stream]))
        if body.stream:
            return streaming_response(self._stream(body, prep, model, request_id, merged))
        final: RequestOutput | None = None
        async for _, output in merged:
            if output.finished:
                final = output
        if final is None:
            raise RuntimeError(f"engine stream of {request_id} ended without a finished output")
        choices = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            reader = self._reader(body, prep)
            message = reader.message(c.text)
            choices.append(ChatCompletionChoice(
                index=c.index, message=message, logprobs=self._logprobs(prep, c, full=True),
                finish_reason=reader.finish_reason(c.finish_reason), stop_reason=c.stop_reason,
                token_ids=list(c.token_ids) if body.return_token_ids else None,
            ))  # fmt: skip
        prompt_logprobs = getattr(final, "prompt_logprobs", None)
        return ChatCompletionResponse(
            id=request_id, model=model, choices=choices, usage=usage_of([final]),
            prompt_token_ids=list(final.prompt_token_ids) if body.return_token_ids else None,
            prompt_logprobs=prompt_logprobs_json(prompt_logprobs, prep.text) if body.prompt_logprobs is not None
            else None,
        )  # fmt: skip

    def _logprobs(self, prep: _Prepared, c: CompletionOutput, full: bool) -> ChoiceLogprobs | None:
        if prep.num_top is None:
            return None
        token_ids = c.token_ids if full else c.delta_token_ids
        logprobs = (c.logprobs if full else c.delta_logprobs) or []
        return chat_logprobs(token_ids, logprobs, prep.num_top, prep.text)

    async def _stream(
        self,
        body: ChatCompletionRequest,
        prep: _Prepared,
        model: str,
        request_id: str,
        merged: AsyncIterator[tuple[int, RequestOutput]],
    ) -> AsyncIterator[str]:
        usage = UsageCounter()
        usage.expect_prompt(0, len(prep.prompt_ids))
        final_usage, continuous = self.ctx.include_usage(body.stream, body.stream_options)

        def chunk(choices: list[ChatCompletionStreamChoice], **extra: object) -> str:
            if continuous and "usage" not in extra:
                extra["usage"] = usage.usage()
            return sse(ChatCompletionStreamResponse(id=request_id, model=model, choices=choices, **extra))

        readers = {j: self._reader(body, prep) for j in range(body.n)}
        try:
            for j in range(body.n):
                role = DeltaMessage(role="assistant", content="")
                ids = list(prep.prompt_ids) if body.return_token_ids and j == 0 else None
                yield chunk([ChatCompletionStreamChoice(index=j, delta=role)], prompt_token_ids=ids)
                if prep.echo:
                    yield chunk([ChatCompletionStreamChoice(index=j, delta=DeltaMessage(content=prep.echo))])
            async for _, output in merged:
                usage.observe(0, output)
                for c in output.outputs:
                    choice = self._stream_choice(body, prep, readers[c.index], c)
                    if choice is not None:
                        yield chunk([choice])
            if final_usage:
                yield chunk([], usage=usage.usage())
        except Exception as exc:  # noqa: BLE001 - headers are out; report in-band like vLLM
            yield stream_error_event(exc)
        finally:
            await merged.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE

    def _stream_choice(
        self, body: ChatCompletionRequest, prep: _Prepared, reader: ChoiceReader, c: CompletionOutput
    ) -> ChatCompletionStreamChoice | None:
        delta = reader.delta(c.delta_text, c.finished)
        tokens = bool(c.delta_token_ids) and (prep.num_top is not None or body.return_token_ids)
        if delta is None and not c.finished and not tokens:
            return None
        return ChatCompletionStreamChoice(
            index=c.index, delta=delta or DeltaMessage(), logprobs=self._logprobs(prep, c, full=False),
            finish_reason=reader.finish_reason(c.finish_reason), stop_reason=c.stop_reason,
            token_ids=list(c.delta_token_ids) if body.return_token_ids else None,
        )  # fmt: skip
