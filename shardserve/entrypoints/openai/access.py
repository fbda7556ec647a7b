"""Who may call the server: the API key, CORS for browsers, and a warning for an open public bind.

``/v1/*``, ``/generate`` (and ``/metrics`` with ``--protect-metrics``) need ``Authorization: Bearer
<key>`` when ``--api-key`` is set; ``/health`` stays public for probes. The key is compared in constant
time so response timing does not leak it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

from shardserve.config import ServerConfig
from shardserve.entrypoints.openai.protocol import InvalidRequestError

logger = logging.getLogger(__name__)


def check_api_key(config: ServerConfig, request: Request) -> None:
    """Accept the request if no key is configured or it carries the right Bearer token.

    Raises:
        InvalidRequestError: 401 ``invalid_api_key``.
    """
    if config.api_key is None:
        return
    # Header values arrive decoded as latin-1; back to their bytes for the comparison.
    given = request.headers.get("authorization", "").encode("latin-1")
    expected = f"Bearer {config.api_key}".encode()
    if not hmac.compare_digest(given, expected):
        raise InvalidRequestError("Incorrect or missing API key.", code="invalid_api_key", status=401)


def install_cors(app: FastAPI, config: ServerConfig) -> None:
    """Add starlette's CORS middleware when ``--allowed-origins`` is given (none otherwise)."""
    if not config.allowed_origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=config.allowed_origins,
        allow_methods=config.allowed_methods,
        allow_headers=config.allowed_headers,
        allow_credentials=config.allow_credentials,
    )


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for 0.0.0.0 and the rest."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_open(config: ServerConfig) -> None:
    """Log a warning when the server listens beyond this machine without an API key."""
    if config.api_key is None and not is_loopback(config.host):
        logger.warning(
            "listening on %s without --api-key: anyone who can reach port %d can use the model; "
            "set --api-key or bind 127.0.0.1",
            config.host,
            config.port,
        )
