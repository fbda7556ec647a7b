"""``shardserve bench serve``: load an OpenAI-compatible server (shardserve, vLLM, SGLang) and report
TTFT, TPOT, ITL, end-to-end latency and throughput.

Modelled on ``vllm bench serve`` (``vllm/benchmarks/serve.py``): the same random dataset flags, Poisson
(gamma, with ``--burstiness``) arrivals, metric definitions and result JSON keys, so results compare
directly. Requests stream (``stream_options.include_usage``) over one ``httpx.AsyncClient``.

Metrics, per successful request (times in seconds, reported in ms):

* TTFT: request sent -> first chunk with non-empty text.
* ITL: each gap between consecutive text chunks (a chunk may carry several tokens).
* E2EL: request sent -> last text chunk.
* TPOT: ``(e2el - ttft) / (output_tokens - 1)``, for requests with more than one output token.

Output tokens come from the final usage chunk, else the number of text chunks.

Only :func:`serve_command` prints; :func:`run_benchmark` returns a :class:`BenchmarkResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np
import typer

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
RANDOM_TOKEN_ID_RANGE = (1000, 32000)
"""Random prompt token ids are drawn from here: present in every common vocabulary (Llama 2 has 32000)
and clear of the special tokens kept at either end of most vocabularies."""
METRICS = (("ttft", "TTFT", "Time to First Token"), ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
           ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency"))  # fmt: skip
WORDS = ["the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with",
         "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what",
         "all", "were", "we", "when", "your", "can", "said", "there", "use", "an", "each", "which", "she", "do",
         "how", "their", "if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some",
         "her", "would", "make", "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see",
         "number", "no", "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil",
         "its", "now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part"]  # fmt: skip
"""Words for random chat prompts: common English words, about one token each in most vocabularies."""


class BenchError(RuntimeError):
    """The benchmark could not start: no --model given and none could be listed."""


@dataclass
class BenchConfig:
    """What to send, where and how fast."""

    base_url: str = "http://127.0.0.1:8000"
    """Server address; a trailing ``/v1`` is dropped."""
    endpoint: str = "/v1/completions"
    """``/v1/completions`` (token-id prompts) or ``/v1/chat/completions`` (random-word messages)."""
    model: str = ""
    """Model name sent in each request."""
    num_prompts: int = 1000
    """Requests to send."""
    request_rate: float = math.inf
    """Mean arrivals per second; ``inf`` sends every request at once."""
    burstiness: float = 1.0
    """Gamma shape of the inter-arrival times: 1 is Poisson, lower is burstier, higher more uniform."""
    seed: int = 0
    """Seed for the prompts and the arrival times."""
    max_concurrency: Optional[int] = None
    """Requests in flight at most (None: unbounded)."""
    random_input_len: int = 1024
    """Prompt tokens (words for chat) per request, before the range ratio."""
    random_output_len: int = 128
    """``max_tokens`` per request, before the range ratio (sent with ``ignore_eos``)."""
    random_range_ratio: float = 0.0
    """Lengths are drawn uniformly from ``[len * (1 - r), len * (1 + r)]``; 0 <= r < 1."""
    api_key: Optional[str] = None
    """Bearer token, if the server requires one."""
    timeout: float = 3600.0
    """Seconds each request may take, from sending to the last chunk."""
    percentiles: tuple[float, ...] = (90.0, 99.0)
    """Percentiles reported for each metric, besides the median."""

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/").removesuffix("/v1")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if self.num_prompts < 1 or self.random_input_len < 1 or self.random_output_len < 1:
            raise ValueError("--num-prompts, --random-input-len and --random-output-len must be at least 1")
        if not self.request_rate > 0 or not self.burstiness > 0:
            raise ValueError("--request-rate and --burstiness must be positive (inf allowed)")
        if not 0 <= self.random_range_ratio < 1:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {self.random_range_ratio}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if not self.timeout > 0 or not all(0 < p <= 100 for p in self.percentiles):
            raise ValueError("--timeout must be positive and percentiles in (0, 100]")

    @property
    def chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"


@dataclass
class SampleRequest:
    """One prompt to send: token ids (completions) or text (chat), and the output length asked for."""

    prompt: list[int] | str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    """What one request measured; times in seconds from ``time.perf_counter()``."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""


