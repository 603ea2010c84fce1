"""`create_app(settings)`: the FastAPI application, its lifespan and its one error mapping."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from safesteer.server.admin_routes import admin_router
from safesteer.server.auth import KeyStore
from safesteer.server.errors import (
    APIError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ServerOverloaded,
)
from safesteer.server.logs import RequestIdMiddleware
from safesteer.server.metrics import MetricsMiddleware, ServerMetrics
from safesteer.server.routes import router
from safesteer.server.serving import OpenAIServing
from safesteer.server.settings import Settings
from safesteer.server.startup import Server, build_server

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def error_response(exc: APIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, ServerOverloaded) else None
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)


def _validation_error(exc: RequestValidationError) -> InvalidRequest:
    """FastAPI's 422 becomes OpenAI's 400, naming the field; never echoes the input."""
    errors = exc.errors()
    if not errors:
        return InvalidRequest("invalid request")
    first = errors[0]
    # Drop "body" and the union-branch tags pydantic puts into locations ("str", "list[int]").
    loc = [
        str(part)
        for part in first.get("loc", ())
        if part != "body" and not (isinstance(part, str) and (part in _TYPE_TAGS or "[" in part))
    ]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return InvalidRequest("the request body is not valid JSON", code="invalid_json")
    if not param and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return InvalidRequest("the request body must be a JSON object", code="invalid_body")
    if first.get("type") == "missing" and param:
        return InvalidRequest(f"'{param}' is required", param=param)
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.url.path}"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"{request.method} is not allowed here"))
        error = APIError(str(exc.detail))
        error.status_code = exc.status_code
        return error_response(error)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(APIError("internal server error; see the server log"))


def create_app(settings: Settings | None = None, server: Server | None = None) -> FastAPI:
    """Build the app. Without `server`, models and adapters load at startup from `settings`."""
    settings = settings or Settings()
    keys = KeyStore.load(settings.keys_file) if settings.keys_file is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        built = server or build_server(settings)
        metrics = ServerMetrics(built.registry)
        built.admin.swap_listeners.append(
            lambda family, _record: metrics.adapter_swaps.labels(family.family.id).inc()
        )
        app.state.metrics = metrics
        app.state.admin = built.admin
        app.state.serving = OpenAIServing(built.registry, settings, metrics)
        built.registry.start()
        try:
            yield
        finally:
            built.registry.stop()

    app = FastAPI(title="safesteer", version="0.1.0", lifespan=lifespan)
    app.state.keys = keys
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_router)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
