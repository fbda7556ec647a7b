"""Typed configuration: one dataclass per concern, composed into :class:`EngineConfig`.

Validation raises ``ValueError`` with a message a user can act on. Environment variables are
not read here; the launch layer (``shardserve.distributed.launch``) owns them.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
"""``--kv-cache-dtype`` values (vLLM's names): auto is the model dtype, fp8 and fp8_e4m3 store e4m3."""

FP8_MIN_CAPABILITY = (8, 9)
"""CUDA compute capability with FP8 tensor cores and conversions (Ada 8.9, Hopper 9.0 and later)."""


def check_fp8_device(device: str | torch.device, what: str) -> None:
    """Refuse an FP8 option on a CUDA device older than compute capability 8.9; CPUs pass (they dequantize).

    Args:
        device: ``cuda``, ``cuda:N``, ``cpu`` or a ``torch.device``.
        what: the option, named in the error (``--kv-cache-dtype fp8``).

    Raises:
        ValueError: the device is a CUDA GPU below capability 8.9.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"{what} needs a GPU with FP8 support (compute capability >= 8.9: Ada, Hopper or later); "
            f"{torch.cuda.get_device_name(index)} has {capability[0]}.{capability[1]}. "
            "Drop the option, or run on CPU (--device cpu), where FP8 is dequantized"
        )


@dataclass
class ModelArchConfig:
    """Architecture of a Llama-family decoder, read from config.json or GGUF metadata.

    Field names follow Hugging Face ``config.json`` so that both sources map one to one.
    """

    architecture: str
    """``model_type`` as configs name it: llama, mistral, qwen2 or qwen3."""
    vocab_size: int
    """Rows of the embedding table (tokens)."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int
    """Decoder layers."""
    num_attention_heads: int
    """Query heads, over all TP ranks."""
    num_key_value_heads: int
    """KV heads, over all TP ranks (GQA when fewer than query heads)."""
    head_dim: int
    """Width of one attention head."""
    rms_norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling dict as in config.json (``rope_type: llama3`` is supported)."""
    max_position_embeddings: int = 8192
    """Longest context the model was trained for (tokens)."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding weight."""
    attention_bias: bool = False
    """q/k/v projections have a bias (qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each q and k head before RoPE (qwen3)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence token id(s)."""
    torch_dtype: str | None = None
    """Dtype the checkpoint was saved in."""

    SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")

    def __post_init__(self) -> None:
        if self.architecture not in self.SUPPORTED:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; shardserve serves {', '.join(self.SUPPORTED)}"
            )

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelArchConfig:
        """Build from a parsed Hugging Face ``config.json``.

        Raises:
            ValueError: the ``model_type`` is not a supported architecture.
        """
        model_type = cfg.get("model_type") or ""
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        return cls(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            torch_dtype=cfg.get("torch_dtype"),
        )

    def num_params(self) -> int:
        """Parameter count (embedding, layers, norms, LM head unless tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * h * i + 2 * h + (2 * d if self.qk_norm else 0)
        embed = self.vocab_size * h
        return embed * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h


def tensor_parallel_problems(arch: ModelArchConfig, tp: int) -> list[str]:
    """Why the layers cannot split ``arch`` over ``tp`` ranks; empty when they can.

    The rules of the layers, one each: ``QKVParallelLinear`` splits the query heads (``heads % tp``) and
    splits the KV heads or replicates them (``kv % tp`` when ``tp < kv``, else ``tp % kv``);
    ``MergedColumnParallelLinear`` / ``RowParallelLinear`` split the MLP width (``intermediate % tp``).
    The vocabulary is padded to a multiple of ``tp`` (``VocabParallelEmbedding``): no rule.
    """
    heads, kv, mlp = arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size
    problems = []
    if heads % tp:
        problems.append(f"its {heads} attention heads are not divisible by {tp}")
    if (kv % tp if tp < kv else tp % kv) != 0:
        problems.append(f"its {kv} KV heads neither are divisible by {tp} nor divide it")
    if mlp % tp:
        problems.append(f"its MLP width {mlp} is not divisible by {tp}")
    return problems


def tensor_parallel_sizes(arch: ModelArchConfig) -> list[int]:
    """Every TP size the layers accept for ``arch`` (all divide the attention heads)."""
    return [t for t in range(1, arch.num_attention_heads + 1) if not tensor_parallel_problems(arch, t)]


def check_parallel_layout(
    arch: ModelArchConfig, tp: int, pp: int, pp_layer_partition: list[int] | None = None, model: str = "the model"
) -> None:
    """Check before any process starts that ``arch`` splits over TP ``tp`` x PP ``pp`` as the layers and the
    loader will split it (:func:`tensor_parallel_problems`; ``pp_layer_range`` for the stages).

    Used by ``serve`` (before spawning), ``serve --dry-run`` and ``doctor``.

    Raises:
        ValueError: the layout does not fit; the message names the model's sizes and the TP / PP sizes
            that would work.
    """
    from shardserve.model_executor.loader import pp_layer_range

    problems = tensor_parallel_problems(arch, tp)
    if problems:
        works = tensor_parallel_sizes(arch)
        heads = arch.num_attention_heads
        by_heads = [t for t in range(1, heads + 1) if heads % t == 0]
        ruled_out = [f"{t} fails as {tensor_parallel_problems(arch, t)[0]}" for t in by_heads if t not in works]
        note = (
            f" (the {heads} attention heads alone allow {_join(by_heads)}; {'; '.join(ruled_out)})" if ruled_out else ""
        )
        raise ValueError(
            f"--tensor-parallel-size {tp} does not fit {model}: {'; '.join(problems)}. "
            f"Tensor parallel sizes that work: {_join(works)}{note}"
        )
    try:
        for stage in range(pp):
            pp_layer_range(arch.num_hidden_layers, pp, stage, pp_layer_partition)
    except ValueError as e:
        raise ValueError(
            f"--pipeline-parallel-size {pp} does not fit {model}: {e}. "
            f"Pipeline parallel sizes that work: 1..{arch.num_hidden_layers} (one layer per stage at least)"
        ) from None


def _join(sizes: list[int]) -> str:
    return ", ".join(str(s) for s in sizes)


@dataclass
class ModelConfig:
    """Which model to load and how."""

    model: str | None = None
    """GGUF file, Hugging Face directory or hub id; None serves the embedded SmolLM2-135M."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on CUDA, fp32 on CPU), float32, float16 or bfloat16."""
    load_format: str = "auto"
    """auto, gguf, safetensors or dummy (random weights of the real shape)."""
    max_model_len: int | None = None
    """Context length (prompt + output tokens); defaults to the model's own, capped at 8192."""
    served_model_name: str | None = None
    """Name reported by /v1/models and accepted in requests."""
    seed: int = 0
    """Seed for dummy weights and for requests without a seed."""
    device: str = "auto"
    """auto (cuda when present), cuda or cpu."""
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    """Overrides applied to config.json fields (for dummy shapes)."""
    enforce_eager: bool = False
    """Run every step eagerly (no CUDA graphs for decode)."""
    tokenizer: str | None = None
    """``--tokenizer``: a GGUF file, HF directory or hub id to load the tokenizer from instead of the model."""
    max_cuda_graph_batch_size: int = 512
    """Largest decode batch captured in a CUDA graph (requests); larger batches run eagerly."""
    max_logprobs: int = 20
    """``--max-logprobs``: most logprobs (and prompt logprobs) a request may ask for per token; ``-1`` asks
    are capped to it; -1 is no cap (vLLM's name)."""
    quantization: str | None = None
    """Weight quantization (vLLM's ``--quantization``): None uses the checkpoint's own (a GGUF file's blocks
    stay quantized on CUDA and are dequantized at load on CPU); ``gguf`` keeps GGUF blocks on CPU too."""

    LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in self.LOAD_FORMATS:
            raise ValueError(f"--load-format must be one of {self.LOAD_FORMATS}, got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len must be positive, got {self.max_model_len}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.max_logprobs < -1:
            raise ValueError(f"--max-logprobs must be -1 (no cap) or >= 0, got {self.max_logprobs}")
        if self.quantization is not None:
            from shardserve.model_executor.layers.quantization import QUANTIZATION_METHODS

            if self.quantization not in QUANTIZATION_METHODS:
                raise ValueError(
                    f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {self.quantization!r}"
                )
            if self.quantization == "fp8":
                check_fp8_device(self.resolved_device(), "--quantization fp8")

    def resolved_device(self) -> str:
        """``cuda`` or ``cpu``."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def torch_dtype(self) -> torch.dtype:
        """The compute dtype."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device() == "cuda" else torch.float32
        return DTYPES[self.dtype]


@dataclass
class ParallelConfig:
    """How the model is split over processes and nodes."""

    tensor_parallel_size: int = 1
    """TP ranks per pipeline stage (kept inside one node)."""
    pipeline_parallel_size: int = 1
    """Pipeline stages."""
    pp_layer_partition: list[int] | None = None
    """Layers per stage, e.g. [10, 10, 12]; None splits evenly."""
    pp_partition_by_memory: bool = False
    """Split layers in proportion to each stage's free device memory."""
    nnodes: int = 1
    """Nodes in the launch."""
    node_rank: int = 0
    """This node's index in the launch; 0 is the head that serves HTTP."""
    master_addr: str = "127.0.0.1"
    """Address of the head node for the rendezvous."""
    master_port: int | None = None
    """TCP port of the rendezvous; None picks a free one on a single node."""
    rendezvous_timeout: float = 300.0
    """Seconds to wait for every node to join before failing (names the missing ranks)."""
    distributed_backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    distributed_executor_backend: str = "mp"
    """How ranks are started: mp (worker processes spawned by each node's shardserve) or ray (Ray actors
    placed on a running Ray cluster from one ``shardserve serve``)."""
    disable_custom_all_reduce: bool = False
    """Use NCCL for every TP all-reduce, not the one-shot peer-memory kernel for small messages."""
    watchdog_timeout: float = 120.0
    """Seconds a step may take before its ranks are declared stalled and the group is restarted."""
    max_restarts: int = 3
    """Restarts of the whole worker group after a rank fails; past this the server exits non-zero."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} out of range for --nnodes {self.nnodes}")
        if self.world_size % self.nnodes:
            raise ValueError(f"world size TP x PP = {self.world_size} is not divisible by --nnodes {self.nnodes}")
        if self.watchdog_timeout <= 0:
            raise ValueError(f"--watchdog-timeout must be positive seconds, got {self.watchdog_timeout}")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.distributed_executor_backend not in ("mp", "ray"):
            raise ValueError(
                f"--distributed-executor-backend must be mp or ray, got {self.distributed_executor_backend!r}"
            )
        if self.distributed_executor_backend == "ray" and self.nnodes > 1:
            raise ValueError(
                "--distributed-executor-backend ray places every rank on the Ray cluster from one `shardserve serve`"
                f" (on any of its nodes): drop --nnodes {self.nnodes} (it is for the mp backend)"
            )
        if self.pp_layer_partition is not None and len(self.pp_layer_partition) != self.pipeline_parallel_size:
            raise ValueError(
                f"--pp-layer-partition has {len(self.pp_layer_partition)} entries, "
                f"expected one per stage ({self.pipeline_parallel_size})"
            )

    @property
    def world_size(self) -> int:
        """TP x PP processes in total."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def ranks_per_node(self) -> int:
        """Worker processes on each node."""
        return self.world_size // self.nnodes


@dataclass
class CacheConfig:
    """Paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    gpu_memory_utilization: float = 0.9
    """Fraction of device memory for weights, activations and KV cache (CUDA)."""
    num_kv_blocks: int | None = None
    """Fixed number of KV blocks; None sizes the cache from memory."""
    cpu_kv_cache_gib: float = 1.0
    """KV cache size on CPU (GiB) when num_kv_blocks is None."""
    enable_prefix_caching: bool = True
    """Share full prompt blocks between requests by content hash."""
    kv_cache_dtype: str = "auto"
    """auto (the model dtype), or fp8 / fp8_e4m3: one byte per element, e4m3 with a per-tensor scale per layer."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"--num-kv-blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )

    def cache_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type: ``model_dtype`` for auto, ``torch.float8_e4m3fn`` for fp8."""
        return model_dtype if self.kv_cache_dtype == "auto" else torch.float8_e4m3fn


@dataclass
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 64
    """Requests in the running batch."""
    max_num_batched_tokens: int = 2048
    """Tokens computed per step over all requests (chunked-prefill budget)."""
    max_queue_len: int | None = None
    """Waiting requests beyond which new ones get HTTP 429; None is unbounded."""
    async_scheduling: bool = True
    """Schedule step N+1 while step N runs; the ranks take its inputs from step N's sample on the device."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be at least "
                f"--max-num-seqs ({self.max_num_seqs}) so every running request can decode"
            )


