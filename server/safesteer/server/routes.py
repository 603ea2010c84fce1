"""Thin HTTP routes: parse, hand to the serving object, wrap the result."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from safesteer.server.protocol import ChatCompletionRequest, CompletionRequest, ModelList
from safesteer.server.serving import OpenAIServing

router = APIRouter()


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


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return serving(request).models()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return _respond(await serving(request).chat(body, request))


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return _respond(await serving(request).completion(body, request))