@dataclass
class BenchmarkResult:
    """A finished run: the flat vLLM-named metrics and every request's measurements."""

    config: BenchConfig
    metrics: dict[str, float | int]
    requests: list[RequestResult]

    def to_json_dict(self) -> dict[str, Any]:
        """The ``--save-result`` document, with ``vllm bench serve``'s keys."""
        c = self.config
        ok = [r.success for r in self.requests]
        return {
            "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
            "backend": "openai-chat" if c.chat else "openai",
            "endpoint_type": "openai-chat" if c.chat else "openai",
            "base_url": c.base_url,
            "endpoint": c.endpoint,
            "model_id": c.model,
            "num_prompts": c.num_prompts,
            "request_rate": c.request_rate if math.isfinite(c.request_rate) else "inf",
            "burstiness": c.burstiness,
            "max_concurrency": c.max_concurrency,
            **self.metrics,
            "input_lens": [r.prompt_len for r in self.requests],
            "output_lens": [r.output_tokens if s else 0 for r, s in zip(self.requests, ok)],
            "ttfts": [r.ttft for r in self.requests],
            "itls": [r.itl for r in self.requests],
            "generated_texts": [r.generated_text for r in self.requests],
            "errors": [r.error for r in self.requests],
        }


# ----------------------------------------------------------------------------- workload


def arrival_intervals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds between consecutive request sends, shape ``(n,)``.

    Gamma(shape=burstiness, scale=1 / (rate * burstiness)): mean ``1 / rate``; burstiness 1 is the
    exponential distribution of a Poisson process (as ``vllm bench serve``'s ``get_request``).
    ``rate == inf`` gives zeros.
    """
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def send_offsets(intervals: np.ndarray) -> np.ndarray:
    """Send time of each request in seconds after the start; the first goes at 0."""
    return np.concatenate([[0.0], np.cumsum(intervals[:-1])]) if len(intervals) else intervals


def _lengths(mean: int, ratio: float, n: int, rng: np.random.Generator) -> np.ndarray:
    low, high = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)


def random_requests(config: BenchConfig, rng: np.random.Generator) -> list[SampleRequest]:
    """``--dataset-name random``: uniform random token ids (completions) or random words (chat)."""
    n = config.num_prompts
    input_lens = _lengths(config.random_input_len, config.random_range_ratio, n, rng)
    output_lens = _lengths(config.random_output_len, config.random_range_ratio, n, rng)
    out = []
    for in_len, out_len in zip(input_lens.tolist(), output_lens.tolist()):
        if config.chat:
            prompt: list[int] | str = " ".join(rng.choice(WORDS, size=in_len).tolist())
        else:
            prompt = rng.integers(*RANDOM_TOKEN_ID_RANGE, size=in_len).tolist()
        out.append(SampleRequest(prompt, in_len, out_len))
    return out


def request_payload(config: BenchConfig, request: SampleRequest) -> dict[str, Any]:
    """The JSON body for one streamed request."""
    body: dict[str, Any] = {
        "model": config.model,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


# ----------------------------------------------------------------------------- metrics


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def summarize(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    """``mean_/median_/std_/p{P}_{name}_ms`` of ``values_s`` (seconds); zeros when empty, as vLLM.

    Percentiles interpolate linearly (``numpy.percentile``); std is the population std.
    """
    ms = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}  # fmt: skip
    for p in percentiles:
        out[f"p{_p_word(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def tpot(result: RequestResult) -> float | None:
    """Seconds per output token after the first, or None with fewer than two output tokens."""
    if result.output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def calculate_metrics(results: list[RequestResult], duration: float, percentiles: tuple[float, ...]) -> dict[str, Any]:
    """The flat vLLM-named metrics of a run that took ``duration`` seconds.

    Throughputs are per second of the whole run: ``request_throughput`` (completed req/s),
    ``output_throughput`` (tokens/s), ``total_token_throughput`` ((input + output) tokens/s).
    """
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    duration = max(duration, 1e-9)
    values = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for t in map(tpot, ok) if t is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    metrics: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    for name, _, _ in METRICS:
        metrics.update(summarize(name, values[name], percentiles))
    return metrics


# ----------------------------------------------------------------------------- requests


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def _read_stream(resp: httpx.Response, result: RequestResult, chat: bool) -> None:
    """Fill ``result`` from an SSE body; raises ``ValueError`` on an in-band error."""
    last = result.start_time
    chunks = 0
    async for line in resp.aiter_lines():
        data = line.strip().removeprefix("data:").strip() if line.startswith("data:") else ""
        if not data:
            continue
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise ValueError(f"server error: {chunk['error']}")
        if usage := chunk.get("usage"):
            result.output_tokens = int(usage.get("completion_tokens") or 0)
            result.prompt_len = int(usage.get("prompt_tokens") or result.prompt_len)
        if text := _chunk_text(chunk, chat):
            now = time.perf_counter()
            if chunks == 0:
                result.ttft = now - result.start_time
            else:
                result.itl.append(now - last)
            last, chunks = now, chunks + 1
            result.generated_text += text
    if chunks == 0:
        raise ValueError("no text chunk received")
    result.latency = last - result.start_time
    result.output_tokens = result.output_tokens or chunks


async def send_request(client: httpx.AsyncClient, config: BenchConfig, request: SampleRequest) -> RequestResult:
    """Stream one request; failures (HTTP status, transport, timeout, bad stream) come back as
    ``success=False`` with ``error`` set, never raised. Bounded by ``config.timeout`` seconds."""
    result = RequestResult(prompt_len=request.prompt_len, start_time=time.perf_counter())
    url = config.base_url + config.endpoint
    try:
        async with asyncio.timeout(config.timeout):
            body, headers = request_payload(config, request), _headers(config.api_key)
            async with client.stream("POST", url, json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:300]
                    raise ValueError(f"HTTP {resp.status_code}: {text}")
                await _read_stream(resp, result, config.chat)
        result.success = True
    except TimeoutError:
        result.error = f"timed out after {config.timeout} s"
    except (httpx.HTTPError, ValueError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return result


def first_model(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """The first model id listed by ``GET {base_url}/v1/models``.

    Raises:
        BenchError: the server cannot be reached or lists no model.
    """
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    try:
        resp = httpx.get(url, headers=_headers(api_key), timeout=timeout)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise BenchError(f"cannot list models at {url} ({e}); pass --model") from e


async def _run(
    config: BenchConfig, requests: list[SampleRequest], offsets: np.ndarray
) -> tuple[list[RequestResult], float]:
    """Send each request at its offset (seconds after the start); (results in order, run seconds)."""
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()

    async def limited(request: SampleRequest) -> RequestResult:
        async with semaphore:
            return await send_request(client, config, request)

    async with httpx.AsyncClient(timeout=httpx.Timeout(config.timeout), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for request, offset in zip(requests, offsets.tolist()):
            if (delay := start + offset - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(request)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def run_benchmark(config: BenchConfig) -> BenchmarkResult:
    """Send ``config.num_prompts`` random requests at the configured rate and measure them.

    Ends within the arrival span plus ``ceil(num_prompts / max_concurrency) * timeout`` seconds
    (``timeout`` alone without a concurrency limit): each request is bounded, failures included.
    An empty ``config.model`` is filled from ``GET /v1/models``.

    Raises:
        BenchError: no ``--model`` given and the server lists none.
    """
    if not config.model:
        config.model = first_model(config.base_url, config.api_key)
    rng = np.random.default_rng(config.seed)
    requests = random_requests(config, rng)
    offsets = send_offsets(arrival_intervals(len(requests), config.request_rate, config.burstiness, rng))
    logger.info("sending %d requests to %s%s at %s req/s", len(requests), config.base_url, config.endpoint,
                config.request_rate)  # fmt: skip
    results, duration = asyncio.run(_run(config, requests, offsets))
    return BenchmarkResult(config, calculate_metrics(results, duration, config.percentiles), results)


def default_result_filename(config: BenchConfig) -> str:
    """``openai-{rate}qps[-concurrency{c}]-{model}-{YYYYmmdd-HHMMSS}.json``, as ``vllm bench serve`` names it."""
    concurrency = f"-concurrency{config.max_concurrency}" if config.max_concurrency else ""
    backend = "openai-chat" if config.chat else "openai"
    model = config.model.rstrip("/").split("/")[-1]
    return f"{backend}-{config.request_rate}qps{concurrency}-{model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def write_result(result: BenchmarkResult, result_dir: Path | None, filename: str | None) -> Path:
    """Write :meth:`BenchmarkResult.to_json_dict` and return the path."""
    path = Path(result_dir or ".") / (filename or default_result_filename(result.config))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json_dict(), indent=2))
    return path


def format_result(result: BenchmarkResult) -> str:
    """The ``vllm bench serve`` result table."""
    m, c = result.metrics, result.config
    rows = [("Successful requests:", m["completed"]), ("Failed requests:", m["failed"])]
    if c.max_concurrency is not None:
        rows.append(("Maximum request concurrency:", c.max_concurrency))
    if math.isfinite(c.request_rate):
        rows.append(("Request rate configured (RPS):", c.request_rate))
    rows += [("Benchmark duration (s):", m["duration"]), ("Total input tokens:", m["total_input_tokens"]),
             ("Total generated tokens:", m["total_output_tokens"]),
             ("Request throughput (req/s):", m["request_throughput"]),
             ("Output token throughput (tok/s):", m["output_throughput"]),
             ("Total Token throughput (tok/s):", m["total_token_throughput"])]  # fmt: skip
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    lines += [_row(label, value) for label, value in rows]
    for key, short, header in METRICS:
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        lines.append(_row(f"Mean {short} (ms):", m[f"mean_{key}_ms"]))
        lines.append(_row(f"Median {short} (ms):", m[f"median_{key}_ms"]))
        lines += [_row(f"P{_p_word(p)} {short} (ms):", m[f"p{_p_word(p)}_{key}_ms"]) for p in c.percentiles]
    lines.append("=" * 50)
    return "\n".join(lines)


def _row(label: str, value: float | int) -> str:
    return f"{label:<40} {value:<10}" if isinstance(value, int) else f"{label:<40} {value:<10.2f}"


# ----------------------------------------------------------------------------- CLI

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks against a running server.")


@bench_app.callback()
def _bench() -> None:
    """Benchmarks against a running OpenAI-compatible server."""


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise typer.BadParameter(f"--metric-percentiles wants comma-separated numbers, got {text!r}") from None


@bench_app.command("serve")
def serve_command(
    base_url: str = typer.Option("http://127.0.0.1:8000", help="Server address (shardserve, vLLM, SGLang)."),
    endpoint: str = typer.Option("/v1/completions", help="/v1/completions or /v1/chat/completions."),
    model: Optional[str] = typer.Option(None, help="Model name in requests (default: first id of GET /v1/models)."),
    dataset_name: str = typer.Option("random", help="Only 'random' for now."),
    num_prompts: int = typer.Option(1000, help="Requests to send."),
    request_rate: float = typer.Option(float("inf"), help="Mean requests per second; inf sends all at once."),
    burstiness: float = typer.Option(1.0, help="Gamma shape of arrivals: 1 is Poisson, <1 burstier."),
    seed: int = typer.Option(0, help="Seed for prompts and arrival times."),
    max_concurrency: Optional[int] = typer.Option(None, help="Requests in flight at most."),
    random_input_len: int = typer.Option(1024, help="Prompt tokens per request (words for chat)."),
    random_output_len: int = typer.Option(128, help="Output tokens per request (ignore_eos)."),
    random_range_ratio: float = typer.Option(0.0, help="Lengths drawn uniformly from len*(1-r) to len*(1+r)."),
    metric_percentiles: str = typer.Option("90,99", help="Percentiles to report, comma-separated."),
    api_key: Optional[str] = typer.Option(None, envvar="OPENAI_API_KEY", help="Bearer token."),
    timeout: float = typer.Option(3600.0, help="Seconds each request may take."),
    save_result: bool = typer.Option(False, "--save-result", help="Write the result as JSON."),
    result_dir: Optional[Path] = typer.Option(None, help="Directory for --save-result (default: cwd)."),
    result_filename: Optional[str] = typer.Option(None, help="File name for --save-result (default: vLLM's pattern)."),
) -> None:
    """Benchmark online serving: TTFT, TPOT, ITL, E2E latency and throughput, as `vllm bench serve`."""
    if dataset_name != "random":
        raise typer.BadParameter(f"only --dataset-name random is supported, got {dataset_name!r}")
    try:
        config = BenchConfig(
            base_url=base_url, endpoint=endpoint, model=model or "", num_prompts=num_prompts,
            request_rate=request_rate, burstiness=burstiness, seed=seed, max_concurrency=max_concurrency,
            random_input_len=random_input_len, random_output_len=random_output_len,
            random_range_ratio=random_range_ratio, api_key=api_key, timeout=timeout,
            percentiles=_percentiles(metric_percentiles),
        )  # fmt: skip
        distribution = "Poisson process" if burstiness == 1.0 else "Gamma distribution"
        typer.echo(f"Traffic request rate: {request_rate}\nBurstiness factor: {burstiness} ({distribution})\n"
                   f"Maximum request concurrency: {max_concurrency}")  # fmt: skip
        result = run_benchmark(config)
    except (ValueError, BenchError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_result(result))
    if result.metrics["failed"]:
        first = next(r.error for r in result.requests if not r.success)
        typer.echo(f"warning: {result.metrics['failed']} request(s) failed; first error: {first}", err=True)
    if save_result:
        typer.echo(f"Saved to {write_result(result, result_dir, result_filename)}")
    if result.metrics["completed"] == 0:
        raise typer.Exit(1)
