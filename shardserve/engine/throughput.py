"""Token throughput over a sliding window, fed by the engine loop once per step."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

DEFAULT_WINDOW_S = 10.0


class TokenThroughput:
    """Prompt and generation tokens per second over the last ``window_s`` seconds.

    Prompt tokens are the prefill tokens each step computed (prefix-cache hits are not computed, so they
    do not count), as vLLM's "prompt throughput" counts them; generation tokens are the tokens each step
    sampled. Thread-safe: the engine thread calls :meth:`add`, the HTTP thread :meth:`rates`.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._start = clock()
        self._events: deque[tuple[float, int, int]] = deque()
        self._lock = threading.Lock()

    def add(self, prompt_tokens: int, generation_tokens: int) -> None:
        """Count one step's computed prompt tokens and sampled tokens."""
        if not (prompt_tokens or generation_tokens):
            return
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
