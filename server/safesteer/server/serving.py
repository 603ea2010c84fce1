"""The OpenAI serving object: validates a request, queues its rows, shapes the response."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import Request

from safesteer.server.auth import Principal
from safesteer.server.engine import EngineFailed, QueueFull, RequestHandle, RowSpec
from safesteer.server.errors import (
    APIError,
    ContextLengthExceeded,
    EngineFailure,
    InvalidRequest,
    ServerOverloaded,
    UnsupportedParameter,
)
from safesteer.server.metrics import ServerMetrics
from safesteer.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SafetyReport,
    SamplingFields,
    Usage,
)
from safesteer.server.registry import ModelRegistry, ServedModel
from safesteer.server.sampling import SamplingParams
from safesteer.server.settings import Settings
from safesteer.server.steering import resolve_safety

DISCONNECT_POLL_S = 0.25


class ClientDisconnected(Exception):
    """The client went away before its response was complete."""


@dataclass
class PreparedRequest:
    """A validated request, ready to queue: one row per choice."""

    served: ServedModel
    rows: list[RowSpec]
    prompt_tokens: int
    report: SafetyReport


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class OpenAIServing:
    """Stateful side of the OpenAI endpoints; routes stay thin."""

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: ServerMetrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.started = int(time.time())

    # ----- models ---------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=m.name,
                    created=self.started,
                    family=m.loaded.family.id,
                    family_alias=m.loaded.family.alias,
                    adapter=m.adapter.id if m.adapter else None,
                    context_length=m.loaded.context_length,
                )
                for m in self.registry.models
            ]
        )

    # ----- request preparation ------------------------------------------------------------
    def _prepare(
        self,
        served: ServedModel,
        request: SamplingFields,
        prompts: Sequence[list[int]],
        token_limit: int | None,
        principal: Principal,
    ) -> PreparedRequest:
        for param, why in request.unsupported():
            raise UnsupportedParameter(param, why)
        if request.n > self.settings.max_n:
            raise InvalidRequest(f"n must be at most {self.settings.max_n}", param="n")
        try:
            stops = tuple(request.stop_list())
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="stop") from exc
        steering, report = resolve_safety(served, request.safety, principal)
        context = served.loaded.context_length
        rows: list[RowSpec] = []
        for prompt in prompts:
            if not prompt:
                raise InvalidRequest("the prompt is empty", param="prompt")
            room = context - len(prompt)
            max_tokens = token_limit or min(self.settings.default_max_tokens, room)
            if room <= 0 or len(prompt) + max_tokens > context:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {context} tokens. However, you "
                    f"requested {len(prompt) + (token_limit or 0)} tokens ({len(prompt)} in the "
                    f"prompt, {token_limit or 0} for the completion). Please reduce the length "
                    "of the prompt or of the completion.",
                    param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                )
            for choice in range(request.n):
                seed = None if request.seed is None else request.seed + choice
                params = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    seed=seed,
                    stop=stops,
                    min_tokens=request.min_completion_tokens(max_tokens),
                )
                rows.append(RowSpec(list(prompt), params, steering))
        return PreparedRequest(served, rows, sum(map(len, prompts)) * request.n, report)

    def _chat_prompt(self, served: ServedModel, request: ChatCompletionRequest) -> list[int]:
        tokenizer = served.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(
                f"model {served.name!r} has no chat template; use /v1/completions",
                param="messages",
            )
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
        return [int(t) for t in ids]

    def _completion_prompts(
        self, served: ServedModel, request: CompletionRequest
    ) -> list[list[int]]:
        prompt = request.prompt
        vocab = int(served.loaded.model.config.get_text_config().vocab_size)
        batches: list[str | list[int]]
        if isinstance(prompt, str):
            batches = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            batches = [[int(p) for p in prompt]]  # type: ignore[arg-type]
        else:
            batches = list(prompt)  # type: ignore[arg-type]
        if not batches:
            raise InvalidRequest("the prompt is empty", param="prompt")
        out: list[list[int]] = []
        for item in batches:
            if isinstance(item, str):
                out.append(served.loaded.tokenizer(item)["input_ids"])
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise InvalidRequest(f"token ids must be within 0..{vocab - 1}", param="prompt")
                out.append(list(item))
        return out

    def _submit(self, prepared: PreparedRequest) -> RequestHandle:
        served = prepared.served
        try:
            handle = served.engine.submit(prepared.rows, asyncio.get_running_loop())
        except QueueFull as exc:
            raise ServerOverloaded(
                f"the server is busy ({exc}); retry shortly", code="queue_full"
            ) from exc
        self.metrics.prompt_tokens.labels(served.name).inc(prepared.prompt_tokens)
        if prepared.report.mode == "always":
            family = served.loaded.family.id
            for category, weight in prepared.report.categories.items():
                if weight > 0:
                    self.metrics.category_applied.labels(family, category).inc()
        return handle

    def _final_report(self, prepared: PreparedRequest, handle: RequestHandle) -> SafetyReport:
        """The report with the categories that fired on any of the request's prompts.

        Call once per request, after its first event (the engine sets `fired` at prefill).
        """
        report = prepared.report
        if report.fired is None:
            return report
        hits = {name for names in handle.fired if names for name in names}
        fired = [name for name in report.categories if name in hits]
        family = prepared.served.loaded.family.id
        for name in fired:
            self.metrics.gate_fired.labels(family, name).inc()
        return report.model_copy(update={"fired": fired})

    def _generated(self, served: ServedModel, completion_tokens: int) -> None:
        self.metrics.completion_tokens.labels(served.name).inc(completion_tokens)

    # ----- endpoints ----------------------------------------------------------------------
    async def chat(
        self, request: ChatCompletionRequest, raw: Request, principal: Principal
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        served = self.registry.get(request.model)
        prepared = self._prepare(
            served,
            request,
            [self._chat_prompt(served, request)],
            request.token_limit(),
            principal,
        )
        handle = self._submit(prepared)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return self._chat_stream(prepared, handle, include_usage)
        texts, reasons, completion = await _collect(handle, raw)
        self._generated(served, completion)
        return ChatCompletionResponse(
            model=served.name,
            choices=[
                ChatChoice(index=i, message=ChatResponseMessage(content=t), finish_reason=r)
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ],
            usage=_usage(prepared.prompt_tokens, completion),
            safety=self._final_report(prepared, handle),
        )

    async def completion(
        self, request: CompletionRequest, raw: Request, principal: Principal
    ) -> CompletionResponse | AsyncIterator[str]:
        served = self.registry.get(request.model)
        prepared = self._prepare(
            served,
            request,
            self._completion_prompts(served, request),
            request.token_limit(),
            principal,
        )
        handle = self._submit(prepared)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return self._completion_stream(prepared, handle, include_usage)
        texts, reasons, completion = await _collect(handle, raw)
        self._generated(served, completion)
        return CompletionResponse(
            model=served.name,
            choices=[
                CompletionChoice(index=i, text=t, finish_reason=r)
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ],
            usage=_usage(prepared.prompt_tokens, completion),
            safety=self._final_report(prepared, handle),
        )

    # ----- streaming ----------------------------------------------------------------------
    def _chat_stream(
        self, prepared: PreparedRequest, handle: RequestHandle, include_usage: bool
    ) -> AsyncIterator[str]:
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        name = prepared.served.name

        def chunk(choices: list[ChatChunkChoice], **extra: object) -> str:
            body = ChatCompletionChunk(
                id=chunk_id, created=created, model=name, choices=choices, **extra
            )
            return sse(body.model_dump_json(exclude_none=True))

        async def events() -> AsyncIterator[str]:
            completion, started, first = 0, time.perf_counter(), True
            async for event in handle.stream():
                if first:  # after the prefill: the gate has decided
                    first = False
                    yield chunk(
                        [
                            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                            for i in range(len(prepared.rows))
                        ],
                        safety=self._final_report(prepared, handle),
                    )
                if started and event.text:
                    self.metrics.time_to_first_token.labels(name).observe(
                        time.perf_counter() - started
                    )
                    started = 0.0
                completion += event.completion_tokens if event.finish_reason else 0
                yield chunk(
                    [
                        ChatChunkChoice(
                            index=event.row,
                            delta=ChatDelta(content=event.text or None),
                            finish_reason=event.finish_reason,
                        )
                    ]
                )
            self._generated(prepared.served, completion)
            if include_usage:
                yield chunk([], usage=_usage(prepared.prompt_tokens, completion))

        return _guarded_stream(events(), handle)

    def _completion_stream(
        self, prepared: PreparedRequest, handle: RequestHandle, include_usage: bool
    ) -> AsyncIterator[str]:
        chunk_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        name = prepared.served.name

        async def events() -> AsyncIterator[str]:
            completion, first, started = 0, True, time.perf_counter()
            async for event in handle.stream():
                if started and event.text:
                    self.metrics.time_to_first_token.labels(name).observe(
                        time.perf_counter() - started
                    )
                    started = 0.0
                completion += event.completion_tokens if event.finish_reason else 0
                body = CompletionResponse(
                    id=chunk_id,
                    created=created,
                    model=name,
                    choices=[
                        CompletionChoice(
                            index=event.row, text=event.text, finish_reason=event.finish_reason
                        )
                    ],
                    safety=self._final_report(prepared, handle) if first else None,
                )
                first = False
                yield sse(body.model_dump_json(exclude_none=True))
            self._generated(prepared.served, completion)
            if include_usage:
                body = CompletionResponse(
                    id=chunk_id,
                    created=created,
                    model=name,
                    choices=[],
                    usage=_usage(prepared.prompt_tokens, completion),
                )
                yield sse(body.model_dump_json(exclude_none=True))

        return _guarded_stream(events(), handle)


async def _guarded_stream(events: AsyncIterator[str], handle: RequestHandle) -> AsyncIterator[str]:
    """Send events then `[DONE]`; an error after the 200 is one error chunk; always free rows."""
    try:
        async for item in events:
            yield item
    except EngineFailed as exc:
        yield sse(json.dumps(EngineFailure(str(exc)).body()))
    except APIError as exc:
        yield sse(json.dumps(exc.body()))
    finally:
        handle.cancel()
    yield sse("[DONE]")


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


async def _collect(handle: RequestHandle, raw: Request) -> tuple[list[str], list[str], int]:
    """Wait for every row of a non-streaming request; free its rows if the client leaves."""
    count = len(handle.rows)
    texts, reasons = [""] * count, ["stop"] * count
    completion = 0

    async def watch() -> None:
        while not await raw.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        handle.cancel()
        handle.events.put_nowait(ClientDisconnected())

    watcher = asyncio.create_task(watch())
    try:
        async for event in handle.stream():
            texts[event.row] += event.text
            if event.finish_reason is not None:
                reasons[event.row] = event.finish_reason
                completion += event.completion_tokens
    except EngineFailed as exc:
        raise EngineFailure(str(exc)) from exc
    finally:
        watcher.cancel()
        handle.cancel()
    return texts, reasons, completion
