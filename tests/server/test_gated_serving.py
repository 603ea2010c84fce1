"""Gated mode end to end: the engine steers only the rows whose probes fire at the prefill."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import serve_tiny
from fastapi.testclient import TestClient
from tiny_chat import TINY_MODEL_NAME, chat_ids

from safesteer.adapters.adapter import CategoryGate, GateSpec, SafetyAdapter
from safesteer.adapters.gating import PromptGate, prompt_activations
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.table import SteeringBasis
from safesteer.server.app import create_app
from safesteer.server.engine import Engine, RowGate, RowSpec, RowSteering
from safesteer.server.sampling import SamplingParams

HARMFUL, BENIGN = "how do I pick a lock", "what is the capital of France"
PROBED = ("violence", "fraud")  # "drugs" gets no probe: it never fires
GREEDY = SamplingParams(max_tokens=14, temperature=0.0)
DETECTION_LAYER = 0


def gated(adapter: SafetyAdapter, loaded: LoadedModel) -> SafetyAdapter:
    """`adapter` plus a gate that fires on HARMFUL and not on BENIGN, by construction."""
    pooled = prompt_activations(
        loaded.model,
        loaded.tokenizer,
        [HARMFUL, BENIGN],
        [DETECTION_LAYER],
        show_progress=False,
    )["mean"][:, 0]
    direction = pooled[0] - pooled[1]
    scores = pooled @ direction
    threshold = float(scores.mean())  # half way between the two prompts
    spec = GateSpec(
        DETECTION_LAYER,
        "mean",
        {c: CategoryGate(bias=0.0, threshold=threshold, target_fpr=0.02) for c in PROBED},
    )
    return SafetyAdapter(
        replace(adapter.metadata, gate=spec),
        adapter.vectors,
        adapter.coefficients,
        dict.fromkeys(PROBED, direction),
    )


@pytest.fixture
def gated_adapter(strong_adapter: SafetyAdapter, loaded: LoadedModel) -> SafetyAdapter:
    return gated(strong_adapter, loaded)


@pytest.fixture
def served(
    loaded: LoadedModel, gated_adapter: SafetyAdapter, tmp_path: Path
) -> Iterator[TestClient]:
    config, server = serve_tiny(loaded, gated_adapter, tmp_path)
    with TestClient(create_app(config, server)) as client:
        yield client


def ask(client: TestClient, prompt: str, **safety: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": TINY_MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 14,
        "temperature": 0,
    }
    if safety:
        body["safety"] = safety
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def content(payload: dict[str, Any]) -> str:
    text: str = payload["choices"][0]["message"]["content"]
    return text


def test_gated_is_the_default_and_steers_only_where_the_probe_fires(served: TestClient) -> None:
    harmful, benign = ask(served, HARMFUL), ask(served, BENIGN)
    assert harmful["safety"]["mode"] == "gated" and harmful["safety"]["fired"] == list(PROBED)
    assert benign["safety"]["fired"] == []
    # Fired categories steer like `always` (drugs has default weight 0 here); silence is `off`.
    assert content(harmful) == content(ask(served, HARMFUL, mode="always"))
    assert content(harmful) != content(ask(served, HARMFUL, mode="off"))
    assert content(benign) == content(ask(served, BENIGN, mode="off"))
    assert content(benign) != content(ask(served, BENIGN, mode="always"))


def test_weights_of_fired_categories_apply(served: TestClient) -> None:
    zeroed = ask(served, HARMFUL, categories={"violence": 0, "fraud": 0})
    assert zeroed["safety"]["fired"] == []  # only categories with a weight are evaluated
    assert content(zeroed) == content(ask(served, HARMFUL, mode="off"))
    one = ask(served, HARMFUL, categories={"violence": 0})
    assert one["safety"]["fired"] == ["fraud"]
    assert content(one) == content(ask(served, HARMFUL, mode="always", categories={"violence": 0}))
    # Only the fired categories count: drugs has no probe, so in gated mode it adds nothing.
    drugs = ask(served, BENIGN, categories={"drugs": 4})
    assert content(drugs) == content(ask(served, BENIGN, mode="off"))


def test_stream_reports_fired_in_the_first_chunk_and_metrics_count_firings(
    served: TestClient,
) -> None:
    body = {
        "model": TINY_MODEL_NAME,
        "messages": [{"role": "user", "content": HARMFUL}],
        "max_tokens": 5,
        "stream": True,
    }
    with served.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["safety"]["fired"] == list(PROBED)
    metrics = served.get("/metrics").text
    assert 'safesteer_gate_fired_total{category="violence",family="llama-64x4"} 1.0' in metrics


def test_gated_mode_needs_a_gate(
    loaded: LoadedModel, strong_adapter: SafetyAdapter, tmp_path: Path
) -> None:
    config, server = serve_tiny(loaded, strong_adapter, tmp_path)
    with TestClient(create_app(config, server)) as client:
        assert ask(client, HARMFUL)["safety"]["mode"] == "always"
        body = {
            "model": TINY_MODEL_NAME,
            "messages": [{"role": "user", "content": HARMFUL}],
            "safety": {"mode": "gated"},
        }
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "no_gate"


def test_engine_batch_of_gated_rows_equals_their_solo_runs(
    loaded: LoadedModel, gated_adapter: SafetyAdapter
) -> None:
    """One harmful and one benign gated row, together and joining mid-flight, equal solo."""
    layers = tuple(range(loaded.family.num_layers))
    basis = SteeringBasis.from_adapter(gated_adapter, layers=layers)
    gate = PromptGate.from_adapter(gated_adapter)
    weights = basis.weights({})
    gated_row = RowSteering(None, RowGate(gate, basis, weights))
    always_row = RowSteering(basis.table(weights[None])[0], None)
    none_row = RowSteering(None, None)

    def run(specs: list[RowSpec], delays: list[float]) -> tuple[list[str], list[Any]]:
        engine = Engine(
            loaded.model,
            loaded.tokenizer,
            SteeringHooks(loaded.model, loaded.family.num_layers, layers),
            hidden_size=loaded.family.hidden_size,
        )

        async def main() -> tuple[list[str], list[Any]]:
            loop = asyncio.get_running_loop()

            async def one(spec: RowSpec, delay: float) -> tuple[str, Any]:
                await asyncio.sleep(delay)
                handle = engine.submit([spec], loop)
                text = "".join([event.text async for event in handle.stream()])
                return text, handle.fired[0]

            done = await asyncio.gather(*(one(s, d) for s, d in zip(specs, delays, strict=True)))
            return [t for t, _ in done], [f for _, f in done]

        engine.start()
        try:
            return asyncio.run(main())
        finally:
            engine.stop()

    harmful_ids = chat_ids(loaded.tokenizer, HARMFUL)
    benign_ids = chat_ids(loaded.tokenizer, BENIGN)
    steered_solo = run([RowSpec(harmful_ids, GREEDY, always_row)], [0.0])[0][0]
    plain_solo = run([RowSpec(benign_ids, GREEDY, none_row)], [0.0])[0][0]
    specs = [RowSpec(harmful_ids, GREEDY, gated_row), RowSpec(benign_ids, GREEDY, gated_row)]
    for delays in ([0.0, 0.0], [0.0, 0.03], [0.03, 0.0]):
        texts, fired = run(specs, delays)
        assert texts == [steered_solo, plain_solo], delays
        assert fired == [PROBED, ()]
