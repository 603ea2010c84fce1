"""Thin HTTP routes: parse, hand to the serving object, wrap the result."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from safesteer.server.access import authenticate
from safesteer.server.auth import Principal
from safesteer.server.metrics import ServerMetrics
from safesteer.server.protocol import ChatCompletionRequest, CompletionRequest, ModelList
from safesteer.server.serving import OpenAIServing

router = APIRouter()
Caller = Annotated[Principal, Depends(authenticate)]


def serving(request: Request) -> OpenAIServing:
    server: OpenAIServing = request.app.state.serving
    return server


def _respond(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(
        result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(request: Request) -> JSONResponse:
    """200 once every model's engine runs (503 otherwise), with each model's adapter."""
    registry = serving(request).registry
    models = {
        m.name: {"engine": m.engine.running, "adapter": m.adapter.id if m.adapter else None}
        for m in registry.models
    }
    ok = all(state["engine"] for state in models.values())
    return JSONResponse(
        {"status": "ready" if ok else "starting", "models": models},
        status_code=200 if ok else 503,
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    exported: ServerMetrics = request.app.state.metrics
    return Response(generate_latest(exported.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request, _: Caller) -> ModelList:
    return serving(request).models()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, who: Caller) -> Response:
    return _respond(await serving(request).chat(body, request, who))


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, who: Caller) -> Response:
    return _respond(await serving(request).completion(body, request, who))
