"""Prometheus metrics of the HTTP server, named like vLLM's under a ``shardserve:`` prefix.

Gauges (running / waiting requests, KV cache usage) are read from ``engine.stats()`` at scrape
time. Request metrics (TTFT, inter-token latency, end-to-end latency, token counters) are observed
by the serving layer from the output stream it consumes, with ``time.monotonic()`` timestamps;
prefix-cache queries and hits count prompt tokens when a request ends.
Histogram buckets are vLLM v1's (``vllm/v1/metrics/loggers.py``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shardserve.outputs import RequestOutput

if TYPE_CHECKING:
    from shardserve.engine.async_llm import EngineStats

logger = logging.getLogger(__name__)

PREFIX = "shardserve:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """All server metrics, in a registry of their own (so several servers in one process do not clash).

    Every metric carries the ``model_name`` label, as vLLM's do.
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.num_requests_running = Gauge(
            PREFIX + "num_requests_running", "Requests in the running batch.", labels, registry=r
        )
        self.num_requests_waiting = Gauge(
            PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r
        )
        self.kv_cache_usage_perc = Gauge(
            PREFIX + "kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", labels, registry=r
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens of finished requests.", labels, registry=r
        )
        self.prefix_cache_queries = Counter(
            PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels, registry=r
        )
        self.prefix_cache_hits = Counter(
            PREFIX + "prefix_cache_hits", "Prompt tokens served from the prefix cache.", labels, registry=r
        )
        self.request_success = Counter(
            PREFIX + "request_success",
            "Finished completions by finish reason.",
            labels + ["finished_reason"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from arrival to the first generated token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Seconds between consecutive outputs of one completion.",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Seconds from arrival to the end of the request.",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )

    def update_engine_stats(self, stats: EngineStats | None) -> None:
        """Refresh the gauges from an engine snapshot (zeros while no engine is loaded)."""
        m = self.model_name
        self.num_requests_running.labels(m).set(stats.num_running if stats else 0)
        self.num_requests_waiting.labels(m).set(stats.num_waiting if stats else 0)
        self.kv_cache_usage_perc.labels(m).set(stats.kv_cache_usage if stats else 0.0)

    def render(self, stats: EngineStats | None) -> bytes:
        """The Prometheus text exposition, gauges refreshed from ``stats``."""
        self.update_engine_stats(stats)
        return generate_latest(self.registry)

    def track(self, arrival_time: float | None = None) -> RequestTracker:
        """Start tracking one engine request (one prompt, all its ``n`` completions)."""
        return RequestTracker(self, time.monotonic() if arrival_time is None else arrival_time)


class RequestTracker:
    """Observes one request's stream: TTFT, inter-token latencies, and at the end E2E and token counts."""

    def __init__(self, metrics: ServerMetrics, arrival_time: float) -> None:
        self._metrics = metrics
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self._last_token_time: dict[int, float] = {}
        self._num_tokens: dict[int, int] = {}
        self._finish_reasons: dict[int, str] = {}
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._done = False

    def observe(self, output: RequestOutput) -> None:
        """Record one yield of the engine stream."""
        now = time.monotonic()
        m = self._metrics
        self._prompt_tokens = len(output.prompt_token_ids)
        self._cached_tokens = output.num_cached_tokens or 0
        for completion in output.outputs:
            if completion.delta_token_ids:
                if self.first_token_time is None:
                    # A non-streamed request's one output comes at its end: the engine's own time is the TTFT.
                    engine_first = output.metrics.first_token_time if output.metrics is not None else None
                    self.first_token_time = engine_first if engine_first is not None else now
                    m.time_to_first_token.labels(m.model_name).observe(self.first_token_time - self.arrival_time)
                last = self._last_token_time.get(completion.index)
                if last is not None:
                    m.inter_token_latency.labels(m.model_name).observe(now - last)
                self._last_token_time[completion.index] = now
            self._num_tokens[completion.index] = completion.num_output_tokens
            if completion.finish_reason is not None:
                self._finish_reasons[completion.index] = completion.finish_reason

    def finish(self, n: int) -> None:
        """Count the request as ended; completions with no finish reason count as ``abort``. Idempotent."""
        if self._done:
            return
        self._done = True
        m = self._metrics
        m.e2e_request_latency.labels(m.model_name).observe(time.monotonic() - self.arrival_time)
        m.prompt_tokens.labels(m.model_name).inc(self._prompt_tokens)
        m.prefix_cache_queries.labels(m.model_name).inc(self._prompt_tokens)
        m.prefix_cache_hits.labels(m.model_name).inc(self._cached_tokens)
        m.generation_tokens.labels(m.model_name).inc(sum(self._num_tokens.values()))
        for index in range(n):
            reason = self._finish_reasons.get(index, "abort")
            m.request_success.labels(m.model_name, reason).inc()
