"""``shardserve`` command line: serve, generate, and the cluster tools. The one place that prints."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Annotated, Optional

import typer

from shardserve.config import (
    CacheConfig,
    EngineConfig,
    FaultInjection,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
)

FAULT_INJECTION_ENV = "SHARDSERVE_FAULT_INJECTION"
"""Testing only: ``add_request:RANK:TOKEN`` (see :class:`shardserve.config.FaultInjection`)."""

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve one LLM sharded over GPUs and nodes.")
logger = logging.getLogger("shardserve")

ModelArg = Annotated[
    Optional[str], typer.Argument(help="GGUF file, HF directory or hub id; default: embedded SmolLM2-135M")
]
TP = Annotated[int, typer.Option("--tensor-parallel-size", "-tp", help="TP ranks per stage")]
PP = Annotated[int, typer.Option("--pipeline-parallel-size", "-pp", help="Pipeline stages")]
QUANTIZATION_HELP = (
    "Weight quantization: gguf (keep GGUF blocks; default for GGUF on CUDA), fp8 (quantize bf16 weights to e4m3 "
    "at load; FP8 checkpoints load as FP8 without it); default: the checkpoint's"
)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _partition(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--pp-layer-partition wants comma-separated integers, got {text!r}") from None


def _string_list(values: list[str] | None) -> list[str] | None:
    """Repeated flag values, each a comma-separated list or a JSON list (vLLM's ``'["*"]'``)."""
    if not values:
        return None
    out: list[str] = []
    for value in values:
        if value.lstrip().startswith("["):
            try:
                parsed = json.loads(value)
            except ValueError:
                raise typer.BadParameter(f"not a JSON list: {value!r}") from None
            out += [str(v) for v in parsed]
        else:
            out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def build_engine_config(
    model: str | None,
    *,
    tp: int = 1,
    pp: int = 1,
    pp_layer_partition: str | None = None,
    dtype: str = "auto",
    max_model_len: int | None = None,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    max_queue_len: int | None = None,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    num_kv_blocks: int | None = None,
    cpu_kv_cache_gib: float = 1.0,
    enable_prefix_caching: bool = True,
    kv_cache_dtype: str = "auto",
    load_format: str = "auto",
    quantization: str | None = None,
    seed: int = 0,
    device: str = "auto",
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    rendezvous_timeout: float = 300.0,
    watchdog_timeout: float = 120.0,
    max_restarts: int = 3,
    pp_partition_by_memory: bool = False,
    enforce_eager: bool = False,
    disable_custom_all_reduce: bool = False,
    async_scheduling: bool = True,
    fault_injection: str | None = None,
    tokenizer: str | None = None,
    max_logprobs: int = 20,
    distributed_executor_backend: str = "mp",
) -> EngineConfig:
    """Flags to typed config; ``ValueError`` messages name the flag."""
    return EngineConfig(
        fault_injection=FaultInjection.parse(fault_injection) if fault_injection else None,
        model=ModelConfig(
            model=model,
            dtype=dtype,
            load_format=load_format,
            quantization=quantization,
            max_model_len=max_model_len,
            seed=seed,
            device=device,
            enforce_eager=enforce_eager,
            tokenizer=tokenizer,
            max_logprobs=max_logprobs,
        ),
        parallel=ParallelConfig(
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            pp_layer_partition=_partition(pp_layer_partition),
            pp_partition_by_memory=pp_partition_by_memory,
            disable_custom_all_reduce=disable_custom_all_reduce,
            nnodes=nnodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            rendezvous_timeout=rendezvous_timeout,
            watchdog_timeout=watchdog_timeout,
            max_restarts=max_restarts,
            distributed_executor_backend=distributed_executor_backend,
        ),
        cache=CacheConfig(
            block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization,
            num_kv_blocks=num_kv_blocks,
            cpu_kv_cache_gib=cpu_kv_cache_gib,
            enable_prefix_caching=enable_prefix_caching,
            kv_cache_dtype=kv_cache_dtype,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_queue_len=max_queue_len,
            async_scheduling=async_scheduling,
        ),
    )


@app.command()
def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8000,
    served_model_name: Annotated[Optional[list[str]], typer.Option(help="Name(s) accepted in requests")] = None,
    tensor_parallel_size: TP = 1,
    pipeline_parallel_size: PP = 1,
    pp_layer_partition: Annotated[Optional[str], typer.Option(help="Layers per stage, e.g. 10,10,12")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16")] = "auto",
    max_model_len: Annotated[Optional[int], typer.Option(help="Context length (tokens)")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Requests in the running batch")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Tokens per step (chunked prefill budget)")] = 2048,
    max_queue_len: Annotated[Optional[int], typer.Option(help="Waiting requests before HTTP 429")] = None,
    block_size: Annotated[int, typer.Option(help="Tokens per KV block")] = 16,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Fraction of GPU memory to use")] = 0.9,
    num_kv_blocks: Annotated[Optional[int], typer.Option(help="Fixed number of KV blocks")] = None,
    cpu_kv_cache_gib: Annotated[float, typer.Option(help="KV cache size on CPU (GiB)")] = 1.0,
    enable_prefix_caching: Annotated[bool, typer.Option(help="Share cached prompt blocks")] = True,
    kv_cache_dtype: Annotated[
        str, typer.Option(help="auto (model dtype) or fp8 (e4m3, per-tensor scale; needs compute capability 8.9+)")
    ] = "auto",
    load_format: Annotated[str, typer.Option(help="auto, gguf, safetensors, dummy")] = "auto",
    quantization: Annotated[Optional[str], typer.Option("--quantization", "-q", help=QUANTIZATION_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Seed for dummy weights")] = 0,
    device: Annotated[str, typer.Option(help="auto, cuda, cpu")] = "auto",
    nnodes: Annotated[
        Optional[int], typer.Option(help="Nodes in the launch (default: from the scheduler's env)")
    ] = None,
    node_rank: Annotated[Optional[int], typer.Option(help="This node's rank; 0 serves HTTP")] = None,
    master_addr: Annotated[Optional[str], typer.Option(help="Head node address")] = None,
    master_port: Annotated[Optional[int], typer.Option(help="Head node rendezvous port")] = None,
    rendezvous_timeout: Annotated[float, typer.Option(help="Seconds to wait for every node")] = 300.0,
    dry_run: Annotated[bool, typer.Option(help="Print what was discovered and exit")] = False,
    watchdog_timeout: Annotated[
        float, typer.Option(help="Seconds a step may stall before every rank is restarted")
    ] = 120.0,
    max_restarts: Annotated[int, typer.Option(help="Restarts after a rank fails; then exit non-zero")] = 3,
    distributed_executor_backend: Annotated[
        str, typer.Option(help="mp: worker processes per node; ray: Ray actors on a running Ray cluster")
    ] = "mp",
    api_key: Annotated[Optional[str], typer.Option(help="Bearer token required on /v1 and /generate")] = None,
    protect_metrics: Annotated[bool, typer.Option("--protect-metrics", help="Require the API key on /metrics")] = False,
    allowed_origins: Annotated[
        Optional[list[str]], typer.Option(help='CORS origins (repeat, comma list or JSON ["*"])')
    ] = None,
    allowed_methods: Annotated[Optional[list[str]], typer.Option(help="CORS methods (default *)")] = None,
    allowed_headers: Annotated[Optional[list[str]], typer.Option(help="CORS headers (default *)")] = None,
    allow_credentials: Annotated[bool, typer.Option("--allow-credentials", help="CORS: allow credentials")] = False,
    max_request_body_bytes: Annotated[int, typer.Option(help="Largest request body (bytes); 413 past it")] = 8
    * 1024
    * 1024,
    request_timeout: Annotated[Optional[float], typer.Option(help="Seconds before a request is ended (504)")] = None,
    shutdown_timeout: Annotated[float, typer.Option(help="Seconds SIGTERM waits for running requests")] = 30.0,
    pp_partition_by_memory: Annotated[
        bool, typer.Option(help="Split layers over stages by free device memory")
    ] = False,
    enforce_eager: Annotated[bool, typer.Option(help="No CUDA graphs for decode")] = False,
    disable_custom_all_reduce: Annotated[bool, typer.Option(help="NCCL for every TP all-reduce")] = False,
    async_scheduling: Annotated[bool, typer.Option(help="Schedule step N+1 while step N runs (any TP and PP)")] = True,
    chat_template: Annotated[Optional[str], typer.Option(help="Chat template file, or the template itself")] = None,
    default_chat_template_kwargs: Annotated[
        Optional[str], typer.Option(help="Template variables for every request, JSON: '{\"enable_thinking\": false}'")
    ] = None,
    enable_auto_tool_choice: Annotated[
        bool, typer.Option("--enable-auto-tool-choice", help="Parse tool calls for tool_choice auto")
    ] = False,
    tool_call_parser: Annotated[Optional[str], typer.Option(help="llama3_json, hermes, mistral, pythonic")] = None,
    reasoning_parser: Annotated[Optional[str], typer.Option(help="deepseek_r1, qwen3")] = None,
    generation_config: Annotated[str, typer.Option(help="auto, vllm, or a generation_config.json directory")] = "auto",
    max_logprobs: Annotated[int, typer.Option(help="Most logprobs per token a request may ask for")] = 20,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer to use instead of the model's")] = None,
    root_path: Annotated[str, typer.Option(help="Path prefix the server is reached under behind a proxy")] = "",
    structured_outputs_backend: Annotated[
        str, typer.Option("--structured-outputs-config.backend", help="Grammar engine: xgrammar (the only one)")
    ] = "xgrammar",
    enable_force_include_usage: Annotated[
        bool, typer.Option("--enable-force-include-usage", help="Every stream ends with a usage chunk")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Serve MODEL behind an OpenAI-compatible HTTP API."""
    _setup_logging(log_level)
    from shardserve.distributed.dry_run import launch_problems

    try:
        launch = _discover_launch(nnodes, node_rank, master_addr, master_port)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    topology, _ = launch_problems(launch, tensor_parallel_size, pipeline_parallel_size)
    problems: list[str] = []
    config = server = None
    if not topology:  # else the world size does not split over the nodes, which ParallelConfig repeats
        try:
            config = build_engine_config(
                model,
                tp=tensor_parallel_size,
                pp=pipeline_parallel_size,
                pp_layer_partition=pp_layer_partition,
                dtype=dtype,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_queue_len=max_queue_len,
                block_size=block_size,
                gpu_memory_utilization=gpu_memory_utilization,
                num_kv_blocks=num_kv_blocks,
                cpu_kv_cache_gib=cpu_kv_cache_gib,
                enable_prefix_caching=enable_prefix_caching,
                kv_cache_dtype=kv_cache_dtype,
                load_format=load_format,
                quantization=quantization,
                seed=seed,
                device=device,
                nnodes=launch.nnodes,
                node_rank=launch.node_rank,
                master_addr=launch.master_addr,
                master_port=launch.master_port,
                rendezvous_timeout=rendezvous_timeout,
                watchdog_timeout=watchdog_timeout,
                max_restarts=max_restarts,
                pp_partition_by_memory=pp_partition_by_memory,
                enforce_eager=enforce_eager,
                disable_custom_all_reduce=disable_custom_all_reduce,
                async_scheduling=async_scheduling,
                fault_injection=os.environ.get(FAULT_INJECTION_ENV),
                tokenizer=tokenizer,
                max_logprobs=max_logprobs,
                distributed_executor_backend=distributed_executor_backend,
            )
            server = ServerConfig(
                host=host,
                port=port,
                served_model_name=served_model_name,
                api_key=api_key,
                protect_metrics=protect_metrics,
                allowed_origins=_string_list(allowed_origins),
                allowed_methods=_string_list(allowed_methods) or ["*"],
                allowed_headers=_string_list(allowed_headers) or ["*"],
                allow_credentials=allow_credentials,
                max_request_body_bytes=max_request_body_bytes,
                request_timeout=request_timeout,
                shutdown_timeout=shutdown_timeout,
                chat_template=chat_template,
                default_chat_template_kwargs=default_chat_template_kwargs,
                enable_auto_tool_choice=enable_auto_tool_choice,
                tool_call_parser=tool_call_parser,
                reasoning_parser=reasoning_parser,
                generation_config=generation_config,
                max_logprobs=max_logprobs,
                tokenizer=tokenizer,
                root_path=root_path,
                structured_outputs_backend=structured_outputs_backend,
                enable_force_include_usage=enable_force_include_usage,
            )
            check_model_layout(config)
        except ValueError as e:
            problems.append(str(e))
    if dry_run:
        report = _dry_run_report(launch, tensor_parallel_size, pipeline_parallel_size, problems,
                                 distributed_executor_backend, device)  # fmt: skip
        typer.echo(report)
        raise typer.Exit(1 if any(line.startswith("PROBLEM:") for line in report.splitlines()) else 0)
    for problem in topology + problems:
        typer.echo(f"error: {problem}", err=True)
    if topology or problems:
        raise typer.Exit(2)
    from shardserve.launcher import run_node

    raise typer.Exit(run_node(config, server, launch))


def _discover_launch(nnodes: int | None, node_rank: int | None, master_addr: str | None, master_port: int | None):
    from shardserve.distributed.launch import discover_launch

    return discover_launch(
        os.environ, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port
    )


def check_model_layout(config: EngineConfig) -> None:
    """Locate the model (metadata only, no weights) and check that its shape splits over TP x PP.

    Runs before any process is spawned, so a bad layout or a missing model fails in a second.

    Raises:
        ValueError: the model or ``--tokenizer`` is not found, or :func:`shardserve.config.check_parallel_layout`
            refuses the layout.
    """
    from shardserve.config import check_parallel_layout
    from shardserve.model_executor.loader.resolve import resolve_model

    source = resolve_model(config.model.model, config.model.hf_overrides)
    if config.model.tokenizer:
        from shardserve.engine.llm_engine import tokenizer_source

        tokenizer_source(config.model.tokenizer)  # a missing tokenizer fails here, before any process starts
    par = config.parallel
    check_parallel_layout(
        source.arch, par.tensor_parallel_size, par.pipeline_parallel_size, par.pp_layer_partition, source.name
    )


def _dry_run_report(launch, tp: int, pp: int, problems: list[str], backend: str = "mp", device: str = "auto") -> str:
    """What ``serve --dry-run`` prints; each problem found is a ``PROBLEM:`` line (the dry run then exits 1).

    With the Ray backend: the Ray cluster's nodes and where each pipeline stage would go (nothing reserved).
    """
    if backend == "ray":
        from shardserve.distributed.dry_run import launch_problems
        from shardserve.executor.ray_utils import describe_ray_launch

        return describe_ray_launch(tp, pp, device, [*launch_problems(launch, tp, pp)[0], *problems])
    from shardserve.distributed.dry_run import describe_launch
    from shardserve.distributed.netconf import network_env

    net_env, notes = network_env(launch.master_addr, os.environ)
    return describe_launch(launch, tp, pp, net_env, notes, problems)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="GGUF file, HF directory or hub id")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template")] = True,
    tensor_parallel_size: TP = 1,
    pipeline_parallel_size: PP = 1,
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16")] = "auto",
    load_format: Annotated[str, typer.Option(help="auto, gguf, safetensors, dummy")] = "auto",
    quantization: Annotated[Optional[str], typer.Option("--quantization", "-q", help=QUANTIZATION_HELP)] = None,
    device: Annotated[str, typer.Option(help="auto, cuda, cpu")] = "auto",
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "warning",
) -> None:
    """Print one completion and its decode speed (tokens/s)."""
    _setup_logging(log_level)
    from shardserve.entrypoints.llm import LLM
    from shardserve.sampling_params import SamplingParams

    try:
        llm = LLM(
            model,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            dtype=dtype,
            load_format=load_format,
            quantization=quantization,
            device=device,
        )
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    start = time.perf_counter()
    if chat:
        out = llm.chat([{"role": "user", "content": prompt}], params)[0]
    else:
        out = llm.generate(prompt, params)[0]
    elapsed = time.perf_counter() - start
    completion = out.outputs[0]
    typer.echo(completion.text)
    n = len(completion.token_ids)
    typer.echo(f"[{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s]", err=True)
    llm.shutdown()


def _register_tools() -> None:
    from shardserve.tools import register

    register(app)


_register_tools()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
