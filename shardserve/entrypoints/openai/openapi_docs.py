"""Request-body schemas in ``/openapi.json`` for routes that parse their bodies themselves.

The POST routes read the raw body (to enforce the size limit and answer errors in OpenAI's shape), so
FastAPI cannot infer their bodies; these helpers describe them from the pydantic models, so that
clients and API fuzzers (schemathesis) know what to send.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

REF_TEMPLATE = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model`` (nested models are referenced)."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def publish_body_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add the nested definitions that :func:`request_body` references to the app's ``components``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = build()  # caches the dict it returns in app.openapi_schema; completed in place below
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            for name, definition in model.model_json_schema(ref_template=REF_TEMPLATE).get("$defs", {}).items():
                schemas.setdefault(name, definition)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
