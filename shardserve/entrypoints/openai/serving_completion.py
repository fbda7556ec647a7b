"""``POST /v1/completions``: one or several prompts, ``n`` completions each, streamed or not.

A list of prompts gives ``len(prompts) * n`` choices; choice ``index = i * n + j`` for completion
``j`` of prompt ``i``, as in OpenAI and vLLM.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response

from shardserve.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    InvalidRequestError,
    PromptTokensDetails,
    UsageInfo,
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
from shardserve.outputs import CompletionOutput, Logprob, RequestOutput

MISSING_LOGPROB = -9999.0  # vLLM's stand-in when the engine did not return the sampled token's logprob


def completion_logprobs(
    token_ids: list[int],
    logprobs: list[dict[int, Logprob]],
    num_top: int,
    text_offset: int,
    piece: Callable[[int], str],
) -> CompletionLogprobs:
    """Legacy completions logprobs for some generated tokens.

    Args:
        token_ids: the tokens, in order.
        logprobs: per token, the sampled token and the top alternatives (``Logprob.rank`` 1 = best).
        num_top: alternatives per position (the request's ``logprobs``); the sampled token is always listed too.
        text_offset: characters of text before the first token (the echoed prompt, earlier chunks).
        piece: the text of a token id, for a token the engine did not decode.
    """
    result = CompletionLogprobs()
    for token_id, candidates in zip(token_ids, logprobs):
        entry = candidates.get(token_id)
        token = entry.decoded_token if entry is not None else piece(token_id)
        result.tokens.append(token)
        result.token_logprobs.append(entry.logprob if entry is not None else MISSING_LOGPROB)
        result.text_offset.append(text_offset)
        text_offset += len(token)
        ranked = sorted(candidates.values(), key=lambda lp: lp.rank)[:num_top]
        top = {lp.decoded_token: lp.logprob for lp in ranked}
        top.setdefault(token, result.token_logprobs[-1])
        result.top_logprobs.append(top)
    return result


class CompletionServer:
    """Handles completion requests against one engine."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, body: CompletionRequest, raw: Request) -> Response | CompletionResponse:
        """Run a completion request; a ``StreamingResponse`` of SSE events when ``stream`` is set.

        Raises:
            InvalidRequestError: unknown model (404), bad parameters or too long a prompt (400).
            EngineOverloadedError, EngineDeadError: from the engine.
        """
        ctx = self.ctx
        model = ctx.check_model(body.model)
        if body.echo and body.logprobs is not None:
            raise InvalidRequestError("echo together with logprobs is not supported", param="echo")
        engine = ctx.engine
        prompts = body.prompts()
        prompt_ids = [ctx.tokenize(p, add_special_tokens=body.add_special_tokens is not False) for p in prompts]
        params = [
            body.to_sampling_params(engine.generation_defaults, len(ids), engine.max_model_len) for ids in prompt_ids
        ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = [
            ctx.generate(ids, p, f"{request_id}-{i}", stream=body.stream)
            for i, (ids, p) in enumerate(zip(prompt_ids, params))
        ]
        echoes = [self._echo_text(p) for p in prompts] if body.echo else [""] * len(prompts)
        merged = await prime(merge_streams(streams))
        if body.stream:
            return streaming_response(self._stream(body, model, request_id, merged, echoes))
        finals: dict[int, RequestOutput] = {}
        async for i, output in merged:
            if output.finished:
                finals[i] = output
        if len(finals) != len(prompts):
            raise RuntimeError(f"engine streams of {request_id} ended without a finished output")
        return self._response(body, model, request_id, [finals[i] for i in range(len(prompts))], echoes)

    def _echo_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.ctx.engine.tokenizer.decode(prompt)

    def _logprobs(
        self, body: CompletionRequest, c: CompletionOutput, full: bool, offset: int
    ) -> CompletionLogprobs | None:
        if body.logprobs is None:
            return None
        token_ids = c.token_ids if full else c.delta_token_ids
        logprobs = (c.logprobs if full else c.delta_logprobs) or []
        return completion_logprobs(
            token_ids, logprobs, body.logprobs, offset, self.ctx.engine.tokenizer.id_to_piece_text
        )

    def _response(
        self, body: CompletionRequest, model: str, request_id: str, finals: list[RequestOutput], echoes: list[str]
    ) -> CompletionResponse:
        choices = []
        for i, final in enumerate(finals):
            for c in sorted(final.outputs, key=lambda c: c.index):
                choices.append(
                    CompletionChoice(
                        index=i * body.n + c.index,
                        text=echoes[i] + c.text,
                        logprobs=self._logprobs(body, c, full=True, offset=len(echoes[i])),
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of(finals))

    async def _stream(
        self,
        body: CompletionRequest,
        model: str,
        request_id: str,
        merged: AsyncIterator[tuple[int, RequestOutput]],
        echoes: list[str],
    ) -> AsyncIterator[str]:
        usage = UsageCounter()
        offsets: dict[int, int] = {}  # characters sent so far per choice, for text_offset
        try:
            async for i, output in merged:
                usage.observe(i, output)
                for c in output.outputs:
                    index = i * body.n + c.index
                    if not (c.delta_text or c.finished or (body.logprobs is not None and c.delta_token_ids)):
                        continue
                    prefix = echoes[i] if index not in offsets else ""
                    offset = offsets.get(index, 0) + len(prefix)
                    text = prefix + c.delta_text
                    offsets[index] = offsets.get(index, 0) + len(text)
                    choice = CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=self._logprobs(body, c, full=False, offset=offset),
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                    yield sse(CompletionResponseChunk(id=request_id, model=model, choices=[choice]))
            if body.include_usage:
                yield sse(CompletionResponseChunk(id=request_id, model=model, choices=[], usage=usage.usage()))
        except Exception as exc:  # noqa: BLE001 - headers are out; report in-band like vLLM
            yield stream_error_event(exc)
        finally:
            await merged.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE


CompletionResponseChunk = CompletionResponse  # OpenAI streams completions as "text_completion" objects too


def usage_of(finals: list[RequestOutput]) -> UsageInfo:
    """Token usage over finished requests: prompt tokens once per prompt, completion tokens of every choice."""
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(c.num_output_tokens for f in finals for c in f.outputs)
    cached = sum(f.num_cached_tokens for f in finals)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )
