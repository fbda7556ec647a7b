"""shardserve behind Ray Serve: one replica owns the whole model, all its ranks and their placement groups.

Ray Serve restarts replicas one at a time, which breaks a model whose ranks must all restart together (the
DeepSpeed-in-Ray-Serve guide's problem). Here a replica is not a rank: it is the head (scheduler and the
OpenAI-compatible routes), and it starts the T x P ranks as Ray actors with the Ray backend
(``distributed_executor_backend="ray"``, :mod:`shardserve.executor.ray_executor`), in placement groups it
owns. A rank or node that dies makes the engine restart every rank as a new generation (up to
``max_restarts``); when no restart is left the replica fails its health check, and Serve replaces the
replica, which places and starts every rank again. Nothing restarts one rank alone.

Use it as a Serve application builder::

    serve run shardserve.entrypoints.ray_serve:build_app model=/models/Llama-3.1-70B-Instruct \
        tensor_parallel_size=8 pipeline_parallel_size=2

or in a Serve config (``import_path: shardserve.entrypoints.ray_serve:build_app`` with ``args:``; see
``deploy/ray`` and ``deploy/kubernetes/rayservice.yaml``). ``args`` are the fields of the engine's config
dataclasses (``ModelConfig``, ``ParallelConfig``, ``CacheConfig``, ``SchedulerConfig``; ``model``,
``tensor_parallel_size``, ``max_model_len``, ...) and of ``ServerConfig`` (``api_key``,
``served_model_name``, ``request_timeout``, ...), by name; strings (``serve run`` passes strings) are
converted to the field's type. Deployment options (replicas, health checks) come from Serve's config.
"""

from __future__ import annotations

import asyncio
import logging
import typing
from typing import Any

import pydantic
from ray import serve

from shardserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, ServerConfig

logger = logging.getLogger(__name__)

_ENGINE_PARTS = (ModelConfig, ParallelConfig, CacheConfig, SchedulerConfig)
_SERVER_ONLY = ("host", "port", "shutdown_timeout")
"""ServerConfig fields that Ray Serve's proxy owns (it listens and drains), not accepted in ``args``."""


def configs_from_args(args: dict[str, Any]) -> tuple[EngineConfig, ServerConfig]:
    """The engine and server configs for ``args`` (see the module docstring), with the Ray backend.

    Raises:
        ValueError: an unknown or Serve-owned key, a value of the wrong type, or an invalid configuration
            (the config's own message).
    """
    # ServerConfig first: ``served_model_name`` is the server's list of names (as ``shardserve serve`` takes it).
    parts: dict[type, dict[str, Any]] = {cls: {} for cls in (ServerConfig, *_ENGINE_PARTS)}
    if isinstance(args.get("served_model_name"), str):
        args = {**args, "served_model_name": [args["served_model_name"]]}
    for key, value in args.items():
        owner = next((cls for cls in parts if key in cls.__dataclass_fields__ and key not in _SERVER_ONLY), None)
        if owner is None:
            known = sorted(k for cls in parts for k in cls.__dataclass_fields__ if k not in _SERVER_ONLY)
            raise ValueError(f"unknown shardserve Ray Serve argument {key!r}; known: {', '.join(known)}")
        parts[owner][key] = _coerce(owner, key, value)
    backend = parts[ParallelConfig].setdefault("distributed_executor_backend", "ray")
    if backend != "ray":
        raise ValueError(
            f"under Ray Serve the ranks are Ray actors: distributed_executor_backend is ray, not {backend}"
        )
    engine = EngineConfig(
        model=ModelConfig(**parts[ModelConfig]),
        parallel=ParallelConfig(**parts[ParallelConfig]),
        cache=CacheConfig(**parts[CacheConfig]),
        scheduler=SchedulerConfig(**parts[SchedulerConfig]),
    )
    return engine, ServerConfig(**parts[ServerConfig])


def _coerce(cls: type, key: str, value: Any) -> Any:
    hint = typing.get_type_hints(cls)[key]
    try:
        return pydantic.TypeAdapter(hint).validate_python(value)
    except pydantic.ValidationError as e:
        raise ValueError(f"Ray Serve argument {key}={value!r}: {e.errors()[0]['msg']}") from None


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 1},  # the head: scheduler, tokenizer, HTTP; the ranks have their own bundles
    health_check_period_s=10,
    health_check_timeout_s=30,
    max_ongoing_requests=256,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class ShardServe:
    """One Ray Serve replica = one shardserve head; the ranks are actors in placement groups it owns."""

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig):
        from shardserve.engine.async_llm import AsyncLLM

        self.server_config = server_config
        # Loading blocks (model, ranks, KV cache): off the replica's event loop.
        self.engine = await asyncio.to_thread(AsyncLLM, engine_config)

    def __serve_build_asgi_app__(self):
        from shardserve.entrypoints.openai.api_server import ServerState, build_app

        self.state = ServerState(
            engine=self.engine,
            served_model_names=list(self.server_config.served_model_name or []),
            config=self.server_config,
        )
        return build_app(self.state)

    def check_health(self) -> None:
        """Serve's health check: raises once the engine stopped for good (no restart left), so that Serve
        replaces the replica and with it every rank. A group that is restarting is healthy."""
        if getattr(self.engine, "errored", False):
            raise RuntimeError(f"shardserve engine stopped: {self.state.unusable_reason()}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()  # kills the rank actors and removes the placement groups


def build_app(args: dict[str, Any], deployment_options: dict[str, Any] | None = None) -> serve.Application:
    """Ray Serve application builder: ``args`` as in :func:`configs_from_args`; ``deployment_options`` override
    the deployment's (``health_check_period_s``, ...; a Serve config file sets them under ``deployments:``).

    Raises:
        ValueError: see :func:`configs_from_args`.
    """
    engine_config, server_config = configs_from_args(dict(args))
    deployment = ShardServe.options(**deployment_options) if deployment_options else ShardServe
    return deployment.bind(engine_config, server_config)
