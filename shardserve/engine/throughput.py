"""Token throughput over a sliding window, fed from the engine's output stream."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from shardserve.outputs import RequestOutput

DEFAULT_WINDOW_S = 10.0


class TokenThroughput:
    """Prompt and generation tokens per second over the last ``window_s`` seconds.

    Prompt tokens are counted when a request's first token comes out (its prefill is done), less
    the prefix-cached ones (they were not computed), as vLLM's "prompt throughput" counts computed
    prefill tokens. Generation tokens are the output tokens of every step. Thread-safe: the engine
    thread calls :meth:`observe`, the HTTP thread :meth:`rates`.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._start = clock()
        self._events: deque[tuple[float, int, int]] = deque()
        self._lock = threading.Lock()

    def observe(self, output: RequestOutput) -> None:
        """Count the new tokens of one engine output."""
        generated = sum(len(c.delta_token_ids) for c in output.outputs)
        first = any(c.token_ids and len(c.token_ids) == len(c.delta_token_ids) for c in output.outputs)
        prompt = max(0, len(output.prompt_token_ids) - (output.num_cached_tokens or 0)) if first else 0
        if generated or prompt:
            self.add(prompt, generated)

    def add(self, prompt_tokens: int, generation_tokens: int) -> None:
        now = self._clock()
        with self._lock:
            self._events.append((now, prompt_tokens, generation_tokens))
            self._prune(now)

    def rates(self) -> tuple[float, float]:
        """(prompt tokens/s, generation tokens/s) over the window (or since start, if shorter)."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            prompt = sum(e[1] for e in self._events)
            generated = sum(e[2] for e in self._events)
        span = max(min(self.window_s, now - self._start), 1e-3)
        return prompt / span, generated / span

    def _prune(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
