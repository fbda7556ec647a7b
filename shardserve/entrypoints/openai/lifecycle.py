"""How the HTTP server stops: a graceful drain on SIGTERM, and at once when the engine is gone for good.

SIGTERM (what Kubernetes and systemd send) stops admission at once (new requests get 503 and
``/health`` turns 503 so load balancers move away), lets the requests in flight finish for up to
``--shutdown-timeout`` seconds, aborts the rest (503, or a final SSE error event), then stops the
server. A second SIGTERM, or SIGINT, stops at once as plain uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

UNCOUNTED_PATHS = frozenset({"/health", "/metrics", "/version"})
"""Probes and scrapes do not hold a drain up."""
ABORT_GRACE_S = 5.0
"""After aborting, how long the drain waits for the aborted responses to be written (seconds)."""


@dataclass
class DrainState:
    """Requests in flight and whether the server is draining (one per server)."""

    draining: bool = False
    in_flight: int = 0
    """HTTP requests being handled, probes excluded; a stream counts until its last byte is sent."""
    aborted: int = 0
    """Requests still running when ``--shutdown-timeout`` passed (they were aborted)."""


class InFlightCounter:
    """ASGI middleware that keeps :attr:`DrainState.in_flight` up to date."""

    def __init__(self, app: ASGIApp, drain: DrainState) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


async def drain(state: Any, timeout: float) -> None:
    """Stop admitting, wait up to ``timeout`` s for the requests in flight, then abort the rest.

    ``state`` is the server's ``ServerState`` (its ``drain`` and ``engine``).
    """
    ds: DrainState = state.drain
    ds.draining = True
    loop = asyncio.get_running_loop()
    logger.warning("shutting down: no new requests; waiting up to %.0f s for %d in flight", timeout, ds.in_flight)
    deadline = loop.time() + timeout
    while ds.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if not ds.in_flight:
        logger.info("drained: every request finished")
        return
    ds.aborted = ds.in_flight
    logger.warning("aborting %d request(s) still running after %.0f s (--shutdown-timeout)", ds.aborted, timeout)
    abort_all = getattr(state.engine, "abort_all", None)
    if abort_all is not None:
        abort_all(f"the server shut down before the request finished (--shutdown-timeout {timeout:g} s)")
    deadline = loop.time() + ABORT_GRACE_S
    while ds.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)


class GracefulServer(uvicorn.Server):
    """uvicorn that drains on the first SIGTERM instead of closing its sockets at once."""

    def __init__(self, config: uvicorn.Config, state: Any, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not re-raised after the drain (uvicorn re-raises captured signals): a clean drain exits 0.
        if sig == signal.SIGTERM and self.begin_drain():
            return
        super().handle_exit(sig, frame)

    def begin_drain(self) -> bool:
        """Start the drain (thread-safe); False if it cannot start (not serving, or already draining)."""
        if self._loop is None or self.should_exit or self.state.drain.draining:
            return False
        self.state.drain.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)
        return True

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(drain(self.state, self.shutdown_timeout))
        self._drain_task.add_done_callback(lambda _: setattr(self, "should_exit", True))
