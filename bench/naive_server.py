"""The naive peer of serving_bench.py: HF `model.generate`, one request at a time, under a lock.

A minimal OpenAI-ish `POST /v1/chat/completions` (plain and SSE streaming, greedy only) plus
`GET /health`, on the same packaged model that safesteer serves. All model compute runs on
one persistent worker thread (a thread per request would make PyTorch's OpenMP pools fight),
and an asyncio lock serializes requests: this is the floor a batching server must beat.

    .venv/bin/python bench/naive_server.py --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from safesteer.adapters.loading import DEFAULT_MODEL, LoadedModel, load_model


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(64, ge=1, le=2048)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class TokenSink:
    """A `generate` streamer: hands each new token id to the event loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]) -> None:
        self._loop = loop
        self._queue = queue
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, int(token))

    def end(self) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)


class NaiveEngine:
    """Greedy generation of one request at a time on one persistent thread."""

    def __init__(self, loaded: LoadedModel, threads: int | None) -> None:
        self.loaded = loaded
        self.lock = asyncio.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="naive-generate")
        if threads:
            self._worker.submit(torch.set_num_threads, threads).result()

    def prompt_ids(self, request: ChatRequest) -> torch.Tensor:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        encoded = self.loaded.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids: torch.Tensor = encoded["input_ids"]
        return ids

    def _generate(self, ids: torch.Tensor, request: ChatRequest, sink: TokenSink) -> None:
        tokenizer = self.loaded.tokenizer
        with torch.inference_mode():
            self.loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=request.max_tokens,
                min_new_tokens=request.max_tokens if request.ignore_eos else 0,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                streamer=sink,
            )

    async def tokens(self, request: ChatRequest) -> AsyncIterator[int]:
        """Yield the completion's token ids as they are generated (holding the lock)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        ids = self.prompt_ids(request)
        async with self.lock:
            job = loop.run_in_executor(
                self._worker, self._generate, ids, request, TokenSink(loop, queue)
            )
            while (token := await queue.get()) is not None:
                yield token
            await job


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chunk(chunk_id: str, delta: dict[str, str], finish: str | None) -> str:
    body: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": DEFAULT_MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


def _finish_reason(count: int, request: ChatRequest) -> str:
    return "length" if count >= request.max_tokens else "stop"


async def _stream(engine: NaiveEngine, request: ChatRequest) -> AsyncIterator[str]:
    chunk_id, decode = f"chatcmpl-{uuid.uuid4().hex}", _decoder(engine)
    prompt = int(engine.prompt_ids(request).shape[1])
    yield _chunk(chunk_id, {"role": "assistant", "content": ""}, None)
    ids: list[int] = []
    async for token in engine.tokens(request):
        ids.append(token)
        yield _chunk(chunk_id, {"content": decode(ids)}, None)
    yield _chunk(chunk_id, {}, _finish_reason(len(ids), request))
    if request.stream_options and request.stream_options.include_usage:
        usage = {"id": chunk_id, "object": "chat.completion.chunk", "choices": []}
        yield f"data: {json.dumps({**usage, 'usage': _usage(prompt, len(ids))})}\n\n"
    yield "data: [DONE]\n\n"


def _decoder(engine: NaiveEngine) -> Callable[[list[int]], str]:
    """Incremental detokenizer: the text the latest token added."""
    tokenizer, done = engine.loaded.tokenizer, [""]

    def decode(ids: list[int]) -> str:
        text = str(tokenizer.decode(ids, skip_special_tokens=True))
        new, done[0] = text[len(done[0]) :], text
        return new

    return decode


async def _complete(engine: NaiveEngine, request: ChatRequest) -> dict[str, Any]:
    prompt = int(engine.prompt_ids(request).shape[1])
    ids = [token async for token in engine.tokens(request)]
    text = str(engine.loaded.tokenizer.decode(ids, skip_special_tokens=True))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": DEFAULT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": _finish_reason(len(ids), request),
            }
        ],
        "usage": _usage(prompt, len(ids)),
    }


def create_app(engine: NaiveEngine) -> FastAPI:
    app = FastAPI(title="naive HF generate server")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: ChatRequest) -> StreamingResponse | JSONResponse:
        if request.stream:
            return StreamingResponse(_stream(engine, request), media_type="text/event-stream")
        return JSONResponse(await _complete(engine, request))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec for load_model")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    engine = NaiveEngine(load_model(args.model), args.threads)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