@dataclass
class ServerConfig:
    """The HTTP front end."""

    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 8000
    """TCP port to bind."""
    served_model_name: list[str] | None = None
    """Model names accepted in requests; the first is reported. None uses the model's own name."""
    api_key: str | None = None
    """Bearer token required on /v1 routes and /generate; None leaves the API open."""
    protect_metrics: bool = False
    """Require the API key on /metrics too (it is public by default, like /health)."""
    allowed_origins: list[str] | None = None
    """CORS origins allowed to call the API from a browser; None installs no CORS middleware."""
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    """CORS methods allowed (when ``allowed_origins`` is set)."""
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    """CORS request headers allowed (when ``allowed_origins`` is set)."""
    allow_credentials: bool = False
    """CORS: let browsers send cookies and Authorization headers."""
    max_request_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted (bytes)."""
    request_timeout: float | None = None
    """Seconds after which a running request is ended (HTTP 504 or a final SSE error); None waits forever."""
    shutdown_timeout: float = 30.0
    """Seconds SIGTERM waits for running requests to finish before aborting them."""
    log_requests: bool = False
    """Log each request's id, prompt length and finish reason."""
    chat_template: str | None = None
    """``--chat-template``: a template file or the template text, used instead of the model's."""
    chat_template_text: str | None = field(default=None, init=False)
    """The template text ``chat_template`` resolves to (read from the file, or the inline text unescaped)."""
    default_chat_template_kwargs: dict[str, Any] | str | None = None
    """Template variables for every request (a dict or its JSON text); a request's own override them."""
    enable_auto_tool_choice: bool = False
    """Parse tool calls from the output when ``tool_choice`` is ``auto`` (needs ``tool_call_parser``)."""
    tool_call_parser: str | None = None
    """Tool-call format of the model: llama3_json, hermes, mistral or pythonic."""
    reasoning_parser: str | None = None
    """Reasoning format of the model: deepseek_r1 or qwen3."""
    generation_config: str = "auto"
    """Sampling defaults: ``auto`` (the model's generation_config.json), ``vllm`` (none) or a directory."""
    max_logprobs: int = 20
    """Most logprobs a request may ask for per token (``top_logprobs: -1`` is capped to it); -1 is no cap."""
    tokenizer: str | None = None
    """Tokenizer to load instead of the model's (a GGUF file, an HF directory or a hub id)."""
    root_path: str = ""
    """Path prefix the server is reached under behind a proxy (``/api``); routes answer with and without it."""
    structured_outputs_backend: str = "xgrammar"
    """Grammar engine for structured outputs; xgrammar (or ``auto``) is the only one."""
    enable_force_include_usage: bool = False
    """Every streamed response ends with a usage chunk, as if ``stream_options.include_usage`` were set."""
    generation_defaults: dict[str, Any] | None = field(default=None, init=False)
    """The sampling defaults ``generation_config`` gives: None (``auto``: the model's), ``{}`` (``vllm``) or the
    given directory's ``generation_config.json``."""

    STRUCTURED_OUTPUTS_BACKENDS = ("auto", "xgrammar")

    def __post_init__(self) -> None:
        self._check_limits()
        self.chat_template_text = load_chat_template(self.chat_template)
        self.default_chat_template_kwargs = _json_object(self.default_chat_template_kwargs)
        self._check_parsers()
        self.generation_defaults = load_generation_defaults(self.generation_config)
        if self.max_logprobs < -1:
            raise ValueError(f"--max-logprobs must be -1 (no cap) or >= 0, got {self.max_logprobs}")
        if self.root_path and not self.root_path.startswith("/"):
            raise ValueError(f"--root-path must start with '/', got {self.root_path!r}")
        self.root_path = self.root_path.rstrip("/")
        if self.structured_outputs_backend not in self.STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(
                f"--structured-outputs-config.backend {self.structured_outputs_backend!r} is not available: "
                "shardserve enforces structured outputs with xgrammar only (use xgrammar or auto)"
            )

    def _check_parsers(self) -> None:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME")
        try:
            if self.tool_call_parser:
                from shardserve.entrypoints.openai.tool_parsers import get_tool_parser

                get_tool_parser(self.tool_call_parser)
            if self.reasoning_parser:
                from shardserve.entrypoints.openai.reasoning_parsers import get_reasoning_parser

                get_reasoning_parser(self.reasoning_parser)
        except ValueError as exc:
            flag = "--tool-call-parser" if "tool call" in str(exc) else "--reasoning-parser"
            raise ValueError(f"{flag}: {exc}") from None

    def _check_limits(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"--max-request-body-bytes must be positive, got {self.max_request_body_bytes}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"--request-timeout must be positive seconds, got {self.request_timeout}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {self.shutdown_timeout}")


@dataclass(frozen=True)
class FaultInjection:
    """Testing only: make rank ``rank`` fail at one place, to check that failures stay contained.

    ``where`` is ``add_request`` (the rank fails to add every request whose prompt holds ``token_id``: that
    request alone must fail), ``step`` (the rank raises out of a step that adds such a request: the group is
    restarted and the error quoted) or ``load`` (the rank raises while loading the model: the launch fails
    quoting the rank's error). Set with ``SHARDSERVE_FAULT_INJECTION=where:rank[:token_id]`` (read by the CLI).
    """

    where: str
    rank: int
    token_id: int | None = None

    PLACES = ("add_request", "step", "load")

    @classmethod
    def parse(cls, spec: str) -> FaultInjection:
        """``where:rank[:token_id]``.

        Raises:
            ValueError: an unknown place, or not integers where integers belong.
        """
        parts = spec.split(":")
        try:
            fault = cls(parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None)
        except (ValueError, IndexError):
            raise ValueError(f"fault injection spec {spec!r} is not where:rank[:token_id]") from None
        if fault.where not in cls.PLACES or len(parts) > 3:
            raise ValueError(f"fault injection spec {spec!r}: where must be one of {cls.PLACES}")
        return fault

    def check(self, where: str, rank: int, prompt_token_ids=()) -> None:
        """Raise the injected fault when it applies.

        Raises:
            RuntimeError: this is the rank and the place named (and the prompt holds the token, if one is named).
        """
        if where != self.where or rank != self.rank:
            return
        if self.token_id is None or self.token_id in prompt_token_ids:
            raise RuntimeError(f"injected fault: rank {rank} fails at {where}")


JINJA_CHARS = "{}\n"


def load_chat_template(value: str | None) -> str | None:
    """The text of ``--chat-template``: a file's content, or the value itself when it looks like a template
    (has ``{``, ``}`` or a newline; backslash escapes such as ``\\n`` are decoded), as vLLM reads it.

    Raises:
        ValueError: the value looks like a path but the file cannot be read, or the template does not compile.
    """
    if value is None:
        return None
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        if not any(c in value for c in JINJA_CHARS):
            message = f"--chat-template {value!r} looks like a file path, but it cannot be read: {exc}"
            raise ValueError(message) from None
        text = codecs.decode(value, "unicode_escape")
    from shardserve.transformers_utils.chat_template import compile_chat_template

    try:
        compile_chat_template(text)
    except ValueError as exc:
        raise ValueError(f"--chat-template: {exc}") from None
    return text


def load_generation_defaults(value: str) -> dict[str, Any] | None:
    """``--generation-config``: None for ``auto`` (the model's own), ``{}`` for ``vllm``, else the sampling
    fields of ``DIR/generation_config.json`` (its EOS ids are not used: the tokenizer's stay).

    Raises:
        ValueError: neither auto nor vllm, and not a directory with a readable generation_config.json.
    """
    if value == "auto":
        return None
    if value == "vllm":
        return {}
    path = Path(value).expanduser() / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"--generation-config must be auto, vllm or a directory with generation_config.json, got {value!r} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"--generation-config: {path} does not hold a JSON object")
    return {k: v for k, v in config.items() if k not in ("transformers_version", "_from_model_config", "eos_token_id",
                                                          "bos_token_id", "pad_token_id")}  # fmt: skip


def _json_object(value: dict[str, Any] | str | None) -> dict[str, Any]:
    """``--default-chat-template-kwargs`` as a dict (given as one, or as JSON text)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"--default-chat-template-kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("--default-chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    from shardserve.entrypoints.openai.chat_render import RESERVED_TEMPLATE_VARIABLES

    reserved = sorted(RESERVED_TEMPLATE_VARIABLES & set(value))
    if reserved:
        raise ValueError(f"--default-chat-template-kwargs may not set {', '.join(reserved)}: the server sets it")
    return value


@dataclass
class EngineConfig:
    """Everything the engine needs, composed from the parts above."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    fault_injection: FaultInjection | None = None
    """Testing only (see :class:`FaultInjection`)."""

    def __post_init__(self) -> None:
        if self.cache.kv_cache_dtype != "auto":
            check_fp8_device(self.model.resolved_device(), f"--kv-cache-dtype {self.cache.kv_cache_dtype}")

    def replace(self, **parts: Any) -> EngineConfig:
        """A copy with some parts swapped."""
        return dataclasses.replace(self, **parts)
