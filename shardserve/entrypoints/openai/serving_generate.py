"""SGLang's native ``POST /generate``.

Body: ``{"text" | "input_ids", "sampling_params": {"max_new_tokens", "temperature", ...}, "stream"}``;
``sampling_params`` may constrain the output with ``regex``, ``json_schema`` or ``ebnf`` and bias it with
``logit_bias``.
Answer per completion: ``{"text", "meta_info": {"id", "prompt_tokens", "completion_tokens",
"cached_tokens", "finish_reason": {"type": "stop" | "length" | "abort", ...}}}``; a list when
the request holds a batch of prompts or ``n > 1``. Streaming sends the same objects with the
cumulative text so far (SGLang's format), then ``data: [DONE]``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response

from shardserve.entrypoints.openai.protocol import GenerateRequest
from shardserve.entrypoints.openai.request_options import request_error, sampling_fields, structured_output_fields
from shardserve.entrypoints.openai.serving import (
    SSE_DONE,
    ServingContext,
    merge_streams,
    prime,
    sse,
    stream_error_event,
    streaming_response,
)
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.structured_output import InvalidStructuredOutputError, from_sglang_sampling_params


def finish_reason_info(c: CompletionOutput) -> dict[str, Any] | None:
    """SGLang's ``finish_reason`` object, None while the completion runs."""
    if c.finish_reason is None:
        return None
    if c.finish_reason == "length":
        return {"type": "length", "length": c.num_output_tokens}
    if c.finish_reason == "stop":
        return {"type": "stop", "matched": c.stop_reason}
    return {"type": c.finish_reason}


class GenerateServer:
    """Handles ``/generate`` against one engine."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, body: GenerateRequest) -> Response:
        """Run a ``/generate`` request.

        Raises:
            InvalidRequestError: bad parameters or too long a prompt (400).
            EngineOverloadedError, EngineDeadError: from the engine.
        """
        ctx = self.ctx
        engine = ctx.engine
        param = "text" if body.text is not None else "input_ids"
        prompt_ids = [ctx.tokenize(p, param=param) for p in body.prompts()]
        sampling = body.sampling_params
        try:
            extra = structured_output_fields(from_sglang_sampling_params(sampling))
        except InvalidStructuredOutputError as exc:
            raise request_error(exc) from None
        extra |= sampling_fields(sampling, prefix="sampling_params.")
        params = [
            sampling.to_sampling_params(ctx.generation_defaults, len(ids), engine.max_model_len, extra)
            for ids in prompt_ids
        ]
        base_id = body.rid or uuid.uuid4().hex
        ids = [base_id if len(prompt_ids) == 1 else f"{base_id}-{i}" for i in range(len(prompt_ids))]
        streams = [ctx.generate(p, sp, rid, stream=body.stream) for p, sp, rid in zip(prompt_ids, params, ids)]
        merged = await prime(merge_streams(streams))
        as_list = body.is_batch or sampling.n > 1
        if body.stream:
            return streaming_response(self._stream(merged, ids, sampling.n))
        finals: dict[int, RequestOutput] = {}
        async for i, output in merged:
            if output.finished:
                finals[i] = output
        results = [
            self._result(finals[i], c, ids[i], sampling.n)
            for i in sorted(finals)
            for c in sorted(finals[i].outputs, key=lambda c: c.index)
        ]
        return JSONResponse(results if as_list else results[0])

    @staticmethod
    def _result(
        output: RequestOutput, c: CompletionOutput, rid: str, n: int, text: str | None = None,
        token_ids: list[int] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        token_ids = c.token_ids if token_ids is None else token_ids
        return {
            "text": c.text if text is None else text,
            "output_ids": token_ids,
            "meta_info": {
                "id": rid if n == 1 else f"{rid}-{c.index}",
                "prompt_tokens": len(output.prompt_token_ids),
                "completion_tokens": c.num_output_tokens,
                "cached_tokens": output.num_cached_tokens,
                "finish_reason": finish_reason_info(c),
            },
        }

    async def _stream(
        self, merged: AsyncIterator[tuple[int, RequestOutput]], ids: list[str], n: int
    ) -> AsyncIterator[str]:
        texts: dict[int, list[str]] = {}  # SGLang streams the text so far: kept here from the deltas
        tokens: dict[int, list[int]] = {}
        try:
            async for i, output in merged:
                for c in output.outputs:
                    index = i * n + c.index
                    texts.setdefault(index, []).append(c.delta_text)
                    tokens.setdefault(index, []).extend(c.delta_token_ids)
                    result = self._result(output, c, ids[i], n, "".join(texts[index]), tokens[index])
                    result["index"] = index
                    yield sse(result)
        except Exception as exc:  # noqa: BLE001 - headers are out; report in-band
            yield stream_error_event(exc)
        finally:
            await merged.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE
