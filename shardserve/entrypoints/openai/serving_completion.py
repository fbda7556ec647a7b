"""``POST /v1/completions``: one or several prompts, ``n`` completions each, streamed or not.

A list of prompts gives ``len(prompts) * n`` choices; choice ``index = i * n + j`` for completion
``j`` of prompt ``i``, as in OpenAI and vLLM. ``echo`` puts the prompt in front of the text; with
``logprobs`` the prompt's tokens get their logprobs too (the first has none), as vLLM returns them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from shardserve.entrypoints.openai.logprobs import TokenText, completion_logprobs, prompt_logprobs_json
from shardserve.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
)
from shardserve.entrypoints.openai.request_options import (
    engine_field,
    logprobs_count,
    request_error,
    sampling_fields,
    structured_output_fields,
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
from shardserve.sampling_params import SamplingParams
from shardserve.structured_output import InvalidStructuredOutputError, from_openai_request


@dataclass
class _Prepared:
    """A completion request ready for the engine."""

    prompt_ids: list[list[int]]
    params: list[SamplingParams]
    echoes: list[str]
    num_top: int | None
    text: TokenText
    echo_logprobs: bool
    """``echo`` with ``logprobs``: the prompt's tokens lead each choice's logprobs."""
    prompt_logprobs: dict[int, list[dict[int, Logprob] | None]] = field(default_factory=dict)
    """Per prompt, its prompt logprobs once the engine sent them."""


class CompletionServer:
    """Handles completion requests against one engine."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def prepare(self, body: CompletionRequest) -> _Prepared:
        """Tokenize the prompts and map the request onto sampling parameters (no engine call).

        Raises:
            InvalidRequestError: an invalid or unsupported field, or too long a prompt.
        """
        ctx, engine = self.ctx, self.ctx.engine
        prompts = body.prompts()
        prompt_ids = [ctx.tokenize(p, add_special_tokens=body.add_special_tokens is not False) for p in prompts]
        max_logprobs, vocab = ctx.config.max_logprobs, ctx.vocab_size
        num_top = logprobs_count(body.logprobs, max_logprobs, vocab, "logprobs")
        prompt_lp = logprobs_count(body.prompt_logprobs, max_logprobs, vocab, "prompt_logprobs")
        extra: dict = {"logprobs": num_top}
        echo_logprobs = body.echo and num_top is not None
        if echo_logprobs or prompt_lp is not None:
            wanted = max(prompt_lp or 0, num_top or 0)
            extra |= engine_field("prompt_logprobs", wanted, "prompt_logprobs" if prompt_lp is not None else "echo")
        try:
            extra |= structured_output_fields(from_openai_request(body))
        except InvalidStructuredOutputError as exc:
            raise request_error(exc) from None
        extra |= sampling_fields(body)
        params = [
            body.to_sampling_params(ctx.generation_defaults, len(ids), engine.max_model_len, extra=extra)
            for ids in prompt_ids
        ]
        echoes = [self._echo_text(p) for p in prompts] if body.echo else [""] * len(prompts)
        text = TokenText(engine.tokenizer.id_to_piece_text, body.return_tokens_as_token_ids)
        return _Prepared(prompt_ids, params, echoes, num_top, text, echo_logprobs)

    async def create(self, body: CompletionRequest, raw: Request) -> Response | CompletionResponse:
        """Run a completion request; a ``StreamingResponse`` of SSE events when ``stream`` is set.

        Raises:
            InvalidRequestError: unknown model (404), bad parameters or too long a prompt (400).
            EngineOverloadedError, EngineDeadError: from the engine.
        """
        ctx = self.ctx
        model = ctx.check_model(body.model)
        prep = self.prepare(body)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = [
            ctx.generate(ids, p, f"{request_id}-{i}", stream=body.stream)
            for i, (ids, p) in enumerate(zip(prep.prompt_ids, prep.params))
        ]
        merged = await prime(merge_streams(streams))
        if body.stream:
            return streaming_response(self._stream(body, prep, model, request_id, merged))
        finals: dict[int, RequestOutput] = {}
        async for i, output in merged:
            if output.finished:
                finals[i] = output
        if len(finals) != len(prep.prompt_ids):
            raise RuntimeError(f"engine streams of {request_id} ended without a finished output")
        return self._response(body, prep, model, request_id, [finals[i] for i in range(len(finals))])

    def _echo_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.ctx.engine.tokenizer.decode(prompt)

    def _logprobs(
        self, prep: _Prepared, i: int, c: CompletionOutput, full: bool, offset: int, first: bool
    ) -> CompletionLogprobs | None:
        if prep.num_top is None:
            return None
        token_ids = list(c.token_ids if full else c.delta_token_ids)
        logprobs: list = list((c.logprobs if full else c.delta_logprobs) or [])
        if prep.echo_logprobs and first:  # the echoed prompt's tokens come first, from offset 0
            prompt = prep.prompt_logprobs.get(i) or [None] * len(prep.prompt_ids[i])
            token_ids, logprobs, offset = prep.prompt_ids[i] + token_ids, list(prompt) + logprobs, 0
        return completion_logprobs(token_ids, logprobs, prep.num_top, offset, prep.text)

    def _extras(self, body: CompletionRequest, prep: _Prepared, i: int, first: bool) -> dict:
        """vLLM's per-choice extras: ``prompt_logprobs`` and ``prompt_token_ids`` (first chunk of a choice)."""
        extras: dict = {}
        if body.prompt_logprobs is not None and first:
            extras["prompt_logprobs"] = prompt_logprobs_json(prep.prompt_logprobs.get(i), prep.text)
        if body.return_token_ids and first:
            extras["prompt_token_ids"] = list(prep.prompt_ids[i])
        return extras

    def _observe_prompt_logprobs(self, prep: _Prepared, i: int, output: RequestOutput) -> None:
        prompt_logprobs = getattr(output, "prompt_logprobs", None)
        if prompt_logprobs is not None and i not in prep.prompt_logprobs:
            prep.prompt_logprobs[i] = prompt_logprobs

    def _response(
        self, body: CompletionRequest, prep: _Prepared, model: str, request_id: str, finals: list[RequestOutput]
    ) -> CompletionResponse:
        choices = []
        for i, final in enumerate(finals):
            self._observe_prompt_logprobs(prep, i, final)
            for c in sorted(final.outputs, key=lambda c: c.index):
                choices.append(CompletionChoice(
                    index=i * body.n + c.index, text=prep.echoes[i] + c.text,
                    logprobs=self._logprobs(prep, i, c, full=True, offset=len(prep.echoes[i]), first=True),
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    token_ids=list(c.token_ids) if body.return_token_ids else None,
                    **self._extras(body, prep, i, first=True),
                ))  # fmt: skip
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of(finals))

    async def _stream(
        self,
        body: CompletionRequest,
        prep: _Prepared,
        model: str,
        request_id: str,
        merged: AsyncIterator[tuple[int, RequestOutput]],
    ) -> AsyncIterator[str]:
        usage = UsageCounter()
        for i, ids in enumerate(prep.prompt_ids):
            usage.expect_prompt(i, len(ids))
        final_usage, continuous = self.ctx.include_usage(body.stream, body.stream_options)
        offsets: dict[int, int] = {}  # characters sent so far per choice, for text_offset
        try:
            async for i, output in merged:
                usage.observe(i, output)
                self._observe_prompt_logprobs(prep, i, output)
                for c in output.outputs:
                    index = i * body.n + c.index
                    tokens = bool(c.delta_token_ids) and (prep.num_top is not None or body.return_token_ids)
                    if not (c.delta_text or c.finished or tokens):
                        continue
                    first = index not in offsets
                    prefix = prep.echoes[i] if first else ""
                    offset = offsets.get(index, 0) + len(prefix)
                    text = prefix + c.delta_text
                    offsets[index] = offsets.get(index, 0) + len(text)
                    choice = CompletionChoice(
                        index=index, text=text,
                        logprobs=self._logprobs(prep, i, c, full=False, offset=offset, first=first),
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                        token_ids=list(c.delta_token_ids) if body.return_token_ids else None,
                        **self._extras(body, prep, i, first),
                    )  # fmt: skip
                    extra = {"usage": usage.usage()} if continuous else {}
                    yield sse(CompletionResponseChunk(id=request_id, model=model, choices=[choice], **extra))
            if final_usage:
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
