"""The decode engine: one thread owns the model; requests join the running batch between steps.

Continuous batching: a new request is prefilled on its own, then its KV cache is left-padded
and stacked onto the running batch's cache, so it decodes alongside rows that started earlier.
Rows leave as soon as they finish or their client goes away. Each row carries its own
sampling settings, stop sequences and steering row; a `[rows, layers, hidden]` steering table
is kept in step with the batch and handed to the hooks for every forward pass.

All model compute stays on this one thread: per-request worker threads make the OpenMP
thread pools of PyTorch fight each other and halve CPU throughput.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from safesteer.adapters.gating import PromptGate
from safesteer.adapters.hooks import Observers, SteeringHooks
from safesteer.adapters.padding import left_pad
from safesteer.adapters.table import SteeringBasis
from safesteer.server.detokenize import TextStream
from safesteer.server.sampling import RowSampler, SamplingParams

log = logging.getLogger(__name__)
Observer = Callable[[torch.Tensor], None]


class QueueFull(Exception):
    """More requests are waiting than the engine accepts."""


class EngineFailed(Exception):
    """The model step failed for this request (details are in the server log)."""


@dataclass(frozen=True, eq=False)
class RowGate:
    """Gated steering of a row: `basis.table(weights * fired)`, `fired` decided at prefill."""

    gate: PromptGate
    basis: SteeringBasis
    weights: torch.Tensor  # [categories], strength included


@dataclass(frozen=True, eq=False)
class RowSteering:
    """A row's steering: a fixed `[hook layers, hidden]` part and/or a gated part."""

    fixed: torch.Tensor | None
    gated: RowGate | None

    @property
    def none(self) -> bool:
        return self.fixed is None and self.gated is None


@dataclass(frozen=True)
class RowSpec:
    """One sequence to generate: a choice of a request."""

    prompt_ids: list[int]
    params: SamplingParams
    steering: RowSteering


@dataclass(frozen=True)
class RowEvent:
    """New text for row `row`; `finish_reason` is set on the row's last event."""

    row: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


class RequestHandle:
    """The asyncio side of a request: events arrive on `events`; `cancel()` frees its rows."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rows: list[RowSpec]) -> None:
        self.rows = rows
        # Per row, the gated categories that fired at the prefill (None: row not gated). Set
        # by the engine thread before the row's first event is emitted.
        self.fired: list[tuple[str, ...] | None] = [None] * len(rows)
        self.events: asyncio.Queue[RowEvent | Exception] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: RowEvent | Exception) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancel()

    async def stream(self) -> AsyncIterator[RowEvent]:
        """Yield events until every row has finished; raise the engine's error if one came."""
        remaining = len(self.rows)
        while remaining:
            event = await self.events.get()
            if isinstance(event, Exception):
                raise event
            if event.finish_reason is not None:
                remaining -= 1
            yield event


def _budget(spec: RowSpec) -> int:
    """Tokens a row may hold in the KV cache: its prompt and its longest completion."""
    return len(spec.prompt_ids) + spec.params.max_tokens


@dataclass
class _Row:
    handle: RequestHandle
    index: int
    params: SamplingParams
    sampler: RowSampler
    text: TextStream
    budget: int
    completion_tokens: int = 0
    finished: bool = False


@dataclass
class _Batch:
    """Rows decoding together, their KV cache and the per-row tensors kept in step with it."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, cached positions], 0 where left padding
    next_input: torch.Tensor  # [rows] last chosen token, not yet in the cache
    next_position: torch.Tensor  # [rows] position id of next_input
    table: torch.Tensor  # [rows, hook layers, hidden], zero rows where steering is off
    steered: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def rows_handles(self) -> list[RequestHandle]:
        return [row.handle for row in self.rows]


def _joinable(cache: DynamicCache) -> bool:
    """Only full-attention dynamic caches can be padded and stacked."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _kv_layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer key/value holders (DynamicLayer: `.keys`, `.values`)."""
    return list(cache.layers)


def _pad_cache_left(cache: DynamicCache, amount: int) -> None:
    if amount:
        for layer in _kv_layers(cache):
            layer.keys = F.pad(layer.keys, (0, 0, amount, 0))
            layer.values = F.pad(layer.values, (0, 0, amount, 0))


