"""Engine invariants on a tiny model: batching never changes a row's greedy output."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch
from tiny_chat import chat_ids, plain_greedy

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.table import SteeringBasis
from safesteer.server.engine import Engine, EngineFailed, QueueFull, RowSpec, RowSteering
from safesteer.server.sampling import SamplingParams

PROMPTS = ["hello there", "a much longer prompt about the weather today", "x", "tell me a story"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def make_engine(loaded: LoadedModel, adapter: SafetyAdapter | None, **kw: Any) -> Engine:
    hooks = SteeringHooks(loaded.model, 4, adapter.layers) if adapter else None
    return Engine(loaded.model, loaded.tokenizer, hooks, hidden_size=64, **kw)


NONE = RowSteering(None, None)


def steering_rows(adapter: SafetyAdapter) -> list[RowSteering]:
    basis = SteeringBasis.from_adapter(adapter)
    mixes: list[dict[str, float] | None] = [
        {},
        None,
        {"violence": 0.0, "fraud": 3.0},
        {"drugs": 4.0, "violence": 0.5},
    ]
    return [
        NONE if mix is None else RowSteering(basis.table(basis.weights(mix)[None])[0], None)
        for mix in mixes
    ]


async def _run(engine: Engine, specs: list[RowSpec], delays: list[float]) -> list[list[str]]:
    loop = asyncio.get_running_loop()

    async def one(spec: RowSpec, delay: float) -> list[str]:
        await asyncio.sleep(delay)
        handle = engine.submit([spec], loop)
        return [event.text async for event in handle.stream()]

    return await asyncio.gather(*(one(s, d) for s, d in zip(specs, delays, strict=True)))


def run_requests(engine: Engine, specs: list[RowSpec], delays: list[float]) -> list[str]:
    engine.start()
    try:
        return ["".join(parts) for parts in asyncio.run(_run(engine, specs, delays))]
    finally:
        engine.stop()


def test_rows_in_a_mixed_batch_equal_their_solo_runs(
    loaded: LoadedModel, strong_adapter: SafetyAdapter
) -> None:
    rows = steering_rows(strong_adapter)
    specs = [
        RowSpec(chat_ids(loaded.tokenizer, p), GREEDY, s)
        for p, s in zip(PROMPTS, rows, strict=True)
    ]
    solo = [run_requests(make_engine(loaded, strong_adapter), [s], [0.0])[0] for s in specs]
    together = run_requests(make_engine(loaded, strong_adapter), specs, [0.0] * len(specs))
    assert together == solo
    # The steering is strong enough to matter: the first prompt unsteered reads differently.
    unsteered = RowSpec(specs[0].prompt_ids, GREEDY, NONE)
    assert run_requests(make_engine(loaded, strong_adapter), [unsteered], [0.0])[0] != solo[0]


def test_rows_joining_mid_flight_equal_their_solo_runs(
    loaded: LoadedModel, strong_adapter: SafetyAdapter
) -> None:
    rows = steering_rows(strong_adapter)
    long = SamplingParams(max_tokens=40, temperature=0.0)
    specs = [
        RowSpec(chat_ids(loaded.tokenizer, p), long, s) for p, s in zip(PROMPTS, rows, strict=True)
    ]
    solo = [run_requests(make_engine(loaded, strong_adapter), [s], [0.0])[0] for s in specs]
    staggered = run_requests(make_engine(loaded, strong_adapter), specs, [0.0, 0.02, 0.05, 0.08])
    assert staggered == solo


def test_unsteered_row_equals_plain_generate(loaded: LoadedModel) -> None:
    ids = chat_ids(loaded.tokenizer, "hello there")
    text = run_requests(make_engine(loaded, None), [RowSpec(ids, GREEDY, NONE)], [0.0])[0]
    assert text == plain_greedy(loaded, ids, GREEDY.max_tokens)


def test_seeded_sampling_is_reproducible(loaded: LoadedModel) -> None:
    ids = chat_ids(loaded.tokenizer, "hello")

    def sample(seed: int) -> str:
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
        return run_requests(make_engine(loaded, None), [RowSpec(ids, params, NONE)], [0.0])[0]

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_cancelled_request_leaves_the_batch_within_a_step(loaded: LoadedModel) -> None:
    forwards = 0

    def slow_counted_forward(*_: Any) -> None:
        nonlocal forwards
        forwards += 1
        time.sleep(0.01)  # slow steps, so the row is surely still decoding when cancelled

    loaded.model.register_forward_pre_hook(slow_counted_forward)
    engine = make_engine(loaded, None)
    engine.start()
    try:

        async def scenario() -> None:
            long = SamplingParams(max_tokens=200, temperature=0.0, min_tokens=200)
            handle = engine.submit([RowSpec([1, 2, 3], long, NONE)], asyncio.get_running_loop())
            await handle.events.get()  # decoding has started
            while engine.active_rows == 0:  # the first token goes out just before the join
                await asyncio.sleep(0.001)
            handle.cancel()
            cancelled_at = forwards
            deadline = time.monotonic() + 5
            while engine.active_rows and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert engine.active_rows == 0
            assert forwards - cancelled_at <= 1

        asyncio.run(scenario())
    finally:
        engine.stop()


def test_full_queue_is_refused(loaded: LoadedModel) -> None:
    engine = make_engine(loaded, None, max_queue=2)  # not started: nothing leaves the queue

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(2):
            engine.submit([RowSpec([1, 2], GREEDY, NONE)], loop)
        with pytest.raises(QueueFull):
            engine.submit([RowSpec([1, 2], GREEDY, NONE)], loop)

    asyncio.run(scenario())


def test_token_budget_holds_back_requests_that_do_not_fit(loaded: LoadedModel) -> None:
    engine = make_engine(loaded, None, max_tokens_in_flight=40)
    ids = chat_ids(loaded.tokenizer, "hi")  # ~20 tokens + 12 completion: one row fits, not two
    specs = [RowSpec(ids, GREEDY, NONE) for _ in range(3)]
    peak = 0

    def record_batch(_module: Any, args: Any, kwargs: Any) -> None:
        nonlocal peak
        peak = max(peak, int(kwargs["input_ids"].shape[0]))

    loaded.model.register_forward_pre_hook(record_batch, with_kwargs=True)
    texts = run_requests(engine, specs, [0.0, 0.0, 0.0])
    assert peak == 1
    assert len(set(texts)) == 1


def test_a_failing_request_does_not_disturb_the_running_batch(
    loaded: LoadedModel, strong_adapter: SafetyAdapter
) -> None:
    ids = chat_ids(loaded.tokenizer, "hello there")
    good = RowSpec(ids, SamplingParams(max_tokens=30, temperature=0.0), NONE)
    broken = RowSpec(ids, GREEDY, RowSteering(torch.ones(5, 5), None))  # wrong shape
    solo = run_requests(make_engine(loaded, strong_adapter), [good], [0.0])[0]
    engine = make_engine(loaded, strong_adapter)
    engine.start()
    try:

        async def scenario() -> tuple[str, BaseException | None]:
            loop = asyncio.get_running_loop()
            first = engine.submit([good], loop)
            await first.events.get()  # the good row is decoding
            second = engine.submit([broken], loop)
            error: BaseException | None = None
            try:
                [event async for event in second.stream()]
            except EngineFailed as exc:
                error = exc
            rest = "".join([event.text async for event in first.stream()])
            return rest, error

        rest, error = asyncio.run(scenario())
    finally:
        engine.stop()
    assert isinstance(error, EngineFailed)
    assert solo.endswith(rest) and len(rest) > 0
