"""Model and server descriptions clients ask for: ``GET /v1/models/{id}`` (the ``openai`` client's
``models.retrieve``), SGLang's ``GET /get_model_info`` and ``GET /get_server_info``, and SGLang's
``GET /health_generate`` probe, which generates one token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

from shardserve.entrypoints.openai.protocol import InvalidRequestError, ModelCard
from shardserve.entrypoints.openai.serving import ServingContext
from shardserve.sampling_params import SamplingParams

HEALTH_GENERATE_TIMEOUT_S = 20.0
"""How long ``/health_generate`` waits for its one token before answering 503."""


def retrieve_model(ctx: ServingContext, model_id: str) -> ModelCard:
    """The card of one served model name.

    Raises:
        InvalidRequestError: 404 ``model_not_found`` for a name that is not served.
    """
    if model_id not in ctx.served_model_names:
        raise InvalidRequestError(
            f"The model `{model_id}` does not exist. Served: {', '.join(ctx.served_model_names)}.",
            param="model",
            code="model_not_found",
            status=404,
        )
    return ModelCard(id=model_id, root=ctx.engine.model_name, max_model_len=ctx.engine.max_model_len)


def model_info(ctx: ServingContext) -> dict[str, Any]:
    """SGLang's ``/get_model_info``: where the model and tokenizer come from and what kind of model it is."""
    engine = ctx.engine
    config = getattr(engine, "config", None)
    source = getattr(getattr(engine, "engine", None), "source", None)
    model_path = str(source.path) if source is not None else (config.model.model if config else engine.model_name)
    arch = getattr(source, "arch", None)
    return {
        "model_path": model_path,
        "tokenizer_path": ctx.config.tokenizer or model_path,
        "is_generation": True,
        "preferred_sampling_params": ctx.generation_defaults or None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": getattr(arch, "architecture", None),
        "architectures": [_HF_ARCHITECTURES.get(arch.architecture, "LlamaForCausalLM")] if arch else None,
        "max_model_len": engine.max_model_len,
        "served_model_names": ctx.served_model_names,
    }


_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def server_info(ctx: ServingContext, version: str) -> dict[str, Any]:
    """SGLang's ``/get_server_info``: the server's and engine's settings (the API key left out), the running
    state and the version."""
    server = {f.name: getattr(ctx.config, f.name) for f in dataclasses.fields(ctx.config) if f.name != "api_key"}
    server.pop("chat_template_text", None)
    server["api_key_set"] = ctx.config.api_key is not None
    engine_config = getattr(ctx.engine, "config", None)
    engine = dataclasses.asdict(engine_config) if dataclasses.is_dataclass(engine_config) else {}
    state: dict[str, Any] = {}
    try:
        stats = ctx.engine.stats()
        state = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(vars(stats))
    except Exception as exc:  # noqa: BLE001 - the description is best effort; a failed stats() is reported
        state = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "version": version,
        "served_model_names": ctx.served_model_names,
        "max_model_len": ctx.engine.max_model_len,
        "server_args": server,
        "engine_args": engine,
        "internal_states": [state],
    }


async def health_generate(ctx: ServingContext, timeout: float = HEALTH_GENERATE_TIMEOUT_S) -> bool:
    """Generate one token through the engine: True when it came back within ``timeout`` seconds.

    The request is aborted (its stream closed) whatever happens.
    """
    tokenizer = ctx.engine.tokenizer
    prompt = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    stream = ctx.engine.generate(prompt, params, f"health-{uuid.uuid4().hex}")
    try:
        async with asyncio.timeout(timeout):
            async for output in stream:
                if output.finished:
                    return bool(output.outputs and output.outputs[0].num_output_tokens)  # DELTA outputs
    except (TimeoutError, Exception):  # noqa: BLE001 - any failure means unhealthy
        return False
    finally:
        await stream.aclose()
    return False