class Engine:
    """Runs a model on one thread and serves many requests through continuous batching."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        hooks: SteeringHooks | None,
        *,
        hidden_size: int,
        max_batch_size: int = 16,
        max_tokens_in_flight: int = 65536,
        max_queue: int = 256,
        threads: int | None = None,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._hooks = hooks
        self._hidden_size = hidden_size
        self._hook_layers = len(hooks.layers) if hooks else 0
        self.max_batch_size = max_batch_size
        self.max_tokens_in_flight = max_tokens_in_flight
        self.max_queue = max_queue
        self._threads = threads
        self._eos = self._eos_ids(model, tokenizer)
        self._pad_id = int(tokenizer.pad_token_id)
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._wake = threading.Condition()
        self._batch: _Batch | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
        ids: set[int] = set()
        configured = getattr(model.generation_config, "eos_token_id", None)
        for value in (tokenizer.eos_token_id, configured):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    # ----- asyncio side ---------------------------------------------------------------------
    def submit(self, rows: list[RowSpec], loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Queue a request; raises QueueFull when `max_queue` requests already wait."""
        handle = RequestHandle(loop, rows)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        batch = self._batch
        return len(batch) if batch else 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="safesteer-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ----- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._batch:
                        self._wake.wait()
                    if self._stopping:
                        break
                    admitted = self._take_admissible()
                if admitted:
                    self._admit(admitted)
                if self._batch:
                    try:
                        self._decode_step()
                    except Exception:  # a failed step fails its rows, never the engine
                        log.exception("decode step failed")
                        self._fail(self._batch.rows_handles())
                        self._batch = None
        handles = list(self._waiting) + (self._batch.rows_handles() if self._batch else [])
        self._fail(handles, "the server is shutting down")

    def _take_admissible(self) -> list[RequestHandle]:
        """Pop waiting requests that fit into free rows (called with the lock held)."""
        if self._batch is not None and not _joinable(self._batch.cache):
            return []
        running = self._batch.rows if self._batch else []
        free_rows = self.max_batch_size - len(running)
        free_tokens = self.max_tokens_in_flight - sum(r.budget for r in running)
        taken: list[RequestHandle] = []
        while self._waiting:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                continue
            budget = sum(_budget(spec) for spec in head.rows)
            fits = len(head.rows) <= free_rows and budget <= free_tokens
            if not fits and (taken or running):  # an oversized request still runs alone
                break
            taken.append(self._waiting.popleft())
            free_rows -= len(head.rows)
            free_tokens -= budget
        return taken

    @staticmethod
    def _fail(
        handles: list[RequestHandle], why: str = "generation failed; see the server log"
    ) -> None:
        for handle in {id(h): h for h in handles}.values():
            handle.emit(EngineFailed(why))
            handle.cancel()

    def _steering(
        self, table: torch.Tensor, steered: list[bool], observers: Observers | None
    ) -> AbstractContextManager[None]:
        if self._hooks is None or not (any(steered) or observers):
            return nullcontext()
        return self._hooks.steering(table, observers=observers)

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        table: torch.Tensor,
        steered: list[bool],
        observers: Observers | None = None,
    ) -> torch.Tensor:
        with self._steering(table, steered, observers):
            out = self._model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Prefill new requests and join them to the batch; a failure fails only them."""
        try:
            new = self._prefill(handles)
        except Exception:
            log.exception("prefill failed")
            self._fail(handles)
            return
        try:
            self._batch = new if self._batch is None else self._merge(self._batch, new)
            self._drop_finished()
        except Exception:  # the running batch may be half-merged: fail all of it
            log.exception("joining the batch failed")
            self._fail(handles + (self._batch.rows_handles() if self._batch else []))
            self._batch = None

    def _prefill(self, handles: list[RequestHandle]) -> _Batch:
        """Prefill the new rows together and choose their first tokens.

        Gated rows get their steering inside this pass: an observer on each detection layer
        evaluates the rows' probes and writes their table rows before any later layer runs.
        """
        rows: list[_Row] = []
        specs: list[RowSpec] = []
        for handle in handles:
            for index, spec in enumerate(handle.rows):
                rows.append(
                    _Row(
                        handle,
                        index,
                        spec.params,
                        RowSampler(spec.params),
                        TextStream(self._tokenizer, spec.params.stop),
                        _budget(spec),
                    )
                )
                specs.append(spec)
        input_ids, mask = left_pad([spec.prompt_ids for spec in specs], self._pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        table = torch.zeros((len(rows), self._hook_layers, self._hidden_size))
        steered = [False] * len(rows)
        for i, spec in enumerate(specs):
            if spec.steering.fixed is not None:
                table[i] = spec.steering.fixed
                steered[i] = True
        gated = [(i, spec.steering.gated) for i, spec in enumerate(specs) if spec.steering.gated]
        fired: dict[int, tuple[str, ...]] = {}
        observers = self._gate_observers(gated, mask, table, steered, fired) if gated else None
        cache = DynamicCache(config=self._model.config)
        logits = self._forward(input_ids, mask, positions, cache, table, steered, observers)
        for i, names in fired.items():
            rows[i].handle.fired[rows[i].index] = names
        new = _Batch(
            rows=rows,
            cache=cache,
            mask=mask,
            next_input=torch.zeros(len(rows), dtype=torch.long),
            next_position=positions[:, -1] + 1,
            table=table,
            steered=steered,
        )
        self._choose_tokens(new, logits)
        return new

    @staticmethod
    def _gate_observers(
        gated: list[tuple[int, RowGate]],
        mask: torch.Tensor,
        table: torch.Tensor,
        steered: list[bool],
        fired: dict[int, tuple[str, ...]],
    ) -> Observers:
        """Per detection layer, a callback deciding its rows' gated steering in place."""
        groups: dict[tuple[int, int], list[tuple[int, RowGate]]] = {}
        for i, row_gate in gated:
            key = (row_gate.gate.detection_layer, id(row_gate.gate))
            groups.setdefault(key, []).append((i, row_gate))
        by_layer: dict[int, list[list[tuple[int, RowGate]]]] = {}
        for (layer, _), members in groups.items():
            by_layer.setdefault(layer, []).append(members)

        def observer(
            groups_here: list[list[tuple[int, RowGate]]],
        ) -> Callable[[torch.Tensor], None]:
            def observe(hidden: torch.Tensor) -> None:
                for members in groups_here:
                    index = torch.tensor([i for i, _ in members])
                    gate, basis = members[0][1].gate, members[0][1].basis
                    weights = torch.stack([g.weights for _, g in members])
                    hits = gate.fired(hidden[index], mask[index]) & weights.ne(0)
                    table[index] += basis.table(weights * hits)
                    for (i, _), names in zip(members, gate.names(hits), strict=True):
                        fired[i] = tuple(names)
                        steered[i] = steered[i] or bool(names)

            return observe

        return {layer: observer(groups_here) for layer, groups_here in by_layer.items()}

    @staticmethod
    def _merge(old: _Batch, new: _Batch) -> _Batch:
        width = max(old.mask.shape[1], new.mask.shape[1])
        for batch in (old, new):
            pad = width - batch.mask.shape[1]
            _pad_cache_left(batch.cache, pad)
            batch.mask = F.pad(batch.mask, (pad, 0))
        for old_layer, new_layer in zip(_kv_layers(old.cache), _kv_layers(new.cache), strict=True):
            old_layer.keys = torch.cat([old_layer.keys, new_layer.keys])
            old_layer.values = torch.cat([old_layer.values, new_layer.values])
        return _Batch(
            rows=old.rows + new.rows,
            cache=old.cache,
            mask=torch.cat([old.mask, new.mask]),
            next_input=torch.cat([old.next_input, new.next_input]),
            next_position=torch.cat([old.next_position, new.next_position]),
            table=torch.cat([old.table, new.table]),
            steered=old.steered + new.steered,
        )

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None
        mask = torch.cat([batch.mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=1)
        logits = self._forward(
            batch.next_input[:, None],
            mask,
            batch.next_position[:, None],
            batch.cache,
            batch.table,
            batch.steered,
        )
        batch.mask = mask
        batch.next_position = batch.next_position + 1
        self._choose_tokens(batch, logits)
        self._drop_finished()

    def _choose_tokens(self, batch: _Batch, logits: torch.Tensor) -> None:
        early = [i for i, r in enumerate(batch.rows) if r.completion_tokens < r.params.min_tokens]
        if early and self._eos:
            rows = torch.tensor(early)[:, None]
            logits[rows, torch.tensor(sorted(self._eos))[None, :]] = float("-inf")
        greedy = logits.argmax(dim=-1)
        for i, row in enumerate(batch.rows):
            if row.finished or row.handle.cancelled:
                continue
            token = int(greedy[i]) if row.params.greedy else row.sampler.sample(logits[i])
            batch.next_input[i] = token
            self._accept(row, token)

    def _accept(self, row: _Row, token: int) -> None:
        row.completion_tokens += 1
        reason: str | None = None
        if token in self._eos:
            text, reason = row.text.finish(), "stop"
        else:
            text = row.text.push(token)
            if row.text.stopped:
                reason = "stop"
            elif row.completion_tokens >= row.params.max_tokens:
                text, reason = text + row.text.finish(), "length"
        if text or reason:
            row.handle.emit(RowEvent(row.index, text, reason, row.completion_tokens))
        row.finished = reason is not None

    def _drop_finished(self) -> None:
        batch = self._batch
        assert batch is not None
        keep = [i for i, r in enumerate(batch.rows) if not r.finished and not r.handle.cancelled]
        if len(keep) == len(batch):
            return
        if not keep:
            self._batch = None
            return
        index = torch.tensor(keep)
        batch.cache.batch_select_indices(index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask = batch.mask[index]
        batch.next_input = batch.next_input[index]
        batch.next_position = batch.next_position[index]
        batch.table = batch.table[index]
        batch.steered = [batch.steered[i] for i in keep]
        # Columns that are padding for every remaining row cost attention time: drop them.
        lead = int((batch.mask.sum(0) == 0).cumprod(0).sum())
        if lead:
            batch.mask = batch.mask[:, lead:]
            for layer in _kv_layers(batch.cache):
                layer.keys = layer.keys[:, :, lead:]
                layer.values = layer.values[:, :, lead:]
