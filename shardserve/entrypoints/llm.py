"""Offline batch inference: ``LLM(model).generate(prompts, params)`` and ``LLM.chat``."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import replace
from typing import Any

from shardserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.output_processor import OutputProcessor
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLM:
    """A model loaded for offline generation, with the same knobs as ``shardserve serve``.

    Args:
        model: GGUF file, Hugging Face directory or hub id (local cache); None is the embedded SmolLM2-135M.
        tensor_parallel_size, pipeline_parallel_size: ranks of the TP x PP grid (worker processes when > 1).
        Other keyword arguments are fields of ModelConfig, CacheConfig, SchedulerConfig or ParallelConfig.

    Raises:
        ValueError: a configuration value is invalid, or a keyword is unknown.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        **kwargs: Any,
    ):
        parts: dict[type, dict[str, Any]] = {ModelConfig: {}, CacheConfig: {}, SchedulerConfig: {}, ParallelConfig: {}}
        for key, value in kwargs.items():
            owner = next((cls for cls in parts if key in cls.__dataclass_fields__), None)
            if owner is None:
                raise ValueError(f"unknown LLM argument {key!r}")
            parts[owner][key] = value
        self.config = EngineConfig(
            model=ModelConfig(model=model, **parts[ModelConfig]),
            parallel=ParallelConfig(
                tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                **parts[ParallelConfig],
            ),
            cache=CacheConfig(**parts[CacheConfig]),
            scheduler=SchedulerConfig(**parts[SchedulerConfig]),
        )
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self.processor = OutputProcessor(self.tokenizer)
        self._next_id = 0

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the prompts' order, each with ``n`` completions.

        Raises:
            ValueError: a prompt is empty or too long for the context.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        groups = []
        for prompt, p in zip(prompts, params_list):
            rid = str(self._next_id)
            self._next_id += 1
            p = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
            children = self.engine.make_requests(rid, prompt, p)
            groups.append((rid, prompt, children))
        for _, prompt, children in groups:
            for req in children:
                text = prompt if isinstance(prompt, str) else None
                self.processor.add_request(req.request_id, text, req.prompt_token_ids, req.params, req.arrival_time)
                self.engine.add_request(req)
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            results, stopped = self.processor.process(self.engine.step(), time.monotonic())
            for rid in stopped:
                self.engine.abort_request(rid)
            for out in results:
                final[out.request_id] = out
                if out.outputs[0].finish_reason == "error":
                    logger.error("request %s failed: %s", out.request_id, out.outputs[0].error)
        return [self._merge(rid, children, final) for rid, _, children in groups]

    @staticmethod
    def _merge(rid: str, children, final: dict[str, RequestOutput]) -> RequestOutput:
        outs = [final[c.request_id] for c in children]
        completions = [replace(o.outputs[0], index=i) for i, o in enumerate(outs)]
        return replace(outs[0], request_id=rid, outputs=completions)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate.

        Raises:
            ValueError: the model has no chat template, or the template rejects the messages.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, add_generation_prompt=True)
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
